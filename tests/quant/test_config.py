"""QuantizationConfig and QuantizationDtype: defaults, validation, YAML in and out."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from diffulex_edge import ConfigError
from diffulex_edge.quant import INT4_GROUP_SIZES, PACKED_FORMATS, INT8Quantizer, QuantizationConfig, QuantizationDtype

DEFAULTS = QuantizationConfig()


# ---- QuantizationDtype ---------------------------------------------------------------------

@pytest.mark.parametrize(
    "alias, dtype",
    [
        ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"), ("F16", "fp16"), (" Half ", "fp16"),
        ("bf16", "bf16"), ("bfloat16", "bf16"), ("BFloat16", "bf16"),
        ("int8", "int8"), ("qint8", "int8"), ("i8", "int8"), ("8", "int8"), (8, "int8"),
        ("int4", "int4"), ("qint4", "int4"), ("i4", "int4"), ("4", "int4"), (4, "int4"),
        ("QuantizationDtype.INT4", "int4"), (QuantizationDtype.BF16, "bf16"),
    ],
)
def test_dtype_parse_aliases(alias, dtype):
    assert QuantizationDtype.parse(alias) is QuantizationDtype(dtype)


@pytest.mark.parametrize("bad", ["int2", "fp8", "", "float32", 16, None, "int4_g32"])
def test_dtype_parse_rejects_unknown_and_lists_supported(bad):
    with pytest.raises(ConfigError) as e:
        QuantizationDtype.parse(bad)
    for name in ("fp16", "bf16", "int8", "int4"):
        assert name in str(e.value)
    assert isinstance(e.value, ValueError)


def test_dtype_properties():
    base = list(QuantizationDtype)[:4]
    assert [d.bits for d in base] == [16, 16, 8, 4]
    assert [d.is_float for d in QuantizationDtype] == [True, True] + [False] * (len(QuantizationDtype) - 2)
    # packed formats: storage bits of a 4096-wide row, scales included (GGUF block sizes: 144 B / 256 for q4_K)
    assert QuantizationDtype.Q4_K.bits == 144 * 8 / 256
    assert QuantizationDtype.Q8_0.bits == 34 * 8 / 32
    assert [d.value for d in QuantizationDtype if d.is_packed] == list(PACKED_FORMATS)
    assert QuantizationDtype.parse("Q4_k") is QuantizationDtype.Q4_K and QuantizationDtype.parse("IQ4_XS").block_size == 256
    assert str(QuantizationDtype.INT4) == "int4"
    assert f"{QuantizationDtype.FP16}" == "fp16"


# ---- construction and validation -------------------------------------------------------------

def test_defaults():
    c = QuantizationConfig()
    assert c.dtype is None and not c.is_enabled
    assert c.mode == "weight_only" and c.group_size == 128 and c.symmetric is None
    assert c.exclude_layers == [] and c.on_indivisible == "error" and c.skip_tied is True
    assert c.kernel == "auto" and c.enabled is None


def test_dtype_string_is_parsed_and_enables():
    c = QuantizationConfig(dtype="half")
    assert c.dtype is QuantizationDtype.FP16 and c.is_enabled
    assert not QuantizationConfig(dtype="int8", enabled=False).is_enabled
    assert not QuantizationConfig(enabled=True).is_enabled  # nothing chosen: nothing to do


@pytest.mark.parametrize("dtype, expected", [("int8", True), ("int4", False), ("fp16", True), (None, True)])
def test_resolved_symmetric_defaults_per_format(dtype, expected):
    assert QuantizationConfig(dtype=dtype).resolved_symmetric is expected
    assert QuantizationConfig(dtype=dtype, symmetric=not expected).resolved_symmetric is (not expected)


@pytest.mark.parametrize("g", INT4_GROUP_SIZES)
def test_valid_group_sizes(g):
    assert QuantizationConfig(dtype="int4", group_size=g).group_size == g


@pytest.mark.parametrize("g", [16, 48, 100, 0, -32, 512, "64", True, 64.0, None])
def test_invalid_group_sizes(g):
    with pytest.raises(ConfigError, match="group_size"):
        QuantizationConfig(dtype="int4", group_size=g)


def test_group_size_is_checked_for_the_format_it_applies_to():
    # fp16/bf16/int8 have no groups: a group_size there is not an error (it is not used) ...
    for dtype in ("fp16", "bf16", "int8"):
        assert QuantizationConfig(dtype=dtype, group_size=48).group_size == 48
    # ... but a config without a dtype is checked when a quantizer makes it int4
    c = QuantizationConfig(group_size=48)
    with pytest.raises(ConfigError, match="for int4"):
        c.with_dtype("int4")
    for bad in (0, -32, "64", True, 32.0):
        with pytest.raises(ConfigError, match="positive int"):
            QuantizationConfig(dtype="fp16", group_size=bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "sometimes"}, "mode"),
        ({"mode": None}, "mode"),
        ({"on_indivisible": "truncate"}, "on_indivisible"),
        ({"kernel": "neon"}, "kernel"),
        ({"symmetric": "yes"}, "symmetric"),
        ({"symmetric": 1}, "symmetric"),
        ({"enabled": "true"}, "enabled"),
        ({"exclude_layers": [1, 2]}, "exclude_layers"),
        ({"exclude_layers": 5}, "exclude_layers"),
        ({"skip_tied": "no"}, "skip_tied"),
        ({"dtype": "int3"}, "dtype"),
        ({"dtype": "int4", "mode": "dynamic"}, "int8"),
        ({"dtype": "fp16", "mode": "static"}, "int8"),
    ],
)
def test_bad_values_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantizationConfig(**kwargs)


def test_exclude_layers_single_string_becomes_list():
    assert QuantizationConfig(exclude_layers="lm_head").exclude_layers == ["lm_head"]
    assert QuantizationConfig(exclude_layers=("a", "b")).exclude_layers == ["a", "b"]
    assert QuantizationConfig(exclude_layers=None).exclude_layers == []


def test_with_dtype_returns_a_new_config():
    c = QuantizationConfig(group_size=64)
    d = c.with_dtype("int4")
    assert d.dtype is QuantizationDtype.INT4 and d.group_size == 64 and c.dtype is None


# ---- dict / YAML ------------------------------------------------------------------------------

def test_from_dict_missing_keys_take_defaults():
    c = QuantizationConfig.from_dict({"dtype": "int4", "group_size": 32})
    assert c == dataclasses.replace(DEFAULTS, dtype=QuantizationDtype.INT4, group_size=32)
    assert QuantizationConfig.from_dict(None) == DEFAULTS
    assert QuantizationConfig.from_dict({}) == DEFAULTS


def test_from_dict_unwraps_a_quantization_section():
    c = QuantizationConfig.from_dict({"quantization": {"dtype": "int8", "mode": "dynamic"}})
    assert c.dtype is QuantizationDtype.INT8 and c.mode == "dynamic"
    assert QuantizationConfig.from_dict({"quantization": None}) == DEFAULTS


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        QuantizationConfig.from_dict({"dtype": "int8", "bits": 8, "groupsize": 64})
    msg = str(e.value)
    assert "'bits'" in msg and "'groupsize'" in msg
    for key in QuantizationConfig.field_names():
        assert key in msg
    # a quantization section next to other keys is not unwrapped: it is an unknown key
    with pytest.raises(ConfigError, match="quantization"):
        QuantizationConfig.from_dict({"quantization": {"dtype": "int8"}, "model": "x"})


@pytest.mark.parametrize("data", [[1, 2], "int8", 8])
def test_from_dict_needs_a_mapping(data):
    with pytest.raises(ConfigError, match="mapping"):
        QuantizationConfig.from_dict(data)


def test_from_yaml_string():
    c = QuantizationConfig.from_yaml("dtype: int4\ngroup_size: 64\nexclude_layers: [lm_head, 're:.*gate']\n")
    assert c.dtype is QuantizationDtype.INT4 and c.group_size == 64
    assert c.exclude_layers == ["lm_head", "re:.*gate"]
    assert c.mode == "weight_only" and c.symmetric is None  # defaults
    # a one-line YAML string is not mistaken for a path
    assert QuantizationConfig.from_yaml("dtype: bf16").dtype is QuantizationDtype.BF16


def test_from_yaml_file(tmp_path):
    p = tmp_path / "q.yaml"
    p.write_text("quantization:\n  dtype: int8\n  mode: dynamic\n  kernel: scalar\n")
    for source in (p, str(p)):
        c = QuantizationConfig.from_yaml(source)
        assert c.dtype is QuantizationDtype.INT8 and c.mode == "dynamic" and c.kernel == "scalar"
        assert c.group_size == 128


@pytest.mark.parametrize(
    "text", ["", "# nothing here\n", "quantization:\n", "null\n", "group_size: 64\n", "quantization:\n  mode: weight_only\n"]
)
def test_yaml_without_dtype_means_quantization_off(text, tmp_path):
    assert not QuantizationConfig.from_yaml(text).is_enabled
    p = tmp_path / "empty.yml"
    p.write_text(text)
    c = QuantizationConfig.from_yaml(p)
    assert not c.is_enabled and c.enabled is False and c.dtype is None
    assert dataclasses.replace(c, enabled=None, group_size=128) == DEFAULTS
    # and a quantizer does not fill in its own format for it
    res = INT8Quantizer().quantize(torch.nn.Linear(4, 4), c)
    assert res.num_quantized_layers == 0 and type(res.model) is torch.nn.Linear


def test_yaml_with_explicit_enabled_or_null_dtype():
    assert QuantizationConfig.from_yaml("dtype: null\n").enabled is None  # explicitly "not chosen"
    assert QuantizationConfig.from_yaml("enabled: true\n").enabled is True
    assert QuantizationConfig.from_yaml("dtype: int4\nenabled: false\n").is_enabled is False


def test_yaml_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        QuantizationConfig.from_yaml("dtype: [int8\n")
    with pytest.raises(ConfigError, match="does not exist"):
        QuantizationConfig.from_yaml(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="valid keys"):
        QuantizationConfig.from_yaml("dtype: int8\nbitz: 3\n")
    with pytest.raises(ConfigError, match="group_size"):
        QuantizationConfig.from_yaml("dtype: int4\ngroup_size: 48\n")
    with pytest.raises(ConfigError, match="mapping"):
        QuantizationConfig.from_yaml("- int8\n- int4\n")


configs = st.builds(
    QuantizationConfig,
    dtype=st.sampled_from([None, *QuantizationDtype]),
    group_size=st.sampled_from(INT4_GROUP_SIZES),
    symmetric=st.sampled_from([None, True, False]),
    exclude_layers=st.lists(st.sampled_from(["lm_head", "model.layers.0", "*.down_proj", "re:^a\\d+$", "é"]), max_size=3),
    on_indivisible=st.sampled_from(["error", "skip", "pad"]),
    skip_tied=st.booleans(),
    kernel=st.sampled_from(["auto", "scalar"]),
    enabled=st.sampled_from([None, True, False]),
)


@given(c=configs)
def test_yaml_round_trip(c):
    text = c.to_yaml()
    assert yaml.safe_load(text) == c.to_dict()
    assert QuantizationConfig.from_yaml(text) == c
    assert QuantizationConfig.from_dict(c.to_dict()) == c
    assert QuantizationConfig.from_yaml(yaml.safe_dump({"quantization": c.to_dict()})) == c


def test_to_dict_is_plain_data():
    d = QuantizationConfig(dtype="int8", mode="static").to_dict()
    assert d["dtype"] == "int8" and type(d["dtype"]) is str
    assert list(d) == QuantizationConfig.field_names()


@pytest.mark.parametrize("name,want", [
    ("fp16", dict(dtype="fp16")), ("BF16", dict(dtype="bf16")), ("int8", dict(dtype="int8", mode="weight_only")),
    ("int8-asym", dict(dtype="int8", symmetric=False)), ("w8a8", dict(dtype="int8", mode="dynamic")),
    ("w8a8-static", dict(dtype="int8", mode="static")), ("int4-g32", dict(dtype="int4", group_size=32, symmetric=None)),
    ("int4-g256-sym", dict(dtype="int4", group_size=256, symmetric=True)),
])
def test_from_scheme(name, want):
    cfg = QuantizationConfig.from_scheme(name, exclude_layers=["lm_head"])
    got = cfg.to_dict()
    assert {k: got[k] for k in want} == want and cfg.exclude_layers == ["lm_head"]


@pytest.mark.parametrize("bad", ["fp32", "int3", "int4-g48", "int4", "nf4-g32", 5, "int8 -sym"])
def test_from_scheme_rejects(bad):
    with pytest.raises(ConfigError, match="group_size|unknown scheme"):
        QuantizationConfig.from_scheme(bad)
