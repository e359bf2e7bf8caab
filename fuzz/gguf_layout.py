"""A GGUF v3 byte builder and a lenient field locator, written from the format description (ggml
docs/gguf.md) with nothing but ``struct``, so the fuzzers and seed generator do not depend on the
code under test.

``fields(data)`` walks a (possibly corrupt) file and returns where each header field lies, which
the struct-aware mutators use to change counts, string lengths, value types, dims, tensor types
and offsets in place. It stops quietly at the first thing it cannot follow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

# value type id -> struct code for the scalar types
SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# ggml type id -> (block size, bytes per block), the subset the seeds use
GGML_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 12: (256, 144), 14: (256, 210), 20: (32, 18),
              30: (1, 2), 35: (256, 66)}


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: Sequence[int], v: Any) -> bytes:
    t = vtype[0]
    if t in SCALAR:
        return struct.pack(SCALAR[t], v)
    if t == STRING:
        return _str(v)
    if t == ARRAY:
        return struct.pack("<IQ", vtype[1], len(v)) + b"".join(_value(vtype[1:], x) for x in v)
    raise ValueError(f"unknown value type {t}")


def build(metadata: Sequence[Tuple[str, Sequence[int], Any]], tensors: Sequence[Tuple[str, Sequence[int], int, bytes]],
          alignment: int = 32, version: int = 3) -> bytes:
    """metadata: ``(key, type path, value)``; tensors: ``(name, GGUF dims, ggml type id, bytes)``."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(metadata))]
    for k, vt, v in metadata:
        out += [_str(k), struct.pack("<I", vt[0]), _value(vt, v)]
    offset, datas = 0, []
    for name, dims, tid, raw in tensors:
        out += [_str(name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", tid, offset)]
        pad = -len(raw) % alignment
        datas.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    head = b"".join(out)
    head += b"\0" * (-len(head) % alignment)
    return head + b"".join(datas)


@dataclass(frozen=True)
class Field:
    offset: int
    size: int  # bytes: 4 or 8
    kind: str  # n_tensors n_kv strlen vtype arrlen scalar ndims dim ttype toffset


def fields(data: bytes) -> List[Field]:
    out: List[Field] = []
    pos = 0

    def u(size: int, kind: str) -> int:
        nonlocal pos
        if pos + size > len(data):
            raise EOFError
        out.append(Field(pos, size, kind))
        v = int.from_bytes(data[pos:pos + size], "little")
        pos += size
        return v

    def skip_str() -> None:
        nonlocal pos
        n = u(8, "strlen")
        if pos + n > len(data):
            raise EOFError
        pos += n

    def value(t: int, depth: int) -> None:
        nonlocal pos
        if t in SCALAR:
            size = struct.calcsize(SCALAR[t])
            if size >= 4:
                u(size, "scalar")
            else:
                pos += size
        elif t == STRING:
            skip_str()
        elif t == ARRAY and depth < 4:
            et = u(4, "vtype")
            n = u(8, "arrlen")
            for _ in range(min(n, 64)):
                value(et, depth + 1)
            if n > 64:
                raise EOFError
        else:
            raise EOFError

    try:
        if data[:4] != b"GGUF":
            return out
        pos = 8
        nt = u(8, "n_tensors")
        nkv = u(8, "n_kv")
        for _ in range(min(nkv, 256)):
            skip_str()
            value(u(4, "vtype"), 0)
        for _ in range(min(nt, 256)):
            skip_str()
            nd = u(4, "ndims")
            for _ in range(min(nd, 8)):
                u(8, "dim")
            u(4, "ttype")
            u(8, "toffset")
    except (EOFError, struct.error):
        pass
    return out
