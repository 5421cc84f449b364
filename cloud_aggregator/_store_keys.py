"""The store's ``device_keys`` table: the public key each device was first seen with.

With trust on first use (``AggregatorConfig.trust_on_first_use``) a device that has no
enrolled key is trusted with the key of its first update whose signature verifies under
it; that key is written here, in its own transaction, before the update goes on, and is
never replaced: a later update signed with another key is refused (``wrong_key``) however
often it comes. Enrolled keys live in the operator's enrolment file, not here.

Schema version 3 introduced the table (``migrate_v3``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

MIGRATION_V3 = """
CREATE TABLE device_keys (
    device_id  TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,            -- 32 bytes, Ed25519
    first_seen REAL NOT NULL
)
"""
"""Statements from schema version 2 to 3."""


def migrate_v3(conn: sqlite3.Connection) -> None:
    """Schema 2 -> 3 inside the caller's transaction: the ``device_keys`` table."""
    for statement in MIGRATION_V3.split(";"):
        if statement.strip():
            conn.execute(statement)


class KeyTables:
    """The device-key methods of ``Store`` (its connection, lock and transactions)."""

    if TYPE_CHECKING:
        def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

        def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def device_key(self, device_id: str) -> bytes | None:
        """The key ``device_id`` was first seen with, if any."""
        rows = self._read("SELECT public_key FROM device_keys WHERE device_id = ?", (device_id,))
        return bytes(rows[0][0]) if rows else None

    def device_keys(self) -> dict[str, bytes]:
        return {str(d): bytes(k) for d, k in self._read(
            "SELECT device_id, public_key FROM device_keys ORDER BY device_id")}

    def first_key(self, device_id: str, public_key: bytes, *, at: float | None = None) -> bytes:
        """Record ``public_key`` as ``device_id``'s unless it has one; the key it holds
        now (the first one recorded, whichever that was)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO device_keys (device_id, public_key, first_seen) VALUES (?, ?, ?)"
                " ON CONFLICT (device_id) DO NOTHING",
                (device_id, bytes(public_key), time.time() if at is None else at))
            (held,) = conn.execute("SELECT public_key FROM device_keys WHERE device_id = ?",
                                   (device_id,)).fetchone()
        return bytes(held)
