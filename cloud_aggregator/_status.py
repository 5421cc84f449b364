"""What the aggregator is waiting for, in one line, and the fix when there is one.

A wait longer than a few seconds says why: ``status_line`` describes the fleet as the
aggregator sees it (online, eligible, selected, needed) and names the usual mistakes:
no device online at all (agents started with another ``--fleet``, or another broker),
fewer devices known than a round needs (``--devices-per-round`` too high), devices
online but ineligible (their reasons, counted).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._registry import DeviceInfo

STATUS_INTERVAL_S = 10.0
"""Seconds between two status lines while the aggregator waits."""


@dataclass(frozen=True, kw_only=True)
class FleetView:
    known: int
    online: int
    ready: int
    ineligible: dict[str, int]


def fleet_view(devices: list[DeviceInfo], ready: list[DeviceInfo]) -> FleetView:
    reasons: collections.Counter[str] = collections.Counter()
    for d in devices:
        if d.online and d.hello_seen and not d.eligible:
            for reason in d.reasons or ("ineligible",):
                reasons[reason.split(":")[0][:60]] += 1
        elif d.online and d.hello_seen and d.num_samples <= 0:
            reasons["no local data"] += 1
    return FleetView(known=len(devices), online=sum(1 for d in devices if d.online),
                     ready=len(ready), ineligible=dict(reasons.most_common(4)))


def waiting_line(config: AggregatorConfig, view: FleetView, *, next_round: int) -> str:
    """Why no round starts, and what would make one start."""
    need = config.effective_min_devices
    fleet = config.fleet
    if view.online == 0:
        return (f"waiting: 0 devices online in fleet {fleet!r} (round {next_round} needs "
                f"{need}); agents must use --fleet {fleet} and the same broker as this "
                "aggregator")
    line = (f"waiting: {view.online} devices online in fleet {fleet!r}, {view.ready} "
            f"eligible; round {next_round} needs {need}")
    if view.ineligible:
        line += "; ineligible: " + ", ".join(f"{r} ({n})" for r, n in view.ineligible.items())
    if view.known < need:
        line += (f"; only {view.known} devices have ever been seen: lower "
                 f"--devices-per-round (now {config.devices_per_round}) or --min-devices")
    return line


def round_line(*, index: int, counted: int, selected: int, pending: int, quorum: int,
               target: int, seconds_left: float | None) -> str:
    """Where the open round stands."""
    left = "" if seconds_left is None else f", deadline in {max(seconds_left, 0.0):.0f} s"
    return (f"round {index}: {counted} of {selected} selected devices reported "
            f"({pending} still working); {quorum} needed to apply it, {target} wanted{left}")


def async_line(*, inflight: int, concurrency: int, buffered: int, buffer_size: int,
               view: FleetView, fleet: str) -> str:
    if inflight == 0 and view.ready == 0:
        return (f"waiting: no eligible device online in fleet {fleet!r} ({view.online} "
                f"online); agents must use --fleet {fleet}")
    return (f"async: {inflight} of {concurrency} tasks in flight, {buffered} of "
            f"{buffer_size} updates buffered, {view.ready} devices eligible")
