"""A state folder's lock held by another process, for the tests of who may use a folder."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HOLD = ("import sys, time; from pathlib import Path; from broker_bridge._files import DirLock; "
         "lock = DirLock(Path(sys.argv[1]), sys.argv[2]); lock.acquire(); "
         "print('held', flush=True); time.sleep(60)")


@contextmanager
def held_elsewhere(folder: Path, name: str) -> Iterator[int]:
    """A child process holds ``DirLock(folder, name)`` for the block; yields its pid. It is
    SIGKILLed at the end: nothing of its own frees the lock, only the kernel does."""
    folder.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), name],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.kill()
        child.wait()
