"""How each device has behaved when asked to train: one record per device, one owner.

``FleetHistory`` holds a ``DeviceHistory`` per device. The aggregator's registry owns
the fleet's (it records selections when a strategy hands out tasks and outcomes when
a device's update counts or its task is missed) and persists it in the store's
``device_history`` table; selection policies read it (``BasePolicy.history``) and keep
only what they learn themselves (duration corrections, exploration, credits). What a
device contributed to the aggregates it counted in (its weight shares, marginal
contributions) and its ``reputation`` (``_contribution``) are in the same record,
updated once per round or release (``contributed``) and saved in that release's
transaction. A policy
used on its own, without an aggregator, owns a history and records into it from
``select`` and ``feedback``, so the same policy code runs in both places.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from cloud_aggregator._contribution import (
    ContributionRecord,
    Standing,
    decayed_alignment,
    refusal_rate,
    reputation,
)
from cloud_aggregator._evolve import evolve

MAX_DURATIONS = 16
"""Observed task durations kept per device (newest last)."""


@dataclass(frozen=True, kw_only=True)
class DeviceHistory:
    """One device's record: tasks given, completed and missed, what its last ones said."""

    selections: int = 0
    """Tasks given (sync rounds it was selected for, asynchronous tasks)."""
    completions: int = 0
    """Tasks whose update counted."""
    misses: int = 0
    """Tasks it did not complete in time (late, offline, declined after accepting, refused
    for good)."""
    last_round: int | None = None
    """The round (or asynchronous task number) it was last selected for."""
    last_loss: float | None = None
    """Root-mean-square per-sample training loss its last counted update reported."""
    reported_samples: int | None = None
    """Samples its last counted update trained on (may be fewer than its data set when
    its task was cut to fit a deadline)."""
    durations: tuple[float, ...] = ()
    """Observed task durations in seconds (emulated time in a simulation), newest last."""
    contributions: int = 0
    """Aggregates its updates counted in (rounds, FedBuff releases)."""
    weight_total: float = 0.0
    """Its weight shares in those aggregates, added up."""
    marginal_total: float | None = None
    """Its leave-one-out marginal contributions to validation accuracy, added up (None:
    never measured; ``contribution_marginal``)."""
    standing: Standing = field(default_factory=Standing)
    """The decayed sums its ``reputation`` is computed from."""

    @property
    def alignment(self) -> float:
        """Decayed mean consensus cosine of its updates (``PRIOR_ALIGNMENT`` at first)."""
        return decayed_alignment(self.standing)

    @property
    def refusal_rate(self) -> float:
        """Decayed share of its screened tasks a screen refused (0 at first)."""
        return refusal_rate(self.standing)

    @property
    def reputation(self) -> float:
        """In [0, 1]: 1 for a new device, near 0 for one whose updates are persistently
        anti-aligned with the others' or refused by the screens (``_contribution``)."""
        return reputation(self.standing)

    @property
    def last_duration_s(self) -> float | None:
        return self.durations[-1] if self.durations else None

    @property
    def mean_duration_s(self) -> float | None:
        return sum(self.durations) / len(self.durations) if self.durations else None


EMPTY = DeviceHistory()


def finite_or_none(value: float | None) -> float | None:
    """``value`` when it is a finite, non-negative number, else None."""
    return value if value is not None and math.isfinite(value) and value >= 0 else None


class FleetHistory:
    """``DeviceHistory`` by device id (thread-safe). ``take_changed`` hands the records
    changed since the last call to whoever persists them."""

    def __init__(self, records: Iterable[tuple[str, DeviceHistory]] = ()) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, DeviceHistory] = dict(records)
        self._changed: set[str] = set()

    def get(self, device_id: str) -> DeviceHistory:
        return self._records.get(device_id, EMPTY)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._records

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def selected(self, device_ids: Iterable[str], round_index: int) -> None:
        """Each of ``device_ids`` was given a task of ``round_index``."""
        with self._lock:
            for d in device_ids:
                h = self._records.get(d, EMPTY)
                self._records[d] = evolve(h, selections=h.selections + 1, last_round=round_index)
                self._changed.add(d)

    def finished(self, device_id: str, *, completed: bool, duration_s: float | None = None,
                 loss: float | None = None, num_samples: int | None = None) -> DeviceHistory:
        """A task of ``device_id`` ended: counted (``completed``) or missed. Values that
        are not finite, non-negative numbers are not recorded."""
        with self._lock:
            h = self._records.get(device_id, EMPTY)
            duration, loss = finite_or_none(duration_s), finite_or_none(loss)
            h = evolve(
                h,
                completions=h.completions + int(completed),
                misses=h.misses + int(not completed),
                durations=(h.durations if duration is None
                           else (*h.durations, float(duration))[-MAX_DURATIONS:]),
                last_loss=loss if loss is not None else h.last_loss,
                reported_samples=(num_samples if num_samples is not None and num_samples >= 0
                                  else h.reported_samples),
            )
            self._records[device_id] = h
            self._changed.add(device_id)
            return h

    def contributed(self, records: Iterable[ContributionRecord],
                    screened: Iterable[str] = ()) -> dict[str, DeviceHistory]:
        """The records after one aggregate (``records``: the devices that counted in it;
        ``screened``: devices a screen refused in it), not yet applied: apply them with
        ``apply`` once they are durable."""
        with self._lock:
            out: dict[str, DeviceHistory] = {}
            for r in records:
                h = out.get(r.device) or self._records.get(r.device, EMPTY)
                marginal = h.marginal_total
                if r.marginal is not None:
                    marginal = (marginal or 0.0) + r.marginal
                out[r.device] = evolve(
                    h, contributions=h.contributions + 1, weight_total=h.weight_total + r.weight,
                    marginal_total=marginal,
                    standing=h.standing.observed(cosine=r.cosine, refused=False))
            for device in screened:
                h = out.get(device) or self._records.get(device, EMPTY)
                out[device] = evolve(h, standing=h.standing.observed(refused=True))
            return out

    def apply(self, records: Mapping[str, DeviceHistory]) -> None:
        """Take these devices' contributions and standing (``contributed``'s, once
        saved); what else changed in their records meanwhile stays."""
        with self._lock:
            for device, new in records.items():
                h = self._records.get(device, EMPTY)
                self._records[device] = evolve(
                    h, contributions=new.contributions, weight_total=new.weight_total,
                    marginal_total=new.marginal_total, standing=new.standing)
                self._changed.add(device)

    def take_changed(self) -> dict[str, DeviceHistory]:
        """The records changed since the last call (and forget that they changed)."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return {d: self._records[d] for d in changed}
