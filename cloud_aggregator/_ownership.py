"""One aggregator per state dir.

Two aggregators on one state dir (a restart while the old process still shuts down, a
second ``fleetlearn aggregator`` started by mistake, an edge and a cloud given the same
folder) would interleave rounds in one store, write the same checkpoint names over each
other and delete each other's files: the state would be wrong long before anything
failed. ``StateDirLock`` holds ``broker_bridge``'s ``DirLock`` on
``<state dir>/aggregator.lock`` for the aggregator's whole life; a second one is refused
at construction with ``StateDirInUse``, naming the process that holds it. The kernel
drops the lock when its process dies, however it dies, so a crash never leaves a stale
lock behind. Tools that only read the store (``fleetlearn ledger verify``) take no lock.
A file system that takes no locks is said in the log; a lock file that cannot be opened
is a ``StoreError``.
"""

from __future__ import annotations

from pathlib import Path

from broker_bridge._files import DirLock, DirLockHeld
from cloud_aggregator._errors import StateDirInUse, StoreError

LOCK_NAME = "aggregator.lock"


class StateDirLock:
    """The exclusive lock of one aggregator state dir (see the module doc)."""

    def __init__(self, state_dir: Path) -> None:
        self._lock = DirLock(state_dir, LOCK_NAME)
        self.path = self._lock.path

    @property
    def held(self) -> bool:
        return self._lock.held

    def acquire(self) -> None:
        """Take the lock; ``StateDirInUse`` when another aggregator holds it."""
        try:
            self._lock.acquire()
        except DirLockHeld as exc:
            raise StateDirInUse(
                f"another aggregator uses the state dir {self.path.parent} "
                f"({exc.holder or 'its lock file names no process'}): stop it first, or "
                "give this one another state dir") from None
        except OSError as exc:
            raise StoreError(f"cannot open the state dir's lock file {self.path}: "
                             f"{exc}") from exc

    def release(self) -> None:
        self._lock.release()
