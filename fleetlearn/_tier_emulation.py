"""Device profiles and link bandwidths in a tree: what each tier's emulated time is.

A tree simulation emulates its devices exactly as the flat simulator does (a catalogue
class per device from ``profile_mix``, the cost model's download + train + encode +
upload in ``UpdateMeta.emulated_s``, ``edge_runtime.Emulation``), and its edges with a
profile of their own (``--edge-profile``, e.g. ``x86-gateway`` or ``x86-server``).

A link bandwidth (``--link-bandwidth device-edge:1mbit,edge-cloud:100mbit``) replaces
both directions of the profiles on that link (``uplink_mbps`` and ``downlink_mbps``;
the latency stays the profile's): the cost model then prices the bytes that cross it.

An edge's emulated duration for a parent task (``EdgeEmulation``) is the emulated
durations of the job's child rounds (on the virtual clock: the slowest counted child of
each, or the whole deadline if one missed it) plus its own download, encode and upload
on its profile; the cost model does not price aggregation itself (summing a few
updates), so that counts as nothing.

Every emulated task is recorded (``TierLog``) for the report's per-tier section.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker_bridge import TaskSpec
from device_profiles import (
    ConfigError,
    CostBreakdown,
    DeviceProfile,
    ProfileError,
    get_profile,
    predict,
)
from device_profiles import Task as CostTask
from edge_runtime import Emulation
from fleetlearn._pairs import named_pairs

DEFAULT_EDGE_PROFILE = "x86-gateway"
"""The catalogue class edges run on unless told (``--edge-profile``)."""
LINKS = ("device-edge", "edge-cloud")
"""The links of a tree: devices to their edge, edges to the cloud."""
_UNITS = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_BANDWIDTH = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(kbit|mbit|gbit)$")


def parse_bandwidth(text: str) -> float:
    """``500kbit``, ``1mbit``, ``1.5gbit`` (decimal units, as ``tc`` writes them) in
    megabits per second."""
    m = _BANDWIDTH.match(text.strip())
    if m is None:
        raise ConfigError(f"bandwidth {text!r}: write a number and kbit, mbit or gbit "
                          "(megabits per second: 1mbit), e.g. 500kbit or 100mbit")
    mbps = float(m.group(1)) * _UNITS[m.group(2)]
    if not mbps > 0 or not math.isfinite(mbps):
        raise ConfigError(f"bandwidth {text!r} must be positive")
    return mbps


def parse_links(spec: str | None) -> dict[str, float]:
    """``device-edge:1mbit,edge-cloud:100mbit`` as {link: Mbit/s}; a link left out
    keeps its profiles' bandwidths."""
    if spec is None:
        return {}
    return {link: parse_bandwidth(value) for link, value in named_pairs(
        spec, what="link_bandwidth", names=LINKS, form="LINK:BANDWIDTH",
        example="device-edge:1mbit,edge-cloud:100mbit").items()}


def edge_profile(name: str) -> DeviceProfile:
    """The catalogue profile an edge runs on (an unknown name lists the known ones)."""
    try:
        return get_profile(name)
    except ProfileError as exc:
        raise ConfigError(f"edge_profile: {exc}") from None


def on_link(profile: DeviceProfile, mbps: float | None) -> DeviceProfile:
    """``profile`` behind a link of ``mbps`` both ways (None: the profile's own)."""
    if mbps is None:
        return profile
    return dataclasses.replace(profile, uplink_mbps=mbps, downlink_mbps=mbps)


class TierLog:
    """Every emulated task of one tier (thread-safe: agents encode in their threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.records.append(record)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.records)


def _record(who: str, task: TaskSpec, cost: CostBreakdown, *, total_s: float,
            update_bytes: int, model_bytes: int, latency_ms: float,
            **extra: float) -> dict[str, Any]:
    return {"who": who, "round": task.round, "emulated_s": total_s,
            "download_s": cost.download_s, "train_s": cost.train_s, "encode_s": cost.encode_s,
            "upload_s": cost.upload_s, "update_bytes": update_bytes,
            "model_bytes": model_bytes, "latency_s": latency_ms / 1000.0, **extra}


@dataclass(frozen=True, kw_only=True)
class DeviceTierEmulation(Emulation):
    """A device's emulation (the flat simulator's), each task recorded in ``log``."""

    who: str = ""
    log: TierLog = field(default_factory=TierLog)

    def emulated_s(self, *, task: TaskSpec, num_parameters: int, samples: int, steps: int,
                   update_bytes: int) -> float:
        cost = self.breakdown(task=task, num_parameters=num_parameters, samples=samples,
                              steps=steps, update_bytes=update_bytes)
        self.log.add(_record(self.who, task, cost, total_s=cost.total_s,
                             update_bytes=update_bytes, model_bytes=4 * num_parameters,
                             latency_ms=self.profile.latency_ms))
        return cost.total_s


@dataclass(frozen=True, kw_only=True)
class EdgeEmulation(Emulation):
    """An edge's emulated duration for a parent task (see the module doc):
    ``rounds_s()`` (its job's child rounds) plus its own download, encode and upload."""

    rounds_s: Callable[[], float]
    who: str = ""
    log: TierLog = field(default_factory=TierLog)

    def emulated_s(self, *, task: TaskSpec, num_parameters: int, samples: int, steps: int,
                   update_bytes: int) -> float:
        del samples, steps  # an edge trains through its children
        cost = predict(self.profile, CostTask(
            model_bytes=4 * num_parameters, update_bytes=update_bytes,
            dense_update_bytes=4 * num_parameters, n_samples=1, batch_size=task.batch_size,
            train_flops_per_sample=0.0, max_steps=0))
        children = float(self.rounds_s())
        total = children + cost.total_s
        self.log.add(_record(self.who, task, cost, total_s=total, update_bytes=update_bytes,
                             model_bytes=4 * num_parameters,
                             latency_ms=self.profile.latency_ms, children_s=children))
        return total


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"total": 0.0, "mean": None, "max": None}
    return {"total": round(sum(values), 6), "mean": round(sum(values) / len(values), 6),
            "max": round(max(values), 6)}


def link_report(records: Sequence[dict[str, Any]], mbps: float | None,
                wire_bytes_up: int) -> dict[str, Any]:
    """The uploads over one link: the encoded bytes the senders emulated, their emulated
    transfer seconds (``transfer_s``: bytes over the bandwidth; ``upload_s`` adds one
    latency per upload) and the bytes the receiving aggregators counted on the wire."""
    upload = sum(r["upload_s"] for r in records)
    latency = sum(r["latency_s"] for r in records)
    return {"mbit_s": mbps, "uploads": len(records),
            "update_bytes": sum(r["update_bytes"] for r in records),
            "upload_s": round(upload, 6), "latency_s": round(latency, 6),
            "transfer_s": round(upload - latency, 6),
            "download_s": round(sum(r["download_s"] for r in records), 6),
            "wire_bytes_up": wire_bytes_up}


def tier_report(*, devices: Sequence[DeviceProfile], device_log: TierLog,
                edge: DeviceProfile, edges: int, edge_log: TierLog,
                links: dict[str, float], cloud: dict[str, Any],
                wire_bytes_up: dict[str, int]) -> dict[str, Any]:
    """The report's per-tier section: each tier's members, emulated seconds and the
    uploads over each link."""
    dev, edg = device_log.snapshot(), edge_log.snapshot()
    return {
        "device": {
            "count": len(devices),
            "profiles": dict(sorted(Counter(p.name for p in devices).items())),
            "tasks": len(dev),
            "emulated_s": _stats([r["emulated_s"] for r in dev]),
            "train_s": _stats([r["train_s"] for r in dev]),
        },
        "edge": {
            "count": edges, "profile": edge.name, "tasks": len(edg),
            "emulated_s": _stats([r["emulated_s"] for r in edg]),
            "children_s": _stats([r["children_s"] for r in edg]),
            "own_s": _stats([r["emulated_s"] - r["children_s"] for r in edg]),
        },
        "cloud": cloud,
        "links": {
            "device-edge": link_report(dev, links.get("device-edge"),
                                       wire_bytes_up["device-edge"]),
            "edge-cloud": link_report(edg, links.get("edge-cloud"),
                                      wire_bytes_up["edge-cloud"]),
        },
    }


def tier_lines(tiers: dict[str, Any]) -> list[str]:
    """The console summary of ``tier_report``."""
    d, e, c = tiers["device"], tiers["edge"], tiers["cloud"]

    def bw(mbps: float | None) -> str:
        return "profiles' own" if mbps is None else f"{mbps:g} Mbit/s"

    def mean(stats: dict[str, Any]) -> str:
        return "-" if stats["mean"] is None else f"{stats['mean']:.2f} s"

    lines = [
        f"tiers: device x{d['count']} ({', '.join(f'{k} {v}' for k, v in d['profiles'].items())})"
        f": {d['tasks']} tasks, emulated {mean(d['emulated_s'])} mean, "
        f"{d['emulated_s']['max'] or 0:.2f} s max",
        f"       edge x{e['count']} ({e['profile']}): {e['tasks']} tasks, emulated "
        f"{mean(e['emulated_s'])} mean (children {mean(e['children_s'])}, own "
        f"{mean(e['own_s'])})",
        f"       cloud: {c['rounds_closed']} rounds, emulated {c['emulated_s']:.2f} s, "
        f"accuracy {c['accuracy']}",
    ]
    for name, link in tiers["links"].items():
        lines.append(f"  link {name} ({bw(link['mbit_s'])}): {link['uploads']} uploads, "
                     f"{link['update_bytes'] / 1e3:.1f} kB up, transfer "
                     f"{link['transfer_s']:.3f} s (+ latency {link['latency_s']:.3f} s), "
                     f"{link['wire_bytes_up'] / 1e3:.1f} kB on the wire")
    return lines
