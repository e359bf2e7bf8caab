"""Out-of-core GGUF export of checkpoint folders: byte-identical to the in-memory export, memory
bounded by the largest tensor, resumable after an interruption, and the same bytes on Ray."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffulex_edge.errors import ConfigError, CorruptFileError, NonFiniteWeightError, UnsupportedFormatError
from diffulex_edge.export import Checkpoint, export_gguf, export_gguf_checkpoint, plan_gguf_checkpoint
from diffulex_edge.export import stream as stream_mod
from diffulex_edge.gguf import GGUFFile
from diffulex_edge.testing import write_synthetic_checkpoint

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, tie_word_embeddings=False)


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "llama"
    write_synthetic_checkpoint(str(d), SMALL, dtype="bf16", shard_bytes=150_000, seed=3)
    return str(d)


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """The in-memory export of the same checkpoint (the model loaded by transformers)."""
    out = tmp_path_factory.mktemp("ref") / "ref.gguf"
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    export_gguf(model, out, "Q4_K_M", name="m", show_progress=False)
    return str(out)


def test_checkpoint_reads_shards_without_loading(ckpt):
    c = Checkpoint(ckpt)
    assert len(c.shards()) > 1 and len(c) == 2 + 9 * 2 + 1  # embed, norm, lm_head + 9 per layer
    ref = c["model.layers.1.mlp.down_proj.weight"]
    assert ref.dtype == "BF16" and ref.shape == (128, 256)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    want = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(ref.load(), want)  # bf16 -> f32 is exact
    assert "Checkpoint(" in repr(c) and "shard(s)" in repr(c)


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_every_float_dtype_loads_exactly(tmp_path, dtype):
    d = tmp_path / dtype
    write_synthetic_checkpoint(str(d), SMALL, dtype=dtype, seed=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    got = Checkpoint(str(d))["model.layers.0.self_attn.q_proj.weight"].load()
    np.testing.assert_array_equal(got, model.model.layers[0].self_attn.q_proj.weight.detach().numpy())


def test_same_bytes_as_the_in_memory_export(ckpt, reference, tmp_path):
    out = tmp_path / "m.gguf"
    rep = export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False)
    assert sha(out) == sha(reference)
    assert not os.path.exists(str(out) + ".partial") and not os.path.exists(str(out) + ".partial.json")
    assert rep.input_bytes == Checkpoint(ckpt).nbytes and rep.seconds > 0 and rep.resumed_tensors == 0
    assert rep.nbytes == sum(t.nbytes for t in GGUFFile.read(out).tensors.values())


def test_tied_embeddings_imatrix_and_profile_match_in_memory(tmp_path):
    d = tmp_path / "tied"
    write_synthetic_checkpoint(str(d), {**SMALL, "tie_word_embeddings": True}, seed=5)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    rng = np.random.default_rng(0)
    im = {f"blk.{i}.{k}.weight": rng.random(n).astype(np.float32) + 0.1 for i in range(2)
          for k, n in (("attn_q", 128), ("attn_k", 128), ("attn_v", 128), ("attn_output", 128), ("ffn_gate", 128),
                       ("ffn_up", 128), ("ffn_down", 256))}
    kw = dict(imatrix=im, name="t", profile="attention-high-precision", overrides={"ffn_down": "Q8_0"})
    export_gguf(model, tmp_path / "a.gguf", "Q3_K_M", show_progress=False, **kw)
    export_gguf_checkpoint(d, tmp_path / "b.gguf", "Q3_K_M", tokenizer=None, show_progress=False, **kw)
    assert sha(tmp_path / "a.gguf") == sha(tmp_path / "b.gguf")
    assert "output.weight" not in GGUFFile.read(tmp_path / "b.gguf").tensors


class _Interrupt:
    """Make `_encode_one` raise KeyboardInterrupt on its `n`-th call."""

    def __init__(self, n):
        self.n, self.calls, self.real = n, 0, stream_mod._encode_one

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.real(*a, **k)


def test_interrupt_then_resume_gives_the_same_file(ckpt, reference, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the user's old file")
    monkeypatch.setattr(stream_mod, "_encode_one", _Interrupt(7))
    with pytest.raises(KeyboardInterrupt):
        export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False)
    assert out.read_bytes() == b"the user's old file"  # the target is untouched until the end
    journal = (tmp_path / "m.gguf.partial.json").read_text().splitlines()
    assert len(journal) == 1 + 6  # header line + the 6 tensors written
    monkeypatch.undo()
    rep = export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False)
    assert rep.resumed_tensors == 6
    assert sha(out) == sha(reference)
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_a_torn_journal_line_redoes_that_tensor(ckpt, reference, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    monkeypatch.setattr(stream_mod, "_encode_one", _Interrupt(5))
    with pytest.raises(KeyboardInterrupt):
        export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False)
    monkeypatch.undo()
    j = tmp_path / "m.gguf.partial.json"
    lines = j.read_text().splitlines()
    j.write_text("\n".join(lines[:-1] + [lines[-1][:7]]) + "\n")  # the last record cut short by a crash
    # ... and that tensor's bytes overwritten with garbage: it must be redone, not trusted
    partial = tmp_path / "m.gguf.partial"
    f = GGUFFile.read(partial)
    t = f.tensors[json.loads(lines[-1])["name"]]
    with open(partial, "r+b") as fh:
        fh.seek(f.data_offset + t.offset)
        fh.write(b"\xaa" * t.nbytes)
    rep = export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False)
    assert rep.resumed_tensors == 3
    assert sha(out) == sha(reference)


def test_a_partial_file_of_another_plan_is_started_over(ckpt, reference, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    monkeypatch.setattr(stream_mod, "_encode_one", _Interrupt(4))
    with pytest.raises(KeyboardInterrupt):
        export_gguf_checkpoint(ckpt, out, "Q8_0", name="m", tokenizer=None, show_progress=False)
    monkeypatch.undo()
    rep = export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False)
    assert rep.resumed_tensors == 0 and sha(out) == sha(reference)
    # resume=False ignores a matching partial file too
    monkeypatch.setattr(stream_mod, "_encode_one", _Interrupt(4))
    with pytest.raises(KeyboardInterrupt):
        export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False)
    monkeypatch.undo()
    rep = export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False, resume=False)
    assert rep.resumed_tensors == 0 and sha(out) == sha(reference)


def test_kill_9_then_resume(ckpt, reference, tmp_path):
    """A process killed outright mid-export (no Python cleanup at all) resumes to the same file."""
    out = tmp_path / "m.gguf"
    code = (
        "import os, sys; from diffulex_edge.export import stream as s\n"
        "real = s._encode_one; n = [0]\n"
        "def enc(*a):\n"
        "    n[0] += 1\n"
        "    if n[0] == 9: os.kill(os.getpid(), 9)\n"
        "    return real(*a)\n"
        "s._encode_one = enc\n"
        f"s.export_gguf_checkpoint({ckpt!r}, {str(out)!r}, 'Q4_K_M', name='m', tokenizer=None, show_progress=False)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert not out.exists() and (tmp_path / "m.gguf.partial").exists()
    rep = export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, show_progress=False)
    assert rep.resumed_tensors == 8 and sha(out) == sha(reference)


def test_bad_weights_fail_and_leave_nothing(tmp_path):
    d = tmp_path / "nan"
    write_synthetic_checkpoint(str(d), SMALL, dtype="f32", seed=2)
    ref = Checkpoint(str(d))["model.layers.1.self_attn.v_proj.weight"]
    with open(ref.file, "r+b") as fh:  # one NaN in the middle of a weight
        fh.seek(ref.offset + 4 * 1000)
        fh.write(np.array([np.nan], np.float32).tobytes())
    out = tmp_path / "m.gguf"
    with pytest.raises(NonFiniteWeightError, match="blk.1.attn_v.weight|v_proj"):
        export_gguf_checkpoint(d, out, "Q4_K_M", tokenizer=None, show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["nan"]


def test_corrupt_and_unsupported_checkpoints_are_named(tmp_path):
    d = tmp_path / "c"
    write_synthetic_checkpoint(str(d), SMALL, dtype="bf16", shard_bytes=150_000)
    shards = Checkpoint(str(d)).shards()
    # truncated shard
    with open(shards[1], "r+b") as fh:
        fh.truncate(os.path.getsize(shards[1]) - 10)
    with pytest.raises(CorruptFileError, match=os.path.basename(shards[1])):
        Checkpoint(str(d))
    # not safetensors at all
    with open(shards[1], "wb") as fh:
        fh.write(b"\xff" * 100)
    with pytest.raises(CorruptFileError, match="header length"):
        Checkpoint(str(d))
    # header that is not JSON
    with open(shards[1], "wb") as fh:
        fh.write((8).to_bytes(8, "little") + b"{not json")
    with pytest.raises(CorruptFileError, match="JSON"):
        Checkpoint(str(d))
    # a shard the index names is missing
    os.unlink(shards[1])
    with pytest.raises(FileNotFoundError, match=os.path.basename(shards[1])):
        Checkpoint(str(d))
    # pickles only
    e = tmp_path / "bin"
    e.mkdir()
    (e / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (e / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        Checkpoint(str(e))


def test_int_tensors_and_config_mismatches_are_refused(tmp_path):
    d = tmp_path / "q"
    write_synthetic_checkpoint(str(d), SMALL, dtype="f32")
    f = os.path.join(d, "model.safetensors")
    raw = open(f, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["dtype"] = "I32"
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    with open(f, "wb") as fh:
        fh.write(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(UnsupportedFormatError, match="model.norm.weight.*I32"):
        Checkpoint(str(d))
    # a config that disagrees with the weights' shapes
    e = tmp_path / "s"
    write_synthetic_checkpoint(str(e), SMALL)
    cfg = json.loads((e / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (e / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="mlp.gate_proj.weight.*512"):
        plan_gguf_checkpoint(e)
    # a missing tensor
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 256, 3
    (e / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model.layers.2"):
        plan_gguf_checkpoint(e)


_RSS_CHILD = """
import json, resource, sys
from diffulex_edge.export import Checkpoint, export_gguf_checkpoint
Checkpoint(sys.argv[1]).skeleton()   # imports and the meta model: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
export_gguf_checkpoint(sys.argv[1], sys.argv[2], "Q8_0", tokenizer=None, show_progress=False)
print(json.dumps({"base_kib": base, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_peak_memory_is_a_tensor_not_the_model(tmp_path):
    """A 16-layer checkpoint of ~100 MB exports with far less memory than it holds: the growth
    of the peak RSS over the baseline stays within a few copies of the largest tensor (f32)."""
    cfg = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=8,
               num_key_value_heads=8, vocab_size=4096)
    d = tmp_path / "big"
    total = write_synthetic_checkpoint(str(d), cfg, dtype="bf16", shard_bytes=32 * 2**20)
    largest_f32 = 4 * 4096 * 512
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(d), str(tmp_path / "m.gguf")], env=env,
                       capture_output=True, text=True, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grew = (m["peak_kib"] - m["base_kib"]) * 1024
    # the model in float32 would be 2x `total`; one tensor in f32, its bf16 map and its encoding
    # come to ~1.8x `largest_f32`
    assert grew < 4 * largest_f32 + 8 * 2**20 < total, (grew, total)


_RAY_CHILD = """
import json, os, sys
import numpy as np
import ray
from diffulex_edge.errors import NonFiniteWeightError
from diffulex_edge.export import Checkpoint, export_gguf_checkpoint
from diffulex_edge.export import stream
from diffulex_edge.testing import write_synthetic_checkpoint
ckpt, out, fault, bad, small = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
env = {stream.FAULT_ONCE_ENV: fault + ":blk.1.ffn_up.weight"}
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
rep = export_gguf_checkpoint(ckpt, out, "Q4_K_M", name="m", tokenizer=None, executor="ray", show_progress=False,
                             max_in_flight=3)
write_synthetic_checkpoint(bad, small, dtype="f32", seed=2)
ref = Checkpoint(bad)["model.layers.0.mlp.down_proj.weight"]
with open(ref.file, "r+b") as fh:
    fh.seek(ref.offset + 4 * 77)
    fh.write(np.array([np.nan], np.float32).tobytes())
try:
    export_gguf_checkpoint(bad, out + ".bad.gguf", "Q4_K_M", tokenizer=None, executor="ray", show_progress=False)
    error = None
except NonFiniteWeightError as e:
    error = str(e)
ray.shutdown()
print(json.dumps({"input_bytes": rep.input_bytes, "error": error}))
"""


def test_ray_gives_the_same_bytes_and_retries_a_lost_task(ckpt, reference, tmp_path):
    """On a local 2-CPU Ray instance (in a child process, so Ray's threads and environment stay
    out of the test process and the tests after it), with the worker encoding one tensor killed
    once: the same file as the in-memory export; a task's bad-data error reaches the caller as
    itself and leaves nothing behind."""
    pytest.importorskip("ray")
    fault = tmp_path / "fault"
    fault.mkdir()
    out = tmp_path / "m.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", _RAY_CHILD, ckpt, str(out), str(fault), str(tmp_path / "nan"),
                        json.dumps(SMALL)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert sha(out) == sha(reference)
    assert (fault / "blk.1.ffn_up.weight.crashed").exists()  # the worker did die once
    assert res["input_bytes"] == Checkpoint(ckpt).nbytes
    assert res["error"] and ("down_proj" in res["error"] or "ffn_down" in res["error"])
    assert not any(p.name.startswith("m.gguf.bad") for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="executor"):
        export_gguf_checkpoint(ckpt, out, "Q4_K_M", executor="dask")


def test_cli_gguf_streams_a_safetensors_folder(ckpt, reference, tmp_path, capsys):
    from diffulex_edge import cli

    out = tmp_path / "m.gguf"
    assert cli.main(["gguf", ckpt, "-o", str(out), "--name", "m"]) == 0
    assert sha(out) == sha(reference)
    assert "GB of weights" in capsys.readouterr().out
    assert cli.main(["gguf", ckpt, "-o", str(out), "--name", "m", "--no-resume"]) == 0
    assert sha(out) == sha(reference)


def test_an_edited_plan_is_written_and_checked(ckpt, tmp_path):
    from diffulex_edge.export import write_gguf_resumable

    plan = plan_gguf_checkpoint(ckpt, "Q4_K_M", tokenizer=None)
    i = next(k for k, p in enumerate(plan.tensors) if p.gguf_name == "blk.0.ffn_up.weight")
    plan.tensors[i] = plan.tensors[i]._replace(ggml_type="Q8_0", reason="mine")
    rep = write_gguf_resumable(plan, tmp_path / "m.gguf", show_progress=False)
    assert GGUFFile.read(tmp_path / "m.gguf").tensors["blk.0.ffn_up.weight"].ggml_type == "Q8_0"
    assert rep.tensors[i].reason == "mine"
    plan.tensors[i] = plan.tensors[i]._replace(ggml_type="Q9_9")
    with pytest.raises(UnsupportedFormatError, match="blk.0.ffn_up.weight"):
        write_gguf_resumable(plan, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf.partial").exists()
