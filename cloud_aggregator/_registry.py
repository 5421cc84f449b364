"""The fleet registry: every device the aggregator has heard of, and how it behaved.

Devices appear through presence (a retained ``online``/``offline`` status; the last
will turns it ``offline`` when a connection dies) and ``hello`` messages (profile,
eligibility, sample count, artifacts and model versions held). Only a device that said
hello to this aggregator process (``greeted``), and has not gone offline since, may be
selected: a retained ``online`` can be stale (a device gone without its will firing),
and some brokers never deliver retained messages to wildcard subscriptions, so the
aggregator asks every device for a hello on start (``broker_bridge.roll_call``).
How each device behaved when asked to train is ``history`` (a ``FleetHistory``: tasks
given, completed and missed, last loss, reported samples, durations), the one record
of it: strategies record into it (``record_selected``, ``record_outcome``) and the
selection policy reads it. Everything is persisted through the ``Store`` in typed
tables (``devices``: profile, presence, what the last hello said; ``device_history``),
in batches (``flush``), so a restarted aggregator knows its fleet before the first
presence message arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from broker_bridge import Hello, LogLimiter, ProtocolError, printable
from cloud_aggregator._history import FleetHistory
from cloud_aggregator._selection import Candidate
from cloud_aggregator._store import Store, StoreError
from cloud_aggregator._store_devices import DeviceRow
from device_profiles import ConfigError, DeviceProfile, ProfileError

log = logging.getLogger(__name__)

_LOG_LIMIT = LogLimiter()
"""What devices say comes at their pace: a few lines a minute per device at most."""


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """What the aggregator knows about one device (an immutable snapshot)."""

    device_id: str
    online: bool = False
    last_seen: float | None = None
    profile: DeviceProfile | None = None
    profile_problem: str | None = None
    """Why the profile of the last hello was refused (None: usable, or none sent)."""
    eligible: bool = False
    reasons: tuple[str, ...] = ()
    num_samples: int = 0
    artifacts_hash: str | None = None
    model_versions: tuple[int, ...] = ()
    busy_round: int | None = None
    hello_seen: bool = False
    greeted: bool = False
    """A hello reached this aggregator process since the device last went offline
    (never persisted: a restarted aggregator asks again)."""


DurationModel = Callable[[DeviceInfo], float | None]
"""Predicted seconds for a device's task (the cost model), None when unknown."""


class FleetRegistry:
    """Devices by id; thread-safe; changes written to the ``Store`` in batches
    (``flush``, which the aggregator calls after each group of updates and tick)."""

    def __init__(self, *, store: Store | None = None, clock: Callable[[], float] = time.time):
        self._store = store
        self._clock = clock
        self._lock = threading.RLock()
        self._devices: dict[str, DeviceInfo] = {}
        self._dirty: dict[str, tuple[DeviceInfo, bool]] = {}
        self._online: set[str] = set()
        self._flushed_at = 0.0
        self.history = FleetHistory()
        if store is not None:
            self._load(store)

    def _load(self, store: Store) -> None:
        records = store.devices()
        for record in records:
            # Presence is re-announced after a restart (roll call); until then, offline.
            self._devices[record.device_id] = DeviceInfo(
                device_id=record.device_id, online=False, last_seen=record.last_seen,
                profile=_profile(record.device_id, record.profile), eligible=record.eligible,
                reasons=record.reasons, num_samples=record.num_samples,
                artifacts_hash=record.artifacts_hash, model_versions=record.model_versions,
                hello_seen=record.hello_seen)
        self.history = FleetHistory((r.device_id, r.history) for r in records)

    # -- queries

    def get(self, device_id: str) -> DeviceInfo | None:
        with self._lock:
            return self._devices.get(device_id)

    def all(self) -> list[DeviceInfo]:
        with self._lock:
            return [self._devices[d] for d in sorted(self._devices)]

    def online(self) -> list[DeviceInfo]:
        return [d for d in self.all() if d.online]

    @property
    def online_count(self) -> int:
        """How many devices are online (kept as presence changes, not counted)."""
        return len(self._online)

    def ready(self) -> list[DeviceInfo]:
        """Online devices that may train, sorted by id: greeted by a hello since they came
        online (a retained ``online`` alone may be stale), eligible, with data."""
        return [d for d in self.all()
                if d.online and d.greeted and d.eligible and d.num_samples > 0]

    def candidates(
        self, *, exclude: set[str] | frozenset[str] = frozenset(),
        duration: DurationModel | None = None,
    ) -> list[Candidate]:
        """Selection candidates among ready devices (``exclude``: busy ones)."""
        out = []
        for info in self.ready():
            if info.device_id in exclude:
                continue
            predicted = duration(info) if duration is not None else None
            if predicted is None or not predicted > 0:
                predicted = self.history.get(info.device_id).mean_duration_s or 1.0
            out.append(Candidate(
                device_id=info.device_id, predicted_duration_s=max(predicted, 1e-6),
                num_samples=info.num_samples, profile=info.profile,
            ))
        return out

    # -- events

    def on_presence(self, device_id: str, *, online: bool, at: float | None = None) -> bool:
        """Record a presence change; True when the device's online state flipped."""
        when = self._clock() if at is None else at
        with self._lock:
            info = self._devices.get(device_id) or DeviceInfo(device_id=device_id)
            changed = info.online != online
            info = replace(info, online=online, last_seen=when, greeted=info.greeted and online)
            self._devices[device_id] = info
            if online:
                self._online.add(device_id)
            else:
                self._online.discard(device_id)
        if info.hello_seen:  # stored since its hello; until then, in memory only
            self._persist(info, with_profile=False)
        return changed

    def on_hello(self, device_id: str, hello: Hello, *, at: float | None = None) -> DeviceInfo:
        """Record a hello (profile, eligibility, data, artifacts and versions held)."""
        when = self._clock() if at is None else at
        profile, problem = _parse_profile(hello.profile) if hello.profile else (None, None)
        if problem is not None:
            _LOG_LIMIT.log(log, logging.WARNING, device_id, "device %s: unusable profile in its "
                           "hello (%s); the cost model will guess", device_id, problem)
        try:
            elig = hello.eligibility_info()
            eligible, reasons = elig.eligible, tuple(elig.reasons)
        except ProtocolError as exc:
            _LOG_LIMIT.log(log, logging.WARNING, device_id,
                           "device %s: bad eligibility in hello (%s); treated as ineligible",
                           device_id, printable(exc))
            eligible, reasons = False, ("malformed eligibility",)
        with self._lock:
            info = self._devices.get(device_id) or DeviceInfo(device_id=device_id)
            info = replace(
                info, online=True, last_seen=when, profile=profile or info.profile,
                profile_problem=problem,
                eligible=eligible, reasons=reasons, num_samples=max(0, hello.num_samples),
                artifacts_hash=hello.artifacts_hash,
                model_versions=tuple(hello.model_versions[-8:]), busy_round=hello.busy_round,
                hello_seen=True, greeted=True,
            )
            self._devices[device_id] = info
            self._online.add(device_id)
        self._persist(info, with_profile=True)
        return info

    def record_selected(self, device_ids: list[str] | tuple[str, ...], round_index: int) -> None:
        """``device_ids`` were given a task of ``round_index`` (their history says so)."""
        self.history.selected(device_ids, round_index)

    def record_outcome(
        self, device_id: str, *, completed: bool, duration_s: float | None = None,
        loss: float | None = None, num_samples: int | None = None,
    ) -> None:
        """A device's task ended: its update counted (``completed``) or it missed."""
        self.history.finished(device_id, completed=completed, duration_s=duration_s, loss=loss,
                              num_samples=num_samples)

    def exclude(self, device_id: str, reason: str) -> None:
        """Not selectable until its next hello (which says again what it can do)."""
        with self._lock:
            info = self._devices.get(device_id)
            if info is not None:
                self._devices[device_id] = replace(
                    info, eligible=False, hello_seen=True, reasons=(reason,))

    # -- persistence

    def _persist(self, info: DeviceInfo, *, with_profile: bool) -> None:
        """Queue ``info`` for the next ``flush`` (one transaction for every change
        since the last one: a thousand updates a second must not cost a thousand
        commits). The registry is advisory: what a crash loses, hellos bring back."""
        if self._store is None:
            return
        with self._lock:
            _, had_profile = self._dirty.get(info.device_id, (info, False))
            self._dirty[info.device_id] = (info, had_profile or with_profile)

    def flush(self, *, every_s: float = 0.0) -> None:
        """Write the devices changed since the last flush, in one transaction (not when
        the last flush was less than ``every_s`` ago)."""
        if self._store is None:
            return
        now = time.monotonic()
        if every_s and now - self._flushed_at < every_s:
            return
        self._flushed_at = now
        with self._lock:
            dirty, self._dirty = self._dirty, {}
        histories = self.history.take_changed()
        if not dirty and not histories:
            return
        rows = []
        for device_id in {*dirty, *histories}:
            stale, with_profile = dirty.get(device_id, (None, False))
            info = self._devices.get(device_id, stale) or DeviceInfo(device_id=device_id)
            profile = ((info.profile.to_dict() if info.profile is not None else {})
                       if with_profile else None)
            rows.append(DeviceRow(
                device_id=device_id, profile=profile, online=info.online, seen_at=info.last_seen,
                eligible=info.eligible, reasons=info.reasons, num_samples=info.num_samples,
                artifacts_hash=info.artifacts_hash, model_versions=info.model_versions,
                hello_seen=info.hello_seen, history=histories.get(device_id)))
        def write(store: Store) -> bool:
            store.save_devices(rows)
            return True

        self._write(write)

    def _write(self, action: Callable[[Store], bool]) -> bool:
        assert self._store is not None
        try:
            return action(self._store)
        except StoreError as exc:  # the registry is advisory: log, keep serving
            log.error("registry write failed: %s", exc)
            return False


def _parse_profile(data: Mapping[str, Any]) -> tuple[DeviceProfile | None, str | None]:
    """A profile from the wire (keys this version does not know are ignored, as in
    every control message), or why it is unusable."""
    try:
        return DeviceProfile.from_dict(data, strict=False), None
    except (ProfileError, ConfigError, KeyError, TypeError, ValueError) as exc:
        return None, printable(exc)


def _profile(device_id: str, data: Mapping[str, Any]) -> DeviceProfile | None:
    if not data:
        return None
    profile, problem = _parse_profile(data)
    if problem is not None:
        _LOG_LIMIT.log(log, logging.WARNING, device_id,
                       "device %s: unusable profile (%s); the cost model will guess", device_id,
                       problem)
    return profile
