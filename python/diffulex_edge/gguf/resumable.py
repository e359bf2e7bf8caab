"""A GGUF file written tensor by tensor that survives interruption.

The layout of the whole file (header bytes, each tensor's offset and size) is fixed before any
tensor is encoded (:func:`_native.gguf_layout`, the same bytes the atomic stream writer
produces). The file is built under ``<target>.partial``: header first, then each tensor written at
its offset and fsynced, then its index appended (and fsynced) to the journal
``<target>.partial.json``. A rerun with the same layout (same metadata, tensor names, shapes and
types: checked by the header's sha256 and the partial file's own header bytes) skips the tensors
the journal lists; any other partial file is started over. When every tensor is in, the file is
fsynced and renamed onto the target, and the journal removed. The target itself is never written
until that rename, so an interrupted run leaves an existing file at the target as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, List, Sequence, Set, Tuple

import numpy as np

from .. import _native
from ..errors import ConfigError, ShapeError

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "diffulex-edge/gguf-partial/1"
#: Linux writes at most this many bytes per write(2)
_MAX_WRITE = 0x7FFFF000


class ResumableGGUFWriter:
    """Write the tensors of a GGUF file at their final offsets, in any order, resumably.

    ``metadata``: ``[(key, type_path, value)]`` as :meth:`GGUFWriter._native_metadata` gives;
    ``specs``: ``[(name, gguf_dims, ggml_type_id)]``. ``resume``: continue a matching partial
    file (else start over). ``done`` holds the indices of the tensors already in the file."""

    def __init__(self, path: str, metadata: Sequence[Tuple[str, Sequence[int], Any]],
                 specs: Sequence[Tuple[str, Sequence[int], int]], resume: bool = True):
        self.path = os.fspath(path)
        self.partial = self.path + ".partial"
        self.journal = self.partial + ".json"
        if os.path.isdir(self.path):
            raise ConfigError(f"{self.path} is a folder; give the GGUF file's path")
        header, offsets, sizes, file_len = _native.gguf_layout(list(metadata), [(n, list(d), int(t)) for n, d, t in specs])
        self.names = [n for n, _, _ in specs]
        self.header_len = len(header)
        self.offsets: List[int] = [self.header_len + int(o) for o in offsets]
        self.sizes: List[int] = [int(s) for s in sizes]
        self.file_len = int(file_len)
        self.fingerprint = hashlib.sha256(header).hexdigest()
        self.done: Set[int] = self._resume(header) if resume else set()
        if self.done:
            log.info("resuming %s: %d of %d tensors already written", self.partial, len(self.done), len(self.names))
        else:
            self._start(header)
        self._fd = os.open(self.partial, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        self._jfh = open(self.journal, "a", encoding="utf-8")

    def _resume(self, header: bytes) -> Set[int]:
        if not (os.path.isfile(self.partial) and os.path.isfile(self.journal)):
            return set()
        try:
            with open(self.journal, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            head = json.loads(lines[0])
            if head.get("format") != JOURNAL_FORMAT or head.get("header_sha256") != self.fingerprint:
                log.warning("%s was written for another plan (different metadata or tensor types); starting over",
                            self.partial)
                return set()
            if os.path.getsize(self.partial) != self.file_len:
                log.warning("%s has the wrong size; starting over", self.partial)
                return set()
            with open(self.partial, "rb") as fh:
                if fh.read(self.header_len) != header:
                    log.warning("%s has another header than its journal says; starting over", self.partial)
                    return set()
            done = set()
            for line in lines[1:]:
                # a line cut short by a crash is the tensor that was being recorded: redone
                try:
                    i = int(json.loads(line)["i"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
                if 0 <= i < len(self.names):
                    done.add(i)
            return done
        except (OSError, json.JSONDecodeError, IndexError, AttributeError) as e:
            log.warning("cannot resume from %s (%s); starting over", self.partial, e)
            return set()

    def _start(self, header: bytes) -> None:
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, self.file_len)  # the gaps between tensors read as the zero padding GGUF wants
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(self.journal, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"format": JOURNAL_FORMAT, "header_sha256": self.fingerprint,
                                 "tensors": len(self.names), "file_len": self.file_len}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write(self, i: int, data: np.ndarray) -> None:
        """Put the encoded bytes of tensor ``i`` at its place and record it as done (durably)."""
        buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if buf.size != self.sizes[i]:
            raise ShapeError(f"tensor {self.names[i]!r}: the header announced {self.sizes[i]} bytes, got {buf.size}",
                             layer=self.names[i])
        _pwrite_all(self._fd, memoryview(buf), self.offsets[i])
        os.fdatasync(self._fd) if hasattr(os, "fdatasync") else os.fsync(self._fd)
        self._jfh.write(json.dumps({"i": i, "name": self.names[i]}) + "\n")
        self._jfh.flush()
        os.fsync(self._jfh.fileno())
        self.done.add(i)

    def finish(self) -> str:
        """Every tensor written: fsync, rename onto the target, remove the journal."""
        missing = [self.names[i] for i in range(len(self.names)) if i not in self.done]
        if missing:
            raise ConfigError(f"{len(missing)} tensors not written yet, e.g. {missing[0]!r}")
        os.fsync(self._fd)
        self.close()
        os.replace(self.partial, self.path)
        os.unlink(self.journal)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        return self.path

    def close(self) -> None:
        """Stop writing; the partial file and journal stay for a rerun to resume."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._jfh.closed:
            self._jfh.close()

    def discard(self) -> None:
        """Stop and delete the partial file and its journal."""
        self.close()
        for p in (self.partial, self.journal):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.pwrite(fd, buf[:_MAX_WRITE], offset)
        buf, offset = buf[n:], offset + n


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["ResumableGGUFWriter"]
