"""Measuring the machine we run on: cores, memory, storage and a GEMM FLOP/s estimate.

The training-step measurement needs the ONNX Runtime backend, which lives in the
device agent; this package cannot import it. So the agent passes measured step
times in (``measure_machine(step_times_ms=...)``), or registers a probe with
:func:`register_throughput_probe` that ``fleetlearn profile`` calls. Whatever is not
measured here (the network) is left at stated defaults and listed in ``estimated``.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from device_profiles._errors import ProfileError
from device_profiles._profile import Availability, DeviceProfile, PowerSource

_log = logging.getLogger(__name__)

# A probe returns measured step times in milliseconds by reference-model name, at the
# batch size it states: (step_times_ms, batch_size).
ThroughputProbe = Callable[[], tuple[Mapping[str, float], int]]
_PROBES: list[ThroughputProbe] = []

# Unmeasured network defaults for a machine measured in place (a wired LAN host).
_DEFAULT_DOWNLINK_MBPS = 100.0
_DEFAULT_UPLINK_MBPS = 20.0
_DEFAULT_LATENCY_MS = 10.0
_DEFAULT_STEP_OVERHEAD_MS = 0.3


def register_throughput_probe(probe: ThroughputProbe) -> None:
    """Let another package (the agent's ONNX Runtime backend) add step-time measurements."""
    if probe not in _PROBES:
        _PROBES.append(probe)


def registered_probes() -> tuple[ThroughputProbe, ...]:
    return tuple(_PROBES)


@dataclass(frozen=True, kw_only=True)
class GemmResult:
    """A float32 matrix-multiply throughput measurement."""

    size: int
    repeats: int
    seconds: float

    @property
    def gflops(self) -> float:
        return 2.0 * self.size**3 * self.repeats / self.seconds / 1e9


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def memory_mb() -> int:
    """Physical memory in MiB, from /proc/meminfo or sysconf."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError) as exc:
        raise ProfileError("cannot determine this machine's memory") from exc
    return int(pages * page_size) // (1024 * 1024)


def storage_gb(path: str = ".") -> float:
    """Free space where local data and state will live, in GB."""
    try:
        return round(shutil.disk_usage(path).free / 1e9, 1)
    except OSError as exc:
        raise ProfileError(f"cannot read free space at {path}: {exc}") from exc


def measure_gemm(
    *, size: int = 256, min_seconds: float = 0.2, max_repeats: int = 10_000
) -> GemmResult:
    """Best-of-three float32 GEMM throughput, after a warm-up call.

    A middling size on purpose: small-model training is made of small GEMMs, and a
    huge one would flatter the machine.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)
    best: GemmResult | None = None
    for _ in range(3):
        repeats = 0
        start = time.perf_counter()
        elapsed = 0.0
        while elapsed < min_seconds / 3 and repeats < max_repeats:
            np.matmul(a, b, out=out)
            repeats += 1
            elapsed = time.perf_counter() - start
        result = GemmResult(size=size, repeats=repeats, seconds=max(elapsed, 1e-9))
        if best is None or result.gflops > best.gflops:
            best = result
    assert best is not None
    return best


def measure_machine(
    *,
    name: str = "this-machine",
    step_times_ms: Mapping[str, float] | None = None,
    batch_size: int = 32,
    storage_path: str = ".",
    gemm_seconds: float = 0.2,
    use_probes: bool = True,
    power: PowerSource = PowerSource.MAINS,
) -> DeviceProfile:
    """A profile of this machine; network and overhead figures are marked estimated.

    ``step_times_ms`` (reference-model name -> ms per optimizer step at
    ``batch_size``) comes from a real training backend; registered probes are asked
    too unless ``use_probes`` is false. With a measured step time the cost model
    uses it directly for that model.
    """
    steps: dict[str, float] = dict(step_times_ms or {})
    if use_probes:
        for probe in _PROBES:
            try:
                measured, probe_batch = probe()
            except Exception as exc:  # a probe is outside code: report, don't crash
                _log.warning("throughput probe %r failed: %s", probe, exc)
                continue
            if probe_batch != batch_size:
                _log.warning("probe measured at batch %d, not %d: ignored", probe_batch, batch_size)
                continue
            steps.update(measured)
    gemm = measure_gemm(min_seconds=gemm_seconds)
    estimated = ["downlink_mbps", "uplink_mbps", "latency_ms", "step_overhead_ms"]
    machine = platform.machine() or "unknown"
    return DeviceProfile(
        name=name,
        display_name=f"{platform.node() or 'host'} ({machine}, measured)",
        device_class="measured",
        cores=cpu_count(),
        memory_mb=memory_mb(),
        storage_gb=storage_gb(storage_path),
        gflops=round(gemm.gflops, 3),
        step_overhead_ms=_DEFAULT_STEP_OVERHEAD_MS,
        downlink_mbps=_DEFAULT_DOWNLINK_MBPS,
        uplink_mbps=_DEFAULT_UPLINK_MBPS,
        latency_ms=_DEFAULT_LATENCY_MS,
        power=power,
        availability=Availability(),
        measured_step_ms=tuple(steps.items()),
        measured_batch_size=batch_size,
        sources=(
            ("cores", "os.sched_getaffinity on this machine"),
            ("memory_mb", "/proc/meminfo MemTotal (or sysconf) on this machine"),
            ("storage_gb", f"free space at {os.path.abspath(storage_path)}"),
            (
                "gflops",
                f"numpy float32 GEMM {gemm.size}x{gemm.size}, best of 3 "
                f"({gemm.repeats} repeats in {gemm.seconds:.3f} s)",
            ),
        ),
        estimated=tuple(estimated),
        notes=(
            "Measured by fleetlearn profile. Network figures are defaults for a wired LAN "
            "host, not measurements: edit them for the real link. gflops is a dense GEMM "
            "rate, an upper bound for small-model training; measured_step_ms, when present, "
            "is what the cost model uses."
        ),
    )
