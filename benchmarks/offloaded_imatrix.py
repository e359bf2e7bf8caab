"""Importance matrix of a model larger than memory: the decoder blocks offloaded to the checkpoint.

Runs `compute_imatrix(load_offloaded(MODEL_DIR), ...)` (block by block, each block loaded from the
safetensors only while it runs, checkpointed after each) in a child process and reports its wall
time, tokens/s and peak RSS next to the float32 model's size (what loading it whole would take).
Token ids are random: this measures time and memory; use real text for a real imatrix.

    python benchmarks/out_of_core.py --dir /tmp/ooc      # writes the 7B-shaped checkpoint once
    python benchmarks/offloaded_imatrix.py /tmp/ooc/llama-7b-shaped-32L --samples 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, resource, sys, time, torch
from diffulex_edge.calib import CalibrationDataset, compute_imatrix, load_offloaded
src, samples, seq, ckdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(2)
model, _ = load_offloaded(src)
vocab = model.config.vocab_size
ids = torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(0))
calib = CalibrationDataset(ids, n_samples=None, batch_size=1, show_progress=False)
t = time.perf_counter()
im = compute_imatrix(model, calib, checkpoint_dir=ckdir, show_progress=False)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "tokens": samples * seq, "entries": len(im),
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(HERE, "..", "python"))
    from diffulex_edge.export import Checkpoint

    ck = Checkpoint(a.model_dir)
    n_params = sum(r.numel for r in ck.values())
    env = {**os.environ, "PYTHONPATH": os.path.join(HERE, "..", "python")}
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", CHILD, a.model_dir, str(a.samples), str(a.seq_len), tmp], env=env,
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:])
            return 1
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{ck}: {n_params / 1e9:.2f} B weights, {n_params * 4 / 2**30:.1f} GiB in float32")
    print(f"offloaded imatrix: {m['tokens']} tokens in {m['seconds']:.1f} s ({m['tokens'] / m['seconds']:.1f} tokens/s, "
          f"2 threads), {m['entries']} entries; peak RSS {m['peak_kib'] / 2**20:.2f} GiB "
          f"({m['peak_kib'] * 1024 / (n_params * 4):.2f}x the float32 model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
