"""Child process for the crash-safety tests and benchmarks/crash_safety.py.

    python crash_child.py JOB DEST HOOK [SCALE]
    python crash_child.py serve        (a fork server: see `serve`)

JOB: ``save_pt`` / ``save_st`` (save_quantized as .pt / .safetensors) or ``gguf`` (export_gguf).
HOOK says where the child stops and waits (sleeping) to be killed, after printing a marker line
on stdout, so the parent can signal it at a known point:

* ``none``: no stop; prints ``BEGIN`` when the write starts (the parent may kill after a delay)
  and ``DONE`` at the end.
* ``begin``: the temporary/unnamed file exists, nothing written yet.
* ``written``: all data is written (save: the writer returned; gguf: the first tensor is written).
* ``fsync``: all data written, at the fsync before the file gets its name.
* ``replace``: (save only) the file is linked under its temporary name, just before the rename
  onto DEST: the only moment a named temporary exists.

SCALE multiplies the model size (default 1: a write of some tens of MB).
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))


def marker(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def stop(text: str) -> None:
    marker(text)
    while True:  # interruptible: SIGINT raises KeyboardInterrupt here
        time.sleep(0.05)


def build_quantized(scale: int):
    import torch
    from torch import nn

    from diffulex_edge.quant import QuantizationConfig, quantize_

    torch.manual_seed(0)
    d = 512 * scale
    model = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Linear(d, 4 * d)).eval()
    quantize_(model[0], QuantizationConfig(dtype="int8"))
    quantize_(model[2], QuantizationConfig(dtype="int4", group_size=128))
    quantize_(model[3], QuantizationConfig(dtype="fp16"))
    # a float part too, so the file is big enough for a write that takes a while
    model.append(nn.Linear(d, 8 * d))
    return model


def build_llama(scale: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512 * scale, intermediate_size=1536 * scale, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6)
    return LlamaForCausalLM(cfg).eval()


def install_hooks(job: str, hook: str) -> None:
    from diffulex_edge import _io

    if hook == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            import stat

            if stat.S_ISREG(os.fstat(fd).st_mode):
                stop("AT fsync")
            return real_fsync(fd)

        os.fsync = fsync  # the Python writer's fsync
    if hook == "replace":
        real_replace = os.replace

        def replace(src, dst, **kw):
            stop("AT replace")
            return real_replace(src, dst, **kw)

        _io.os.replace = replace
    if job == "gguf":
        from diffulex_edge.gguf import file as gf

        real_write, real_finish = gf.GGUFStreamWriter.write_tensor, gf.GGUFStreamWriter.finish
        state = {"n": 0}

        def write_tensor(self, name, data):
            if state["n"] == 0:
                if hook == "begin":
                    stop("AT begin")
                marker("BEGIN")
            real_write(self, name, data)
            state["n"] += 1
            if hook == "written" and state["n"] == 1:
                stop("AT written")

        def finish(self):
            if hook == "fsync":  # the Rust writer's fsync comes first thing in finish
                stop("AT fsync")
            return real_finish(self)

        gf.GGUFStreamWriter.write_tensor, gf.GGUFStreamWriter.finish = write_tensor, finish
    else:
        from diffulex_edge.quant import serialization

        real_atomic = serialization.atomic_write

        def atomic_write(path, write):
            def hooked(tmp):
                if hook == "begin":
                    stop("AT begin")
                marker("BEGIN")
                write(tmp)
                if hook == "written":
                    stop("AT written")

            return real_atomic(path, hooked)

        serialization.atomic_write = atomic_write


def run_job(job: str, dest: str, hook: str, scale: int = 1) -> None:
    if job == "gguf":
        model = build_llama(scale)
        install_hooks(job, hook)
        from diffulex_edge.export import export_gguf

        export_gguf(model, dest, quant="Q8_0", mode="rtn", show_progress=False)
    else:
        model = build_quantized(scale)
        install_hooks(job, hook)
        from diffulex_edge.quant import save_quantized

        save_quantized(model, dest)
    marker("DONE")


def serve() -> None:
    """Import torch, transformers and diffulex_edge once, then fork one process per trial, so a
    trial costs the model build and the write, not 4-10 s of imports. Reads ``JOB DEST HOOK
    SCALE`` lines on stdin; answers ``PID n``, the trial's own markers, and ``EXIT n CODE`` (CODE:
    the exit code, or minus the signal that ended it). A trial that gets KeyboardInterrupt prints
    ``KeyboardInterrupt`` and exits with 130, like an interpreter would on Ctrl-C. Nothing before
    the fork may start a thread pool (a forked child would inherit its locks, not its threads)."""
    import signal
    import traceback

    import torch  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401

    import diffulex_edge.export  # noqa: F401
    import diffulex_edge.quant  # noqa: F401

    marker("READY")
    for line in sys.stdin:
        job, dest, hook, scale = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                try:
                    run_job(job, dest, hook, int(scale))
                finally:  # a SIGINT after this point must not turn into a stray traceback
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            except KeyboardInterrupt:
                code = 130
            except BaseException:
                traceback.print_exc()
                code = 1
            if code == 130:
                marker("KeyboardInterrupt")
            sys.stdout.flush()
            os._exit(code)
        marker(f"PID {pid}")
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        marker(f"EXIT {pid} {code}")


def main(argv) -> None:
    if argv[1] == "serve":
        serve()
    else:
        run_job(argv[1], argv[2], argv[3], int(argv[4]) if len(argv) > 4 else 1)


if __name__ == "__main__":
    main(sys.argv)
