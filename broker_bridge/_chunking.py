"""Bounded reassembly of chunked messages.

A receiver keeps incomplete chunk sets in memory under three bounds: the number of
sets, the bytes held across all sets, and a time to live. A set that breaks a bound
or outlives its TTL is dropped whole (and counted); duplicates and out-of-order
chunks are fine. Nothing is allocated from a declared length alone: memory grows
only with bytes actually received.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from broker_bridge._envelope import Chunk, Message
from broker_bridge._errors import ChunkError
from device_profiles import ConfigError

_Key = tuple[str, str, int, int]  # fleet, device, kind, transfer_id


@dataclass(frozen=True, kw_only=True)
class ReassemblyLimits:
    max_pending_sets: int = 256
    max_pending_bytes: int = 512 * 1024 * 1024
    ttl_s: float = 120.0
    remember_completed: int = 4096

    def __post_init__(self) -> None:
        if self.max_pending_sets <= 0 or self.max_pending_bytes <= 0 or self.ttl_s <= 0:
            raise ConfigError("reassembly limits must be positive")


@dataclass
class _Pending:
    first: Chunk
    started: float
    parts: dict[int, Chunk] = field(default_factory=dict)
    size: int = 0


@dataclass
class ReassemblyStats:
    completed: int = 0
    duplicates: int = 0
    expired: int = 0
    evicted: int = 0


class Reassembler:
    """Feeds chunks in, hands whole messages out. Thread-safe."""

    def __init__(
        self,
        *,
        limits: ReassemblyLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits or ReassemblyLimits()
        self._clock = clock
        self._pending: OrderedDict[_Key, _Pending] = OrderedDict()
        self._pending_bytes = 0
        self._done: OrderedDict[_Key, None] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = ReassemblyStats()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_sets(self) -> int:
        return len(self._pending)

    def feed(self, chunk: Chunk) -> Message | None:
        """Add one chunk; return the message once its set is complete, else None.

        Raises ChunkError for a chunk that contradicts its set or breaks a limit (the
        set is dropped in that case).
        """
        if chunk.chunk_count == 1:
            return _to_message(chunk, chunk.data)
        key: _Key = (chunk.fleet, chunk.device, int(chunk.kind), chunk.transfer_id)
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._done:
                self.stats.duplicates += 1
                return None
            pend = self._pending.get(key)
            if pend is None:
                if len(self._pending) >= self._limits.max_pending_sets:
                    self._drop_oldest()
                pend = _Pending(first=chunk, started=now)
                self._pending[key] = pend
            elif not _same_set(pend.first, chunk):
                self._drop(key)
                raise ChunkError("chunk disagrees with the other chunks of its set; set dropped")
            old = pend.parts.get(chunk.chunk_index)
            if old is not None:
                if old.offset != chunk.offset or old.data != chunk.data:
                    self._drop(key)
                    raise ChunkError("two different chunks with the same index; set dropped")
                self.stats.duplicates += 1
                return None
            if self._pending_bytes + len(chunk.data) > self._limits.max_pending_bytes:
                self._drop(key)
                raise ChunkError(
                    f"reassembly buffer full ({self._limits.max_pending_bytes} bytes); set dropped"
                )
            pend.parts[chunk.chunk_index] = chunk
            pend.size += len(chunk.data)
            self._pending_bytes += len(chunk.data)
            if len(pend.parts) < chunk.chunk_count:
                return None
            self._drop(key)
            self._done[key] = None
            while len(self._done) > self._limits.remember_completed:
                self._done.popitem(last=False)
        body = _join(pend)
        self.stats.completed += 1
        return _to_message(pend.first, body)

    def expire(self) -> int:
        """Drop sets older than the TTL now; return how many were dropped."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        dropped = 0
        while self._pending:
            key, pend = next(iter(self._pending.items()))
            if now - pend.started < self._limits.ttl_s:
                break
            self._drop(key)
            self.stats.expired += 1
            dropped += 1
        return dropped

    def _drop_oldest(self) -> None:
        key = next(iter(self._pending))
        self._drop(key)
        self.stats.evicted += 1

    def _drop(self, key: _Key) -> None:
        pend = self._pending.pop(key, None)
        if pend is not None:
            self._pending_bytes -= pend.size


def _same_set(a: Chunk, b: Chunk) -> bool:
    return (
        a.chunk_count == b.chunk_count
        and a.total_length == b.total_length
        and a.body_crc32 == b.body_crc32
        and a.codec == b.codec
        and a.round == b.round
        and a.model_version == b.model_version
        and a.attempt == b.attempt
    )


def _join(pend: _Pending) -> bytes:
    parts = [pend.parts[i] for i in range(pend.first.chunk_count)]
    expected = 0
    for part in parts:
        if part.offset != expected:
            raise ChunkError("chunks do not tile the body (gap or overlap)")
        expected += len(part.data)
    if expected != pend.first.total_length:
        raise ChunkError("chunks do not add up to the declared body length")
    body = b"".join(p.data for p in parts)
    if zlib.crc32(body) != pend.first.body_crc32:
        raise ChunkError("reassembled body fails its checksum")
    return body


def _to_message(chunk: Chunk, body: bytes) -> Message:
    if chunk.chunk_count == 1 and zlib.crc32(body) != chunk.body_crc32:
        raise ChunkError("body fails its checksum")
    return Message(
        kind=chunk.kind, fleet=chunk.fleet, device=chunk.device, round=chunk.round,
        model_version=chunk.model_version, attempt=chunk.attempt, codec=chunk.codec,
        body=body, transfer_id=chunk.transfer_id,
    )
