"""File writing shared by every writer in the package: nothing is ever left half-written.

:func:`atomic_write` makes a file appear at its path complete or not at all, and leaves no
temporary file behind, whatever happens to the process:

* On Linux the data goes to an ``O_TMPFILE`` inode in the destination's directory: a file without
  a name, which the kernel frees if the process dies (``kill -9`` included). Writers that need a
  path get ``/proc/self/fd/N``. When the data is complete it is fsynced and linked into place
  (``linkat(..., AT_SYMLINK_FOLLOW)``): straight onto the destination if it does not exist, else
  under a temporary name that is renamed over it (a link cannot replace a file, a rename can);
  then the directory is fsynced. A named temporary file exists only between that link and that
  rename, two system calls with no data written in between.
* Elsewhere (other systems; file systems that answer ``O_TMPFILE`` with EOPNOTSUPP, EISDIR or
  EINVAL; no /proc; ``DIFFULEX_EDGE_NO_TMPFILE`` set; or a writer that fails on the /proc path
  before writing a byte, as ``safetensors.torch.save_file`` >= 0.7 does, which writes its own
  sibling temporary and renames it) the writer gets a path inside a private directory next to the destination, which
  is removed on any exception (``KeyboardInterrupt`` included).

Temporary names (files of the Rust writer, private directories here) are
``.{name}.tmp-{pid}-{n}`` and their writer holds an exclusive ``flock`` on them, so each write
first removes the temporaries of the same destination whose process is gone (what ``kill -9``
leaves on the fallback path). The Rust GGUF writer (``src/gguf/writer.rs``) uses
the same scheme, so each cleans up after the other. New files get the mode a plain ``open()``
would give them (0o666 less the umask).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import sys
import time
from typing import Callable, Optional, Union

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PathLike = Union[str, "os.PathLike[str]"]

NO_TMPFILE_ENV = "DIFFULEX_EDGE_NO_TMPFILE"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_counter = itertools.count()
log = logging.getLogger(__name__)


def atomic_write(path: PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, which must write the whole file to ``tmp_path``, then put that
    file at `path` in one step. On any error (or interrupt, or the process being killed) an
    existing `path` is left untouched and no temporary file remains. OSErrors name `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if not name:
        raise IsADirectoryError(errno.EISDIR, "not a file name", path)
    _remove_stale_temps(directory, name)
    fd = _open_anonymous(directory, path)
    if fd is None:
        _write_in_private_dir(directory, name, path, write)
        return
    dir_fd = -1
    try:
        mode = _writable_by_owner(fd)
        try:
            write(f"/proc/self/fd/{fd}")
        except Exception as e:
            if os.fstat(fd).st_size != 0:
                raise
            # Some writers cannot write to an open file's /proc path (safetensors' save_file >= 0.7
            # writes a sibling temporary file and renames it onto the path it is given; the
            # package's own writers do not). Nothing was written, so give it a real directory.
            log.debug("atomic_write %s: the writer cannot use an unnamed file (%s); using a private directory", path, e)
            _write_in_private_dir(directory, name, path, write)
            return
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        _link_into_place(fd, dir_fd, name)
        _fsync_dir(dir_fd)
    except OSError as e:
        named = _naming(e, path)
        if named is e:
            raise
        raise named from e
    finally:
        os.close(fd)
        if dir_fd >= 0:
            os.close(dir_fd)


def _naming(e: OSError, path: str) -> OSError:
    """The same kind of OSError, naming the destination rather than a temporary or a directory."""
    if e.errno is None or e.filename == path or type(e).__module__ != "builtins":
        return e
    return type(e)(e.errno, e.strerror, path)


def _temp_name(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}-{next(_counter)}"


def _open_anonymous(directory: str, path: str) -> Optional[int]:
    """An ``O_TMPFILE`` descriptor in `directory`, or None where that is not available."""
    if not sys.platform.startswith("linux") or not hasattr(os, "O_TMPFILE") or os.environ.get(NO_TMPFILE_ENV):
        return None
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | _CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise _naming(e, path) from None
    if not os.path.exists(f"/proc/self/fd/{fd}"):  # linking it later needs its /proc link
        os.close(fd)
        return None
    _lock(fd, blocking=True)  # covers the temporary name it may get in _link_into_place
    return fd


def _writable_by_owner(fd: int) -> Optional[int]:
    """Writers reopen the file by name: with a umask that takes the owner's rw bits away, lend
    them for the write and return the mode to restore (else None)."""
    mode = os.fstat(fd).st_mode & 0o7777
    if mode & 0o600 == 0o600:
        return None
    os.fchmod(fd, mode | 0o600)
    return mode


def _link_into_place(fd: int, dir_fd: int, name: str) -> None:
    src = f"/proc/self/fd/{fd}"
    # dst_dir_fd makes CPython call linkat(..., AT_SYMLINK_FOLLOW) rather than link(), which
    # would try to link the /proc symlink itself
    try:
        os.link(src, name, dst_dir_fd=dir_fd, follow_symlinks=True)
        return
    except FileExistsError:
        pass
    while True:
        tmp = _temp_name(name)
        try:
            os.link(src, tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
            break
        except FileExistsError:
            continue
    try:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise


def _write_in_private_dir(directory: str, name: str, path: str, write: Callable[[str], object]) -> None:
    """The portable path: `write` gets ``{directory}/.{name}.tmp-{pid}-{n}/{name}`` in a private,
    locked directory (so whatever temporaries the writer makes itself are inside it too); the
    result is renamed onto `path` and the private directory removed."""
    while True:
        private = os.path.join(directory, _temp_name(name))
        try:
            os.mkdir(private, 0o700)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise _naming(e, path) from None
    try:
        lock_fd = os.open(private, os.O_RDONLY | _CLOEXEC)
        try:
            _lock(lock_fd, blocking=True)
            tmp = os.path.join(private, name)
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY | _CLOEXEC)
            try:
                os.fchmod(fd, 0o666 & ~_umask())  # writers such as safetensors create 0o600 files
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        finally:
            os.close(lock_fd)
    except BaseException as e:
        shutil.rmtree(private, ignore_errors=True)
        named = _naming(e, path) if isinstance(e, OSError) else e
        if named is e:
            raise
        raise named from e
    shutil.rmtree(private, ignore_errors=True)
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            _fsync_dir(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only where /proc has no answer
    os.umask(mask)
    return mask


def _fsync_dir(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # some file systems cannot fsync a directory
            raise


def _lock(fd: int, blocking: bool) -> bool:
    """An exclusive flock (advisory: it marks a temporary file's writer as alive)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:
        return blocking  # a file system without flock: the lock is only a hint


def _temp_owner(tail: str) -> Optional[int]:
    """The pid in a temporary name's tail ``{pid}-{n}`` (or the older ``{pid}``)."""
    pid, _, n = tail.partition("-")
    if pid.isdigit() and pid.isascii() and (n == "" or (n.isdigit() and n.isascii())):
        return int(pid)
    return None


def _owner_gone(pid: int, path: str) -> bool:
    if os.name == "posix":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # exists, owned by someone else
        return False
    # no safe liveness check (os.kill would terminate on Windows): only long-untouched files
    try:
        return time.time() - os.stat(path).st_mtime > 600
    except OSError:
        return False


def _remove_stale_temps(directory: str, name: str) -> None:
    """Remove temporaries of `name` in `directory` left by processes that died. A file whose
    writer still holds its lock (a process in another pid namespace, say) is kept. Best effort."""
    prefix = f".{name}.tmp-"
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid = _temp_owner(entry[len(prefix):])
        full = os.path.join(directory, entry)
        if pid is None or pid == os.getpid() or not _owner_gone(pid, full):
            continue
        try:
            fd = os.open(full, os.O_RDONLY | _CLOEXEC)
        except OSError:
            continue
        try:
            if _lock(fd, blocking=False):
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    os.unlink(full)
        except OSError:
            pass
        finally:
            os.close(fd)


__all__ = ["NO_TMPFILE_ENV", "atomic_write"]
