import os

import numpy as np
import pytest
import torch
from calib_models import Skewed, tiny_hf_llama
from torch import nn

from diffulex_edge.calib import CalibrationDataset, ImportanceMatrix, compute_imatrix
from diffulex_edge.calib.sequential import STATE
from diffulex_edge.errors import ConfigError, ShapeError
from diffulex_edge.quant import INT4Quantizer, QuantizationConfig
from diffulex_edge.testing import tiny_transformer

EPS32 = float(np.finfo(np.float32).eps)


def torch_reference(model, batches):
    """Mean of x^2 per input column of every Linear, in float64 torch ops."""
    sums, counts, hooks = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def hook(_m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {n: (sums[n] / counts[n]).numpy() for n in sums}


def model_and_data(layers=3):
    model = tiny_transformer(vocab_size=64, dim=64, layers=layers, heads=4)
    ids = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(1))
    return model, CalibrationDataset(ids, n_samples=None, batch_size=3, show_progress=False)


def test_matches_torch_reference():
    model, calib = model_and_data()
    im = compute_imatrix(model, calib)
    ref = torch_reference(model, calib)
    assert set(im) == set(ref) and len(im) == 3 * 7 + 1
    for n, r in ref.items():
        # float64 sums in a different order, then one rounding to float32
        np.testing.assert_allclose(im[n], r, rtol=2 * EPS32, atol=0)
    e = im.entries["lm_head"]
    assert e.count == 12 * 16 and e.calls == 4
    assert im.chunk_count == 4 and im.chunk_size == 16


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_file_round_trip_and_gguf_py_reads_it(tmp_path, fmt):
    model, calib = model_and_data(layers=2)
    im = compute_imatrix(model, calib, dataset_name="unit-test")
    path = tmp_path / f"imatrix.{fmt}"
    im.save(path)
    back = ImportanceMatrix.load(path, model)
    assert set(back) == set(im)
    for n in im:
        # gguf stores the float32 sum; .dat stores mean * ncall in float32 and divides again
        np.testing.assert_allclose(back[n], im[n], rtol=(1 if fmt == "gguf" else 3) * EPS32)
    assert back.chunk_count == 4 and back.datasets == ["unit-test"]
    if fmt == "gguf":
        from gguf import GGUFReader

        r = GGUFReader(str(path))
        f = {k: v.contents() for k, v in r.fields.items()}
        assert f["general.type"] == "imatrix" and f["imatrix.chunk_count"] == 4
        t = {x.name: x for x in r.tensors}
        s2 = t["layers.0.mlp.down_proj.in_sum2"]
        assert list(s2.shape) == [256, 1]  # ggml order: ne0 = n_per_row, ne1 = n_mat
        cnt = np.asarray(t["layers.0.mlp.down_proj.counts"].data).reshape(-1)
        np.testing.assert_allclose(np.asarray(s2.data).reshape(-1) / cnt[0], im["layers.0.mlp.down_proj"], rtol=2 * EPS32)
    with pytest.raises(ConfigError, match="format"):
        im.save(tmp_path / "x", format="npz")


def test_reads_llama_cpp_style_file_written_by_gguf_py(tmp_path):
    """A file laid out as llama.cpp's llama-imatrix writes it, produced with gguf-py."""
    import gguf

    model = tiny_hf_llama(layers=1)
    path = str(tmp_path / "ref.gguf")
    w = gguf.GGUFWriter(path, arch="imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["wiki.train.raw"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    rng = np.random.default_rng(0)
    s2 = rng.random((1, 64), dtype=np.float32) * 100
    w.add_tensor("blk.0.attn_q.weight.in_sum2", s2)
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([[5120.0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = ImportanceMatrix.load(path, model)
    assert list(im) == ["model.layers.0.self_attn.q_proj"]
    np.testing.assert_allclose(im["model.layers.0.self_attn.q_proj"], s2[0] / 5120.0, rtol=EPS32)
    # lookups by llama.cpp tensor name and by parameter name
    assert np.array_equal(im["blk.0.attn_q.weight"], im["model.layers.0.self_attn.q_proj.weight"])
    assert im.chunk_count == 10 and im.datasets == ["wiki.train.raw"]


def test_hf_llama_uses_llama_cpp_names_and_export_accepts_it(tmp_path):
    model = tiny_hf_llama(layers=2)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    im = compute_imatrix(model, CalibrationDataset(ids, n_samples=None, show_progress=False))
    path = tmp_path / "im.dat"
    im.save(path)
    raw = ImportanceMatrix.load(path)  # no model: the file's names
    assert "blk.1.ffn_down.weight" in raw.entries and "output.weight" in raw.entries
    np.testing.assert_allclose(raw["blk.1.ffn_down.weight"], im["model.layers.1.mlp.down_proj"], rtol=3 * EPS32)
    from diffulex_edge.export import export_gguf

    rep = export_gguf(model, tmp_path / "m.gguf", quant="Q4_K_M", imatrix=im)
    assert rep.tensors
    # a plain {llama.cpp name: importances} dict (gguf.load_imatrix) works for INT4 too
    from diffulex_edge.gguf import load_imatrix

    cfg = QuantizationConfig(dtype="int4", group_size=32)
    via_dict = INT4Quantizer().quantize(model, cfg, imatrix=load_imatrix(path)).model
    via_im = INT4Quantizer().quantize(model, cfg, imatrix=ImportanceMatrix.load(path, model)).model
    assert torch.equal(via_dict.model.layers[1].mlp.down_proj.qweight, via_im.model.layers[1].mlp.down_proj.qweight)


def test_interrupted_run_resumes_to_identical_results(tmp_path):
    model, calib = model_and_data(layers=4)
    plain = compute_imatrix(model, calib)
    ckpt = tmp_path / "ckpt"

    class Boom(RuntimeError):
        pass

    def boom(*_):
        raise Boom("simulated interruption")

    h = model.layers[2].register_forward_pre_hook(boom)
    with pytest.raises(Boom):
        compute_imatrix(model, calib, checkpoint_dir=ckpt)
    h.remove()
    state = torch.load(os.path.join(ckpt, STATE), weights_only=False)
    assert state["next_block"] == 2 and not state.get("done")
    calls = []
    h0 = model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    resumed = compute_imatrix(model, calib, checkpoint_dir=ckpt)
    h0.remove()
    assert calls == []  # blocks 0 and 1 were not run again
    for n in plain:
        a, b = plain.entries[n], resumed.entries[n]
        assert np.array_equal(a.sum_sq, b.sum_sq) and a.count == b.count and a.calls == b.calls, n
    # a finished checkpoint returns the same result without running the model
    again = compute_imatrix(model, calib, checkpoint_dir=ckpt)
    assert all(np.array_equal(again.entries[n].sum_sq, plain.entries[n].sum_sq) for n in plain)
    other = CalibrationDataset(torch.randint(0, 64, (12, 16)), n_samples=None, show_progress=False)
    with pytest.raises(ConfigError, match="different"):
        compute_imatrix(model, other, checkpoint_dir=ckpt)


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)).eval()


@pytest.mark.parametrize("build", [tiny_hf_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_checkpointed_hf_models_equal_plain_pass(tmp_path, build):
    model = build()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    calib = CalibrationDataset(ids, n_samples=None, batch_size=2, show_progress=False)
    plain = compute_imatrix(model, calib)
    seq = compute_imatrix(model, calib, checkpoint_dir=tmp_path / "c")
    assert set(plain) == set(seq)
    for n in plain:
        np.testing.assert_array_equal(plain.entries[n].sum_sq, seq.entries[n].sum_sq, err_msg=n)


def test_bad_arguments():
    model, calib = model_and_data(layers=1)
    with pytest.raises(ConfigError, match="no module"):
        compute_imatrix(model, calib, layers=["nope"])
    with pytest.raises(ConfigError, match="nn.Linear"):
        compute_imatrix(model, calib, layers=["layers.0"])
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        compute_imatrix("model", calib)
    with pytest.raises(ConfigError, match="decoder blocks"):
        compute_imatrix(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], checkpoint_dir="/nonexistent/never")
    with pytest.raises(ConfigError, match="not finite"):
        compute_imatrix(nn.Sequential(nn.Linear(4, 4)), [torch.tensor([[1.0, float("nan"), 0.0, 0.0]])])


def test_imatrix_weighted_int4_beats_unweighted_on_skewed_activations(tmp_path):
    torch.manual_seed(0)
    model = Skewed().eval()
    calib = [torch.randn(64, 128) for _ in range(4)]
    im = compute_imatrix(model, calib)
    cfg = QuantizationConfig(dtype="int4", group_size=32)
    plain = INT4Quantizer().quantize(model, cfg).model
    weighted = INT4Quantizer().quantize(model, cfg, imatrix=im).model
    x = torch.randn(512, 128)  # held-out inputs from the same distribution
    with torch.no_grad():
        y = model(x)
        e_plain = float((plain(x) - y).pow(2).mean())
        e_weighted = float((weighted(x) - y).pow(2).mean())
    print(f"INT4 g32 output MSE: round-to-nearest {e_plain:.4e}, imatrix-weighted {e_weighted:.4e}")
    assert e_weighted < 0.9 * e_plain
    # the same through a file path in the config
    path = tmp_path / "im.gguf"
    im.save(path)
    via_cfg = INT4Quantizer().quantize(model, QuantizationConfig(dtype="int4", group_size=32, imatrix=str(path))).model
    assert torch.equal(via_cfg.fc1.qweight, weighted.fc1.qweight)
    with pytest.raises(ConfigError, match="does not use an imatrix"):
        QuantizationConfig(dtype="int8", imatrix=str(path))
    with pytest.raises(ConfigError, match="file path"):
        QuantizationConfig(dtype="int4", imatrix=im)
    from diffulex_edge.quant import INT8Quantizer

    with pytest.raises(ConfigError, match="does not use an imatrix"):
        INT8Quantizer().quantize(model, imatrix=im)
    with pytest.raises(ShapeError, match="fc1"), pytest.warns(UserWarning, match="no entry"):
        INT4Quantizer().quantize(model, cfg, imatrix={"fc1": np.ones(5, np.float32)})
    with pytest.warns(UserWarning, match="no entry for 1 layer"):
        INT4Quantizer().quantize(model, cfg, imatrix={"fc1": im["fc1"]})
    with pytest.raises(ConfigError, match="ImportanceMatrix"):
        INT4Quantizer().quantize(model, cfg, imatrix=42)


def test_checkpoint_with_dict_batches_and_a_corrupt_state(tmp_path):
    model, calib = model_and_data(layers=2)
    dicts = [{"input_ids": b} for b in calib]
    plain = compute_imatrix(model, dicts)
    ck = tmp_path / "ck"
    seq = compute_imatrix(model, dicts, checkpoint_dir=ck)
    assert all(np.array_equal(plain.entries[n].sum_sq, seq.entries[n].sum_sq) for n in plain)
    (ck / STATE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="unreadable"):
        compute_imatrix(model, dicts, checkpoint_dir=ck)


def test_gguf_imatrix_file_errors_and_experts(tmp_path):
    from diffulex_edge.errors import CorruptFileError
    from diffulex_edge.gguf import GGUFWriter, load_imatrix

    def write(tensors):
        p = tmp_path / "x.gguf"
        w = GGUFWriter(p)
        w.add("general.type", "imatrix")
        for k, v in tensors.items():
            w.add_tensor(k, v, "F32")
        w.write()
        return p

    s2 = np.arange(1, 9, dtype=np.float32).reshape(2, 4)  # two experts
    p = write({"blk.0.ffn_down_exps.weight.in_sum2": s2, "blk.0.ffn_down_exps.weight.counts": np.array([[2.0], [4.0]], np.float32)})
    np.testing.assert_allclose(load_imatrix(p)["blk.0.ffn_down_exps.weight"], (s2[0] / 2 + s2[1] / 4) / 2)
    with pytest.raises(CorruptFileError, match="no matching"):
        load_imatrix(write({"a.in_sum2": s2}))
    with pytest.raises(CorruptFileError, match="matrices"):
        load_imatrix(write({"a.in_sum2": s2, "a.counts": np.ones((3, 1), np.float32)}))


class _Blk(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.gain = 0.5

    def forward(self, hidden_states):
        return (torch.tanh(self.fc(hidden_states)),)


class _KwargBlocks(nn.Module):
    """Blocks called with hidden_states= and returning tuples; the parent reads a block attribute."""

    def __init__(self, between=False):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layers = nn.ModuleList([_Blk() for _ in range(3)])
        self.head = nn.Linear(16, 4)
        self.between = between

    def forward(self, x):
        h = self.inp(x)
        for b in self.layers:
            if b.gain > 0:
                h = b(hidden_states=h)[0]
            if self.between:  # work between blocks that a block-by-block replay would miss
                h = h * 2
        return self.head(h)


def test_checkpoint_handles_keyword_hidden_states_tuples_and_block_attributes(tmp_path):
    torch.manual_seed(0)
    model = _KwargBlocks().eval()
    data = [torch.randn(5, 8) for _ in range(3)]
    plain = compute_imatrix(model, data)
    seq = compute_imatrix(model, data, checkpoint_dir=tmp_path / "k")
    assert set(seq) == {"inp", "layers.0.fc", "layers.1.fc", "layers.2.fc", "head"}
    for n in plain:
        np.testing.assert_array_equal(plain.entries[n].sum_sq, seq.entries[n].sum_sq, err_msg=n)
    with pytest.raises(ConfigError, match="between its blocks"):
        compute_imatrix(_KwargBlocks(between=True).eval(), data, checkpoint_dir=tmp_path / "b")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_offloaded_blocks_give_the_same_imatrix(tmp_path, tie):
    """A model whose decoder blocks stay on disk (load_offloaded) calibrates block by block with
    each block loaded only while it runs; the result equals the in-memory model's exactly."""
    transformers = pytest.importorskip("transformers")
    from diffulex_edge.calib.offload import load_offloaded, offload_of
    from diffulex_edge.testing import write_synthetic_checkpoint

    d = tmp_path / "m"
    write_synthetic_checkpoint(str(d), dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                            tie_word_embeddings=tie), dtype="bf16", shard_bytes=40_000, std=0.1)
    full = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    calib = CalibrationDataset(ids, n_samples=None, batch_size=2, show_progress=False)
    want = compute_imatrix(full, calib, checkpoint_dir=tmp_path / "a")
    model, _ = load_offloaded(str(d))
    blocks = model.model.layers
    assert all(p.is_meta for p in blocks.parameters())
    assert not any(p.is_meta for n, p in model.named_parameters() if not n.startswith("model.layers."))
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        compute_imatrix(model, calib)
    loaded = []
    real_load = offload_of(model).load
    offload_of(model).load = lambda i: (loaded.append(i), real_load(i))[1]
    got = compute_imatrix(model, calib, checkpoint_dir=tmp_path / "b")
    assert loaded == [0, 0, 1, 2]  # block 0 for capturing the inputs, then each block once
    assert all(p.is_meta for p in blocks.parameters())  # every block dropped again
    assert set(got) == set(want) and "lm_head" in got
    for n in want:
        np.testing.assert_array_equal(got.entries[n].sum_sq, want.entries[n].sum_sq, err_msg=n)
