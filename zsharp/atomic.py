"""Atomic files and directory ownership: what a reader sees is a whole file, and one
process at a time writes a directory.

Everything is written to a temporary file in the destination's directory, flushed to disk,
given the permissions the umask asks for (``mkstemp`` creates 0600), then renamed over the
destination; on any error the temporary file is removed and an :class:`OSError` that named
no file names the destination (``[Errno 28] No space left on device: 'cell/model.pt'``).
A process killed mid-write (SIGKILL, a lost node) cannot remove its temporary file: the
next owner of the directory does (:func:`remove_stale_temps`), under
:class:`DirectoryLock`, which guarantees no other process is writing there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

LOCK_NAME = ".zsharp.lock"
# flock's answers on a file system without locks
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask``
    can only be read by setting it, which races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def named(error: OSError, path: str | os.PathLike[str]) -> OSError:
    """``error`` naming ``path`` when it named no file (a write or fsync error does not)."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror or os.strerror(error.errno), os.fspath(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise named(error, path) from error
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            # mkstemp makes the file 0600; a file written in place would follow the umask
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
        Path(tmp).replace(path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise named(error, path) from error
        raise


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def write_jsonl(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_open(path) as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def remove_stale_temps(
    directory: str | os.PathLike[str], names: Iterable[str] | None = None
) -> list[Path]:
    """Remove the temporary files of writers that died: ``.NAME.*.tmp`` for each of
    ``names``, or every hidden ``.*.tmp`` file when ``names`` is None. Call it only while
    holding the directory's :class:`DirectoryLock` (a live writer's file would go too)."""
    directory = Path(directory)
    patterns = [f".{name}.*.tmp" for name in names] if names is not None else [".*.tmp"]
    removed = []
    for pattern in patterns:
        for path in directory.glob(pattern):
            if path.is_file() and not path.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


class BusyError(RuntimeError):
    """Another process holds the directory's lock; the message names it (pid, host)."""


class DirectoryLock:
    """An exclusive ``flock`` on ``DIRECTORY/.zsharp.lock``, held by this process.

    The kernel frees the lock however the holder dies (SIGKILL, OOM killer), so a crashed
    run never blocks the next one; a second process fails at once with :class:`BusyError`
    naming the holder, whose pid, host and start time the lock file records. Re-entrant
    within one process (the command line and the trainer both claim a cell). The holder
    removes the file when it lets go; a process that opened the old file just before
    notices (the path no longer names the inode it locked) and locks anew.
    ``flock`` works across NFS clients on Linux (emulated with POSIX locks).
    """

    _held: ClassVar[dict[Path, list[int]]] = {}  # directory -> [fd, depth]
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: str | os.PathLike[str], purpose: str = "zsharp") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose
        self._key = self.directory.resolve()

    def __enter__(self) -> DirectoryLock:
        with self._guard:
            held = self._held.get(self._key)
            if held is not None:
                held[1] += 1
                return self
            self._held[self._key] = [self._acquire(), 1]
        return self

    def __exit__(self, *_exc: object) -> None:
        with self._guard:
            held = self._held[self._key]
            held[1] -= 1
            if held[1] > 0:
                return
            del self._held[self._key]
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still holding it: see the class docstring
            os.close(held[0])

    def _acquire(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as error:
                raise named(error, self.path) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in _NO_LOCKS:  # some FUSE and old NFS mounts: run unguarded
                    print(
                        f"zsharp: warning: {self.path}: this file system has no locks "
                        f"({error.strerror}); nothing stops a second process here",
                        file=sys.stderr,
                    )
                    return fd
                holder = _holder(fd)
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise named(error, self.path) from error
                raise BusyError(
                    f"{self.directory}: in use by {holder or 'another process'}; wait for it "
                    f"to finish or stop it (its lock: {self.path})"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), self.path.stat())
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its last holder removed it as we opened it: lock the new one
        info = (
            f"{self.purpose} (pid {os.getpid()} on host {platform.node()}, since "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')})\n"
        )
        with contextlib.suppress(OSError):  # the record is informative; the lock is what counts
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        return fd


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return os.pread(fd, 512, 0).decode().strip()
    return ""
