"""Metrics: one JSON line per round, counters, and a Prometheus text endpoint.

``RoundMetrics`` is what a round produced (accuracy, devices, bytes, emulated and
wall seconds); ``MetricsLog`` appends it to a JSON-lines file; ``Counters`` holds the
running totals (updates by outcome and reason, bytes up and down) that
``MetricsServer`` exposes at ``/metrics`` in Prometheus' text format (stdlib
``http.server`` in a daemon thread).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cloud_aggregator._contribution import ContributionRecord, parse_records
from cloud_aggregator._errors import StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RoundMetrics:
    """What one round (or one async aggregation) produced."""

    round: int
    model_version: int
    outcome: str  # closed | abandoned | aggregated
    reason: str = ""
    accuracy: float | None = None
    loss: float | None = None
    fed_accuracy: float | None = None
    fed_loss: float | None = None
    train_loss: float | None = None
    devices_selected: int = 0
    devices_reported: int = 0
    devices_dropped: int = 0
    devices_declined: int = 0
    updates_rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    emulated_s: float = 0.0
    emulated_total_s: float = 0.0
    wall_s: float = 0.0
    update_norm: float | None = None
    alignment_mean: float | None = None
    """Mean consensus cosine of the round's updates (``_contribution``)."""
    alignment_min: float | None = None
    devices_distrusted: int = 0
    """Devices whose reputation is below ``reputation_floor`` after this round."""
    contributions: tuple[ContributionRecord, ...] = ()
    """Each counted device's weight share, cosine and marginal in this aggregate."""
    screened: tuple[str, ...] = ()
    """Devices a screen refused an update of in this round (``SCREEN_CODES``)."""
    dp_epsilon: float | None = None
    """Central DP: epsilon spent after this round, at the configured ``dp_delta``."""
    dp_clip_norm: float | None = None
    """Central DP: the clipping bound the round's updates were clipped to."""
    dp_noise_std: float | None = None
    """Central DP: the per-coordinate standard deviation of the noise on the update."""

    def to_json(self) -> dict[str, Any]:
        # Shallow: every field is a scalar but the two tuples, converted below
        # (``asdict`` deep-copied a hundred contribution records only to replace them).
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        out["contributions"] = [r.to_json() for r in self.contributions]
        out["screened"] = list(self.screened)
        return out

    @classmethod
    def from_json(cls, data: Any) -> RoundMetrics:
        """``to_json``'s output back (keys this version does not know are ignored)."""
        if not isinstance(data, dict):
            raise StoreError(f"round metrics are an object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["contributions"] = parse_records(values.get("contributions") or ())
        values["screened"] = tuple(str(d) for d in values.get("screened") or ())
        try:
            return cls(**values)
        except TypeError as exc:
            raise StoreError(f"round metrics are malformed: {exc}") from exc


class MetricsLog:
    """Appends one JSON object per line; each line is flushed and fsynced."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, metrics: RoundMetrics) -> None:
        line = json.dumps(metrics.to_json(), sort_keys=True) + "\n"
        with self.path.open("a+b") as fh:
            # A process killed mid-line leaves a partial last line: start a new one.
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every complete line (a line a killed process left half-written is skipped)."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                log.warning("%s: skipping an unreadable line", self.path)
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


class Counters:
    """Running totals, thread-safe; rendered in Prometheus' text exposition format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.updates: collections.Counter[str] = collections.Counter()  # by outcome/reason
        self.bytes_up = 0
        self.bytes_down = 0
        self.gauges: dict[str, float] = {}

    def update(self, outcome: str) -> None:
        with self._lock:
            self.updates[outcome] += 1

    def add_bytes(self, *, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.bytes_up += up
            self.bytes_down += down

    def set(self, name: str, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        with self._lock:
            self.gauges[name] = float(value)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"updates": dict(self.updates), "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down, "gauges": dict(self.gauges)}

    def render(self) -> str:
        snap = self.snapshot()
        lines = [
            "# HELP fleetlearn_updates_total Updates received, by outcome (accepted, duplicate, "
            "or the rejection reason).",
            "# TYPE fleetlearn_updates_total counter",
        ]
        for outcome, count in sorted(snap["updates"].items()):
            lines.append(f'fleetlearn_updates_total{{outcome="{_label(outcome)}"}} {count}')
        lines += [
            "# TYPE fleetlearn_bytes_up_total counter",
            f"fleetlearn_bytes_up_total {snap['bytes_up']}",
            "# TYPE fleetlearn_bytes_down_total counter",
            f"fleetlearn_bytes_down_total {snap['bytes_down']}",
        ]
        for name, value in sorted(snap["gauges"].items()):
            lines += [f"# TYPE fleetlearn_{name} gauge", f"fleetlearn_{name} {value:.10g}"]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


class MetricsServer:
    """Serves ``Counters.render()`` at ``/metrics`` on ``port`` (0 picks a free one)."""

    def __init__(self, counters: Counters, *, port: int, host: str = "127.0.0.1") -> None:
        registry = counters

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fl-metrics",
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
