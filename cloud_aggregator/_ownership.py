"""One aggregator per state dir.

Two aggregators on one state dir (a restart while the old process still shuts down, a
second ``fleetlearn aggregator`` started by mistake, an edge and a cloud given the same
folder) would interleave rounds in one store, write the same checkpoint names over each
other and delete each other's files: the state would be wrong long before anything
failed. ``StateDirLock`` takes an exclusive ``flock`` on ``<state dir>/aggregator.lock``
for the aggregator's whole life; a second one is refused at construction with
``StateDirInUse``, naming the process that holds it (written into the file). The kernel
drops the lock when its process dies, however it dies, so a crash never leaves a stale
lock behind. Tools that only read the store (``fleetlearn ledger verify``) take no lock.

On a platform without ``fcntl``, or a file system that takes no locks (some network
mounts), the lock is not taken, and the log says so; a lock file that cannot be opened is
a ``StoreError``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from cloud_aggregator._errors import StateDirInUse, StoreError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = "aggregator.lock"


class StateDirLock:
    """The exclusive lock of one state dir (see the module doc)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock; ``StateDirInUse`` when another aggregator holds it."""
        if self._fd is not None:
            return
        if fcntl is None:
            log.warning("no fcntl here: nothing stops a second aggregator on %s",
                        self.path.parent)
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the state dir's lock file {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise StateDirInUse(
                f"another aggregator uses the state dir {self.path.parent} "
                f"({holder or 'its lock file names no process'}): stop it first, or give "
                "this one another state dir") from None
        except OSError as exc:  # e.g. ENOLCK: a file system without locks
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing stops a second aggregator on this "
                        "state dir", self.path, exc)
            return
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode())
        self._fd = fd

    def release(self) -> None:
        """Let the next aggregator in (the file stays: removing it would race a waiter)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
