"""save_quantized / load_quantized: bit-exact round trips, tied weights, corrupt files, skeleton
mismatches (which must leave the skeleton untouched) and atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from torch import nn

from diffulex_edge import CorruptFileError, ShapeError, UnsupportedFormatError
from diffulex_edge.quant import (
    INT8Quantizer,
    QuantizationConfig,
    QuantizedLinear,
    load_quantized,
    quantize_,
    save_quantized,
    serialization,
)
from diffulex_edge.quant.serialization import FORMAT_TAG

EXTS = [".safetensors", ".pt"]
CONFIGS = {
    "fp16": QuantizationConfig(dtype="fp16"),
    "bf16": QuantizationConfig(dtype="bf16"),
    "int8": QuantizationConfig(dtype="int8"),
    "int8asym": QuantizationConfig(dtype="int8", symmetric=False),
    "int8dyn": QuantizationConfig(dtype="int8", mode="dynamic"),
    "int4g32pad": QuantizationConfig(dtype="int4", group_size=32, on_indivisible="pad"),
    "int4g64sym": QuantizationConfig(dtype="int4", group_size=64, symmetric=True, on_indivisible="pad"),
}


class Net(nn.Module):
    def __init__(self, hidden: int = 96):
        super().__init__()
        self.embed = nn.Embedding(20, 64)
        self.up = nn.Linear(64, hidden)
        self.down = nn.Linear(hidden, 64, bias=False)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 10)

    def forward(self, ids):
        h = self.embed(ids)
        return self.out(self.norm(h + self.down(torch.relu(self.up(h)))))


def all_tensors(model):
    return {k: v for k, v in model.state_dict().items()}


def assert_bit_exact(a: nn.Module, b: nn.Module):
    sa, sb = all_tensors(a), all_tensors(b)
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(as_bytes(sa[k]), as_bytes(sb[k])), k
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        assert na == nb and type(ma) is type(mb)
        if isinstance(ma, QuantizedLinear):
            assert ma.spec() == mb.spec()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so -0.0 vs 0.0 and NaN payloads count as differences)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def listing(d):
    return sorted(os.listdir(d))


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_exact(tmp_path, ext, name):
    model = Net(hidden=100).eval()  # 100: a partial INT4 group
    quantize_(model, CONFIGS[name])
    path = tmp_path / f"model{ext}"
    save_quantized(model, path)
    assert listing(tmp_path) == [path.name]  # no temp file left behind
    loaded = load_quantized(path, Net(hidden=100))
    assert_bit_exact(model, loaded)
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    # and again from str paths
    save_quantized(model, str(path))
    assert_bit_exact(model, load_quantized(str(path), Net(hidden=100)))


@pytest.mark.parametrize("ext", EXTS)
def test_round_trip_static_and_bf16_bias(tmp_path, ext):
    model = Net().eval()
    res = INT8Quantizer().quantize(model, {"mode": "static"}, calibration_data=[torch.randint(0, 20, (2, 4))])
    q = res.model
    q.up.bias = q.up.bias.to(torch.bfloat16)  # a bias kept in another dtype is stored as such
    assert q.up.bias.dtype == torch.bfloat16 and "act_scale" in q.up.state_dict()
    path = tmp_path / f"m{ext}"
    save_quantized(q, path)
    skeleton = Net()
    loaded = load_quantized(path, skeleton)
    assert loaded is skeleton
    assert_bit_exact(q, loaded)
    assert loaded.up.act_mode == "static" and loaded.up.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("ext", EXTS)
def test_unquantized_and_single_layer_models(tmp_path, ext):
    model = Net().eval()
    save_quantized(model, tmp_path / f"f{ext}")
    loaded = load_quantized(tmp_path / f"f{ext}", Net())
    assert_bit_exact(model, loaded)
    lin = nn.Linear(64, 8)
    res = INT8Quantizer().quantize(lin)
    save_quantized(res.model, tmp_path / f"l{ext}")
    skeleton = nn.Linear(64, 8)
    out = load_quantized(tmp_path / f"l{ext}", skeleton)
    assert isinstance(out, QuantizedLinear) and type(skeleton) is nn.Linear
    assert_bit_exact(res.model, out)


@pytest.mark.parametrize("ext", EXTS)
def test_load_into_an_already_quantized_skeleton(tmp_path, ext):
    model = Net().eval()
    quantize_(model, QuantizationConfig(dtype="int4", group_size=32))
    save_quantized(model, tmp_path / f"m{ext}")
    skeleton = Net()
    quantize_(skeleton, QuantizationConfig(dtype="int8"))  # other weights, other format
    loaded = load_quantized(tmp_path / f"m{ext}", skeleton)
    assert_bit_exact(model, loaded)


def test_torch_save_state_dict_into_quantized_model(tmp_path):
    cfg = QuantizationConfig(dtype="int4", group_size=32)
    model = Net().eval()
    quantize_(model, cfg)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = Net().eval()  # different random weights, same architecture and config
    quantize_(other, cfg)
    ids = torch.randint(0, 20, (2, 6))
    with torch.no_grad():
        assert not torch.equal(other(ids), model(ids))
    other.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert_bit_exact(model, other)
    with torch.no_grad():
        assert torch.equal(other(ids), model(ids))


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("skip_tied", [True, False])
def test_tied_weights(tmp_path, make_tied_lm, ext, skip_tied):
    model = make_tied_lm()
    quantize_(model, QuantizationConfig(dtype="int8", skip_tied=skip_tied))
    assert isinstance(model.lm_head, QuantizedLinear) is (not skip_tied)
    path = tmp_path / f"tied{ext}"
    save_quantized(model, path)
    skeleton = make_tied_lm()
    assert skeleton.lm_head.weight is skeleton.embed.weight
    loaded = load_quantized(path, skeleton)
    assert_bit_exact(model, loaded)
    if skip_tied:
        assert loaded.lm_head.weight is loaded.embed.weight  # still one tensor
    ids = torch.randint(0, 50, (2, 3))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ---- corrupt files ----------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = Net().eval()
    quantize_(model, QuantizationConfig(dtype="int8"))
    paths = {}
    for ext in EXTS:
        paths[ext] = tmp_path / f"good{ext}"
        save_quantized(model, paths[ext])
    return paths


def corrupt_variants(data: bytes):
    return {
        "empty": b"",
        "truncated_tail": data[:-7],
        "truncated_half": data[: len(data) // 2],
        "tiny": data[:5],
        "garbage": bytes(range(256)) * 8,
    }


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("variant", ["empty", "truncated_tail", "truncated_half", "tiny", "garbage"])
def test_corrupt_files_raise(tmp_path, saved, ext, variant):
    bad = tmp_path / f"bad{ext}"
    bad.write_bytes(corrupt_variants(saved[ext].read_bytes())[variant])
    skeleton = Net()
    types = [type(m) for m in skeleton.modules()]
    with pytest.raises(CorruptFileError) as e:
        load_quantized(bad, skeleton)
    assert isinstance(e.value, OSError) and "bad" in str(e.value)
    assert [type(m) for m in skeleton.modules()] == types


def test_files_not_written_by_save_quantized(tmp_path):
    model = Net()
    safetensors.torch.save_file(model.state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(CorruptFileError, match="no diffulex-edge metadata"):
        load_quantized(tmp_path / "plain.safetensors", Net())
    safetensors.torch.save_file(model.state_dict(), tmp_path / "json.safetensors", metadata={"diffulex_edge": "{not json"})
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load_quantized(tmp_path / "json.safetensors", Net())
    meta = json.dumps({"format": "someone-else/1", "layers": {}})
    safetensors.torch.save_file(model.state_dict(), tmp_path / "tag.safetensors", metadata={"diffulex_edge": meta})
    with pytest.raises(CorruptFileError, match="unknown format tag"):
        load_quantized(tmp_path / "tag.safetensors", Net())
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CorruptFileError, match="no diffulex-edge metadata"):
        load_quantized(tmp_path / "plain.pt", Net())
    torch.save({"diffulex_edge": {"format": "x"}, "state_dict": {}}, tmp_path / "tag.pt")
    with pytest.raises(CorruptFileError, match="unknown format tag"):
        load_quantized(tmp_path / "tag.pt", Net())
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing.safetensors", Net())


# ---- skeleton mismatches --------------------------------------------------------------------------

class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 64)
        self.up = nn.Conv1d(64, 96, 1)  # not a Linear where the file has a quantized layer
        self.down = nn.Linear(96, 64, bias=False)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 10)


class Missing(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 64)
        self.down = nn.Linear(96, 64, bias=False)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 10)


class Extra(Net):
    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(4, 4)


def bigger_embedding():
    net = Net()
    net.embed = nn.Embedding(21, 64)  # a non-quantized tensor of another shape
    return net


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Net(hidden=128), "layer 'up'"),  # quantized layer with other in/out features
        (Other, "expected nn.Linear"),
        (Missing, "no such module"),
        (Extra, "unexpected|missing"),
        (bigger_embedding, "embed.weight"),
    ],
    ids=["features", "not_linear", "missing_module", "extra_module", "float_tensor_shape"],
)
def test_skeleton_mismatch_raises_and_leaves_skeleton_unchanged(saved, ext, make, match):
    skeleton = make()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    modules = [(n, type(m)) for n, m in skeleton.named_modules()]
    with pytest.raises(ShapeError, match=match):
        load_quantized(saved[ext], skeleton)
    assert [(n, type(m)) for n, m in skeleton.named_modules()] == modules
    after = skeleton.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("ext", EXTS)
def test_non_strict_load_ignores_extra_skeleton_modules(saved, ext):
    skeleton = Extra()
    extra_w = skeleton.extra.weight.detach().clone()
    loaded = load_quantized(saved[ext], skeleton, strict=False)
    assert isinstance(loaded.up, QuantizedLinear)
    assert torch.equal(loaded.extra.weight, extra_w)


# ---- atomic writes --------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", EXTS)
def test_failed_save_leaves_no_temp_file_and_keeps_the_old_one(tmp_path, monkeypatch, ext):
    model = Net().eval()
    quantize_(model, QuantizationConfig(dtype="int8"))
    path = tmp_path / f"m{ext}"
    save_quantized(model, path)
    good = path.read_bytes()

    def failing_writer(*args, **kwargs):
        target = args[1] if ext == ".pt" else args[0]  # torch.save(obj, f) / _write_safetensors(path, ...)
        with open(target, "wb") as fh:
            fh.write(b"partial")  # a half-written file
        raise OSError("disk full")

    if ext == ".pt":
        monkeypatch.setattr(torch, "save", failing_writer)
    else:
        monkeypatch.setattr(serialization, "_write_safetensors", failing_writer)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, path)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path / f"new{ext}")
    assert listing(tmp_path) == [path.name]
    assert path.read_bytes() == good
    monkeypatch.undo()
    assert_bit_exact(model, load_quantized(path, Net()))


@pytest.mark.parametrize("skip_tied", [True, False])
def test_safetensors_writer_matches_the_safetensors_library(tmp_path, make_tied_lm, skip_tied):
    """save_quantized streams the safetensors file itself; the library must read it, and it must
    hold what safetensors.torch.save_model would have written: the same tensors bit for bit, the
    same tied-weight aliases, the same metadata."""
    from safetensors import safe_open

    model = make_tied_lm()
    quantize_(model, QuantizationConfig(dtype="int4", group_size=32, skip_tied=skip_tied))
    model.embed.weight.data = model.embed.weight.data.to(torch.bfloat16)
    model.register_buffer("flag", torch.tensor([True, False, True]))
    model.register_buffer("scalar", torch.tensor(3.5, dtype=torch.float64))
    model.register_buffer("empty", torch.zeros(0, 4, dtype=torch.float16))
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_quantized(model, ours)
    meta = {"diffulex_edge": safe_open(str(ours), framework="pt").metadata()["diffulex_edge"]}
    safetensors.torch.save_model(model, str(theirs), metadata=dict(meta))
    with safe_open(str(ours), framework="pt") as a, safe_open(str(theirs), framework="pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape, k
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k
    assert (len(safe_open(str(ours), framework="pt").metadata()) > 1) is skip_tied  # the tied alias is recorded
    n = int.from_bytes(ours.read_bytes()[:8], "little")
    assert n % 8 == 0  # tensor data starts 8-aligned
    skeleton = make_tied_lm()
    skeleton.register_buffer("flag", torch.zeros(3, dtype=torch.bool))
    skeleton.register_buffer("scalar", torch.tensor(0.0, dtype=torch.float64))
    skeleton.register_buffer("empty", torch.zeros(0, 4, dtype=torch.float16))
    skeleton.embed.weight.data = skeleton.embed.weight.data.to(torch.bfloat16)
    assert_bit_exact(model, load_quantized(ours, skeleton))


def test_safetensors_writer_rejects_dtypes_it_cannot_store(tmp_path):
    model = Net()
    model.register_buffer("z", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(UnsupportedFormatError, match="'z'.*complex64.*\\.pt"):
        save_quantized(model, tmp_path / "m.safetensors")
    assert listing(tmp_path) == []
    save_quantized(model, tmp_path / "m.pt")


def test_save_rejects_non_modules(tmp_path):
    with pytest.raises(UnsupportedFormatError):
        save_quantized({"a": torch.zeros(1)}, tmp_path / "x.pt")
    assert listing(tmp_path) == []


def test_metadata_records_layer_specs(tmp_path):
    model = Net().eval()
    quantize_(model, QuantizationConfig(dtype="int4", group_size=32, exclude_layers=["out"]))
    save_quantized(model, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["diffulex_edge"])
    assert meta["format"] == FORMAT_TAG
    assert set(meta["layers"]) == {"up", "down"}
    assert meta["layers"]["up"] == model.up.spec()


@pytest.mark.parametrize("ext", EXTS)
def test_meta_device_skeleton_is_materialized(tmp_path, make_tied_lm, ext):
    # big models are built on the meta device (no memory) and then loaded
    model = make_tied_lm()
    quantize_(model, QuantizationConfig(dtype="int4", group_size=32, exclude_layers=["body.2"]))
    save_quantized(model, tmp_path / f"m{ext}")
    with torch.device("meta"):
        skeleton = make_tied_lm()
        skeleton.register_buffer("scratch", torch.zeros(3), persistent=False)
    loaded = load_quantized(tmp_path / f"m{ext}", skeleton)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    assert loaded.scratch.is_meta  # not in the file: left alone rather than filled with garbage
    assert loaded.lm_head.weight is loaded.embed.weight and isinstance(loaded.lm_head.weight, nn.Parameter)
    assert_bit_exact(model, loaded)
    ids = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


# ---- the metadata schema and the tensors of each quantized layer -----------------------------------

def _protected_int4_w8a8_model():
    from diffulex_edge.quant import INT4Quantizer

    model = Net().eval()
    model = INT4Quantizer().quantize(model, QuantizationConfig(dtype="int4", group_size=32),
                                     protect={"up": [(1, 2), (5, 7)]}).model
    model.out = QuantizedLinear.from_linear(nn.Linear(64, 10), "int8", act_mode="static", act_scale=0.05)
    return model


def _rewrite(src, dst, ext, edit_meta=None, edit_state=None):
    """Copy a save_quantized file with its metadata / tensors edited (as a mutated file would be)."""
    if ext == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            meta = json.loads(f.metadata()["diffulex_edge"])
        state = safetensors.torch.load_file(str(src))
    else:
        payload = torch.load(src, weights_only=True)
        meta, state = payload["diffulex_edge"], payload["state_dict"]
    meta = edit_meta(meta) if edit_meta else meta
    if edit_state:
        edit_state(state)
    if ext == ".safetensors":
        safetensors.torch.save_file(state, str(dst), metadata={"diffulex_edge": json.dumps(meta)})
    else:
        torch.save({"diffulex_edge": meta, "state_dict": state}, dst)


def _set(path, value):
    def edit(meta):
        node = meta
        for k in path[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return meta

    return edit


_DELETE = object()

META_CASES = {
    "meta_not_object": (lambda m: 5, "must be a JSON object"),
    "layers_not_object": (_set(["layers"], [1, 2]), "key 'layers'"),
    "unknown_top_key": (_set(["bogus"], 1), "key 'bogus'"),
    "version_not_string": (_set(["version"], 3), "key 'version'"),
    "spec_not_object": (_set(["layers", "up"], 7), "key 'layers.up'"),
    "unknown_spec_key": (_set(["layers", "up", "bogus"], 1), "key 'layers.up'.*'bogus'"),
    "missing_in_features": (_set(["layers", "up", "in_features"], _DELETE), "'in_features'"),
    "in_features_string": (_set(["layers", "up", "in_features"], "64"), "'in_features'"),
    "in_features_bool": (_set(["layers", "up", "in_features"], True), "'in_features'"),
    "out_features_huge": (_set(["layers", "up", "out_features"], 2**40), "'out_features'"),
    "dtype_unknown": (_set(["layers", "up", "dtype"], "int3"), "'dtype'"),
    "dtype_number": (_set(["layers", "up", "dtype"], 4), "'dtype'"),
    "group_size_odd": (_set(["layers", "up", "group_size"], 33), "'group_size'"),
    "symmetric_string": (_set(["layers", "up", "symmetric"], "yes"), "'symmetric'"),
    "act_mode_for_int4": (_set(["layers", "up", "act_mode"], "dynamic"), "'act_mode'"),
    "act_mode_unknown": (_set(["layers", "out", "act_mode"], "sometimes"), "'act_mode'"),
    "n_protect_huge": (_set(["layers", "up", "n_protect"], 10**12), "'n_protect'"),
    "n_protect_negative": (_set(["layers", "up", "n_protect"], -1), "'n_protect'"),
    "bias_dtype_unknown": (_set(["layers", "up", "bias_dtype"], "int64"), "'bias_dtype'"),
    "bias_dtype_number": (_set(["layers", "up", "bias_dtype"], 3), "'bias_dtype'"),
    # found by pyfuzz (load_quantized_pt): an unhashable value made the lookup raise TypeError
    "bias_dtype_list": (_set(["layers", "up", "bias_dtype"], ["float32"]), "'bias_dtype'"),
    "bias_dtype_object": (_set(["layers", "up", "bias_dtype"], {"a": 1}), "'bias_dtype'"),
    "bias_not_bool": (_set(["layers", "up", "bias"], 1), "'bias'"),
}


def _edit_tensor(key, fn):
    def edit(state):
        state[key] = fn(state[key])

    return edit


STATE_CASES = {
    "qweight_dtype": (_edit_tensor("up.qweight", lambda t: t.to(torch.int16)), "up.*'qweight'.*int16"),
    "scales_shape": (_edit_tensor("up.scales", lambda t: t[:, :1].contiguous()), "up.*'scales'"),
    "scales_nan": (_edit_tensor("up.scales", lambda t: t.fill_(float("nan"))), "up.*'scales'.*NaN"),
    "zeros_over_15": (_edit_tensor("up.zeros", lambda t: t.fill_(16)), "up.*'zeros'"),
    "protect_row_outside": (_edit_tensor("up.protect_index", lambda t: t.index_fill_(1, torch.tensor([0]), 500)), "protect_index"),
    "protect_negative": (_edit_tensor("up.protect_index", lambda t: t.fill_(-1)), "protect_index"),
    "act_scale_zero": (_edit_tensor("out.act_scale", lambda t: t.fill_(0.0)), "act_scale"),
    "missing_qweight": (lambda s: s.pop("up.qweight"), "up.*'qweight'.*missing"),
}


@pytest.fixture(scope="module")
def saved_protected(tmp_path_factory):
    d = tmp_path_factory.mktemp("protected")
    model = _protected_int4_w8a8_model()
    paths = {ext: d / f"model{ext}" for ext in EXTS}
    for ext in EXTS:
        save_quantized(model, paths[ext])
    return paths


def test_protected_model_round_trips(saved_protected):
    for path in saved_protected.values():
        loaded = load_quantized(path, Net())
        assert loaded.up.n_protect == 2 and loaded.out.act_mode == "static"


@pytest.mark.parametrize("ext", EXTS)
@pytest.mark.parametrize("case", list(META_CASES) + list(STATE_CASES))
def test_schema_violations_are_corrupt_file_errors_naming_the_key(tmp_path, saved_protected, ext, case):
    edit_meta, match = META_CASES.get(case, (None, None))
    edit_state = None
    if case in STATE_CASES:
        edit_state, match = STATE_CASES[case]
    bad = tmp_path / f"bad{ext}"
    _rewrite(saved_protected[ext], bad, ext, edit_meta, edit_state)
    skeleton = Net()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(CorruptFileError, match=match) as e:
        load_quantized(bad, skeleton)
    assert str(bad) in str(e.value)
    assert [type(m) for m in skeleton.modules()] == [type(m) for m in Net().modules()]
    assert all(torch.equal(skeleton.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("ext", EXTS)
def test_a_packed_width_the_format_cannot_hold_is_corrupt(tmp_path, ext):
    """A file saying q4_K for a 100-wide layer (the skeleton agreeing) cannot have been written by
    save_quantized: CorruptFileError naming the key, not an error from the layer's construction."""
    model = nn.Sequential(nn.Linear(256, 8))
    quantize_(model, "q4_K")
    good, bad = tmp_path / f"good{ext}", tmp_path / f"bad{ext}"
    save_quantized(model, good)

    def narrow(meta):
        meta["layers"]["0"]["in_features"] = 100
        return meta

    _rewrite(good, bad, ext, narrow)
    with pytest.raises(CorruptFileError, match="in_features.*q4_K block size"):
        load_quantized(bad, nn.Sequential(nn.Linear(100, 8)))


def test_files_from_before_n_protect_and_bias_dtype_still_load(tmp_path, saved):
    """Optional spec keys take their defaults (files written before they existed lack them)."""
    def drop(meta):
        for spec in meta["layers"].values():
            spec.pop("n_protect"), spec.pop("bias_dtype"), spec.pop("act_mode")
        return meta

    old = tmp_path / "old.safetensors"
    _rewrite(saved[".safetensors"], old, ".safetensors", drop)
    assert isinstance(load_quantized(old, Net()).up, QuantizedLinear)


def test_header_sizes_are_checked_before_allocating(tmp_path, saved_protected, monkeypatch):
    """A spec promising a huge layer fails on the metadata or tensor check, before any buffer of
    that size exists (the skeleton here has matching huge features, on the meta device)."""
    big = 1 << 20
    bad = tmp_path / "big.safetensors"
    _rewrite(saved_protected[".safetensors"], bad, ".safetensors",
             lambda m: _set(["layers", "up", "in_features"], big)(_set(["layers", "up", "out_features"], big)(m)))
    skeleton = Net()
    with torch.device("meta"):
        skeleton.up = nn.Linear(big, big)
    allocated = []
    real_zeros = torch.zeros

    def spy(*shape, **kw):
        t = real_zeros(*shape, **kw)
        if t.device.type != "meta":
            allocated.append(t.numel())
        return t

    monkeypatch.setattr(torch, "zeros", spy)
    with pytest.raises(CorruptFileError, match="'qweight'"):
        load_quantized(bad, skeleton)
    assert not allocated or max(allocated) < big
