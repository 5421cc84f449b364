"""The store's device tables: what each device said (``devices``) and how it behaved
(``device_history``), both typed.

``devices`` holds a device's profile, presence and what its last hello said
(eligibility and why not, data size, artifacts and model versions held);
``device_history`` holds its ``DeviceHistory`` (tasks given, completed, missed, last
round, loss, reported samples, durations), the one record of it that the registry
keeps and the selection policies read. Both are written in the registry's batches
(``save_devices``): they are advisory, and what a crash loses a hello brings back.

Schema version 2 introduced ``device_history`` and the hello columns; ``migrate_v2``
moves a version-1 store's per-device JSON blobs and its per-device counters (kept by
the round transactions then) into them. Version 4 (``migrate_v4``) adds what a device
contributed and its standing (``_contribution``) to ``device_history``; those columns
are written in the transaction of the release that changed them (``put_histories``),
not in the registry's advisory batches only.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloud_aggregator._contribution import Standing
from cloud_aggregator._errors import StoreError
from cloud_aggregator._history import MAX_DURATIONS, DeviceHistory

MIGRATION_V2 = """
ALTER TABLE devices ADD COLUMN eligible INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN reasons TEXT NOT NULL DEFAULT '[]';
ALTER TABLE devices ADD COLUMN num_samples INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN artifacts_hash TEXT;
ALTER TABLE devices ADD COLUMN model_versions TEXT NOT NULL DEFAULT '[]';
ALTER TABLE devices ADD COLUMN hello_seen INTEGER NOT NULL DEFAULT 0;
CREATE TABLE device_history (
    device_id        TEXT PRIMARY KEY REFERENCES devices (device_id),
    selections       INTEGER NOT NULL DEFAULT 0,
    completions      INTEGER NOT NULL DEFAULT 0,
    misses           INTEGER NOT NULL DEFAULT 0,
    last_round       INTEGER,
    last_loss        REAL,
    reported_samples INTEGER,
    durations        TEXT    NOT NULL DEFAULT '[]'  -- JSON list of seconds, newest last
)
"""
"""Statements from schema version 1 to 2 (the legacy counters ``rounds_selected``,
``updates_accepted`` and ``missed_deadlines`` of ``devices`` stay, unused)."""

MIGRATION_V4 = """
ALTER TABLE device_history ADD COLUMN contributions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE device_history ADD COLUMN weight_total REAL NOT NULL DEFAULT 0;
ALTER TABLE device_history ADD COLUMN marginal_total REAL;
ALTER TABLE device_history ADD COLUMN alignment_sum REAL NOT NULL DEFAULT 0;
ALTER TABLE device_history ADD COLUMN alignment_weight REAL NOT NULL DEFAULT 0;
ALTER TABLE device_history ADD COLUMN refusal_sum REAL NOT NULL DEFAULT 0;
ALTER TABLE device_history ADD COLUMN refusal_weight REAL NOT NULL DEFAULT 0
"""
"""Statements from schema version 3 to 4: contributions and standing (a device starts
with none, so nothing is carried over)."""


def migrate_v4(conn: sqlite3.Connection) -> None:
    """Schema 3 -> 4 inside the caller's transaction (a self-contained step: it needs
    only ``device_history`` as version 2 made it)."""
    for statement in MIGRATION_V4.split(";"):
        if statement.strip():
            conn.execute(statement)


_OLD_BLOB = "device:"


@dataclass(frozen=True, kw_only=True)
class DeviceRecord:
    """One device as stored."""

    device_id: str
    profile: Mapping[str, Any]
    last_seen: float | None
    online: bool
    eligible: bool = False
    reasons: tuple[str, ...] = ()
    num_samples: int = 0
    artifacts_hash: str | None = None
    model_versions: tuple[int, ...] = ()
    hello_seen: bool = False
    history: DeviceHistory = field(default_factory=DeviceHistory)


@dataclass(frozen=True, kw_only=True)
class DeviceRow:
    """One device's state for ``save_devices``: its profile (None: keep the stored one),
    presence, what its hello said, and its history (None: unchanged)."""

    device_id: str
    profile: Mapping[str, Any] | None
    online: bool
    seen_at: float | None
    eligible: bool = False
    reasons: tuple[str, ...] = ()
    num_samples: int = 0
    artifacts_hash: str | None = None
    model_versions: tuple[int, ...] = ()
    hello_seen: bool = False
    history: DeviceHistory | None = None


_SELECT = (
    "SELECT d.device_id, d.profile, d.last_seen, d.online, d.eligible, d.reasons,"
    " d.num_samples, d.artifacts_hash, d.model_versions, d.hello_seen, h.selections,"
    " h.completions, h.misses, h.last_round, h.last_loss, h.reported_samples, h.durations,"
    " h.contributions, h.weight_total, h.marginal_total, h.alignment_sum, h.alignment_weight,"
    " h.refusal_sum, h.refusal_weight"
    " FROM devices d LEFT JOIN device_history h ON h.device_id = d.device_id"
)


class DeviceTables:
    """The device methods of ``Store`` (its connection, lock and transactions)."""

    if TYPE_CHECKING:
        def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

        def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def upsert_device(self, device_id: str, *, profile: Mapping[str, Any], online: bool = True,
                      seen_at: float | None = None) -> None:
        """Register a device or refresh its profile and presence."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO devices (device_id, profile, last_seen, online) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (device_id) DO UPDATE SET profile = excluded.profile,"
                " last_seen = excluded.last_seen, online = excluded.online",
                (device_id, _json(dict(profile)), _now(seen_at), int(online)),
            )

    def save_devices(self, rows: Sequence[DeviceRow]) -> None:
        """Write several devices' state in one transaction (the registry's batches)."""
        if not rows:
            return
        columns = ("INSERT INTO devices (device_id, profile, last_seen, online, eligible,"
                   " reasons, num_samples, artifacts_hash, model_versions, hello_seen)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE"
                   " SET last_seen = excluded.last_seen, online = excluded.online,"
                   " eligible = excluded.eligible, reasons = excluded.reasons,"
                   " num_samples = excluded.num_samples,"
                   " artifacts_hash = excluded.artifacts_hash,"
                   " model_versions = excluded.model_versions,"
                   " hello_seen = excluded.hello_seen")
        with_profile = [_device_params(r) for r in rows if r.profile is not None]
        without = [_device_params(r) for r in rows if r.profile is None]
        # The registry's batches are advisory: they never write what a device contributed
        # or its standing, which only a release's transaction does (``put_histories``).
        histories = [_history_params(r.device_id, r.history)[:8] for r in rows
                     if r.history is not None]
        with self._write() as conn:
            if with_profile:
                conn.executemany(columns + ", profile = excluded.profile", with_profile)
            if without:
                conn.executemany(columns, without)
            if histories:
                conn.executemany(_HISTORY_V2_UPSERT, histories)

    def mark_seen(self, device_id: str, *, online: bool, at: float | None = None) -> bool:
        """Record presence (status message or last will); False for an unknown device."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE devices SET last_seen = ?, online = ? WHERE device_id = ?",
                (_now(at), int(online), device_id),
            )
            return cur.rowcount == 1

    def device(self, device_id: str) -> DeviceRecord | None:
        rows = self._read(_SELECT + " WHERE d.device_id = ?", (device_id,))
        return _record(rows[0]) if rows else None

    def devices(self, *, online_only: bool = False) -> list[DeviceRecord]:
        where = " WHERE d.online = 1" if online_only else ""
        return [_record(r) for r in self._read(_SELECT + where + " ORDER BY d.device_id")]


def put_histories(conn: sqlite3.Connection, histories: Mapping[str, DeviceHistory]) -> None:
    """Upsert ``histories`` (and an empty device row where none exists yet) in ``conn``'s
    open transaction."""
    if not histories:
        return
    conn.executemany("INSERT INTO devices (device_id, profile) VALUES (?, '{}')"
                     " ON CONFLICT (device_id) DO NOTHING", [(d,) for d in histories])
    conn.executemany(_HISTORY_UPSERT, [_history_params(d, h) for d, h in histories.items()])


def migrate_v2(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2 inside the caller's transaction: the hello columns and
    ``device_history``, filled from the per-device blobs (``device:<id>``) and, for the
    counts, the larger of the blob's and the round transactions' counters."""
    for statement in MIGRATION_V2.split(";"):
        if statement.strip():
            conn.execute(statement)
    rows = conn.execute("SELECT device_id, rounds_selected, missed_deadlines FROM devices")
    for device_id, selected, missed in rows.fetchall():
        blob = conn.execute("SELECT body FROM state_blobs WHERE name = ?",
                            (_OLD_BLOB + device_id,)).fetchone()
        data: dict[str, Any] = {}
        if blob is not None:
            with contextlib.suppress(ValueError, TypeError):
                loaded = json.loads(blob[0])
                data = loaded if isinstance(loaded, dict) else {}
        with contextlib.suppress(ValueError, TypeError):
            conn.execute(
                "UPDATE devices SET eligible = ?, reasons = ?, num_samples = ?,"
                " artifacts_hash = ?, model_versions = ?, hello_seen = ? WHERE device_id = ?",
                (int(bool(data.get("eligible", False))),
                 json.dumps([str(r) for r in data.get("reasons", ())]),
                 int(data.get("num_samples", 0)), data.get("artifacts_hash"),
                 json.dumps([int(v) for v in data.get("model_versions", ())]),
                 int(bool(data.get("hello_seen", False))), device_id))
        try:
            history = DeviceHistory(
                selections=max(int(selected), int(data.get("rounds_selected", 0))),
                completions=int(data.get("rounds_completed", 0)),
                misses=max(int(missed), int(data.get("missed_deadlines", 0))),
                last_round=_int_or_none(data.get("last_round")),
                last_loss=_float_or_none(data.get("last_loss")),
                durations=tuple(float(x) for x in data.get("durations", ()))[-MAX_DURATIONS:],
            )
        except (ValueError, TypeError):
            history = DeviceHistory(selections=int(selected), misses=int(missed))
        _put_history(conn, device_id, history)
    conn.execute("DELETE FROM state_blobs WHERE name LIKE ?", (_OLD_BLOB + "%",))


_HISTORY_UPSERT = (
    "INSERT INTO device_history (device_id, selections, completions, misses, last_round,"
    " last_loss, reported_samples, durations, contributions, weight_total, marginal_total,"
    " alignment_sum, alignment_weight, refusal_sum, refusal_weight)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id) DO UPDATE SET selections = excluded.selections,"
    " completions = excluded.completions, misses = excluded.misses,"
    " last_round = excluded.last_round, last_loss = excluded.last_loss,"
    " reported_samples = excluded.reported_samples, durations = excluded.durations,"
    " contributions = excluded.contributions, weight_total = excluded.weight_total,"
    " marginal_total = excluded.marginal_total, alignment_sum = excluded.alignment_sum,"
    " alignment_weight = excluded.alignment_weight, refusal_sum = excluded.refusal_sum,"
    " refusal_weight = excluded.refusal_weight")
_HISTORY_V2_UPSERT = (
    "INSERT INTO device_history (device_id, selections, completions, misses, last_round,"
    " last_loss, reported_samples, durations) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (device_id) DO UPDATE SET selections = excluded.selections,"
    " completions = excluded.completions, misses = excluded.misses,"
    " last_round = excluded.last_round, last_loss = excluded.last_loss,"
    " reported_samples = excluded.reported_samples, durations = excluded.durations")
"""The version-2 columns: what ``migrate_v2`` (which runs before ``migrate_v4``) and the
registry's advisory batches write."""


def _history_params(device_id: str, h: DeviceHistory) -> tuple[Any, ...]:
    s = h.standing
    return (device_id, h.selections, h.completions, h.misses, h.last_round, h.last_loss,
            h.reported_samples, json.dumps(list(h.durations)), h.contributions,
            h.weight_total, h.marginal_total, s.alignment_sum, s.alignment_weight,
            s.refusal_sum, s.refusal_weight)


def _put_history(conn: sqlite3.Connection, device_id: str, h: DeviceHistory) -> None:
    conn.execute(_HISTORY_V2_UPSERT, _history_params(device_id, h)[:8])


def _device_params(row: DeviceRow) -> tuple[Any, ...]:
    return (row.device_id, _json(dict(row.profile or {})), _now(row.seen_at),
            int(row.online), int(row.eligible), json.dumps(list(row.reasons)),
            int(row.num_samples), row.artifacts_hash, json.dumps(list(row.model_versions)),
            int(row.hello_seen))


def _record(row: tuple[Any, ...]) -> DeviceRecord:
    (device_id, profile, last_seen, online, eligible, reasons, num_samples, artifacts_hash,
     versions, hello_seen, selections, completions, misses, last_round, last_loss, reported,
     durations, contributions, weight_total, marginal_total, a_sum, a_weight, r_sum,
     r_weight) = row
    try:
        history = DeviceHistory() if selections is None else DeviceHistory(
            selections=int(selections), completions=int(completions), misses=int(misses),
            last_round=last_round, last_loss=last_loss, reported_samples=reported,
            durations=tuple(float(x) for x in json.loads(durations))[-MAX_DURATIONS:],
            contributions=int(contributions), weight_total=float(weight_total),
            marginal_total=_float_or_none(marginal_total),
            standing=Standing(alignment_sum=float(a_sum), alignment_weight=float(a_weight),
                              refusal_sum=float(r_sum), refusal_weight=float(r_weight)))
        return DeviceRecord(
            device_id=device_id, profile=json.loads(profile), last_seen=last_seen,
            online=bool(online), eligible=bool(eligible),
            reasons=tuple(str(r) for r in json.loads(reasons)), num_samples=int(num_samples),
            artifacts_hash=artifacts_hash,
            model_versions=tuple(int(v) for v in json.loads(versions)),
            hello_seen=bool(hello_seen), history=history)
    except (ValueError, TypeError, RecursionError) as exc:
        raise StoreError(f"the aggregator store holds an unreadable record of device "
                         f"{device_id!r}: {exc}") from exc


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _json(value: Any) -> str:
    """Plain JSON, keys sorted; a value JSON cannot hold is a ``StoreError``."""
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"value is not plain JSON: {exc}") from exc


def _now(at: float | None) -> float:
    return time.time() if at is None else at
