"""Mutation engine of ``pyfuzz``: generic byte mutations and struct-aware ones for GGUF, the legacy
imatrix ``.dat``, safetensors headers and JSON-like metadata. Every function takes a
``random.Random`` and is deterministic given its state.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from typing import Any, Callable, List, Sequence

from gguf_layout import fields as gguf_fields

INTERESTING8 = [0x00, 0x01, 0x7F, 0x80, 0xFF]
INTERESTING32 = [0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 64, 127, 128, 255, 256, 1023, 1024, 4096, 65535, 65536,
                 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING64 = INTERESTING32 + [1 << 32, 1 << 40, 1 << 48, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1]


def _put(data: bytearray, pos: int, size: int, value: int) -> None:
    value &= (1 << (8 * size)) - 1
    data[pos:pos + size] = value.to_bytes(size, "little")


def _get(data: bytes, pos: int, size: int) -> int:
    return int.from_bytes(data[pos:pos + size], "little")


def interesting_int(rng: random.Random, size: int, old: int = 0) -> int:
    choice = rng.random()
    if choice < 0.5:
        return rng.choice(INTERESTING64 if size == 8 else INTERESTING32)
    if choice < 0.8:  # near the old value
        return old + rng.choice([-16, -8, -4, -2, -1, 1, 2, 4, 8, 16, 32, 256])
    if choice < 0.9:
        return old * rng.choice([2, 3, 4, 1 << 8, 1 << 16])
    return rng.getrandbits(8 * size)


# ---- generic byte mutations --------------------------------------------------------------------

def _bitflip(rng, d: bytearray, others) -> None:
    if d:
        i = rng.randrange(len(d) * 8)
        d[i // 8] ^= 1 << (i % 8)


def _byte_interesting(rng, d: bytearray, others) -> None:
    if d:
        d[rng.randrange(len(d))] = rng.choice(INTERESTING8)


def _random_byte(rng, d: bytearray, others) -> None:
    if d:
        d[rng.randrange(len(d))] = rng.randrange(256)


def _int_interesting(rng, d: bytearray, others) -> None:
    size = rng.choice([2, 4, 8])
    if len(d) >= size:
        pos = rng.randrange(len(d) - size + 1)
        _put(d, pos, size, interesting_int(rng, size, _get(d, pos, size)))


def _truncate(rng, d: bytearray, others) -> None:
    if d:
        del d[rng.randrange(len(d)):]


def _extend(rng, d: bytearray, others) -> None:
    n = rng.choice([1, 4, 8, 31, 32, 100, rng.randrange(1, 2048)])
    fill = rng.choice([b"\0", b"\xff", None])
    d += fill * n if fill else bytes(rng.getrandbits(8) for _ in range(n))


def _chunk(rng, d: bytearray):
    if len(d) < 2:
        return 0, 0
    a = rng.randrange(len(d))
    return a, min(len(d), a + rng.choice([1, 2, 4, 8, 16, 64, rng.randrange(1, len(d) + 1)]))


def _delete_chunk(rng, d: bytearray, others) -> None:
    a, b = _chunk(rng, d)
    del d[a:b]


def _duplicate_chunk(rng, d: bytearray, others) -> None:
    a, b = _chunk(rng, d)
    if b > a:
        at = rng.randrange(len(d) + 1)
        d[at:at] = d[a:b]


def _splice(rng, d: bytearray, others) -> None:
    if not others:
        return
    o = rng.choice(others)
    if not o or not d:
        return
    a, b = rng.randrange(len(d)), rng.randrange(len(o))
    d[a:] = o[b:]


BYTE_MUTATORS: List[Callable] = [_bitflip, _byte_interesting, _random_byte, _int_interesting, _int_interesting,
                                 _truncate, _extend, _delete_chunk, _duplicate_chunk, _splice]


def mutate_bytes(rng: random.Random, data: bytes, others: Sequence[bytes] = ()) -> bytes:
    d = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4, 8])):
        rng.choice(BYTE_MUTATORS)(rng, d, others)
    return bytes(d)


# ---- GGUF ----------------------------------------------------------------------------------------

def _gguf_value(rng: random.Random, kind: str, old: int, size: int, file_len: int) -> int:
    if kind == "vtype":
        return rng.choice([rng.randrange(13), rng.randrange(13), 13, 14, 255, 0xFFFFFFFF])
    if kind == "ttype":
        return rng.choice([0, 1, 2, 3, 6, 8, 10, 12, 14, 16, 19, 20, 29, 30, 34, 35, 39, 40, 41, 4, 5, 31, 42, 99, 0xFFFFFFFF])
    if kind == "ndims":
        return rng.choice([0, 1, 2, 3, 4, 5, 8, 0xFFFFFFFF])
    if kind == "dim":
        return rng.choice([0, 1, 2, 31, 32, 33, 256, old * 2, old // 2, old + 1, 1 << 31, 1 << 32, 1 << 62, 1 << 63,
                           (1 << 64) - 1, interesting_int(rng, 8, old)])
    if kind == "toffset":
        return rng.choice([0, old + 1, old + 32, old - 32, old + 64, file_len, 1 << 63, (1 << 64) - 32,
                           interesting_int(rng, 8, old)])
    if kind in ("strlen", "arrlen", "n_tensors", "n_kv"):
        return rng.choice([0, old + 1, old - 1, old + 8, old * 2, file_len, file_len // 2, 1 << 32, (1 << 64) - 1,
                           interesting_int(rng, size, old)])
    return interesting_int(rng, size, old)


def mutate_gguf(rng: random.Random, data: bytes) -> bytes:
    fs = gguf_fields(data)
    if not fs:
        return mutate_bytes(rng, data)
    d = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        f = rng.choice(fs)
        _put(d, f.offset, f.size, _gguf_value(rng, f.kind, _get(d, f.offset, f.size), f.size, len(d)))
    return bytes(d)


# ---- legacy imatrix .dat -------------------------------------------------------------------------

def dat_fields(data: bytes) -> List[tuple]:
    """(offset, kind) of every int32 of a legacy imatrix file, as far as it can be followed."""
    out, pos = [], 0

    def i32(kind: str) -> int:
        nonlocal pos
        if pos + 4 > len(data):
            raise EOFError
        out.append((pos, kind))
        (v,) = struct.unpack_from("<i", data, pos)
        pos += 4
        return v

    try:
        n = i32("n_entries")
        for _ in range(min(max(n, 0), 1000)):
            pos += max(i32("name_len"), 0)
            i32("ncall")
            pos += 4 * max(i32("nval"), 0)
        i32("last_chunk")
        i32("dataset_len")
    except EOFError:
        pass
    return out


def mutate_dat(rng: random.Random, data: bytes) -> bytes:
    fs = dat_fields(data)
    if not fs:
        return mutate_bytes(rng, data)
    d = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3])):
        pos, kind = rng.choice(fs)
        (old,) = struct.unpack_from("<i", d, pos)
        new = rng.choice([0, 1, -1, old + 1, old - 1, old * 2, -old, len(d), len(d) // 4, 2**31 - 1, -(2**31),
                          2**30, interesting_int(rng, 4, old)])
        _put(d, pos, 4, new)
    return bytes(d)


# ---- JSON-like structures (safetensors headers, diffulex-edge metadata) --------------------------

JSON_INTERESTING: List[Any] = [0, 1, -1, 2, 3, 4, 8, 16, 32, 64, 128, 255, 256, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63),
                               10**30, 0.5, -0.0, 1e308, float("nan"), float("inf"), "", "x", "0", None, True, False, [],
                               {}, [0], [[1]], {"a": 1}, "fp16", "bf16", "int8", "int4", "nf4", "weight_only", "static",
                               "dynamic", "F16", "F32", "I8", "U8", "I64", "BOOL", "F8_E4M3"]


def _interesting(rng: random.Random, extra: Sequence[Any] = ()) -> Any:
    """A copy of one interesting value: the lists and dicts among them must not be shared, or a
    later mutation of the inserted node would change the table (and so every case after it)."""
    return copy.deepcopy(rng.choice(list(JSON_INTERESTING) + list(extra)))


def _paths(obj: Any, prefix=()) -> List[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _at(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(rng: random.Random, obj: Any, extra: Sequence[Any] = ()) -> Any:
    """A mutated deep copy of a JSON-like object: a random node replaced, deleted, duplicated,
    renamed or nudged."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            return _interesting(rng)
        path = rng.choice(paths)
        parent, key = _at(obj, path[:-1]), path[-1]
        old = parent[key]
        op = rng.randrange(7)
        if op == 0:
            parent[key] = _interesting(rng, extra)
        elif op == 1:
            del parent[key]
        elif op == 2 and isinstance(parent, dict):
            parent[rng.choice([str(key) + "_", "", "x", str(key).upper()])] = copy.deepcopy(old)
            if rng.random() < 0.5:
                del parent[key]
        elif op == 2:
            parent.insert(rng.randrange(len(parent) + 1), copy.deepcopy(old))
        elif op == 3 and isinstance(old, bool):
            parent[key] = not old
        elif op == 3 and isinstance(old, (int, float)):
            parent[key] = rng.choice([old + 1, old - 1, old * 2, -old, old // 2 if isinstance(old, int) else old / 2,
                                      float(old), str(old)])
        elif op == 3 and isinstance(old, str):
            parent[key] = rng.choice([old[:-1], old + old[-1:], old.upper(), old[::-1], ""])
        elif op == 4 and isinstance(old, list):
            if old and rng.random() < 0.5:
                old.pop(rng.randrange(len(old)))
            else:
                old.append(rng.choice([0, 1, -1, 2**62, "1", None]))
        elif op == 5 and isinstance(old, dict):
            old[rng.choice(["extra", "_", "format", "dtype", "shape"])] = _interesting(rng)
        else:  # swap two values of the same parent
            if isinstance(parent, list) and len(parent) > 1:
                i, j = rng.sample(range(len(parent)), 2)
                parent[i], parent[j] = parent[j], parent[i]
            elif isinstance(parent, dict) and len(parent) > 1:
                k2 = rng.choice([k for k in parent if k != key])
                parent[key], parent[k2] = parent[k2], parent[key]
    return obj


# ---- safetensors ---------------------------------------------------------------------------------

ST_DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "Q4", "f16", ""]


def _mutate_entry(rng: random.Random, e: Any, data_len: int) -> None:
    if not isinstance(e, dict):
        return
    field = rng.choice(["dtype", "shape", "data_offsets", "delete", "extra"])
    if field == "dtype":
        e["dtype"] = rng.choice(ST_DTYPES + [5, None])
    elif field == "shape":
        s = list(e["shape"]) if isinstance(e.get("shape"), list) else []  # an earlier mutation may have made it a scalar
        op = rng.randrange(5)
        if op == 0 or not s:
            s.append(rng.choice([0, 1, 2, 64]))
        elif op == 1:
            s.pop(rng.randrange(len(s)))
        elif op == 2:
            s[rng.randrange(len(s))] = rng.choice([0, -1, 1, 2**31, 2**62, 2**64, 1.5, "3", None])
        elif op == 3:
            s.reverse()
        else:
            s = [int(x) * 2 if isinstance(x, int) else x for x in s]
        e["shape"] = s
    elif field == "data_offsets":
        a, b = ((e["data_offsets"] if isinstance(e.get("data_offsets"), list) else []) + [0, 0])[:2]
        a, b = (a if isinstance(a, int) else 0), (b if isinstance(b, int) else 0)
        e["data_offsets"] = rng.choice([[b, a], [a, data_len + 1], [-1, b], [a], [a, b, b], None, [a, 2**64],
                                        [a + 1, b + 1], [0, b], [a, a], [a, b + 4], [a, b - 4]])
    elif field == "delete" and e:
        del e[rng.choice(list(e))]
    else:
        e[rng.choice(["extra", "dtype_", "offsets"])] = _interesting(rng)


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    """Mutate the JSON header: tensor entries (dtype, shape, offsets, names) and the
    ``__metadata__`` strings, including the JSON diffulex-edge stores inside one of them."""
    if len(data) < 8:
        return mutate_bytes(rng, data)
    n = struct.unpack_from("<Q", data)[0]
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        return mutate_bytes(rng, data)
    if not isinstance(header, dict):
        return mutate_bytes(rng, data)
    body = data[8 + n:]
    for _ in range(rng.choice([1, 1, 2, 3])):
        names = [k for k in header if k != "__metadata__"]
        op = rng.random()
        meta = header.get("__metadata__")
        if op < 0.4 and names:
            _mutate_entry(rng, header.get(rng.choice(names)), len(body))
        elif op < 0.75 and isinstance(meta, dict) and meta:
            key = rng.choice(list(meta))
            try:
                inner = json.loads(meta[key])
            except (TypeError, ValueError):
                inner = None
            if inner is not None and rng.random() < 0.85:
                meta[key] = json.dumps(mutate_json(rng, inner))
            else:
                meta[key] = rng.choice([str(meta[key])[: rng.randrange(1 + len(str(meta[key])))], 5, None, "{}", "[]"])
        elif op < 0.85 and names:  # rename, drop or duplicate a tensor
            k = rng.choice(names)
            e = header.pop(k)
            r = rng.random()
            if r < 0.4:
                header[k + rng.choice(["_", ".weight", "x"])] = e
            elif r < 0.7:
                header[k] = e
                header[rng.choice(names)] = copy.deepcopy(e)
        else:
            header = mutate_json(rng, header)
            if not isinstance(header, dict):
                header = {"__metadata__": header}
    raw = json.dumps(header).encode()
    if rng.random() < 0.1:
        raw += b" " * rng.randrange(1, 9)
    hlen = len(raw) if rng.random() < 0.9 else interesting_int(rng, 8, len(raw))
    return struct.pack("<Q", hlen & ((1 << 64) - 1)) + raw + body
