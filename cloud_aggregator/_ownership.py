"""One aggregator per state dir.

Two aggregators on one state dir (a restart while the old process still shuts down, a
second ``fleetlearn aggregator`` started by mistake, an edge and a cloud given the same
folder) would interleave rounds in one store, write the same checkpoint names over each
other and delete each other's files: the state would be wrong long before anything
failed. ``lock_state_dir`` takes ``broker_bridge``'s ``DirLock`` on
``<state dir>/aggregator.lock`` for the aggregator's whole life; a second one is refused
at construction with ``StateDirInUse``, naming the process that holds it. The kernel
drops the lock when its process dies, however it dies, so a crash never leaves a stale
lock behind. Tools that only read the store (``fleetlearn ledger verify``) take no lock.
A file system that takes no locks is said in the log; a lock file that cannot be opened
is a ``StoreError``. (The agent's ``edge_runtime._state.lock_state_folder`` is the same
lock, with the agent's errors.)
"""

from __future__ import annotations

from pathlib import Path

from broker_bridge._files import DirLock, DirLockHeld
from cloud_aggregator._errors import StateDirInUse, StoreError

LOCK_NAME = "aggregator.lock"


def lock_state_dir(state_dir: Path) -> DirLock:
    """The held lock of ``state_dir`` (``release`` it when the aggregator goes);
    ``StateDirInUse`` when another aggregator holds it."""
    lock = DirLock(state_dir, LOCK_NAME)
    try:
        lock.acquire()
    except DirLockHeld as exc:
        raise StateDirInUse(f"another aggregator uses the state dir {state_dir} ({exc.holder}): "
                            "stop it first, or give this one another state dir") from None
    except OSError as exc:
        raise StoreError(f"cannot open the state dir's lock file {lock.path}: {exc}") from exc
    return lock
