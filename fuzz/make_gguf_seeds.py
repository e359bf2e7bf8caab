"""Write the small GGUF seed files of the fuzz corpus (fuzz/seeds/gguf_reader/, a few KB in all)
and the crash regressions (fuzz/regressions/gguf_reader/).

Run from anywhere: ``python3 fuzz/make_gguf_seeds.py``; deterministic, standard library only.
"""

from __future__ import annotations

import math
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_layout import build  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def f32(values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def seeds():
    every_type = [
        ("general.architecture", (8,), "llama"), ("u8", (0,), 7), ("i8", (1,), -7), ("u16", (2,), 65535),
        ("i16", (3,), -300), ("u32", (4,), 4_000_000_000), ("i32", (5,), -5), ("f32", (6,), 1.5e-5),
        ("bool", (7,), True), ("u64", (10,), 2**64 - 1), ("i64", (11,), -(2**63)), ("f64", (12,), math.pi),
        ("tokens", (9, 8), ["<s>", "héllo", ""]), ("nested", (9, 9, 5), [[1, 2], [], [3]]), ("empty", (9, 6), []),
    ]
    yield "metadata_only.gguf", build(every_type, [])
    yield "empty.gguf", build([], [])
    q8 = bytes([0x00, 0x3C]) + bytes(range(32))  # one Q8_0 block, scale 1.0
    q4k = bytes(range(144))
    yield "tensors.gguf", build([("general.architecture", (8,), "llama")], [
        ("blk.0.attn_q.weight", (32, 2), 8, q8 * 2),
        ("norm", (4,), 0, f32([1.0, -2.0, 0.5, 0.0])),
        ("half", (2, 2), 1, struct.pack("<4e", 1.0, 2.0, -1.0, 0.25)),
        ("kq", (256,), 12, q4k),
        ("zero", (0, 3), 0, b""),
    ])
    yield "aligned64.gguf", build([("general.alignment", (4,), 64)], [
        ("a", (3,), 0, f32([1, 2, 3])), ("b", (32,), 2, bytes(18))], alignment=64)
    yield "imatrix.gguf", build([
        ("general.type", (8,), "imatrix"), ("imatrix.datasets", (9, 8), ["wiki.txt"]),
        ("imatrix.chunk_count", (4,), 2), ("imatrix.chunk_size", (4,), 512)], [
        ("blk.0.ffn_down.weight.in_sum2", (8, 1), 0, f32([1, 2, 3, 4, 5, 6, 7, 8])),
        ("blk.0.ffn_down.weight.counts", (1, 1), 0, f32([2])),
        ("blk.0.ffn_up_exps.weight.in_sum2", (4, 2), 0, f32([1, 1, 1, 1, 2, 2, 2, 2])),
        ("blk.0.ffn_up_exps.weight.counts", (1, 2), 0, f32([1, 2])),
    ])
    yield "v2.gguf", build([("k", (8,), "v")], [("t", (2,), 0, f32([1, 2]))], version=2)


def regressions():
    """Inputs that once got through the reader and broke its users; each must now be refused."""
    # a zero dim makes the tensor 0 bytes, so the size check passed, but numpy cannot build the shape
    yield "zero_dim_overflow.gguf", build([], [("t", (2**62, 2**62, 0), 0, b"")])
    # fewer than 2^63 elements, but more than 2^63 bytes once numpy makes them float32/float64
    yield "zero_dim_too_many_bytes.gguf", build([], [("u", (2**61, 2, 0), 0, b"")])


def main() -> None:
    out = os.path.join(HERE, "seeds", "gguf_reader")
    os.makedirs(out, exist_ok=True)
    total = 0
    for name, data in seeds():
        with open(os.path.join(out, name), "wb") as fh:
            fh.write(data)
        total += len(data)
    reg = os.path.join(HERE, "regressions", "gguf_reader")
    os.makedirs(reg, exist_ok=True)
    for name, data in regressions():
        with open(os.path.join(reg, name), "wb") as fh:
            fh.write(data)
        total += len(data)
    print(f"wrote {out} and {reg} ({total} bytes)")


if __name__ == "__main__":
    main()
