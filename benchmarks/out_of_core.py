"""Out-of-core GGUF export of a 7B-shaped checkpoint: peak memory, throughput, next to llama-quantize.

Writes (once) a synthetic Hugging Face checkpoint with Llama-2-7B's tensor shapes (random bf16
weights, 4 GiB safetensors shards; `--layers` fewer than 32 keeps every tensor's shape and just
has fewer blocks, for small disks), then measures, each in a fresh child process:

* `export_gguf_checkpoint(..., QUANT)`: wall time, GB/s of checkpoint read, peak RSS (and the
  peak of a child that only imports and builds the meta model: the baseline), sha256;
* with --ray: the same export as Ray tasks on a local 2-worker Ray instance: same sha256?
* with --resume-check: an export killed with SIGKILL halfway, then rerun: same sha256?
* with --llama-bin (llama.cpp's build/bin): llama-quantize QUANT from an F16 GGUF of the same
  weights (written by our exporter first; its time is reported as the conversion step), with its
  peak RSS and GB/s of its input, 2 threads as ours.

    python benchmarks/out_of_core.py --dir /tmp/ooc --layers 32 --ray --resume-check \\
        --llama-bin .../llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from diffulex_edge.testing import LLAMA_7B_CONFIG, write_synthetic_checkpoint  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from diffulex_edge.export import Checkpoint, export_gguf_checkpoint
src, out, quant, executor = sys.argv[1:5]
Checkpoint(src).skeleton()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if out != "-":
    if executor == "ray":
        import ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    rep = export_gguf_checkpoint(src, out, quant, tokenizer=None, name="llama-7b-synthetic", executor=executor,
                                 show_progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t, "input_bytes": rep.input_bytes, "base_kib": base,
                      "resumed": rep.resumed_tensors}))
else:
    print(json.dumps({"base_kib": base}))
"""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def run_child(args, env=None, kill_when=None):
    """(stdout, peak RSS in bytes, seconds) of a child; `kill_when()` -> True sends SIGKILL."""
    t = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.join(HERE, "..", "python"), **(env or {})})
    if kill_when is not None:
        while p.poll() is None:
            if kill_when():
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
    _, status, ru = os.wait4(p.pid, 0)
    out, err = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0 and kill_when is None:
        raise RuntimeError(f"{args[0]} failed ({p.returncode}):\n{err[-3000:]}")
    return out, ru.ru_maxrss * 1024, time.perf_counter() - t


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/diffulex-ooc", help="where the checkpoint and outputs go")
    ap.add_argument("--layers", type=int, default=32, help="decoder blocks (32 = Llama-2-7B; fewer for small disks)")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--ray", action="store_true", help="also run on a local 2-worker Ray instance")
    ap.add_argument("--resume-check", action="store_true", help="also kill an export halfway and resume it")
    ap.add_argument("--llama-bin", help="llama.cpp build/bin with llama-quantize: compare with it")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files")
    a = ap.parse_args()

    os.makedirs(a.dir, exist_ok=True)
    ckpt = os.path.join(a.dir, f"llama-7b-shaped-{a.layers}L")
    cfg = {**LLAMA_7B_CONFIG, "num_hidden_layers": a.layers}
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        t = time.perf_counter()
        n = write_synthetic_checkpoint(ckpt, cfg, dtype="bf16", shard_bytes=4 * 2**30, show_progress=True)
        print(f"wrote {ckpt}: {gib(n)} in {time.perf_counter() - t:.0f} s")
    from diffulex_edge.export import Checkpoint

    ck = Checkpoint(ckpt)
    largest = max(r.numel for r in ck.values()) * 4
    print(f"{ck}; largest tensor {gib(largest)} in float32")
    py = sys.executable
    rows = []
    out, base_rss, _ = run_child([py, "-c", CHILD, ckpt, "-", a.quant, "local"])
    print(f"baseline (imports + meta model): peak RSS {gib(base_rss)}")

    ours = os.path.join(a.dir, f"ours-{a.quant}.gguf")
    out, rss, _ = run_child([py, "-c", CHILD, ckpt, ours, a.quant, "local"])
    r = json.loads(out.strip().splitlines()[-1])
    digest = sha256(ours)
    size = os.path.getsize(ours)
    rows.append(("diffulex-edge export_gguf_checkpoint", r["seconds"], r["input_bytes"], rss, size))
    print(f"ours: {r['seconds']:.1f} s, {r['input_bytes'] / 1e9 / r['seconds']:.3f} GB/s of checkpoint, peak RSS "
          f"{gib(rss)} = {gib(rss - largest)} over the largest tensor, {gib(rss - base_rss)} over the baseline; "
          f"{size / 1e9:.3f} GB, sha256 {digest[:16]}")

    if a.ray:
        ray_out = os.path.join(a.dir, f"ray-{a.quant}.gguf")
        out, rss_r, _ = run_child([py, "-c", CHILD, ckpt, ray_out, a.quant, "ray"])
        rr = json.loads(out.strip().splitlines()[-1])
        same = sha256(ray_out) == digest
        print(f"ray (2 local workers): {rr['seconds']:.1f} s, {rr['input_bytes'] / 1e9 / rr['seconds']:.3f} GB/s, "
              f"driver peak RSS {gib(rss_r)}; sha256 {'EQUAL to' if same else 'DIFFERS from'} the single-process run")
        os.unlink(ray_out)

    if a.resume_check:
        res = os.path.join(a.dir, f"resume-{a.quant}.gguf")
        journal = res + ".partial.json"
        n_tensors = len(ck)

        def halfway() -> bool:
            try:
                with open(journal) as fh:
                    return sum(1 for _ in fh) - 1 >= n_tensors // 2
            except OSError:
                return False

        _, _, t_kill = run_child([py, "-c", CHILD, ckpt, res, a.quant, "local"], kill_when=halfway)
        out, _, _ = run_child([py, "-c", CHILD, ckpt, res, a.quant, "local"])
        rr = json.loads(out.strip().splitlines()[-1])
        same = sha256(res) == digest
        print(f"resume: killed (SIGKILL) after {t_kill:.1f} s, rerun resumed after {rr['resumed']} tensors and took "
              f"{rr['seconds']:.1f} s; sha256 {'EQUAL to' if same else 'DIFFERS from'} the uninterrupted run")
        os.unlink(res)

    if a.llama_bin:
        f16 = os.path.join(a.dir, "f16.gguf")
        out, rss_c, _ = run_child([py, "-c", CHILD, ckpt, f16, "F16", "local"])
        rc = json.loads(out.strip().splitlines()[-1])
        print(f"conversion to F16 GGUF (ours, for llama-quantize's input): {rc['seconds']:.1f} s, peak RSS {gib(rss_c)}")
        if not a.keep:
            os.unlink(ours)  # disk: the checkpoint, the F16 copy and one output at a time
        lq = os.path.join(a.dir, f"llama-{a.quant}.gguf")
        _, rss_l, t_l = run_child([os.path.join(a.llama_bin, "llama-quantize"), f16, lq, a.quant, "2"])
        in_bytes = os.path.getsize(f16)
        rows.append(("llama-quantize (F16 GGUF in)", t_l, in_bytes, rss_l, os.path.getsize(lq)))
        print(f"llama-quantize: {t_l:.1f} s, {in_bytes / 1e9 / t_l:.3f} GB/s of its F16 input, peak RSS {gib(rss_l)}; "
              f"{os.path.getsize(lq) / 1e9:.3f} GB")
        for p in (f16, lq):
            if not a.keep:
                os.unlink(p)
    elif not a.keep:
        os.unlink(ours)

    print("\n| tool | seconds | input GB | GB/s | peak RSS | output GB |\n|---|---|---|---|---|---|")
    for name, s, n, rss_, size in rows:
        print(f"| {name} | {s:.1f} | {n / 1e9:.2f} | {n / 1e9 / s:.3f} | {gib(rss_)} | {size / 1e9:.3f} |")
    if len(rows) == 2:
        print(f"\nthroughput ratio ours / llama-quantize: {(rows[0][2] / rows[0][1]) / (rows[1][2] / rows[1][1]):.2f}x; "
              f"peak RSS ratio: {rows[0][3] / rows[1][3]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
