"""kill -9 and SIGINT during save_quantized (.pt, .safetensors) and export_gguf: an existing
destination stays byte-identical, no temporary file stays behind, SIGINT is a KeyboardInterrupt.

Writers run in processes forked from one server (crash_child.py) that stops them at a marked
point (the file opened, the data written, the fsync, the rename) or lets them run; the test then
signals them. benchmarks/crash_safety.py runs the many-trial version at random moments.
"""

from __future__ import annotations

import os
import random
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import EXT, SIGINT, SIGKILL, ForkServer, leftovers, read  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 safety is a Linux guarantee")

JOBS = ["save_pt", "save_st", "gguf"]
SCALE = 2  # models of 80 MB (.pt/.safetensors) and 27 MB (GGUF Q8_0): writes of 0.1-0.3 s
OLD = b"an existing destination file " * 1000


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """What a complete write of each job produces (written twice: the bytes must not vary), and
    how long the write takes from its first marker to its return (the span random kills aim at)."""
    out = {}
    for job in JOBS:
        runs, spans = [], []
        for _ in range(2):  # same file name as the tests' (torch.save records it in the archive)
            p = dest_in(tmp_path_factory.mktemp("reference"), job)
            trial = server.run(job, p, scale=SCALE)
            assert trial.code == 0, trial.lines
            runs.append(read(p))
            spans.append(trial.seconds_between("BEGIN", "DONE"))
        assert runs[0] == runs[1], f"{job}: two runs wrote different bytes"
        out[job] = runs[0]
        out[job, "span"] = min(spans)
    return out


def assert_same_file(job: str, got: bytes, want: bytes) -> None:
    """Byte equality, except that torch.save names the archive's root folder after the file it is
    given: /proc/self/fd/N on the O_TMPFILE path, the real name on the fallback path."""
    if job != "save_pt" or got == want:
        assert got == want
        return
    import io

    import torch

    a, b = (torch.load(io.BytesIO(x), weights_only=True) for x in (got, want))
    assert a["diffulex_edge"] == b["diffulex_edge"] and a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        w = b["state_dict"][k]
        assert v.dtype == w.dtype and torch.equal(v.view(torch.uint8) if v.dtype.is_floating_point else v,
                                                  w.view(torch.uint8) if w.dtype.is_floating_point else w), k


def dest_in(tmp_path, job) -> str:
    p = tmp_path / f"model{EXT[job]}"
    p.write_bytes(OLD)
    return str(p)


@pytest.mark.parametrize("hook", ["begin", "written", "fsync"])
@pytest.mark.parametrize("job", JOBS)
def test_kill9_at_each_stage_leaves_old_file_and_nothing_else(server, tmp_path, job, hook):
    dest = dest_in(tmp_path, job)
    trial = server.run(job, dest, hook, sig=SIGKILL, at="AT ")
    assert trial.code == -SIGKILL, trial.lines
    assert read(dest) == OLD
    assert leftovers(str(tmp_path), keep=[os.path.basename(dest)]) == []


@pytest.mark.parametrize("job", ["save_pt", "save_st"])
def test_kill9_between_link_and_rename_is_cleaned_by_the_next_write(server, tmp_path, reference, job):
    """The one moment a named temporary exists: linked, not yet renamed over the destination."""
    dest = dest_in(tmp_path, job)
    trial = server.run(job, dest, "replace", sig=SIGKILL, at="AT ", scale=SCALE)
    assert trial.code == -SIGKILL, trial.lines
    assert read(dest) == OLD
    left = leftovers(str(tmp_path), keep=[os.path.basename(dest)])
    assert len(left) == 1 and re.fullmatch(rf"\.{re.escape(os.path.basename(dest))}\.tmp-{trial.pid}-\d+", left[0]), left
    assert server.run(job, dest, scale=SCALE).code == 0
    assert read(dest) == reference[job]
    assert leftovers(str(tmp_path), keep=[os.path.basename(dest)]) == []


@pytest.mark.parametrize("job", JOBS)
def test_kill9_at_random_moments(server, tmp_path, reference, job):
    rng = random.Random(f"kill9-{job}")
    name = os.path.basename(dest_in(tmp_path, job))
    for _ in range(4):
        dest = dest_in(tmp_path, job)
        trial = server.run(job, dest, sig=SIGKILL, delay=rng.uniform(0.0, reference[job, "span"]), scale=SCALE)
        assert read(dest) in (OLD, reference[job]), f"{job}: destination neither old nor complete after {trial.lines}"
        assert leftovers(str(tmp_path), keep=[name]) == []


@pytest.mark.parametrize("hook", ["begin", "written"])
@pytest.mark.parametrize("job", JOBS)
def test_sigint_is_a_keyboard_interrupt_and_leaves_old_file(server, tmp_path, job, hook):
    dest = dest_in(tmp_path, job)
    trial = server.run(job, dest, hook, sig=SIGINT, at="AT ")
    assert trial.code == 130 and "KeyboardInterrupt" in trial.lines, trial.lines
    assert read(dest) == OLD
    assert leftovers(str(tmp_path), keep=[os.path.basename(dest)]) == []


@pytest.mark.parametrize("job", JOBS)
def test_sigint_at_random_moments(server, tmp_path, reference, job):
    rng = random.Random(f"sigint-{job}")
    for _ in range(4):
        dest = dest_in(tmp_path, job)
        trial = server.run(job, dest, sig=SIGINT, delay=rng.uniform(0.0, reference[job, "span"]), scale=SCALE)
        assert trial.code in (0, 130), trial.lines
        # an interrupt that lands after the rename (while the writer returns) still raises
        assert read(dest) in ((OLD, reference[job]) if trial.code == 130 else (reference[job],))
        left = leftovers(str(tmp_path), keep=[os.path.basename(dest)])
        assert left == [], left


@pytest.fixture(scope="module")
def fallback_server():
    s = ForkServer(env={"DIFFULEX_EDGE_NO_TMPFILE": "1"})
    yield s
    s.close()


@pytest.mark.parametrize("job", JOBS)
def test_fallback_path_cleans_up_after_dead_writers(fallback_server, tmp_path, reference, job):
    """Without O_TMPFILE, kill -9 leaves a named temporary (file or private directory); the next
    write to the same destination removes it, as it does on the link/rename window above."""
    dest = dest_in(tmp_path, job)
    trial = fallback_server.run(job, dest, "written", sig=SIGKILL, at="AT ")
    assert trial.code == -SIGKILL
    assert read(dest) == OLD
    left = leftovers(str(tmp_path), keep=[os.path.basename(dest)])
    assert len(left) == 1 and left[0].startswith(f".{os.path.basename(dest)}.tmp-{trial.pid}-"), left
    sigint = fallback_server.run(job, dest, "written", sig=SIGINT, at="AT ")
    assert sigint.code == 130
    assert leftovers(str(tmp_path), keep=[os.path.basename(dest)]) == [], "SIGINT cleans up, and the dead one's is gone"
    assert read(dest) == OLD
    assert fallback_server.run(job, dest, scale=SCALE).code == 0
    assert_same_file(job, read(dest), reference[job])
    assert leftovers(str(tmp_path), keep=[os.path.basename(dest)]) == []
