"""GGUF container: round trips, gguf-py interop, and corruption handling."""

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQT
from gguf import GGUFReader
from gguf import GGUFWriter as RefWriter
from hypothesis import given
from hypothesis import strategies as st

from diffulex_edge.errors import CorruptFileError, ShapeError
from diffulex_edge.gguf import GGUFFile, GGUFWriter, ValueType, quantize


def make_file(path):
    w = GGUFWriter(path)
    w.add("general.architecture", "llama")
    w.add("general.name", "tiny ünïcode")
    w.add("u8", 7, ValueType.UINT8)
    w.add("i8", -7, ValueType.INT8)
    w.add("u16", 65535, ValueType.UINT16)
    w.add("i16", -300, ValueType.INT16)
    w.add("u32", 4_000_000_000, ValueType.UINT32)
    w.add("i32", -5)
    w.add("f32", 0.5)
    w.add("bool", True)
    w.add("u64", 2**64 - 1, ValueType.UINT64)
    w.add("i64", -(2**63), ValueType.INT64)
    w.add("f64", 3.25, ValueType.FLOAT64)
    w.add("tokens", ["<s>", "</s>", "héllo"])
    w.add("scores", [0.0, -1.5, 2.0])
    w.add("ids", [1, 2, 3], (ValueType.ARRAY, ValueType.UINT32))
    w.add("nested", [[1, 2], [3]], (ValueType.ARRAY, ValueType.ARRAY, ValueType.INT32))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    b = rng.standard_normal((2, 256)).astype(np.float32)
    w.add_tensor("a", a, "Q8_0")
    w.add_tensor("b", b, "Q4_K")
    w.add_tensor("norm", np.arange(5, dtype=np.float32), "F32")
    w.write()
    return a, b


def test_round_trip_and_gguf_py_reads_it(tmp_path):
    p = tmp_path / "t.gguf"
    a, b = make_file(p)
    f = GGUFFile.read(p)
    assert f.version == 3 and f.alignment == 32
    assert f["general.name"] == "tiny ünïcode"
    assert f["u64"] == 2**64 - 1 and f["i64"] == -(2**63)
    assert f["nested"] == [[1, 2], [3]]
    assert f.metadata_types["ids"] == (ValueType.ARRAY, ValueType.UINT32)
    assert f.tensors["a"].shape == (4, 64) and f.tensors["a"].ggml_type == "Q8_0"
    np.testing.assert_array_equal(f.tensor_bytes("a"), quantize(a, "Q8_0").reshape(-1))
    np.testing.assert_array_equal(f.tensor("norm"), np.arange(5, dtype=np.float32))
    assert np.abs(f.tensor("b") - b).max() < 0.3

    r = GGUFReader(str(p))
    fields = r.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokens"].contents() == ["<s>", "</s>", "héllo"]
    assert fields["u32"].contents() == 4_000_000_000
    by_name = {t.name: t for t in r.tensors}
    assert by_name["a"].tensor_type == GQT.Q8_0
    np.testing.assert_array_equal(np.asarray(by_name["a"].data).reshape(-1), quantize(a, "Q8_0").reshape(-1))
    np.testing.assert_array_equal(np.asarray(by_name["b"].data).reshape(-1), f.tensor_bytes("b"))


def test_reads_gguf_py_written_file(tmp_path):
    p = tmp_path / "ref.gguf"
    w = RefWriter(str(p), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_array("tokenizer.ggml.tokens", ["a", "b"])
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    w.add_tensor("t", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile.read(p)
    assert f["llama.block_count"] == 2 and f["tokenizer.ggml.tokens"] == ["a", "b"]
    np.testing.assert_array_equal(f.tensor("t"), x)
    # and our re-save is byte-identical in content
    q = tmp_path / "re.gguf"
    f.to_writer().write(q)
    g = GGUFFile.read(q)
    assert g.metadata == f.metadata
    np.testing.assert_array_equal(g.tensor("t"), x)


def test_write_is_atomic(tmp_path):
    p = tmp_path / "x.gguf"
    make_file(p)
    before = p.read_bytes()
    w = GGUFWriter(p)
    w.add_raw_tensor("bad", np.zeros(5, np.uint8), "F32", (4,))  # wrong size: 5 bytes for 4 floats
    with pytest.raises(ShapeError):
        w.write()
    assert p.read_bytes() == before
    assert [n for n in os.listdir(tmp_path) if n != "x.gguf"] == []


def test_truncations_raise_corrupt(tmp_path):
    p = tmp_path / "t.gguf"
    make_file(p)
    data = p.read_bytes()
    f = GGUFFile.read(p)
    end = max(f.data_offset + t.offset + t.nbytes for t in f)  # only trailing padding follows
    q = tmp_path / "cut.gguf"
    for n in list(range(0, 200)) + list(range(200, end, 37)) + [end - 1]:
        q.write_bytes(data[:n])
        with pytest.raises(CorruptFileError):
            GGUFFile.read(q)
    q.write_bytes(data[:end])
    np.testing.assert_array_equal(GGUFFile.read(q).tensor("norm"), f.tensor("norm"))


@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8))
def test_bit_flips_never_crash(tmp_path_factory, flips):
    d = tmp_path_factory.mktemp("flip")
    p = d / "t.gguf"
    make_file(p)
    data = bytearray(p.read_bytes())
    for i, v in flips:
        data[i % len(data)] ^= v
    p.write_bytes(bytes(data))
    try:
        f = GGUFFile.read(p)
    except CorruptFileError:
        return
    for t in f:
        assert f.data_offset + t.offset + t.nbytes <= len(data)
        f.tensor_bytes(t.name)


def test_huge_counts(tmp_path):
    p = tmp_path / "t.gguf"
    make_file(p)
    data = bytearray(p.read_bytes())
    for off in (8, 16, 24):
        bad = bytearray(data)
        bad[off:off + 8] = (2**62).to_bytes(8, "little")
        q = tmp_path / f"h{off}.gguf"
        q.write_bytes(bytes(bad))
        with pytest.raises(CorruptFileError, match="cannot fit"):
            GGUFFile.read(q)
    with pytest.raises(CorruptFileError, match="magic"):
        q.write_bytes(b"GGML" + bytes(data[4:]))
        GGUFFile.read(q)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        GGUFFile.read(tmp_path / "nope.gguf")
