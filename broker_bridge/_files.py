"""Crash-safe file writes, shared by everything fleetlearn persists; and the lock that
keeps a state folder to one process.

A write goes to a temporary file in the target's folder, is flushed and fsynced, then
``os.replace``d over the target, and the folder is fsynced: a crash leaves the old
file or the new one, whole, never a mix.

``DirLock`` is an exclusive ``flock`` on a file in a state folder, held for a process's
life: a second process (or object) asking for it gets ``DirLockHeld`` naming the holder
(written into the file). The kernel drops it when its process dies, however it dies, so
a crash leaves no stale lock; nor does an owner dropped without releasing it (the
descriptor is closed when the ``DirLock`` is collected). Where ``fcntl`` is missing, or
the file system takes no locks (ENOLCK on some network mounts), nothing is locked and the
log says so; a lock file that cannot be opened is an ``OSError``. Each package turns
these into its own errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
import weakref
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so a crash leaves the old file or the new, never half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


class DirLockHeld(Exception):
    """Another process (or object) holds the lock; ``holder`` is what it wrote (or says
    that it wrote nothing)."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder or "its lock file names no process"
        super().__init__(f"{path} is held ({self.holder})")


class DirLock:
    """An exclusive lock on ``<folder>/<name>`` (see the module doc)."""

    def __init__(self, folder: str | os.PathLike[str], name: str) -> None:
        self.path = Path(folder) / name
        self._closer: weakref.finalize[[int], DirLock] | None = None
        """Closes the held descriptor (on ``release``, or when this object is collected)."""

    @property
    def held(self) -> bool:
        return self._closer is not None

    def acquire(self) -> None:
        """Take the lock; ``DirLockHeld`` when another holds it, ``OSError`` when the
        file cannot be opened."""
        if self._closer is not None:
            return
        if fcntl is None:
            log.warning("no fcntl here: nothing keeps %s to one process", self.path.parent)
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DirLockHeld(self.path, holder) from None
        except OSError as exc:  # e.g. ENOLCK: a file system without locks
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing keeps %s to one process", self.path,
                        exc, self.path.parent)
            return
        self._closer = weakref.finalize(self, os.close, fd)  # closing drops the flock
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode())

    def release(self) -> None:
        """Let the next one in (the file stays: removing it would race a waiter)."""
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()  # closes the descriptor once: the flock goes with it


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
