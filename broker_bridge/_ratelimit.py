"""Per-key rate limits: what one device may cost a receiver, in requests and log lines.

A receiver serves many devices; one of them must not be able to make it push
megabytes on request, or grow its log at the attacker's pace. ``KeyedRateLimit`` is a
token bucket per key (a device id): ``allow(key)`` spends a token when one is left.
``LogLimiter`` uses one to let a few lines per key through and folds the rest into a
count, said on the next line that gets through. Both keep at most ``max_keys`` keys
(least recently used first out), so keys an attacker invents cost bounded memory.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from device_profiles import ConfigError


class KeyedRateLimit:
    """A token bucket per key: ``burst`` tokens, refilled at ``per_minute`` a minute."""

    def __init__(
        self,
        *,
        per_minute: float,
        burst: int,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not per_minute > 0 or burst < 1 or max_keys < 1:
            raise ConfigError("rate limits must be positive")
        self.per_minute = per_minute
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = (
            collections.OrderedDict())

    def allow(self, key: str) -> bool:
        """Spend one token of ``key``; False (nothing spent) when its bucket is empty."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.per_minute / 60.0)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return allowed


class LogLimiter:
    """Lets ``burst`` lines per key through, then ``per_minute`` a minute; counts the rest.

    ``log(logger, level, key, msg, *args)`` logs like ``logger.log`` when the key has
    a token; otherwise it only counts, and the next line of that key that gets
    through says how many were left out.
    """

    def __init__(
        self,
        *,
        per_minute: float = 6.0,
        burst: int = 5,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = KeyedRateLimit(per_minute=per_minute, burst=burst, max_keys=max_keys,
                                     clock=clock)
        self._lock = threading.Lock()
        self._suppressed: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._max_keys = max_keys
        self.suppressed_total = 0

    def log(self, logger: logging.Logger | logging.LoggerAdapter[Any], level: int, key: str,
            msg: str, *args: object) -> bool:
        """Log (True) or count (False) one line about ``key``."""
        if not logger.isEnabledFor(level):
            return False
        if not self._limit.allow(key):
            with self._lock:
                self._suppressed[key] = self._suppressed.pop(key, 0) + 1
                self.suppressed_total += 1
                while len(self._suppressed) > self._max_keys:
                    self._suppressed.popitem(last=False)
            return False
        with self._lock:
            left_out = self._suppressed.pop(key, 0)
        if left_out:
            msg = f"{msg} ({left_out} similar lines about {key} left out)"
        logger.log(level, msg, *args)
        return True


def printable(text: object, limit: int = 200) -> str:
    """A device-supplied string made safe for one log line: no control characters
    (no forged lines), at most ``limit`` characters."""
    s = str(text)
    cleaned = "".join(c if c.isprintable() else "?" for c in s[:limit])
    return cleaned + ("..." if len(s) > limit else "")
