"""Waiting for a condition that another thread (or process) makes true."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(cond: Callable[[], object], timeout: float = 30.0, step: float = 0.01) -> bool:
    """Poll ``cond()`` every ``step`` seconds until true or ``timeout`` seconds passed;
    whether it became true."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())
