"""Speed and memory: forward-pass latency with warm-up and repetitions, peak memory, on-disk size."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import nn

from ..quant.walk import run_model


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return None


class _PeakRSS:
    """Samples the process's resident memory in a background thread (Linux /proc)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval = interval_s
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            v = _rss_bytes()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v
            time.sleep(self.interval)

    def __enter__(self) -> "_PeakRSS":
        if self.base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def extra_bytes(self) -> Optional[int]:
        return None if self.base is None else max(0, self.peak - self.base)


@dataclass
class LatencyResult:
    """Timing of repeated forward passes (after warm-up)."""

    median_ms: float
    mean_ms: float
    stdev_ms: float
    min_ms: float
    p90_ms: float
    repetitions: int
    tokens_per_call: int
    peak_memory_bytes: Optional[int]
    """Peak resident memory above the level before the timed calls (Linux; None elsewhere)."""
    times_ms: List[float]

    @property
    def ms_per_token(self) -> float:
        return self.median_ms / max(1, self.tokens_per_call)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.tokens_per_call / self.median_ms if self.median_ms > 0 else float("inf")

    def __repr__(self) -> str:
        mem = "" if self.peak_memory_bytes is None else f", peak +{self.peak_memory_bytes / 2**20:.1f} MiB"
        return (f"LatencyResult(median {self.median_ms:.3f} ms (p90 {self.p90_ms:.3f}, sd {self.stdev_ms:.3f}) over "
                f"{self.repetitions} runs, {self.tokens_per_s:.1f} tokens/s, {self.ms_per_token:.3f} ms/token{mem})")


def measure_latency(
    model: nn.Module,
    inputs: Any,
    *,
    warmup: int = 2,
    repetitions: int = 10,
    tokens_per_call: Optional[int] = None,
) -> LatencyResult:
    """Time ``model(inputs)`` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs) under ``torch.inference_mode``. `tokens_per_call` defaults to the element count of
    a tensor input (e.g. batch * seq for token ids)."""
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    if tokens_per_call is None:
        tokens_per_call = inputs.numel() if isinstance(inputs, torch.Tensor) else 1
    was_training = model.training
    model.eval()
    times: List[float] = []
    try:
        with torch.inference_mode():
            for _ in range(max(0, warmup)):
                run_model(model, inputs)
            with _PeakRSS() as mem:
                for _ in range(repetitions):
                    t0 = time.perf_counter()
                    run_model(model, inputs)
                    times.append(1000.0 * (time.perf_counter() - t0))
    finally:
        model.train(was_training)
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return LatencyResult(
        median_ms=statistics.median(times), mean_ms=statistics.fmean(times),
        stdev_ms=statistics.stdev(times) if len(times) > 1 else 0.0, min_ms=ordered[0], p90_ms=p90,
        repetitions=repetitions, tokens_per_call=int(tokens_per_call), peak_memory_bytes=mem.extra_bytes, times_ms=times,
    )


def measure_speedup(
    reference: nn.Module, model: nn.Module, inputs: Any, *, warmup: int = 1, rounds: int = 5
) -> "tuple[float, float, float]":
    """Speed of `model` relative to `reference` on the same inputs, robust to load changes on a
    shared machine: each round times one call of each (alternating which goes first) and the
    result is the median of the per-round ratios ``t_reference / t_model`` (> 1: `model` is
    faster). Returns ``(speedup, median_ms_reference, median_ms_model)``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    states = (reference.training, model.training)
    reference.eval()
    model.eval()
    t_ref: List[float] = []
    t_mod: List[float] = []
    try:
        with torch.inference_mode():
            for _ in range(max(0, warmup)):
                run_model(reference, inputs)
                run_model(model, inputs)
            for r in range(rounds):
                pair = ((reference, t_ref), (model, t_mod)) if r % 2 == 0 else ((model, t_mod), (reference, t_ref))
                for m, acc in pair:
                    t0 = time.perf_counter()
                    run_model(m, inputs)
                    acc.append(1000.0 * (time.perf_counter() - t0))
    finally:
        reference.train(states[0])
        model.train(states[1])
    ratios = [a / b if b > 0 else float("inf") for a, b in zip(t_ref, t_mod)]
    return statistics.median(ratios), statistics.median(t_ref), statistics.median(t_mod)


def disk_size_bytes(model: nn.Module) -> int:
    """Bytes of ``save_quantized(model, '<tmp>.safetensors')``: what the model takes on disk."""
    from ..quant.serialization import save_quantized

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save_quantized(model, path)
        return os.path.getsize(path)
