"""Short, seeded runs of every Python fuzz target (fuzz/pyfuzz.py) plus checks that the harness
itself catches what it should. The long runs and their figures are in docs/fuzzing.md."""

from __future__ import annotations

import random
import struct

import pyfuzz
import pytest
from gguf_layout import build, fields
from mutators import dat_fields, mutate_bytes, mutate_gguf, mutate_safetensors

# (target, cases): a few thousand for the fast GGUF/imatrix loaders, fewer for load_quantized,
# whose cases build a torch model each (~30-100 cases/s on 2 cores)
RUNS = [("gguf_read", 3000), ("imatrix_gguf", 3000), ("imatrix_dat", 3000),
        ("load_quantized_safetensors", 1500), ("load_quantized_pt", 600)]


@pytest.mark.parametrize("target,cases", RUNS, ids=[r[0] for r in RUNS])
def test_target_survives_seeded_run(target, cases, tmp_path):
    s = pyfuzz.run(target, cases, seed=20261207, workers=1, out=str(tmp_path), timeout=30)
    assert s.cases == cases
    assert not s.findings, s.report()


def test_cases_are_deterministic():
    t = pyfuzz.TARGETS["imatrix_dat"]
    seeds = [struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 2, 2) + b"\0" * 8]
    ctx = pyfuzz.Ctx(seeds)
    a = [pyfuzz.make_case(t, ctx, 7, i) for i in range(50)]
    b = [pyfuzz.make_case(t, ctx, 7, i) for i in range(50)]
    assert a == b
    assert len(set(a)) > 25  # and they differ from each other


def test_mutations_leave_the_table_of_interesting_values_alone():
    """The JSON mutator once inserted the table's own lists and dicts and later mutated them in
    place: case i then depended on the cases before it (and the table once grew into a cycle)."""
    import copy
    import math

    import mutators

    def same(a, b):  # == with NaN equal to itself
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return type(a) is type(b) and a == b

    before = copy.deepcopy(mutators.JSON_INTERESTING)
    rng = random.Random(3)
    obj = {"format": "x", "layers": {"a": {"in_features": 4, "dims": [1, 2]}, "b": [[], {}]}}
    for _ in range(20000):
        obj = mutators.mutate_json(rng, obj) if isinstance(obj, (dict, list)) and rng.random() < 0.9 else \
            {"layers": {"a": [1, {"b": 2}]}}
    assert same(mutators.JSON_INTERESTING, before)


def test_gguf_field_locator_finds_every_header_field():
    data = build([("k", (9, 5), [1, 2]), ("s", (8,), "v")], [("t", (4, 2), 0, b"\0" * 32)])
    kinds = [f.kind for f in fields(data)]
    assert kinds == ["n_tensors", "n_kv", "strlen", "vtype", "vtype", "arrlen", "scalar", "scalar", "strlen", "vtype",
                     "strlen", "strlen", "ndims", "dim", "dim", "ttype", "toffset"]
    rng = random.Random(0)
    changed = sum(mutate_gguf(rng, data) != data for _ in range(200))
    assert changed > 150


def test_dat_and_safetensors_mutators_change_structure():
    dat = struct.pack("<i", 1) + struct.pack("<i", 2) + b"ab" + struct.pack("<ii", 1, 1) + b"\0" * 4 + struct.pack("<ii", 0, 0)
    assert [k for _, k in dat_fields(dat)] == ["n_entries", "name_len", "ncall", "nval", "last_chunk", "dataset_len"]
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"m":"{\\"a\\": 1}"}}'
    st = struct.pack("<Q", len(header)) + header + b"\0" * 8
    rng = random.Random(1)
    outs = {mutate_safetensors(rng, st) for _ in range(100)}
    assert len(outs) > 50
    assert all(o[8:9] == b"{" for o in outs if struct.unpack_from("<Q", o)[0] < len(o))
    assert len({mutate_bytes(rng, st) for _ in range(100)}) > 50


def test_harness_reports_untyped_exceptions_hangs_and_crashes(tmp_path, monkeypatch):
    # a target that fails in each way the harness must notice; every third case passes
    def call(path, ctx):
        n = len(open(path, "rb").read()) % 5
        if n == 1:
            raise ValueError("boom")
        if n == 2:
            import time
            time.sleep(60)
        if n == 3:
            import os
            os._exit(3)
        if n == 4:
            from diffulex_edge.errors import CorruptFileError
            raise CorruptFileError("typed")

    fake = pyfuzz.Target("fake", ".bin", lambda tmp: [b"x" * 10, b"y" * 11, b"z" * 12, b"w" * 13, b"v" * 14],
                         lambda rng, d, ctx: d, call, warm_up=False)  # its seeds are the failures
    monkeypatch.setitem(pyfuzz.TARGETS, "fake", fake)
    monkeypatch.setattr(pyfuzz, "make_case", lambda t, ctx, seed, idx: ctx.seeds[idx % 5])
    s = pyfuzz.run("fake", 5, seed=0, out=str(tmp_path), timeout=2, start_method="fork")  # the fake target exists only here
    kinds = sorted((f["kind"], f["type"]) for f in s.findings)
    assert kinds == [("crash", "exit 3"), ("exception", "ValueError"), ("hang", "Timeout")], s.report()
    exc = next(f for f in s.findings if f["kind"] == "exception")
    assert exc["where"] == "(outside diffulex_edge)" and (tmp_path / "findings").is_dir()
    assert open(exc["file"], "rb").read() == b"y" * 11


# ---- regressions: inputs the fuzzers found, each now a typed error naming the file and tensor ----

def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def _imatrix_gguf(tmp_path, sums, counts, sums_type=0, metadata=()):
    return _write(tmp_path, "im.gguf", build([("general.type", (8,), "imatrix"), *metadata], [
        ("a.in_sum2", sums[0], sums_type, sums[1]), ("a.counts", counts[0], 0, counts[1])]))


def test_imatrix_gguf_regressions(tmp_path):
    from diffulex_edge.errors import CorruptFileError
    from diffulex_edge.gguf import load_imatrix

    one = struct.pack("<f", 1.0)
    ok = _imatrix_gguf(tmp_path, ((2, 1), one * 2), ((1, 1), struct.pack("<f", 2.0)))
    assert load_imatrix(ok)["a"].tolist() == [0.5, 0.5]
    cases = {
        # was ValueError: cannot reshape array of size 0 (in_sum2 with a zero-length row)
        "no empty dimension": (((0, 3), b""), ((1, 3), one * 3), 0, ()),
        # was IndexError: a 0-d in_sum2 has no shape[-1]
        "expected \\[n_mat, n\\]": (((), one), ((1,), one), 0, ()),
        "expected F32": (((32, 1), bytes(34)), ((1, 1), one), 8, ()),
        "non-finite token count": (((2, 1), one * 2), ((1, 1), struct.pack("<f", float("nan"))), 0, ()),
        "chunk_count must be a non-negative integer": (((2, 1), one * 2), ((1, 1), one), 0,
                                                        [("imatrix.chunk_count", (8,), "ten")]),
        "datasets must be an array of strings": (((2, 1), one * 2), ((1, 1), one), 0, [("imatrix.datasets", (5,), 3)]),
    }
    for match, (sums, counts, stype, md) in cases.items():
        p = _imatrix_gguf(tmp_path, sums, counts, stype, md)
        with pytest.raises(CorruptFileError, match=match) as e:
            load_imatrix(p)
        assert p in str(e.value)


def test_imatrix_dat_regressions(tmp_path):
    from diffulex_edge.errors import CorruptFileError
    from diffulex_edge.gguf.imatrix import read_imatrix

    def entry(name, ncall, vals):
        return struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, len(vals)) + struct.pack(f"<{len(vals)}f", *vals)

    dup = struct.pack("<i", 2) + entry(b"w", 1, [1.0]) + entry(b"w", 1, [2.0])
    with pytest.raises(CorruptFileError, match="'w' appears twice"):
        read_imatrix(_write(tmp_path, "dup.dat", dup))
    empty = struct.pack("<i", 1) + entry(b"w", 1, [])
    with pytest.raises(CorruptFileError, match="has 0 values"):
        read_imatrix(_write(tmp_path, "empty.dat", empty))


def test_gguf_zero_dim_shapes_numpy_cannot_build(tmp_path):
    # found by pyfuzz (gguf_read, imatrix_gguf): a zero dim makes the tensor 0 bytes, so it passed
    # the size check, but numpy raised "Maximum allowed dimension exceeded" / "array is too big"
    import os

    from diffulex_edge.errors import CorruptFileError, ShapeError
    from diffulex_edge.gguf import GGUFFile, dequantize

    reg = os.path.join(pyfuzz.HERE, "regressions", "gguf_reader")
    for name in sorted(os.listdir(reg)):
        with pytest.raises(CorruptFileError, match="2\\^60 elements"):
            GGUFFile.read(os.path.join(reg, name))
    for shape in [(0, 2**62, 2**62), (0, 2**61, 2), (-1, 4)]:
        with pytest.raises(ShapeError):
            dequantize(b"", "F32", shape=shape)
    f = GGUFFile.read(_write(tmp_path, "e.gguf", build([], [("e", (2**20, 2**20, 0), 0, b"")])))
    assert f.tensor("e").shape == (0, 2**20, 2**20)
