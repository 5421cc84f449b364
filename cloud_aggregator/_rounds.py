"""Round bookkeeping, without MQTT: who was asked, who answered, when a round ends.

- ``Clock``: where "now" comes from. ``WallClock`` for deployments, ``ManualClock``
  for tests. Whether deadlines are judged in wall time or in *emulated* time (the
  seconds a simulated device's hardware profile implies, ``UpdateMeta.emulated_s``)
  is the round's ``virtual`` flag, not the clock's.
- ``SyncRound``: one synchronous round. Over-selected devices work towards a target;
  the round closes when the target is reached (real time), when every selected device
  has reported, declined or vanished, or at the deadline; below quorum it is
  abandoned (nothing applied) and the scheduler retries with a fresh selection.
- ``AsyncScheduler``: FedBuff-style bookkeeping: tasks in flight (bounded by
  ``concurrency``), their deadlines, and the emulated timeline of aggregations.

Nothing here touches update vectors: the ingest pipeline decodes, validates and weighs;
these classes only decide what an arriving update or a silence means.

Why this module is longer than 400 lines: sync rounds and the async scheduler are the
two halves of one question (who is expected to answer, by when), with the clocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from cloud_aggregator._errors import AggregatorError


class Clock(Protocol):
    """Seconds since the epoch (persisted deadlines must survive a restart)."""

    def now(self) -> float: ...


class WallClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock a test (or a simulator) moves by hand."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise AggregatorError("a clock does not go back")
        self._t += seconds


class DeviceState(StrEnum):
    TASKED = "tasked"  # task sent, no answer yet
    WORKING = "working"  # task accepted
    DECLINED = "declined"
    DROPPED = "dropped"  # went offline, or never answered before the round ended
    COUNTED = "counted"  # its update is in the aggregate
    LATE = "late"  # reported past the deadline (emulated time): not aggregated
    REJECTED = "rejected"  # reported an update refused for good (a screen, a rule)
    REFUSED = "refused"  # an update was refused for a fault it may correct: the round
    # does not wait for it, but a corrected update (a new attempt) is still judged

    @property
    def resolved(self) -> bool:
        return self not in (DeviceState.TASKED, DeviceState.WORKING)


_MAY_STILL_REPORT = frozenset({DeviceState.TASKED, DeviceState.WORKING, DeviceState.DROPPED,
                               DeviceState.REFUSED})
"""States in which an update from the device is still judged while the round is open."""


class Admission(StrEnum):
    """What an arriving update of this round may do."""

    OK = "ok"
    NOT_SELECTED = "not_selected"
    ALREADY_COUNTED = "already_counted"
    LATE = "missed_deadline"
    RESOLVED = "device_resolved"  # declined, late or rejected for good earlier this round


class Decision(StrEnum):
    CLOSE = "close"
    ABANDON = "abandon"


@dataclass(frozen=True, kw_only=True)
class RoundSpec:
    """The fixed facts of a round (persisted with it, so a restart rebuilds it)."""

    index: int
    model_version: int
    target: int
    quorum: int
    deadline_s: float
    started_at: float
    virtual: bool = False
    safety_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.target < 1 or not self.quorum >= 1:
            raise AggregatorError("target and quorum must be >= 1")
        if not self.deadline_s > 0:
            raise AggregatorError("deadline_s must be positive")

    @property
    def deadline_at(self) -> float:
        return self.started_at + self.deadline_s


@dataclass(frozen=True, kw_only=True)
class Report:
    """What a counted (or late) device said about its work."""

    duration_s: float
    emulated_s: float | None = None
    loss: float | None = None
    num_samples: int = 0

    @property
    def took_s(self) -> float:
        return took(self.emulated_s, self.duration_s)


def took(emulated_s: float | None, duration_s: float) -> float:
    """How long a task took: the emulated seconds a device reports (a simulated device's
    hardware and links), else its wall-clock seconds."""
    return emulated_s if emulated_s is not None else duration_s


@dataclass(frozen=True, kw_only=True)
class RoundOutcome:
    decision: Decision
    reason: str
    counted: tuple[str, ...]
    missed: tuple[str, ...]
    """Selected devices that did not make it (late, dropped, rejected): missed deadlines."""
    declined: tuple[str, ...]
    wall_s: float
    emulated_s: float
    """Round duration in emulated time (virtual) or wall time (real)."""


class SyncRound:
    """One synchronous round's device states and its termination rule."""

    def __init__(self, *, spec: RoundSpec, selected: Iterable[str]) -> None:
        self.spec = spec
        self.states: dict[str, DeviceState] = {}
        self.reports: dict[str, Report] = {}
        self._counted = 0
        self._unresolved = 0
        for device_id in selected:
            self.add_device(device_id)
        if not self.states:
            raise AggregatorError("a round needs at least one selected device")

    # -- membership

    @property
    def selected(self) -> tuple[str, ...]:
        return tuple(self.states)

    def add_device(self, device_id: str) -> None:
        """Select ``device_id`` (at the start, or as a replacement for a decliner)."""
        if device_id in self.states:
            raise AggregatorError(f"{device_id} is already in round {self.spec.index}")
        self._set(device_id, DeviceState.TASKED)

    def _set(self, device_id: str, state: DeviceState) -> None:
        """Change a device's state, keeping the round's counts (no scan per update)."""
        old = self.states.get(device_id)
        if old is not None:
            self._counted -= old is DeviceState.COUNTED
            self._unresolved -= not old.resolved
        self.states[device_id] = state
        self._counted += state is DeviceState.COUNTED
        self._unresolved += not state.resolved

    def state(self, device_id: str) -> DeviceState | None:
        return self.states.get(device_id)

    def pending(self) -> tuple[str, ...]:
        """Devices still expected to report."""
        return tuple(d for d, s in self.states.items() if not s.resolved)

    @property
    def counted(self) -> int:
        return self._counted

    # -- events

    def task_accepted(self, device_id: str) -> None:
        """The device took its task: working (again, when it had gone offline and came
        back to find its task, which may reach it before its hello)."""
        if self.states.get(device_id) in (DeviceState.TASKED, DeviceState.DROPPED):
            self._set(device_id, DeviceState.WORKING)

    def declined(self, device_id: str) -> bool:
        """True if this changed the device's state (it was still expected)."""
        return self._resolve(device_id, DeviceState.DECLINED)

    def dropped(self, device_id: str) -> bool:
        return self._resolve(device_id, DeviceState.DROPPED)

    def rejected(self, device_id: str) -> bool:
        """An update was refused for good: nothing more from ``device_id`` counts."""
        if self.states.get(device_id) in _MAY_STILL_REPORT:
            self._set(device_id, DeviceState.REJECTED)
            return True
        return False

    def refused(self, device_id: str) -> bool:
        """An update was refused for a fault the device may correct (a new attempt)."""
        if self.states.get(device_id) in _MAY_STILL_REPORT:
            self._set(device_id, DeviceState.REFUSED)
            return True
        return False

    def _resolve(self, device_id: str, state: DeviceState) -> bool:
        current = self.states.get(device_id)
        if current is None or current.resolved:
            return False
        self._set(device_id, state)
        return True

    def revive(self, device_id: str) -> bool:
        """A dropped device is back (it said hello while busy with this round)."""
        if self.states.get(device_id) is DeviceState.DROPPED:
            self._set(device_id, DeviceState.WORKING)
            return True
        return False

    def admit(self, device_id: str, *, emulated_s: float | None, duration_s: float) -> Admission:
        """May an update from ``device_id`` count? (Does not change any state.)

        A device marked dropped (it went offline) may still count while the round is
        open: a connection blip should not waste finished work. So may one whose update
        was refused for a fault it can correct.
        """
        current = self.states.get(device_id)
        if current is None:
            return Admission.NOT_SELECTED
        if current is DeviceState.COUNTED:
            return Admission.ALREADY_COUNTED
        if current not in _MAY_STILL_REPORT:
            return Admission.RESOLVED
        if self.spec.virtual and took(emulated_s, duration_s) > self.spec.deadline_s:
            return Admission.LATE
        return Admission.OK

    def count(self, device_id: str, report: Report) -> None:
        if self.states.get(device_id) not in _MAY_STILL_REPORT:
            raise AggregatorError(f"{device_id} cannot be counted in round {self.spec.index}")
        self._set(device_id, DeviceState.COUNTED)
        self.reports[device_id] = report

    def late(self, device_id: str, report: Report) -> None:
        if self.states.get(device_id) in _MAY_STILL_REPORT:
            self._set(device_id, DeviceState.LATE)
            self.reports[device_id] = report

    # -- termination

    def decide(self, now: float) -> tuple[Decision, str] | None:
        """Should the round end now, and how? None: keep waiting."""
        counted = self.counted
        done = "quorum reached" if counted >= self.spec.quorum else "quorum missed"
        decision = Decision.CLOSE if counted >= self.spec.quorum else Decision.ABANDON
        if self._unresolved == 0:
            return decision, f"every selected device answered ({done})"
        if not self.spec.virtual and counted >= self.spec.target:
            return Decision.CLOSE, "target reached"
        if not self.spec.virtual and now >= self.spec.deadline_at:
            return decision, f"deadline ({done})"
        if self.spec.virtual and now >= self.spec.started_at + self.spec.safety_timeout_s:
            return decision, f"safety timeout ({done})"
        return None

    def finish(self, decision: Decision, reason: str, *, now: float) -> RoundOutcome:
        """End the round: still-pending devices count as dropped (missed deadline)."""
        for device_id in self.pending():
            self._set(device_id, DeviceState.DROPPED)
        wall = max(0.0, now - self.spec.started_at)
        return RoundOutcome(
            decision=decision,
            reason=reason,
            counted=self._with(DeviceState.COUNTED),
            missed=self._with(DeviceState.LATE, DeviceState.DROPPED, DeviceState.REJECTED,
                              DeviceState.REFUSED),
            declined=self._with(DeviceState.DECLINED),
            wall_s=wall,
            emulated_s=self.emulated_duration() if self.spec.virtual else wall,
        )

    def emulated_duration(self) -> float:
        """Virtual time of the round: the slowest counted device, or the whole deadline
        if anyone missed it or vanished (the server would have waited that long)."""
        if any(s in (DeviceState.LATE, DeviceState.DROPPED) for s in self.states.values()):
            return self.spec.deadline_s
        times = [
            r.took_s
            for d, r in self.reports.items()
            if self.states[d] is DeviceState.COUNTED
        ]
        return max(times, default=0.0)

    def _with(self, *states: DeviceState) -> tuple[str, ...]:
        return tuple(d for d, s in self.states.items() if s in states)


# --------------------------------------------------------------------------- async


@dataclass(frozen=True, kw_only=True)
class InFlight:
    """One async task: the device, the model version it trains from, when it started."""

    task_round: int
    device_id: str
    model_version: int
    dispatched_at: float
    emulated_start: float = 0.0


class AsyncScheduler:
    """Tasks in flight in FedBuff mode, each with its own task round number.

    Every dispatch gets a fresh ``task_round`` so the idempotency key of its update,
    ``(fleet, task_round, device, attempt)``, is unique even when a device trains
    several times between two aggregations. ``concurrency`` bounds the tasks in flight.
    The emulated clock advances to the finish time of the update that fills a buffer.
    """

    def __init__(self, *, concurrency: int, deadline_s: float, next_task_round: int = 1) -> None:
        if concurrency < 1:
            raise AggregatorError("concurrency must be >= 1")
        self.concurrency = concurrency
        self.deadline_s = deadline_s
        self.next_task_round = next_task_round
        self.inflight: dict[int, InFlight] = {}
        self._busy: dict[str, int] = {}
        self.emulated_now = 0.0
        self._pending_finish = 0.0  # latest emulated finish among buffered updates

    def free_slots(self) -> int:
        return max(0, self.concurrency - len(self.inflight))

    def busy(self) -> set[str]:
        return set(self._busy)

    def _forget(self, task: InFlight) -> None:
        left = self._busy.get(task.device_id, 0) - 1
        if left > 0:
            self._busy[task.device_id] = left
        else:
            self._busy.pop(task.device_id, None)

    def dispatch(self, device_id: str, *, model_version: int, now: float) -> InFlight:
        if self.free_slots() == 0:
            raise AggregatorError("no free async slot")
        if device_id in self._busy:
            raise AggregatorError(f"{device_id} already has a task in flight")
        task = InFlight(
            task_round=self.next_task_round, device_id=device_id, model_version=model_version,
            dispatched_at=now, emulated_start=self.emulated_now,
        )
        self.next_task_round += 1
        self.inflight[task.task_round] = task
        self._busy[device_id] = self._busy.get(device_id, 0) + 1
        return task

    def lookup(self, task_round: int, device_id: str) -> InFlight | None:
        task = self.inflight.get(task_round)
        return task if task is not None and task.device_id == device_id else None

    def complete(self, task_round: int, *, emulated_s: float | None = None) -> InFlight | None:
        """A task's update was counted (or refused): free its slot."""
        task = self.inflight.pop(task_round, None)
        if task is not None:
            self._forget(task)
        if task is not None and emulated_s is not None:
            finish = task.emulated_start + emulated_s
            self._pending_finish = max(self._pending_finish, finish)
        return task

    def drop_device(self, device_id: str) -> list[InFlight]:
        """The device went offline: forget its tasks."""
        if device_id not in self._busy:
            return []
        gone = [t for t in self.inflight.values() if t.device_id == device_id]
        for t in gone:
            del self.inflight[t.task_round]
            self._forget(t)
        return gone

    def expire(self, now: float) -> list[InFlight]:
        """Tasks past their wall-clock deadline: dropped, their slots freed.

        Tasks are kept in dispatch order, so the scan stops at the first one still in
        time (called at every tick: not a pass over every task in flight). Should the
        clock step back between two dispatches, the later task waits for the earlier
        ones' expiry: late, never lost."""
        late = []
        for t in self.inflight.values():
            if now < t.dispatched_at + self.deadline_s:
                break
            late.append(t)
        for t in late:
            del self.inflight[t.task_round]
            self._forget(t)
        return late

    def aggregated(self) -> float:
        """A buffer was released: advance emulated time; return the emulated duration."""
        start = self.emulated_now
        self.emulated_now = max(self.emulated_now, self._pending_finish)
        self._pending_finish = self.emulated_now
        return self.emulated_now - start

    def to_json(self) -> dict[str, Any]:
        return {
            "next_task_round": self.next_task_round,
            "emulated_now": self.emulated_now,
            "pending_finish": self._pending_finish,
            "inflight": [
                [t.task_round, t.device_id, t.model_version, t.dispatched_at, t.emulated_start]
                for t in self.inflight.values()
            ],
        }

    def load_json(self, data: Mapping[str, Any]) -> None:
        try:
            self.next_task_round = int(data["next_task_round"])
            self.emulated_now = float(data["emulated_now"])
            self._pending_finish = float(data.get("pending_finish", self.emulated_now))
            self.inflight = {
                int(r): InFlight(task_round=int(r), device_id=str(d), model_version=int(v),
                                 dispatched_at=float(at), emulated_start=float(es))
                for r, d, v, at, es in data["inflight"]
            }
            self._busy = {}
            for t in self.inflight.values():
                self._busy[t.device_id] = self._busy.get(t.device_id, 0) + 1
        except (KeyError, TypeError, ValueError) as exc:
            raise AggregatorError(f"unreadable async scheduler state: {exc}") from exc


def over_select(target: int, factor: float, available: int) -> int:
    """How many devices to ask: ceil(target x factor), at most what is available."""
    return min(available, max(target, math.ceil(target * factor - 1e-9)))
