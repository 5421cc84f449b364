"""Persistence of the aggregator: one SQLite file plus checkpoint files beside it.

Errors raised here, all ``AggregatorError``::

    StoreError            the database cannot be opened or used as asked
    ├── SchemaTooNew      written by a newer fleetlearn (never downgraded in place)
    └── CheckpointCorrupt a checkpoint file missing, truncated or not matching its sha256

What survives a SIGKILL mid-round: every update ``journal`` accepted committed its
idempotency key *and* its encoded body in one transaction (one per group of updates),
so a restart re-decodes ``round_updates(...)`` into a fresh aggregate and gets the same
partial sum, with no update lost or counted twice. Bodies are cleared when their round
closes or their buffer becomes a model; the bodies a training-ledger entry cites are
kept (``_store_ledger``), written in the same transaction as that entry.

Checkpoints are written to a temporary file in the same directory, flushed, fsynced,
``os.replace``d into place and the directory fsynced; only then are the path and the
sha256 recorded, so a row always points at a complete file.

A damaged database is a ``StoreError`` saying so, never a raw ``sqlite3`` traceback:
opening runs SQLite's ``quick_check``, and every later SQLite failure is translated.

Why this module is longer than 400 lines: one ``Store`` owns the one connection and
lock through which every write is ordered (rounds, the journal, checkpoints, state);
the device tables are in ``_store_devices``, the keys first seen in ``_store_keys``,
the ledger's in ``_store_ledger``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from broker_bridge import atomic_write
from cloud_aggregator._errors import CheckpointCorrupt, SchemaTooNew, StoreError
from cloud_aggregator._history import DeviceHistory
from cloud_aggregator._ledger import PendingEntry, recorded_only
from cloud_aggregator._retention import (
    checkpoint_name,
    mark_kept,
    migrate_v7,
    orphans,
    prune_tx,
)
from cloud_aggregator._store_devices import (
    DeviceTables,
    _json,
    _now,
    migrate_v2,
    migrate_v4,
    put_histories,
)
from cloud_aggregator._store_keys import KeyTables, migrate_v3
from cloud_aggregator._store_ledger import (
    KEEP_REFERENCED,
    Frontiers,
    LedgerTables,
    append_tx,
    migrate_v5,
    migrate_v6,
)
from device_profiles._errors import ConfigError

log = logging.getLogger(__name__)

MIGRATIONS: tuple[tuple[int, Callable[[sqlite3.Connection], None]], ...] = (
    (2, migrate_v2),
    (3, migrate_v3),
    (4, migrate_v4),
    (5, migrate_v5),
    (6, migrate_v6),
    (7, migrate_v7),
)
"""Each step brings a store to its version inside one transaction, in order."""
SCHEMA_VERSION = MIGRATIONS[-1][0]


# --------------------------------------------------------------------------- records

RoundState = Literal["open", "closed", "abandoned"]


@dataclass(frozen=True, kw_only=True)
class UpdateKey:
    """The idempotency key every update carries: QoS 1 redelivery repeats it."""

    fleet: str
    round: int
    device_id: str
    attempt: int = 0


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    fleet: str
    round: int
    state: RoundState
    model_version: int
    started_at: float
    ended_at: float | None
    selected: tuple[str, ...]
    quorum: int
    deadline: float | None


@dataclass(frozen=True, kw_only=True)
class StoredUpdate:
    """An accepted update of an open round, as it arrived (encoded body + metadata)."""

    key: UpdateKey
    body: bytes = field(repr=False)
    meta: Mapping[str, Any]
    accepted_at: float


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """One accepted update to journal: its idempotency key, the journal stream it
    belongs to (a sync round's index, or the model version a FedBuff buffer builds),
    its encoded body and plain-JSON metadata."""

    key: UpdateKey
    stream: int
    body: bytes
    meta: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Metric:
    fleet: str
    round: int
    name: str
    value: float
    at: float


@dataclass(frozen=True, kw_only=True)
class CheckpointRecord:
    fleet: str
    model_version: int
    path: Path
    sha256: str
    size_bytes: int
    created_at: float


# --------------------------------------------------------------------------- schema

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE rounds (
    fleet         TEXT    NOT NULL,
    round         INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('open', 'closed', 'abandoned')),
    model_version INTEGER NOT NULL,
    started_at    REAL    NOT NULL,
    ended_at      REAL,
    selected      TEXT    NOT NULL,          -- JSON list of device ids
    quorum        INTEGER NOT NULL,
    deadline      REAL,
    PRIMARY KEY (fleet, round)
);
CREATE TABLE devices (
    device_id        TEXT PRIMARY KEY,
    profile          TEXT    NOT NULL,       -- JSON
    last_seen        REAL,
    online           INTEGER NOT NULL DEFAULT 0,
    rounds_selected  INTEGER NOT NULL DEFAULT 0,
    updates_accepted INTEGER NOT NULL DEFAULT 0,
    missed_deadlines INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE accepted_updates (
    seq         INTEGER PRIMARY KEY,
    fleet       TEXT    NOT NULL,
    round       INTEGER NOT NULL,
    device_id   TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    accepted_at REAL    NOT NULL,
    UNIQUE (fleet, round, device_id, attempt)
);
CREATE TABLE round_updates (
    seq   INTEGER PRIMARY KEY REFERENCES accepted_updates (seq),
    fleet TEXT    NOT NULL,
    round INTEGER NOT NULL,
    body  BLOB    NOT NULL,
    meta  TEXT    NOT NULL                   -- JSON object
);
CREATE INDEX round_updates_by_round ON round_updates (fleet, round, seq);
CREATE TABLE metrics (
    fleet TEXT    NOT NULL,
    round INTEGER NOT NULL,
    name  TEXT    NOT NULL,
    value REAL    NOT NULL,
    at    REAL    NOT NULL
);
CREATE INDEX metrics_by_name ON metrics (fleet, name, round);
CREATE TABLE state_blobs (
    name       TEXT PRIMARY KEY,
    body       BLOB NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE checkpoints (
    fleet         TEXT    NOT NULL,
    model_version INTEGER NOT NULL,
    path          TEXT    NOT NULL,          -- relative to the checkpoint directory
    sha256        TEXT    NOT NULL,
    size_bytes    INTEGER NOT NULL,
    created_at    REAL    NOT NULL,
    PRIMARY KEY (fleet, model_version)
);
"""

Synchronous = Literal["FULL", "NORMAL"]


_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _delete(paths: Sequence[Path], what: str) -> tuple[int, int]:
    """Delete checkpoint files no row names any more; (files, bytes) deleted. A file that
    will not go is said and left (nothing reads it)."""
    count = size = 0
    for path in paths:
        try:
            nbytes = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot delete the %s checkpoint file %s: %s", what, path, exc)
            continue
        count, size = count + 1, size + nbytes
    return count, size


def _safe_name(fleet: str) -> str:
    """A file-name-safe form of a fleet id (odd ones get a hash so they stay distinct)."""
    if _SAFE.fullmatch(fleet) and not fleet.startswith("."):
        return fleet
    digest = hashlib.sha256(fleet.encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9_-]", "_", fleet)[:40] + "-" + digest


# --------------------------------------------------------------------------- store


class Store(DeviceTables, KeyTables, LedgerTables):
    """The aggregator's durable state: rounds, devices, accepted keys, metrics, blobs.

    One connection guarded by a lock; write transactions are ``BEGIN IMMEDIATE`` so a
    second process on the same file waits (``busy_timeout``) instead of failing late.

    ``read_only``: for tools that look at a state dir an aggregator may be running on
    (``fleetlearn ledger verify|show``). Nothing is written: no schema is created or
    migrated (a store of another schema version is refused, saying why), and any write
    is a ``StoreError``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        synchronous: Synchronous = "FULL",
        busy_timeout_s: float = 5.0,
        read_only: bool = False,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self._path = Path(path)
        self._checkpoint_dir = (
            Path(checkpoint_dir)
            if checkpoint_dir is not None
            else self._path.with_name(self._path.name + ".checkpoints")
        )
        self._lock = threading.RLock()
        self._frontiers = Frontiers()
        self._read_only = read_only
        if read_only and not self._path.is_file():
            raise StoreError(f"no aggregator store at {self._path}")
        try:
            self._conn = sqlite3.connect(
                f"file:{urllib.parse.quote(str(self._path.resolve()))}?mode=ro" if read_only
                else self._path, uri=read_only,
                isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open aggregator store {self._path}: {exc}") from exc
        try:
            if read_only:
                self._check_integrity()
                self._check_version()
                return
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: with WAL, NORMAL already survives a process crash (SIGKILL) intact,
            # but may lose the last commits on power loss. An accepted update is
            # acknowledged to its device, which then drops its copy, so a lost commit
            # is a lost update; one fsync per commit is cheap at update rates.
            # NORMAL is offered for simulations, where the host never loses power.
            self._conn.execute(f"PRAGMA synchronous={synchronous}")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._check_integrity()
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(f"{self._path} is not a usable aggregator store: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    def _check_integrity(self) -> None:
        rows = self._conn.execute("PRAGMA quick_check").fetchall()
        problems = [str(r[0]) for r in rows if r and r[0] != "ok"]
        if problems:
            raise StoreError(
                f"{self._path} is damaged ({'; '.join(problems[:3])}): restore it from a "
                "backup, or start a new run with another state dir")

    # -- plumbing

    @property
    def path(self) -> Path:
        return self._path

    @property
    def checkpoint_dir(self) -> Path:
        return self._checkpoint_dir

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or not at all."""
        if self._read_only:
            raise StoreError(f"{self._path} is open read-only: nothing is written to it")
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"cannot start a transaction on {self._path}: {exc}") from exc
            try:
                yield self._conn
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise StoreError(f"{self._path}: {exc}") from exc
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise StoreError(f"commit failed on {self._path}: {exc}") from exc

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, args).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"{self._path}: {exc}") from exc

    def _init_schema(self) -> None:
        with self._write() as conn:
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
            ).fetchone()
            if has_table is None:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise StoreError(f"{self._path} holds tables but no fleetlearn schema")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                for _, step in MIGRATIONS:  # a new store is a version-1 store brought up
                    step(conn)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                return
            (version,) = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        version = self._known_version(version)
        for target, step in MIGRATIONS:  # each commits with its version, or not at all
            if version < target:
                with self._write() as conn:
                    step(conn)
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (target,))

    def _known_version(self, version: int | None) -> int:
        """``version`` as recorded, if this fleetlearn can read it (or migrate it)."""
        if version is None or version < 1:
            raise StoreError(f"{self._path} has no schema version recorded")
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self._path} has schema version {version}; this fleetlearn reads up to "
                f"{SCHEMA_VERSION}. Upgrade fleetlearn (the store is never downgraded)."
            )
        return version

    def _check_version(self) -> None:
        """A read-only store must be of this version's schema (it is never migrated)."""
        try:
            row = self._conn.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self._path} holds no fleetlearn schema ({exc})") from exc
        if self._known_version(row[0] if row else None) < SCHEMA_VERSION:
            raise StoreError(
                f"{self._path} has schema version {row[0]}, older than this fleetlearn's "
                f"{SCHEMA_VERSION}, and is read here without changing it: start this "
                "version's aggregator on it once (it migrates the store), or use the "
                "fleetlearn that wrote it")

    def schema_version(self) -> int:
        return int(self._read("SELECT max(version) FROM schema_version")[0][0])

    # -- rounds

    def open_round(
        self,
        *,
        fleet: str,
        round_index: int,
        model_version: int,
        selected: Sequence[str],
        quorum: int,
        deadline: float | None = None,
        started_at: float | None = None,
    ) -> RoundRecord:
        """Record a new open round and the devices selected for it."""
        record = RoundRecord(
            fleet=fleet,
            round=round_index,
            state="open",
            model_version=model_version,
            started_at=_now(started_at),
            ended_at=None,
            selected=tuple(selected),
            quorum=quorum,
            deadline=deadline,
        )
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO rounds (fleet, round, state, model_version, started_at,"
                    " selected, quorum, deadline) VALUES (?, ?, 'open', ?, ?, ?, ?, ?)",
                    (
                        fleet,
                        round_index,
                        model_version,
                        record.started_at,
                        _json(list(record.selected)),
                        quorum,
                        deadline,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"round {round_index} of fleet {fleet!r} exists") from exc
        return record

    def close_round(
        self,
        *,
        fleet: str,
        round_index: int,
        state: Literal["closed", "abandoned"] = "closed",
        ended_at: float | None = None,
        states: Mapping[str, bytes] | None = None,
        histories: Mapping[str, DeviceHistory] | None = None,
        ledger: Sequence[PendingEntry] = (),
    ) -> None:
        """Close (or abandon) an open round and drop its bodies; ``states``, the
        devices' ``histories`` and the ``ledger`` entries are written in the same
        transaction."""
        when = _now(ended_at)
        with self._write() as conn:
            for entry in ledger:  # before the journal rows it keeps go
                append_tx(conn, entry, self._frontiers)
            self._close_round_tx(conn, fleet, round_index, state, when)
            for name, body in (states or {}).items():
                _put_state(conn, name, body, when)
            put_histories(conn, histories or {})

    @staticmethod
    def _close_round_tx(
        conn: sqlite3.Connection,
        fleet: str,
        round_index: int,
        state: str,
        ended_at: float,
    ) -> None:
        if state not in ("closed", "abandoned"):
            raise StoreError(f"a round closes as 'closed' or 'abandoned', not {state!r}")
        cur = conn.execute(
            "UPDATE rounds SET state = ?, ended_at = ? WHERE fleet = ? AND round = ?"
            " AND state = 'open'",
            (state, ended_at, fleet, round_index),
        )
        if cur.rowcount != 1:
            raise StoreError(f"round {round_index} of fleet {fleet!r} is not open")
        conn.execute("DELETE FROM round_updates WHERE fleet = ? AND round = ?"
                     + KEEP_REFERENCED, (fleet, round_index))

    def round(self, fleet: str, round_index: int) -> RoundRecord | None:
        rows = self._read(_ROUND_SELECT + " WHERE fleet = ? AND round = ?", (fleet, round_index))
        return _round(rows[0]) if rows else None

    def rounds(self, fleet: str, *, state: RoundState | None = None) -> list[RoundRecord]:
        if state is None:
            rows = self._read(_ROUND_SELECT + " WHERE fleet = ? ORDER BY round", (fleet,))
        else:
            rows = self._read(
                _ROUND_SELECT + " WHERE fleet = ? AND state = ? ORDER BY round", (fleet, state)
            )
        return [_round(r) for r in rows]

    # -- accepted updates

    @staticmethod
    def _accept_tx(conn: sqlite3.Connection, key: UpdateKey, at: float) -> int | None:
        cur = conn.execute(
            "INSERT INTO accepted_updates (fleet, round, device_id, attempt, accepted_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (key.fleet, key.round, key.device_id, key.attempt, at),
        )
        if cur.rowcount != 1:
            return None
        return cur.lastrowid

    def accept_update(
        self,
        key: UpdateKey,
        *,
        states: Mapping[str, bytes] | None = None,
        at: float | None = None,
    ) -> bool:
        """Record ``key`` once: False if it was already accepted (a redelivery).

        ``states`` are written in the same transaction.
        """
        when = _now(at)
        with self._write() as conn:
            if self._accept_tx(conn, key, when) is None:
                return False
            for name, body in (states or {}).items():
                _put_state(conn, name, body, when)
            return True

    def add_round_update(
        self,
        key: UpdateKey,
        body: bytes,
        meta: Mapping[str, Any] | None = None,
        *,
        at: float | None = None,
    ) -> bool:
        """Accept ``key`` and keep its encoded body for resume, in one transaction.

        False (and nothing stored) for a duplicate key. ``meta`` is plain JSON (sample
        count, model version trained from, norm...).
        """
        meta_json = _json(dict(meta or {}))
        when = _now(at)
        with self._write() as conn:
            seq = self._accept_tx(conn, key, when)
            if seq is None:
                return False
            conn.execute(
                "INSERT INTO round_updates (seq, fleet, round, body, meta) VALUES (?, ?, ?, ?, ?)",
                (seq, key.fleet, key.round, bytes(body), meta_json),
            )
            return True

    def journal(self, entries: Sequence[JournalEntry], *, at: float | None = None) -> list[bool]:
        """Accept and keep several updates in one transaction (a group commit).

        Returns, per entry, whether it was new (False: its key was already accepted,
        and nothing of it is stored). Either every new entry is durable or none is.
        """
        when = _now(at)
        fresh: list[bool] = []
        rows = [(e, _json(dict(e.meta))) for e in entries]
        with self._write() as conn:
            for entry, meta_json in rows:
                seq = self._accept_tx(conn, entry.key, when)
                fresh.append(seq is not None)
                if seq is not None:
                    conn.execute(
                        "INSERT INTO round_updates (seq, fleet, round, body, meta)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (seq, entry.key.fleet, entry.stream, bytes(entry.body), meta_json),
                    )
        return fresh

    def round_updates(self, fleet: str, round_index: int) -> Iterator[StoredUpdate]:
        """The open round's kept updates in acceptance order (re-accumulate them on resume).

        Rows are fetched in small batches so a large round is not loaded all at once.
        """
        last = 0
        while True:
            rows = self._read(
                "SELECT r.seq, a.round, a.device_id, a.attempt, a.accepted_at, r.body, r.meta"
                " FROM round_updates r JOIN accepted_updates a ON a.seq = r.seq"
                " WHERE r.fleet = ? AND r.round = ? AND r.seq > ?"
                " AND r.seq NOT IN (SELECT seq FROM ledger_refs)"  # kept for the ledger only
                " ORDER BY r.seq LIMIT 64",
                (fleet, round_index, last),
            )
            if not rows:
                return
            for seq, key_round, device_id, attempt, accepted_at, body, meta in rows:
                last = seq
                try:
                    meta_obj = json.loads(meta)
                except (ValueError, RecursionError) as exc:
                    raise StoreError(f"stored update {seq} has unreadable metadata") from exc
                yield StoredUpdate(
                    # The key's own round (a FedBuff task), not the stream it was kept under.
                    key=UpdateKey(
                        fleet=fleet, round=key_round, device_id=device_id, attempt=attempt
                    ),
                    body=bytes(body),
                    meta=meta_obj,
                    accepted_at=accepted_at,
                )

    def accepted_keys(self, fleet: str, round_index: int | None = None) -> list[UpdateKey]:
        if round_index is None:
            rows = self._read(
                "SELECT round, device_id, attempt FROM accepted_updates WHERE fleet = ?"
                " ORDER BY seq",
                (fleet,),
            )
        else:
            rows = self._read(
                "SELECT round, device_id, attempt FROM accepted_updates"
                " WHERE fleet = ? AND round = ? ORDER BY seq",
                (fleet, round_index),
            )
        return [UpdateKey(fleet=fleet, round=r, device_id=d, attempt=a) for r, d, a in rows]

    def accepted_attempt(self, fleet: str, round_index: int, device_id: str) -> int | None:
        """The attempt of ``device_id`` accepted in ``round_index`` (kept after the round
        closes, unlike its body), or None."""
        rows = self._read(
            "SELECT attempt FROM accepted_updates WHERE fleet = ? AND round = ? AND device_id = ?"
            " ORDER BY seq LIMIT 1",
            (fleet, round_index, device_id),
        )
        return int(rows[0][0]) if rows else None

    def count_accepted(self, fleet: str, round_index: int) -> int:
        return int(
            self._read(
                "SELECT count(*) FROM accepted_updates WHERE fleet = ? AND round = ?",
                (fleet, round_index),
            )[0][0]
        )

    # -- metrics

    def record_metrics(
        self, *, fleet: str, round_index: int, values: Mapping[str, float], at: float | None = None
    ) -> None:
        when = _now(at)
        rows = []
        for name, value in values.items():
            if not math.isfinite(value):
                raise StoreError(f"metric {name!r} is not finite: {value}")
            rows.append((fleet, round_index, name, float(value), when))
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO metrics (fleet, round, name, value, at) VALUES (?, ?, ?, ?, ?)", rows
            )

    def metrics(self, fleet: str, *, name: str | None = None) -> list[Metric]:
        sql = "SELECT fleet, round, name, value, at FROM metrics WHERE fleet = ?"
        args: list[Any] = [fleet]
        if name is not None:
            sql += " AND name = ?"
            args.append(name)
        rows = self._read(sql + " ORDER BY round, rowid", args)
        return [Metric(fleet=f, round=r, name=n, value=v, at=t) for f, r, n, v, t in rows]

    # -- server-side state blobs

    def put_state(self, name: str, body: bytes, *, at: float | None = None) -> None:
        with self._write() as conn:
            _put_state(conn, name, body, _now(at))

    def get_state(self, name: str) -> bytes | None:
        rows = self._read("SELECT body FROM state_blobs WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else None

    def delete_state(self, *names: str) -> None:
        """Forget the named states (one transaction)."""
        with self._write() as conn:
            conn.executemany("DELETE FROM state_blobs WHERE name = ?", [(n,) for n in names])

    def drop_stream(self, fleet: str, stream: int) -> None:
        """Forget the journaled bodies of ``stream`` (their keys stay: still duplicates)."""
        with self._write() as conn:
            conn.execute("DELETE FROM round_updates WHERE fleet = ? AND round = ?"
                         + KEEP_REFERENCED, (fleet, stream))

    # -- checkpoints

    def save_checkpoint(
        self,
        *,
        fleet: str,
        model_version: int,
        params: npt.NDArray[np.float32],
        states: Mapping[str, bytes] | None = None,
        close_round: int | None = None,
        drop_streams: range | None = None,
        histories: Mapping[str, DeviceHistory] | None = None,
        ledger: Sequence[PendingEntry] = (),
        at: float | None = None,
        keep_newest: int = 0,
    ) -> CheckpointRecord:
        """Write the global model durably, then record it in one transaction.

        The same transaction stores ``states`` (e.g. the server optimizer's bytes), the
        devices' ``histories`` the round changed (their contributions and standing) and,
        with ``close_round``, closes that round: after a crash the store either shows
        the round open with the previous model, or closed with this one. ``drop_streams``:
        the journal streams (FedBuff buffers) this model was derived from, dropped in the
        same transaction. The training ``ledger`` entries of the round (or of the releases
        since the last checkpoint) commit in it too, with the bodies they cite, taken from
        the journal before it is dropped. ``keep_newest`` > 0: older checkpoints go
        (``_retention``), their files once the transaction has committed.
        """
        vec = np.ascontiguousarray(params, dtype=np.float32)
        if vec.ndim != 1:
            raise StoreError(f"a checkpoint is a flat vector, got shape {vec.shape}")
        buf = io.BytesIO()
        np.save(buf, vec, allow_pickle=False)
        data = buf.getvalue()
        name = checkpoint_name(_safe_name(fleet), model_version)
        self._checkpoint_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self._checkpoint_dir / name, data)
        record = CheckpointRecord(
            fleet=fleet,
            model_version=model_version,
            path=self._checkpoint_dir / name,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            created_at=_now(at),
        )
        with self._write() as conn:
            conn.execute(
                "INSERT INTO checkpoints (fleet, model_version, path, sha256, size_bytes,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, model_version)"
                " DO UPDATE SET path = excluded.path, sha256 = excluded.sha256,"
                " size_bytes = excluded.size_bytes, created_at = excluded.created_at",
                (fleet, model_version, name, record.sha256, len(data), record.created_at),
            )
            for key, body in (states or {}).items():
                _put_state(conn, key, body, record.created_at)
            for entry in ledger:  # before the journal rows it keeps go
                append_tx(conn, entry, self._frontiers)
                if entry.outcome in ("closed", "aggregated") and recorded_only(entry.rule):
                    mark_kept(conn, fleet, entry.model_version)
            if close_round is not None:
                self._close_round_tx(conn, fleet, close_round, "closed", record.created_at)
            if drop_streams:  # FedBuff buffers released into this model
                conn.execute("DELETE FROM round_updates WHERE fleet = ? AND round >= ?"
                             " AND round < ?" + KEEP_REFERENCED,
                             (fleet, drop_streams.start, drop_streams.stop))
            put_histories(conn, histories or {})
            gone = prune_tx(conn, fleet, keep_newest)
        _delete([self._checkpoint_dir / old for old in gone], "old")
        return record

    def sweep_checkpoints(self, fleet: str) -> tuple[int, int]:
        """Delete ``fleet``'s checkpoint files that no row names (left by a crash; see
        ``_retention``); only the aggregator that owns the state dir may call it (a
        writer's new file has no row yet). Returns (files, bytes) deleted."""
        recorded = {str(r[0]) for r in self._read(
            "SELECT path FROM checkpoints WHERE fleet = ?", (fleet,))}
        return _delete(orphans(self._checkpoint_dir, _safe_name(fleet), recorded), "orphan")

    def checkpoint(
        self, fleet: str, *, model_version: int | None = None
    ) -> CheckpointRecord | None:
        """The recorded checkpoint of that version (the latest when ``None``)."""
        sql = (
            "SELECT fleet, model_version, path, sha256, size_bytes, created_at"
            " FROM checkpoints WHERE fleet = ?"
        )
        if model_version is None:
            rows = self._read(sql + " ORDER BY model_version DESC LIMIT 1", (fleet,))
        else:
            rows = self._read(sql + " AND model_version = ?", (fleet, model_version))
        if not rows:
            return None
        f, v, rel, digest, size, created = rows[0]
        return CheckpointRecord(
            fleet=f,
            model_version=v,
            path=self._checkpoint_dir / rel,
            sha256=digest,
            size_bytes=size,
            created_at=created,
        )

    def load_checkpoint(
        self, fleet: str, *, model_version: int | None = None
    ) -> tuple[CheckpointRecord, npt.NDArray[np.float32]]:
        """Read a checkpoint back, verifying size and sha256 before parsing it."""
        record = self.checkpoint(fleet, model_version=model_version)
        if record is None:
            raise StoreError(f"no checkpoint recorded for fleet {fleet!r} ({model_version=})")
        try:
            data = record.path.read_bytes()
        except OSError as exc:
            raise CheckpointCorrupt(f"checkpoint {record.path} unreadable: {exc}") from exc
        if len(data) != record.size_bytes or hashlib.sha256(data).hexdigest() != record.sha256:
            raise CheckpointCorrupt(
                f"checkpoint {record.path} does not match its recorded sha256 {record.sha256}"
            )
        try:
            params = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CheckpointCorrupt(f"checkpoint {record.path} is not a vector") from exc
        if params.ndim != 1 or params.dtype != np.float32:
            raise CheckpointCorrupt(f"checkpoint {record.path} is not a flat float32 vector")
        return record, params


def _put_state(conn: sqlite3.Connection, name: str, body: bytes, at: float) -> None:
    conn.execute(
        "INSERT INTO state_blobs (name, body, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
        (name, bytes(body), at),
    )


_ROUND_SELECT = (
    "SELECT fleet, round, state, model_version, started_at, ended_at, selected, quorum,"
    " deadline FROM rounds"
)


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise StoreError(f"the aggregator store holds an unreadable {what}") from exc


def _round(row: tuple[Any, ...]) -> RoundRecord:
    fleet, index, state, version, started, ended, selected, quorum, deadline = row
    return RoundRecord(
        fleet=fleet,
        round=index,
        state=state,
        model_version=version,
        started_at=started,
        ended_at=ended,
        selected=tuple(_loads(selected, f"selection of round {index}")),
        quorum=quorum,
        deadline=deadline,
    )
