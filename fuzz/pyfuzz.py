#!/usr/bin/env python3
"""Deterministic mutation fuzzer for diffulex-edge's file loaders.

    python fuzz/pyfuzz.py TARGET --cases N --seed S [--workers K] [--out DIR] [--timeout SEC]

Case ``i`` of seed ``S`` is always the same input: its generator is ``random.Random(f"{S}:{i}")``
applied to the target's seed files (built at start-up by the package's own writers). A case
passes when the loader returns, or raises a ``diffulex_edge.errors.QuantizationError`` (or
``FileNotFoundError``); anything else is a finding, as is a case that runs past ``--timeout``
(hang), kills its worker (crash: abort, segfault, out-of-memory under the worker's address-space
limit), or allocates more than ``64 MiB + 16 x file size`` (tracemalloc peak, Python and numpy
allocations). Findings are grouped by (kind, exception type, raising location in diffulex_edge);
each one's input is saved under ``DIR/findings`` for reproduction
(``python fuzz/pyfuzz.py TARGET --replay FILE``). Exit status 1 when there is any finding.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from mutators import mutate_bytes, mutate_dat, mutate_gguf, mutate_json, mutate_safetensors  # noqa: E402

ALLOC_BASE = 64 << 20
ALLOC_PER_BYTE = 16


# ---- targets -------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    suffix: str
    seeds: Callable[[str], List[bytes]]  # (scratch dir) -> seed files
    structure: Callable[[random.Random, bytes, "Ctx"], bytes]
    call: Callable[[str, "Ctx"], None]
    ctx_init: Callable[[], Any] = lambda: None
    warm_up: bool = True  # load each seed once before the first case (see _warm_up)


@dataclass
class Ctx:
    seeds: List[bytes]
    extra: Any = None


def _committed_gguf_seeds() -> List[bytes]:
    d = os.path.join(HERE, "seeds", "gguf_reader")
    return [open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))] if os.path.isdir(d) else []


def _gguf_seeds(tmp: str) -> List[bytes]:
    import numpy as np

    from diffulex_edge.gguf import GGUFWriter

    rs = np.random.default_rng(0)
    out = []
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    w.add("general.alignment", 32, 4)
    w.add("tokenizer.ggml.tokens", ["<s>", "</s>", "a"])
    w.add("scores", [0.5, -1.0])
    w.add("nested", [[1, 2], [3]])
    w.add("flag", True)
    w.add("big", 2**40)
    for name, qtype, shape in [("f32", "F32", (2, 8)), ("f16", "F16", (3, 4)), ("bf16", "BF16", (2, 2)),
                               ("q4_0", "Q4_0", (2, 32)), ("q8_0", "Q8_0", (1, 64)), ("q4_k", "Q4_K", (1, 256)),
                               ("q6_k", "Q6_K", (1, 256)), ("iq4_nl", "IQ4_NL", (1, 32)), ("tq2_0", "TQ2_0", (1, 256))]:
        w.add_tensor(name, rs.standard_normal(shape).astype(np.float32), qtype)
    p = os.path.join(tmp, "seed.gguf")
    w.write(p)
    out.append(open(p, "rb").read())
    return out + _committed_gguf_seeds()


def _imatrix_seeds(tmp: str, fmt: str) -> List[bytes]:
    import numpy as np

    from diffulex_edge.gguf.file import GGUFWriter
    from diffulex_edge.gguf.imatrix import ImatrixEntry, ImatrixFile, write_imatrix

    rs = np.random.default_rng(1)
    files = [
        ImatrixFile({"blk.0.attn_q.weight": ImatrixEntry(rs.random(32) * 10, 16.0, 4),
                     "blk.0.ffn_down.weight": ImatrixEntry(rs.random(8), 3.0, 3)}, chunk_count=4, chunk_size=128,
                    datasets=["wiki.train.raw"]),
        ImatrixFile({"output.weight": ImatrixEntry(rs.random(16), 1.0, 1)}),
    ]
    out = []
    for i, f in enumerate(files):
        p = os.path.join(tmp, f"seed{i}.{fmt}")
        write_imatrix(p, f, fmt)
        out.append(open(p, "rb").read())
    if fmt == "gguf":  # an expert tensor: in_sum2 [n_mat, n_per_row], counts [n_mat, 1]
        w = GGUFWriter()
        w.add("general.type", "imatrix")
        w.add("imatrix.chunk_count", 2, 4)
        w.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", rs.random((3, 8)).astype(np.float32))
        w.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[1.0], [0.0], [4.0]], np.float32))
        p = os.path.join(tmp, "experts.gguf")
        w.write(p)
        out.append(open(p, "rb").read())
        out += [s for s in _committed_gguf_seeds() if b"imatrix" in s]
    else:  # without the optional trailer
        out.append(out[1][: -8])
    return out


def _touch_gguf(path: str, ctx: Ctx) -> None:
    from diffulex_edge.gguf import GGUFFile

    f = GGUFFile.read(path)
    for k in f.metadata:
        f.metadata_types[k]
    for t in f:
        f.tensor_bytes(t.name).sum()
        f.tensor(t.name).sum()


def _touch_imatrix(path: str, ctx: Ctx) -> None:
    from diffulex_edge.calib.imatrix import ImportanceMatrix
    from diffulex_edge.gguf import load_imatrix

    for v in load_imatrix(path).values():
        v.sum()
    im = ImportanceMatrix.load(path)
    for k in im:
        im[k].sum()


# load_quantized: a tiny model with one layer per format, saved by save_quantized

def _tiny_model(seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64, bias=False), nn.Linear(64, 64), nn.Linear(64, 32))


def _quantized_model():
    import torch

    from diffulex_edge.quant.nn import QuantizedLinear

    m = _tiny_model()
    m[0] = QuantizedLinear.from_linear(m[0], "fp16", name="0")
    m[1] = QuantizedLinear.from_linear(m[1], "int8", name="1")
    with torch.no_grad():
        m[2].weight[3, 5] = 40.0  # a super weight, kept in the protect table
    m[2] = QuantizedLinear.from_linear(m[2], "int4", group_size=32, name="2", protect=[(3, 5), (7, 1)])
    m[3] = QuantizedLinear.from_linear(m[3], "int8", act_mode="static", act_scale=0.05, name="3")
    return m


def _quant_seeds(tmp: str, suffix: str) -> List[bytes]:
    from diffulex_edge.quant.serialization import save_quantized

    out = []
    for i, model in enumerate([_quantized_model(), _tiny_model(1)]):
        p = os.path.join(tmp, f"seed{i}{suffix}")
        save_quantized(model, p)
        out.append(open(p, "rb").read())
    return out


def _load_quantized(path: str, ctx: Ctx) -> None:
    import torch

    from diffulex_edge.quant.serialization import load_quantized

    model = load_quantized(path, _tiny_model(2))
    Phase.name = "forward"
    with torch.no_grad():
        model(torch.ones(2, 64))


def _mutate_pt(rng: random.Random, data: bytes, ctx: Ctx) -> bytes:
    """Change the payload, not the zip: the metadata dict and the state dict's tensors."""
    import torch

    if ctx.extra is None:
        ctx.extra = [torch.load(io.BytesIO(s), weights_only=True) for s in ctx.seeds]
    base = rng.choice(ctx.extra)
    meta = mutate_json(rng, base["diffulex_edge"]) if rng.random() < 0.5 else dict(base["diffulex_edge"])
    sd = dict(base["state_dict"])
    for _ in range(rng.choice([0, 1, 1, 2])):
        tensors = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
        if not tensors:
            break
        k = rng.choice(tensors)
        t = sd[k]
        op = rng.randrange(7)
        if op == 0:
            del sd[k]
        elif op == 1:
            shape = list(t.shape) or [1]
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 3, 31, 128])
            sd[k] = torch.zeros(shape, dtype=t.dtype)
        elif op == 2:
            sd[k] = t.to(rng.choice([torch.float32, torch.float64, torch.int8, torch.uint8, torch.int64, torch.bool, torch.float16]))
        elif op == 3:
            sd[k] = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
        elif op == 4:
            sd[k] = rng.choice([3, "x", None, [1, 2], torch.tensor(1.0)])
        elif op == 5:
            sd[k + rng.choice(["_", ".extra"])] = t
        else:
            v = t.clone()
            if v.numel() and v.dtype != torch.bool:
                if v.is_floating_point():
                    val = rng.choice([0.0, -1.0, 1.0, 1e30, -1e30, float("nan"), float("inf"), 65504.0])
                else:
                    ii = torch.iinfo(v.dtype)
                    val = rng.choice([0, -1 if ii.min < 0 else 1, 1, ii.max, ii.min, 2**31 - 1 if ii.bits > 32 else ii.max])
                v.view(-1)[rng.randrange(v.numel())] = val
            sd[k] = v
    payload = rng.choice([{"diffulex_edge": meta, "state_dict": sd}, {"diffulex_edge": meta, "state_dict": sd},
                          {"diffulex_edge": meta}, {"state_dict": sd}, [meta, sd]])
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


class Phase:
    """Which part of a target raised: 'load' (the loader) or 'forward' (using what it returned)."""

    name = "load"


TARGETS: Dict[str, Target] = OrderedDict()
for _t in [
    Target("gguf_read", ".gguf", _gguf_seeds, lambda rng, d, ctx: mutate_gguf(rng, d), _touch_gguf),
    Target("imatrix_gguf", ".gguf", lambda tmp: _imatrix_seeds(tmp, "gguf"), lambda rng, d, ctx: mutate_gguf(rng, d), _touch_imatrix),
    Target("imatrix_dat", ".dat", lambda tmp: _imatrix_seeds(tmp, "dat"), lambda rng, d, ctx: mutate_dat(rng, d), _touch_imatrix),
    Target("load_quantized_safetensors", ".safetensors", lambda tmp: _quant_seeds(tmp, ".safetensors"),
           lambda rng, d, ctx: mutate_safetensors(rng, d), _load_quantized),
    Target("load_quantized_pt", ".pt", lambda tmp: _quant_seeds(tmp, ".pt"), _mutate_pt, _load_quantized),
]:
    TARGETS[_t.name] = _t


def make_case(target: Target, ctx: Ctx, seed: int, idx: int) -> bytes:
    rng = random.Random(f"{seed}:{idx}")
    data = rng.choice(ctx.seeds)
    r = rng.random()
    if r < 0.55:
        data = target.structure(rng, data, ctx)
    elif r < 0.9:
        data = mutate_bytes(rng, data, ctx.seeds)
    else:
        data = mutate_bytes(rng, target.structure(rng, data, ctx), ctx.seeds)
    return data


# ---- classification ------------------------------------------------------------------------------

def _where(tb) -> tuple:
    """(deepest frame inside diffulex_edge, innermost frame) as 'path:line'."""
    frames = traceback.extract_tb(tb)
    ours, inner = None, None
    for fr in frames:
        fn = fr.filename.replace(os.sep, "/")
        short = f"{fn.rsplit('/', 2)[-2]}/{fn.rsplit('/', 1)[-1]}:{fr.lineno}" if "/" in fn else f"{fn}:{fr.lineno}"
        if "/diffulex_edge/" in fn:
            ours = fn.split("/diffulex_edge/", 1)[1] + f":{fr.lineno}"
        inner = short
    return ours or "(outside diffulex_edge)", inner or "?"


def _acceptable(e: BaseException) -> bool:
    from diffulex_edge.errors import QuantizationError

    return isinstance(e, (QuantizationError, FileNotFoundError))


def _build_seeds(target: Target, workdir: str) -> Ctx:
    scratch = tempfile.mkdtemp(prefix="seeds-", dir=workdir)
    # seed files are scratch files: the plain named-temp-file path of atomic_write is enough and
    # keeps seed building independent of O_TMPFILE support
    old = os.environ.get("DIFFULEX_EDGE_NO_TMPFILE")
    os.environ["DIFFULEX_EDGE_NO_TMPFILE"] = "1"
    try:
        return Ctx(target.seeds(scratch))
    finally:
        if old is None:
            del os.environ["DIFFULEX_EDGE_NO_TMPFILE"]
        else:
            os.environ["DIFFULEX_EDGE_NO_TMPFILE"] = old
        shutil.rmtree(scratch, ignore_errors=True)


# ---- worker --------------------------------------------------------------------------------------

def _warm_up(target: Target, ctx: Ctx, workdir: str) -> None:
    """Load each seed once, so that the lazy imports and caches of the first call are not
    counted as the allocation of whichever case comes first."""
    path = os.path.join(workdir, f"warm-{os.getpid()}{target.suffix}")
    for data in ctx.seeds:
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            target.call(path, ctx)
        except Exception:  # noqa: BLE001 - a seed that does not load is found again by its cases
            continue
    os.unlink(path)


def _worker(tname: str, seed: int, indices: range, workdir: str, conn, current, rlimit_mb: int) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    import warnings

    warnings.simplefilter("ignore")  # NaN/overflow in mutated data are expected, not findings
    target = TARGETS[tname]
    ctx = _build_seeds(target, workdir)
    if target.warm_up:
        _warm_up(target, ctx, workdir)
    if rlimit_mb > 0:
        import resource

        with open("/proc/self/statm") as fh:
            vm = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + (rlimit_mb << 20), resource.RLIM_INFINITY))
    import tracemalloc

    tracemalloc.start()
    path = os.path.join(workdir, f"case-{os.getpid()}{target.suffix}")
    conn.send(("path", path))
    max_alloc, max_alloc_size = 0, 0
    for idx in indices:
        try:
            data = make_case(target, ctx, seed, idx)
        except Exception:  # a bug in the fuzzer, not a finding
            conn.send(("harness_error", f"case {idx}: {traceback.format_exc()}"))
            return
        with open(path, "wb") as fh:
            fh.write(data)
        current.value = idx
        Phase.name = "load"
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        err: Optional[BaseException] = None
        try:
            target.call(path, ctx)
        except BaseException as e:  # noqa: BLE001 - classifying every exception is the point
            if isinstance(e, KeyboardInterrupt):
                raise
            err = e
        peak = tracemalloc.get_traced_memory()[1] - before
        if peak > max_alloc:
            max_alloc, max_alloc_size = peak, len(data)
        if err is not None and not _acceptable(err):
            ours, inner = _where(err.__traceback__)
            conn.send(("finding", {"kind": "exception", "case": idx, "type": type(err).__name__, "phase": Phase.name,
                                   "where": ours, "raised_at": inner, "message": str(err)[:300], "data": data}))
        elif peak > ALLOC_BASE + ALLOC_PER_BYTE * len(data):
            conn.send(("finding", {"kind": "allocation", "case": idx, "type": "AllocationLimit", "phase": Phase.name,
                                   "where": "-", "raised_at": "-", "data": data,
                                   "message": f"peak {peak} bytes for a {len(data)}-byte file"}))
        err = None
    current.value = -1
    conn.send(("done", {"max_alloc": max_alloc, "max_alloc_file_size": max_alloc_size}))


# ---- driver --------------------------------------------------------------------------------------

@dataclass
class Summary:
    target: str
    cases: int
    seed: int
    seconds: float
    findings: List[dict] = field(default_factory=list)
    max_alloc: int = 0
    max_alloc_file_size: int = 0

    @property
    def rate(self) -> float:
        return self.cases / self.seconds if self.seconds else 0.0

    def groups(self) -> Dict[tuple, List[dict]]:
        g: Dict[tuple, List[dict]] = OrderedDict()
        for f in self.findings:
            g.setdefault((f["kind"], f["type"], f["phase"], f["where"]), []).append(f)
        return g

    def counts(self) -> Dict[str, int]:
        c = {"exception": 0, "hang": 0, "crash": 0, "allocation": 0}
        for f in self.findings:
            c[f["kind"]] += 1
        return c

    def report(self) -> str:
        c = self.counts()
        lines = [f"{self.target}: {self.cases} cases, seed {self.seed}, {self.seconds:.1f} s, {self.rate:.0f} cases/s; "
                 f"untyped exceptions {c['exception']}, hangs {c['hang']}, crashes {c['crash']}, "
                 f"allocation findings {c['allocation']}; max traced allocation {self.max_alloc / 2**20:.2f} MiB "
                 f"(file of {self.max_alloc_file_size} bytes)"]
        for (kind, typ, phase, where), fs in self.groups().items():
            f = fs[0]
            lines.append(f"  {len(fs):6d}  {kind:10s} {typ} @ {where} [{phase}; raised at {f['raised_at']}]: "
                         f"{f['message'][:160]}  e.g. {f.get('file', '')}")
        return "\n".join(lines)


def _save(out: Optional[str], target: Target, f: dict, per_group: Dict[tuple, int]) -> None:
    data = f.pop("data", None)
    if out is None or data is None:
        return
    key = (f["kind"], f["type"], f["phase"], f["where"])
    per_group[key] = per_group.get(key, 0) + 1
    if per_group[key] > 20:  # a few inputs per group are enough to reproduce it
        return
    d = os.path.join(out, "findings")
    os.makedirs(d, exist_ok=True)
    f["file"] = os.path.join(d, f"{target.name}-{f['case']}{target.suffix}")
    with open(f["file"], "wb") as fh:
        fh.write(data)


def run(target: str, cases: int, seed: int = 0, workers: int = 1, out: Optional[str] = None, timeout: float = 10.0,
        rlimit_mb: int = 4096, start_method: str = "spawn") -> Summary:
    """Run cases ``0..cases-1`` of ``seed`` against ``target`` in ``workers`` processes.

    Workers are started with ``spawn`` by default: a forked child inherits the parent's rayon and
    OpenMP thread pools without their threads, so its first parallel kernel waits forever once the
    parent (a pytest session, a notebook) has run one. ``fork`` is only for targets defined at run
    time (the harness's own tests)."""
    if target not in TARGETS:
        raise SystemExit(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    t = TARGETS[target]
    workdir = tempfile.mkdtemp(prefix=f"pyfuzz-{target}-")
    ctxm = mp.get_context(start_method)
    summary = Summary(target, cases, seed, 0.0)
    per_group: Dict[tuple, int] = {}
    # worker k handles cases k, k+K, k+2K, ...; a worker that hangs or dies is replaced and resumes
    # after the case that killed it
    pending = [range(k, cases, max(1, workers)) for k in range(max(1, workers))]
    live: List[dict] = []
    t0 = time.monotonic()

    def spawn(indices: range) -> None:
        parent, child = ctxm.Pipe(duplex=False)
        cur = ctxm.Value("q", -2, lock=False)
        p = ctxm.Process(target=_worker, args=(target, seed, indices, workdir, child, cur, rlimit_mb), daemon=True)
        p.start()
        child.close()
        live.append({"p": p, "conn": parent, "cur": cur, "indices": indices, "last": -2, "since": time.monotonic(),
                     "path": None, "done": False})

    for r in pending:
        if len(r):
            spawn(r)
    try:
        while live:
            for w in list(live):
                try:
                    while w["conn"].poll():
                        kind, payload = w["conn"].recv()
                        if kind == "finding":
                            _save(out, t, payload, per_group)
                            summary.findings.append(payload)
                        elif kind == "harness_error":
                            raise RuntimeError(f"{target}: the mutator failed on {payload}")
                        elif kind == "path":
                            w["path"] = payload
                        elif kind == "done":
                            w["done"] = True
                            summary.max_alloc = max(summary.max_alloc, payload["max_alloc"])
                            if summary.max_alloc == payload["max_alloc"]:
                                summary.max_alloc_file_size = payload["max_alloc_file_size"]
                except (EOFError, OSError):
                    pass
                now = time.monotonic()
                idx = w["cur"].value
                if idx != w["last"]:
                    w["last"], w["since"] = idx, now
                if w["done"]:
                    w["p"].join()
                    live.remove(w)
                    continue
                dead = not w["p"].is_alive()
                # the start-up (imports, seed files) gets a longer allowance than one case
                hung = now - w["since"] > (timeout if idx >= 0 else max(120.0, timeout))
                if not (dead or hung):
                    continue
                if hung:
                    w["p"].kill()
                w["p"].join()
                live.remove(w)
                if idx < 0:
                    raise RuntimeError(f"{target}: worker failed before its first case (exit code {w['p'].exitcode})")
                data = open(w["path"], "rb").read() if w["path"] and os.path.exists(w["path"]) else None
                f = {"kind": "hang" if hung else "crash", "case": idx, "type": "Timeout" if hung else f"exit {w['p'].exitcode}",
                     "phase": "-", "where": "-", "raised_at": "-", "data": data,
                     "message": f"no progress for {timeout:.0f} s" if hung else "worker died"}
                _save(out, t, f, per_group)
                summary.findings.append(f)
                rest = range(idx + w["indices"].step, w["indices"].stop, w["indices"].step)
                if len(rest):
                    spawn(rest)
            time.sleep(0.02)
    finally:
        for w in live:
            w["p"].kill()
        shutil.rmtree(workdir, ignore_errors=True)
    summary.seconds = time.monotonic() - t0
    return summary


def replay(target: str, file: str) -> int:
    t = TARGETS[target]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = _build_seeds(t, tmp)
    try:
        t.call(file, ctx)
    except BaseException as e:  # noqa: BLE001
        if not _acceptable(e):
            traceback.print_exc()
            return 1
        print(f"typed error: {type(e).__name__}: {e}")
        return 0
    print("loaded")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=list(TARGETS))
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for findings/ (inputs) and summary.json")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds one case may run before it is a hang")
    ap.add_argument("--rlimit-mb", type=int, default=4096, help="address space a worker may add after start-up (0: no limit)")
    ap.add_argument("--replay", metavar="FILE", help="run the target on one saved input and show the traceback")
    a = ap.parse_args(argv)
    if a.replay:
        return replay(a.target, a.replay)
    s = run(a.target, a.cases, a.seed, a.workers, a.out, a.timeout, a.rlimit_mb)
    print(s.report())
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"summary-{a.target}-{a.seed}.json"), "w") as fh:
            json.dump({"target": s.target, "cases": s.cases, "seed": s.seed, "seconds": round(s.seconds, 1),
                       "cases_per_s": round(s.rate, 1), **s.counts(), "max_alloc_bytes": s.max_alloc,
                       "max_alloc_file_size": s.max_alloc_file_size,
                       "groups": [{"kind": k[0], "type": k[1], "phase": k[2], "where": k[3], "count": len(v),
                                   "message": v[0]["message"], "example": v[0].get("file")} for k, v in s.groups().items()]},
                      fh, indent=1)
    return 1 if s.findings else 0


if __name__ == "__main__":
    sys.exit(main())
