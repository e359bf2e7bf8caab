"""Many-trial crash safety: kill -9 (and SIGINT) save_quantized (.pt, .safetensors) and export_gguf
at random moments of the write, and count what the destination and its directory look like.

    python benchmarks/crash_safety.py [--trials 50] [--jobs save_pt,save_st,gguf] [--signals kill,int] [--scale 2]

Each trial starts from an existing destination file, starts a write of a model (scale 2: 80 MB
.pt/.safetensors, 27 MB GGUF Q8_0), waits until the write has begun, sleeps a uniform random
time in [0, 1.2 x the measured write time] and signals the writer. Counted per job and signal:
destination intact (byte-identical to the old file, or to a complete new write), old / new,
temporary entries left in the directory right after the trial, and whether the next write
removed them. Writers run in processes forked from tests/reliability/crash_child.py's server.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "reliability"))
from harness import EXT, ForkServer, leftovers, read  # noqa: E402

OLD = b"an existing destination file " * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--jobs", default="save_pt,save_st,gguf")
    ap.add_argument("--signals", default="kill,int")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    sigs = {"kill": signal.SIGKILL, "int": signal.SIGINT}
    rng = random.Random(a.seed)
    server = ForkServer()
    work = tempfile.mkdtemp(prefix="crash-safety-")
    print(f"{'job':8} {'signal':7} {'trials':>6} {'intact':>7} {'old':>4} {'new':>4} {'temp left':>9} "
          f"{'cleaned by next write':>21} {'exit codes':>18} {'write s':>7}")
    try:
        for job in a.jobs.split(","):
            ref_dir = os.path.join(work, "ref")
            os.makedirs(ref_dir, exist_ok=True)
            dest_name = f"model{EXT[job]}"
            spans, ref = [], None
            for _ in range(3):
                t = server.run(job, os.path.join(ref_dir, dest_name), scale=a.scale)
                assert t.code == 0, t.lines
                spans.append(t.seconds_between("BEGIN", "DONE"))
                data = read(os.path.join(ref_dir, dest_name))
                assert ref is None or data == ref, f"{job}: complete writes differ between runs"
                ref = data
            span = sorted(spans)[1]
            for sname in a.signals.split(","):
                intact = old = new = left = cleaned = 0
                codes = {}
                d = os.path.join(work, f"{job}-{sname}")
                os.makedirs(d)
                dest = os.path.join(d, dest_name)
                for _ in range(a.trials):
                    with open(dest, "wb") as f:
                        f.write(OLD)
                    t = server.run(job, dest, sig=sigs[sname], delay=rng.uniform(0.0, 1.2 * span), scale=a.scale)
                    codes[t.code] = codes.get(t.code, 0) + 1
                    got = read(dest)
                    old += got == OLD
                    new += got == ref
                    intact += got in (OLD, ref)
                    if leftovers(d, keep=[dest_name]):
                        left += 1
                        with open(dest, "wb") as f:
                            f.write(OLD)
                        assert server.run(job, dest, scale=a.scale).code == 0
                        cleaned += not leftovers(d, keep=[dest_name])
                        for n in leftovers(d, keep=[dest_name]):  # keep later trials independent
                            p = os.path.join(d, n)
                            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
                code_text = " ".join(f"{c}:{n}" for c, n in sorted(codes.items()))
                print(f"{job:8} {sname:7} {a.trials:6d} {intact:3d}/{a.trials:<3d} {old:4d} {new:4d} "
                      f"{left:5d}/{a.trials:<3d} {cleaned:17d}/{left:<3d} {code_text:>18} {span:7.3f}", flush=True)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
