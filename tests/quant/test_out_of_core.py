"""quantize_checkpoint: a checkpoint folder quantized one tensor at a time into the same files
`quantize_` + `save_quantized_pretrained` write for the loaded model, resumable."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from diffulex_edge import hf
from diffulex_edge.errors import ConfigError, NonFiniteWeightError
from diffulex_edge.export import Checkpoint
from diffulex_edge.quant import QuantizationConfig, QuantizedLinear, quantize_, quantize_checkpoint
from diffulex_edge.quant import out_of_core as ooc
from diffulex_edge.testing import write_synthetic_checkpoint

pytest.importorskip("transformers")

CFG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=256)


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def folder(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "m"
    write_synthetic_checkpoint(str(d), {**CFG, "tie_word_embeddings": request.param}, shard_bytes=300_000, seed=4)
    return str(d)


def in_memory(folder, out, config, **kw):
    model, _ = hf.load_model(folder)
    r = quantize_(model, config, show_progress=False, **kw)
    hf.save_quantized_pretrained(model, str(out), folder, info=r.to_dict())
    return model, r


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "q4_K", "w8a8-dynamic", "bf16"])
def test_same_file_as_the_in_memory_path(folder, tmp_path, scheme):
    model, r1 = in_memory(folder, tmp_path / "a", scheme)
    r2 = quantize_checkpoint(folder, tmp_path / "b", scheme, show_progress=False)
    assert digest(tmp_path / "a" / hf.QUANTIZED_WEIGHTS) == digest(tmp_path / "b" / hf.QUANTIZED_WEIGHTS)
    assert (r2.original_size_bytes, r2.quantized_size_bytes) == (r1.original_size_bytes, r1.quantized_size_bytes)
    assert [x.name for x in r2.layers] == [x.name for x in r1.layers] and r2.skipped == r1.skipped
    assert [x.weight_rel_error for x in r2.layers] == pytest.approx([x.weight_rel_error for x in r1.layers], rel=1e-6)
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "quantization.json", "quantized.safetensors"]
    assert json.loads((tmp_path / "b" / "quantization.json").read_text())["out_of_core"] is True
    loaded, _ = hf.load_model(str(tmp_path / "b"))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_imatrix_and_excludes_as_in_memory(folder, tmp_path):
    rng = np.random.default_rng(1)
    model, _ = hf.load_model(folder)
    im = {n: rng.random(m.in_features).astype(np.float32) + 0.05 for n, m in model.named_modules()
          if isinstance(m, torch.nn.Linear)}
    cfg = QuantizationConfig(dtype="int4", group_size=32, exclude_layers=["*.o_proj"])
    in_memory(folder, tmp_path / "a", cfg, imatrix=im)
    r = quantize_checkpoint(folder, tmp_path / "b", cfg, imatrix=im, show_progress=False)
    assert digest(tmp_path / "a" / hf.QUANTIZED_WEIGHTS) == digest(tmp_path / "b" / hf.QUANTIZED_WEIGHTS)
    assert "model.layers.0.self_attn.o_proj" in r.skipped


class _Interrupt:
    def __init__(self, n):
        self.n, self.calls, self.real = n, 0, QuantizedLinear.from_linear

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.real(*a, **k)


def test_interrupt_then_resume(folder, tmp_path, monkeypatch):
    _, r = in_memory(folder, tmp_path / "a", "q4_K")
    out = tmp_path / "b"
    monkeypatch.setattr(QuantizedLinear, "from_linear", _Interrupt(6))
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(folder, out, "q4_K", show_progress=False)
    assert not (out / hf.QUANTIZED_WEIGHTS).exists() and (out / ooc.STAGING).exists()
    monkeypatch.undo()
    # a record torn by the crash: that unit is redone
    j = out / (ooc.STAGING + ".json")
    lines = j.read_text().splitlines()
    j.write_text("\n".join(lines[:-1] + [lines[-1][:10]]) + "\n")
    calls = _Interrupt(10**9)
    monkeypatch.setattr(QuantizedLinear, "from_linear", calls)
    quantize_checkpoint(folder, out, "q4_K", show_progress=False)
    assert calls.calls == len(r.layers) - 5 + 1  # 5 layers were done, the last one's record is torn
    assert digest(tmp_path / "a" / hf.QUANTIZED_WEIGHTS) == digest(out / hf.QUANTIZED_WEIGHTS)
    assert not (out / ooc.STAGING).exists() and not j.exists()


def test_a_staging_file_of_another_run_is_started_over(folder, tmp_path, monkeypatch):
    in_memory(folder, tmp_path / "a", "int8")
    out = tmp_path / "b"
    monkeypatch.setattr(QuantizedLinear, "from_linear", _Interrupt(3))
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(folder, out, "int4-g32", show_progress=False)
    monkeypatch.undo()
    quantize_checkpoint(folder, out, "int8", show_progress=False)
    assert digest(tmp_path / "a" / hf.QUANTIZED_WEIGHTS) == digest(out / hf.QUANTIZED_WEIGHTS)


def test_bad_input(tmp_path):
    d = tmp_path / "m"
    write_synthetic_checkpoint(str(d), CFG, dtype="f32")
    with pytest.raises(ConfigError, match="static"):
        quantize_checkpoint(d, tmp_path / "o", "w8a8-static")
    with pytest.raises(ConfigError, match="one format"):
        quantize_checkpoint(d, tmp_path / "o", "attention-high-precision")
    with pytest.raises(ConfigError, match="must differ"):
        quantize_checkpoint(d, d, "int8")
    ref = Checkpoint(str(d))["model.layers.1.mlp.up_proj.weight"]
    with open(ref.file, "r+b") as fh:
        fh.seek(ref.offset + 40)
        fh.write(np.array([np.inf], np.float32).tobytes())
    with pytest.raises(NonFiniteWeightError, match="up_proj"):
        quantize_checkpoint(d, tmp_path / "o", "int8", show_progress=False)
    assert os.listdir(tmp_path / "o") == []  # the staging file is gone with the bad data


def test_cli_quantize_uses_the_out_of_core_path(folder, tmp_path, capsys):
    from diffulex_edge import cli

    in_memory(folder, tmp_path / "a", "int4-g32")
    assert cli.main(["quantize", folder, "--scheme", "int4-g32", "-o", str(tmp_path / "b")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert digest(tmp_path / "a" / hf.QUANTIZED_WEIGHTS) == digest(tmp_path / "b" / hf.QUANTIZED_WEIGHTS)
    assert json.loads((tmp_path / "b" / "quantization.json").read_text())["out_of_core"] is True
