"""Drives crash_child.py's fork server: start a write, wait for a marker, signal the writer, and
look at what is left in the directory. Used by test_crash_safety.py and benchmarks/crash_safety.py."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_child.py")
EXT = {"save_pt": ".pt", "save_st": ".safetensors", "gguf": ".gguf"}


@dataclass
class Trial:
    pid: int
    code: int  # exit code, or minus the signal that ended the writer
    lines: List[str] = field(default_factory=list)
    seconds_after_marker: float = 0.0
    times: List[float] = field(default_factory=list)  # perf_counter() when each line arrived

    def seconds_between(self, first: str, last: str) -> float:
        i = next(k for k, line in enumerate(self.lines) if line.startswith(first))
        j = next(k for k, line in enumerate(self.lines) if line.startswith(last))
        return self.times[j] - self.times[i]


class ForkServer:
    def __init__(self, env: Optional[dict] = None, timeout: float = 120.0):
        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, CHILD, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env={**os.environ, **(env or {})})
        self.lines: "queue.Queue[tuple]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._expect("READY")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.perf_counter(), line.rstrip("\n")))
        self.lines.put((time.perf_counter(), "EOF"))

    def _next(self, trial: Optional[Trial] = None) -> str:
        try:
            t, line = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no output from the crash child for {self.timeout} s") from None
        if line == "EOF":
            raise RuntimeError(f"the crash child's fork server exited ({self.proc.wait()})")
        if trial is not None:
            trial.lines.append(line)
            trial.times.append(t)
        return line

    def _expect(self, prefix: str) -> str:
        while True:
            line = self._next()
            if line.startswith(prefix):
                return line

    def run(self, job: str, dest: str, hook: str = "none", *, sig: Optional[int] = None, at: str = "BEGIN",
            delay: float = 0.0, scale: int = 1) -> Trial:
        """Run one write of `job` to `dest`. With `sig`, wait for the marker line `at` (or the
        end of the write), sleep `delay` seconds and send `sig` to the writer."""
        self.proc.stdin.write(f"{job} {dest} {hook} {scale}\n")
        self.proc.stdin.flush()
        pid = int(self._expect("PID ").split()[1])
        trial = Trial(pid, 0)
        done = False
        if sig is not None:
            while True:
                line = self._next(trial)
                if line.startswith(at):
                    break
                if line.startswith(f"EXIT {pid} "):
                    done = True
                    break
            if not done:
                t0 = time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                trial.seconds_after_marker = time.perf_counter() - t0
        while not done:
            done = self._next(trial).startswith(f"EXIT {pid} ")
        trial.code = int(trial.lines[-1].split()[2])
        return trial

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def leftovers(directory: str, keep=()) -> List[str]:
    """Entries of `directory` other than the names in `keep` (temporary files or directories)."""
    return sorted(n for n in os.listdir(directory) if n not in keep)


def read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


SIGKILL, SIGINT = signal.SIGKILL, signal.SIGINT
