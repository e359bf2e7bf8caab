"""Quantized bytes, GGUF files and native forward outputs are bit-identical across runs and across
rayon thread counts: determinism_job.py hashes them in fresh processes with RAYON_NUM_THREADS=1
and =2 (twice), and every hash must agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "determinism_job.py")


def hashes(tmp_path, threads: int, tag: str) -> dict:
    out = tmp_path / tag
    out.mkdir()
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, JOB, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    h = json.loads(r.stdout)
    assert h.pop("_threads") == threads
    return h


def differences(a: dict, b: dict) -> list:
    assert a.keys() == b.keys()
    return sorted(k for k in a if a[k] != b[k])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("determinism")
    return {"1": hashes(d, 1, "t1"), "2a": hashes(d, 2, "t2a"), "2b": hashes(d, 2, "t2b")}


def test_covers_every_format_type_and_export(runs):
    from diffulex_edge.gguf import GGML_TYPES

    keys = runs["1"].keys()
    assert {k.split("/")[1] for k in keys if k.startswith("gguf/")} == set(GGML_TYPES)
    assert sum(k.startswith("layer/") and "/forward/" in k for k in keys) == 9 * 2 * 6
    assert sum(k.startswith("export/") for k in keys) == 8


def test_same_across_runs(runs):
    assert differences(runs["2a"], runs["2b"]) == []


def test_same_across_thread_counts(runs):
    assert differences(runs["1"], runs["2a"]) == []
