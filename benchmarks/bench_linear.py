#!/usr/bin/env python
"""Quantized Linear speed on CPU, as ratios to torch FP32 `F.linear` measured in the same run.

    RAYON_NUM_THREADS=2 python benchmarks/bench_linear.py            # full table (a few minutes)
    RAYON_NUM_THREADS=2 python benchmarks/bench_linear.py --quick    # one shape, few reps (smoke test)

Every figure is a median over interleaved rounds: in each round every variant is timed once, and
the ratio is taken within the round, so load from other processes that drifts over the run hits
the baseline and the variant alike. Ratios are speedups: > 1 means faster than torch FP32.
Optional baselines (torchao, optimum-quanto) are measured when they import, else shown as "-".
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # before the native module starts its pool

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from diffulex_edge import _native
from diffulex_edge.quant.nn import QuantizedLinear

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features, out_features) as nn.Linear(in, out)
BATCHES = [1, 8, 64]


def per_call(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call, looping until `min_time` has passed (one untimed warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        t = time.perf_counter() - t0
        if t >= min_time:
            return t / n


def interleaved(variants: Dict[str, Callable[[], object]], rounds: int, min_time: float) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name].append(per_call(fn, min_time))
    return times


def ratio(times: Dict[str, List[float]], base: str, name: str) -> Optional[float]:
    if name not in times:
        return None
    return statistics.median(b / t for b, t in zip(times[base], times[name]))


# ---- optional baselines -------------------------------------------------------------------

def torchao_variants(lin: nn.Linear) -> Dict[str, nn.Module]:
    out: Dict[str, nn.Module] = {}
    try:
        import copy

        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except Exception:
        return out
    for name, cfg in [("torchao int8wo", Int8WeightOnlyConfig), ("torchao int8dq", Int8DynamicActivationInt8WeightConfig)]:
        try:
            m = nn.Sequential(copy.deepcopy(lin))
            quantize_(m, cfg())
            out[name] = m
        except Exception as e:  # a config this torch/torchao pair cannot run on CPU
            print(f"  ({name} unavailable: {type(e).__name__}: {str(e)[:80]})")
    return out


def quanto_variants(lin: nn.Linear) -> Dict[str, nn.Module]:
    out: Dict[str, nn.Module] = {}
    try:
        import copy

        from optimum.quanto import freeze, qint4, qint8, quantize
    except Exception:
        return out
    for name, qt in [("quanto qint8", qint8), ("quanto qint4", qint4)]:
        try:
            m = nn.Sequential(copy.deepcopy(lin))
            quantize(m, weights=qt)
            freeze(m)
            out[name] = m
        except Exception as e:
            print(f"  ({name} unavailable: {type(e).__name__}: {str(e)[:80]})")
    return out


# ---- linear table ---------------------------------------------------------------------------

COLUMNS = [
    "torch bf16", "int8-wo", "int4-wo g32", "int4-wo g128", "w8a8",
    "torchao int8wo", "torchao int8dq", "quanto qint8", "quanto qint4",
]


def bench_shape(k: int, n: int, batches: List[int], rounds: int, min_time: float, optional: bool):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False)
    w32, w16 = lin.weight.detach(), lin.weight.detach().to(torch.bfloat16)
    ours = {
        "int8-wo": QuantizedLinear.from_linear(lin, "int8"),
        "int4-wo g32": QuantizedLinear.from_linear(lin, "int4", group_size=32),
        "int4-wo g128": QuantizedLinear.from_linear(lin, "int4", group_size=128),
        "w8a8": QuantizedLinear.from_linear(lin, "int8", act_mode="dynamic"),
    }
    others: Dict[str, nn.Module] = {}
    if optional:
        others.update(torchao_variants(lin))
        others.update(quanto_variants(lin))
    rows = []
    for m in batches:
        x = torch.randn(m, k)
        xb = x.to(torch.bfloat16)
        variants: Dict[str, Callable[[], object]] = {
            "torch fp32": lambda x=x: F.linear(x, w32),
            "torch bf16": lambda xb=xb: F.linear(xb, w16),
        }
        for name, mod in {**ours, **others}.items():
            variants[name] = (lambda mod=mod, x=x: mod(x))
        if m == 1:
            # the memory-bandwidth yardstick, timed in the same rounds as the kernels
            variants["copy"] = lambda: copy_dst.copy_(copy_src)
        with torch.inference_mode():
            for name, fn in list(variants.items()):
                try:
                    fn()
                except Exception as e:
                    print(f"  ({name} failed at batch {m}: {type(e).__name__}: {str(e)[:80]})")
                    del variants[name]
            times = interleaved(variants, rounds, min_time)
        rows.append((m, statistics.median(times["torch fp32"]), {c: ratio(times, "torch fp32", c) for c in COLUMNS}, times))
    storage = {name: sum(b.numel() * b.element_size() for b in mod.buffers()) for name, mod in ours.items()}
    storage["torch fp32"] = k * n * 4
    return rows, storage


COPY_BYTES = 64 * 1024 * 1024  # twice the L3 of the machine this was written on
copy_src = torch.randn(COPY_BYTES // 4)
copy_dst = torch.empty_like(copy_src)


def bandwidth(times: Dict[str, List[float]], storage: Dict[str, int]):
    """Per round: weight bytes / time, and that as a fraction of the copy's (read + write) bytes / time."""
    out = {}
    for name, nbytes in storage.items():
        if name not in times:
            continue
        gbs = [nbytes / t / 1e9 for t in times[name]]
        copy = [2 * COPY_BYTES / t / 1e9 for t in times["copy"]]
        out[name] = (statistics.median(gbs), statistics.median(g / c for g, c in zip(gbs, copy)))
    return out, statistics.median(2 * COPY_BYTES / t / 1e9 for t in times["copy"])


def fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


# ---- quantization speed -------------------------------------------------------------------------

def torch_quantize_int8(w: torch.Tensor):
    """The INT8 per-channel symmetric formula of src/formats/int8.rs in torch ops."""
    s = w.abs().amax(dim=1, keepdim=True) / 127.5
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(w / s).clamp(-128, 127).to(torch.int8)
    return q, s.squeeze(1), torch.zeros(w.shape[0], dtype=torch.int8)


def torch_quantize_int4(w: torch.Tensor, group: int):
    """The INT4 grouped asymmetric formula of src/formats/int4.rs in torch ops (cols % group == 0)."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo = g.amin(dim=2, keepdim=True).clamp(max=0)
    hi = g.amax(dim=2, keepdim=True).clamp(min=0)
    s = (hi - lo) / 15
    s = torch.where(s == 0, torch.ones_like(s), s)
    zp = (-torch.round(lo / s)).clamp(0, 15)
    u = (torch.round(g / s) + zp).clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed, s.reshape(n, -1), zp.to(torch.uint8).reshape(n, -1)


def bench_quantize(rounds: int, n: int = 4096, k: int = 14336):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    wn = w.numpy()
    # same bytes as ours (sanity check, not timed)
    q_ours = _native.quantize_int8(wn, True)[0]
    assert torch.equal(torch.from_numpy(q_ours), torch_quantize_int8(w)[0]), "int8 torch twin differs"
    p_ours = _native.quantize_int4(wn, 32, False)[0]
    assert torch.equal(torch.from_numpy(p_ours), torch_quantize_int4(w, 32)[0]), "int4 torch twin differs"
    del q_ours, p_ours
    dst = torch.empty_like(w)
    variants = {
        "copy (clone)": lambda: w.clone(),
        "copy (into)": lambda: dst.copy_(w),
        "ours int8": lambda: _native.quantize_int8(wn, True),
        "torch int8": lambda: torch_quantize_int8(w),
        "ours int4 g32": lambda: _native.quantize_int4(wn, 32, False),
        "torch int4 g32": lambda: torch_quantize_int4(w, 32),
    }
    times = interleaved(variants, rounds, 0.0)
    return {name: statistics.median(t) for name, t in times.items()}, times, w.numel() * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape (4096x4096), batch 1 and 64, 3 rounds: a smoke test")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-optional", action="store_true", help="skip torchao / optimum-quanto even if installed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    min_time = 0.01 if args.quick else 0.05
    shapes = SHAPES[:1] if args.quick else SHAPES
    batches = [1, 64] if args.quick else BATCHES
    info = _native.kernel_info()
    print(f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, RAYON_NUM_THREADS "
          f"{os.environ.get('RAYON_NUM_THREADS')}, native kernel {info['selected']} (available {', '.join(info['available'])})")
    print(f"{rounds} interleaved rounds; ratios are speedups over torch fp32 F.linear (median of per-round ratios)\n")

    header = "| in x out | batch | torch fp32 ms | " + " | ".join(COLUMNS) + " |"
    print(header)
    print("|" + "---|" * (3 + len(COLUMNS)))
    bw_rows = []
    results = {}
    for k, n in shapes:
        rows, storage = bench_shape(k, n, batches, rounds, min_time, not args.no_optional)
        for m, t32, ratios, times in rows:
            results[(k, n, m)] = ratios
            print(f"| {k}x{n} | {m} | {t32 * 1e3:.2f} | " + " | ".join(fmt_ratio(ratios[c]) for c in COLUMNS) + " |", flush=True)
            if m == 1:
                bw, bw_copy = bandwidth(times, storage)
                bw_rows.append((k, n, bw, bw_copy))

    print("\nweight bandwidth at batch 1: weight bytes (incl. scales) / time, and in parentheses as a share of the "
          f"copy bandwidth (read + write bytes / time of a {COPY_BYTES >> 20} MiB tensor copy, timed in the same rounds)\n")
    cols = ["torch fp32", "int8-wo", "int4-wo g32", "int4-wo g128", "w8a8"]
    print("| in x out | copy | " + " | ".join(cols) + " |")
    print("|" + "---|" * (2 + len(cols)))
    for k, n, bw, bw_copy in bw_rows:
        print(f"| {k}x{n} | {bw_copy:.1f} GB/s | "
              + " | ".join(f"{bw[c][0]:.1f} GB/s ({100 * bw[c][1]:.0f}%)" if c in bw else "-" for c in cols) + " |")

    qt, qtimes, nbytes = bench_quantize(rounds)
    print(f"\nquantization of a 4096x14336 f32 matrix ({nbytes / 1e6:.0f} MB), median ms\n")
    print("| op | ours ms | torch-ops ms | ours vs torch-ops | copy into ms | ours vs copy into | clone ms |")
    print("|---|---|---|---|---|---|---|")
    for label, o, t in [("INT8 per-channel", "ours int8", "torch int8"), ("INT4 g32", "ours int4 g32", "torch int4 g32")]:
        sp = statistics.median(a / b for a, b in zip(qtimes[t], qtimes[o]))
        vc = statistics.median(a / b for a, b in zip(qtimes["copy (into)"], qtimes[o]))
        print(f"| {label} | {qt[o] * 1e3:.1f} | {qt[t] * 1e3:.1f} | {sp:.1f}x | {qt['copy (into)'] * 1e3:.1f} | "
              f"{vc:.2f}x | {qt['copy (clone)'] * 1e3:.1f} |")
    print("\n(ours allocates its outputs, like the torch-ops version and clone; 'copy into' writes a preallocated tensor;"
          " 'ours vs copy into' > 1 would mean faster than the copy)")

    if (4096, 4096, 1) in results:
        r1 = results[(4096, 4096, 1)]
        bw = bw_rows[0][2]
        print("\ntargets (4096x4096):")
        print(f"  batch 1 int4-wo g32 >= 3.0x: {fmt_ratio(r1['int4-wo g32'])}; int8-wo >= 2.0x: {fmt_ratio(r1['int8-wo'])}; "
              f">= 60% copy bw: int4 {100 * bw['int4-wo g32'][1]:.0f}%, int8 {100 * bw['int8-wo'][1]:.0f}%")
    if (4096, 4096, 64) in results:
        r64 = results[(4096, 4096, 64)]
        print(f"  batch 64 w8a8 >= 1.5x: {fmt_ratio(r64['w8a8'])}; int4-wo g32 >= 1.0x: {fmt_ratio(r64['int4-wo g32'])}")


if __name__ == "__main__":
    main()
