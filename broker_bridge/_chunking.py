"""Bounded reassembly of chunked messages.

A receiver keeps incomplete chunk sets in memory under bounds on the number of sets
and the bytes held, both across all senders and per sender (the envelope's device
id), and a time to live. A set that breaks a bound or outlives its TTL is dropped
whole (and counted); duplicates and out-of-order chunks are fine. Nothing is
allocated from a declared length alone: memory grows only with chunks actually
received, and each chunk is charged ``chunk_overhead`` bytes on top of its data (the
record that holds it), so many tiny chunks cost what they really cost.

One sender cannot push another one's sets out: past its own limits a sender loses
its own oldest set, and when a global limit is reached the set evicted is the oldest
of the sender holding the most (sets for the set limit, bytes for the byte limit), so
devices holding large incomplete sets never block a lighter device's message.
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
_Sender = tuple[str, str]  # fleet, device


@dataclass(frozen=True, kw_only=True)
class ReassemblyLimits:
    max_pending_sets: int = 256
    max_pending_bytes: int = 512 * 1024 * 1024
    ttl_s: float = 120.0
    remember_completed: int = 4096
    max_sets_per_sender: int = 8
    """Incomplete sets one sender may have at once (a device sends one update at a time)."""
    max_bytes_per_sender: int = 288 * 1024 * 1024
    """One whole body of the largest size the envelope allows (256 MiB), with its records."""
    chunk_overhead: int = 512
    """Bytes charged per chunk held, on top of its data: what its record costs."""

    def __post_init__(self) -> None:
        if (self.max_pending_sets <= 0 or self.max_pending_bytes <= 0 or self.ttl_s <= 0
                or self.max_sets_per_sender <= 0 or self.max_bytes_per_sender <= 0
                or self.chunk_overhead < 0):
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
    sender_limited: int = 0


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
        self._by_sender: dict[_Sender, list[int]] = {}  # sender -> [sets, bytes charged]
        self._done: OrderedDict[_Key, None] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = ReassemblyStats()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending_sets(self) -> int:
        return len(self._pending)

    def sender_usage(self, fleet: str, device: str) -> tuple[int, int]:
        """(incomplete sets, bytes charged) held for one sender."""
        with self._lock:
            sets, nbytes = self._by_sender.get((fleet, device), (0, 0))
            return sets, nbytes

    def feed(self, chunk: Chunk) -> Message | None:
        """Add one chunk; return the message once its set is complete, else None.

        Raises ChunkError for a chunk that contradicts its set or breaks a limit (the
        set is dropped in that case).
        """
        if chunk.chunk_count == 1:
            return _to_message(chunk, bytes(chunk.data))  # bytes already: not copied
        key: _Key = (chunk.fleet, chunk.device, int(chunk.kind), chunk.transfer_id)
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._done:
                self.stats.duplicates += 1
                return None
            pend = self._pending.get(key)
            sender: _Sender = (chunk.fleet, chunk.device)
            if pend is None:
                usage = self._by_sender.get(sender)
                if usage is not None and usage[0] >= self._limits.max_sets_per_sender:
                    self._drop_oldest(sender)
                    self.stats.sender_limited += 1
                if len(self._pending) >= self._limits.max_pending_sets:
                    self._drop_oldest(self._heaviest_sender())
                pend = _Pending(first=chunk, started=now)
                self._pending[key] = pend
                self._by_sender.setdefault(sender, [0, 0])[0] += 1
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
            cost = len(chunk.data) + self._limits.chunk_overhead
            if self._by_sender[sender][1] + cost > self._limits.max_bytes_per_sender:
                self._drop(key)
                self.stats.sender_limited += 1
                raise ChunkError(
                    f"sender {chunk.device or '(broadcast)'} holds "
                    f"{self._limits.max_bytes_per_sender} bytes of incomplete messages; "
                    "set dropped"
                )
            while self._pending_bytes + cost > self._limits.max_pending_bytes:
                # Room comes from the sender holding the most bytes (this chunk counted
                # with its own sender), oldest set first: never from a lighter newcomer.
                heaviest = self._heaviest_sender(by_bytes=True, adding=(sender, cost))
                if self._oldest_of(heaviest) == key:
                    self._drop(key)
                    raise ChunkError(f"reassembly buffer full "
                                     f"({self._limits.max_pending_bytes} bytes); set dropped")
                self._drop_oldest(heaviest)
            pend.parts[chunk.chunk_index] = chunk
            pend.size += cost
            self._pending_bytes += cost
            self._by_sender[sender][1] += cost
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

    def _heaviest_sender(self, *, by_bytes: bool = False,
                         adding: tuple[_Sender, int] | None = None) -> _Sender:
        """The sender holding the most sets (then bytes), or with ``by_bytes`` the most
        bytes (then sets); ``adding`` counts bytes about to be charged to one sender."""
        def weight(item: tuple[_Sender, list[int]]) -> tuple[int, int]:
            sender, (sets, nbytes) = item
            if adding is not None and sender == adding[0]:
                nbytes += adding[1]
            return (nbytes, sets) if by_bytes else (sets, nbytes)

        return max(self._by_sender.items(), key=weight)[0]

    def _oldest_of(self, sender: _Sender) -> _Key:
        return next(k for k in self._pending if (k[0], k[1]) == sender)

    def _drop_oldest(self, sender: _Sender) -> None:
        self._drop(self._oldest_of(sender))
        self.stats.evicted += 1

    def _drop(self, key: _Key) -> None:
        pend = self._pending.pop(key, None)
        if pend is not None:
            self._pending_bytes -= pend.size
            sender = (key[0], key[1])
            usage = self._by_sender[sender]
            usage[0] -= 1
            usage[1] -= pend.size
            if usage[0] <= 0:
                del self._by_sender[sender]


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
