"""One quantized model called from 4 Python threads at once gives exactly the single-threaded
outputs (the native kernels run without the GIL, on the shared rayon pool)."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formats import FORMATS, bits, inputs, quantized_model  # noqa: E402

THREADS = 4
ROUNDS = 6  # each thread runs its 8 inputs this many times, interleaved with the other threads


def run_concurrently(model, per_thread_inputs, rounds=ROUNDS):
    """Each thread calls `model` on its own inputs `rounds` times; returns every output in order."""
    results = [[] for _ in per_thread_inputs]
    errors = []
    barrier = threading.Barrier(len(per_thread_inputs))

    def work(t):
        try:
            with torch.no_grad():  # grad mode is per thread
                barrier.wait()
                for _ in range(rounds):
                    for x in per_thread_inputs[t]:
                        results[t].append(model(x))
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(per_thread_inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("protect", [False, True], ids=["plain", "protected"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_concurrent_forward_is_bit_identical_to_single_threaded(fmt, protect):
    model = quantized_model(fmt, protect)
    per_thread = [inputs(seed=100 + t) for t in range(THREADS)]
    with torch.no_grad():
        want = [[bits(model(x)) for x in xs] for xs in per_thread]
    got = run_concurrently(model, per_thread)
    for t, outs in enumerate(got):
        for i, y in enumerate(outs):
            j = i % len(per_thread[t])
            assert torch.equal(bits(y), want[t][j]), (
                f"{fmt} protect={protect}: thread {t}, call {i} (input {tuple(per_thread[t][j].shape)} "
                f"{per_thread[t][j].dtype}) differs from the single-threaded result")
