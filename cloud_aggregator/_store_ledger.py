"""The store's ledger tables: the training ledger's entries and the update bodies they cite.

``ledger_entries`` holds one row per entry, keyed (fleet, idx): a second entry at the
same index is impossible (no fork). The accepted update bodies an entry references are
kept, content-addressed by SHA-256, for ``fleetlearn ledger verify``, and never deleted
by the aggregator (retention: the life of the state dir; see the README):

- since schema version 6, where the journal wrote them: ``ledger_refs`` maps a digest
  to its journal row (``round_updates.seq``), and the journal's clean-ups keep the rows
  it names (a foreign key makes dropping one an error, not a silent loss). An entry
  therefore costs one small row per update, not a second copy of every body;
- before it, in ``ledger_bodies`` (copies), still read for older entries.

``append_tx`` runs inside the transaction that writes the checkpoint or closes the round
(``Store.save_checkpoint`` / ``close_round``), before that transaction drops the
journal's rows, so an entry commits with its model or not at all. The tree's new root
and the entry's inclusion path come from ``Frontiers`` in O(log n) hashes: reading and
hashing every leaf again made each release cost O(entries so far), which a long FedBuff
run (many releases a second) would feel within the hour.

Schema version 5 introduced ``ledger_entries`` and ``ledger_bodies`` (``migrate_v5``),
version 6 ``ledger_refs`` (``migrate_v6``); each is self-contained.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker_bridge import CompactTree, leaf_hash, root_hash, tree_head_bytes
from cloud_aggregator._errors import LedgerError
from cloud_aggregator._ledger import (
    LEDGER_VERSION,
    ZERO_HASH,
    AppendedEntry,
    PendingEntry,
    canonical,
    sha256_hex,
    split_lines,
)

MIGRATION_V5 = """
CREATE TABLE ledger_entries (
    fleet        TEXT    NOT NULL,
    idx          INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    header       BLOB    NOT NULL,          -- canonical JSON: the Merkle leaf data
    accepted     BLOB    NOT NULL,          -- canonical JSON records, one a line
    details      BLOB    NOT NULL,          -- canonical JSON
    leaf         BLOB    NOT NULL,          -- SHA-256(0x00 || header)
    tree_size    INTEGER NOT NULL,
    root         BLOB    NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    signature    BLOB    NOT NULL,          -- Ed25519 over the tree head bytes
    PRIMARY KEY (fleet, idx)
);
CREATE INDEX ledger_entries_by_round ON ledger_entries (fleet, round);
CREATE TABLE ledger_bodies (
    sha256 TEXT PRIMARY KEY,
    body   BLOB NOT NULL
)
"""


def migrate_v5(conn: sqlite3.Connection) -> None:
    """Schema version 4 -> 5: the ledger tables (nothing to move)."""
    for statement in MIGRATION_V5.split(";"):
        if statement.strip():
            conn.execute(statement)


MIGRATION_V6 = """
CREATE TABLE ledger_refs (
    sha256 TEXT    PRIMARY KEY,
    seq    INTEGER NOT NULL REFERENCES round_updates (seq)
);
CREATE INDEX ledger_refs_by_seq ON ledger_refs (seq)
"""

KEEP_REFERENCED = " AND seq NOT IN (SELECT seq FROM ledger_refs)"
"""Appended to a ``DELETE FROM round_updates`` clean-up: rows the ledger cites stay."""


def migrate_v6(conn: sqlite3.Connection) -> None:
    """Schema version 5 -> 6: bodies are referenced where the journal wrote them."""
    for statement in MIGRATION_V6.split(";"):
        if statement.strip():
            conn.execute(statement)


def _journal_row(conn: sqlite3.Connection, pending: PendingEntry, device: str, task: int,
                 attempt: int) -> int | None:
    """The journal row (``round_updates.seq``) of an update the entry cites."""
    row = conn.execute(
        "SELECT r.seq FROM accepted_updates a JOIN round_updates r ON r.seq = a.seq"
        " WHERE a.fleet = ? AND a.round = ? AND a.device_id = ? AND a.attempt = ?"
        " AND r.round = ?", (pending.fleet, task, device, attempt, pending.stream)).fetchone()
    return None if row is None else int(row[0])


class Frontiers:
    """Each fleet's ledger tree as a ``CompactTree`` (its perfect subtrees' roots), kept
    beside the store's connection. A tree is trusted only while its size and last leaf
    are the table's; otherwise (a rolled-back append, another ``Store`` on the same file)
    it is rebuilt from the leaves once."""

    def __init__(self) -> None:
        self._trees: dict[str, CompactTree] = {}

    def tree(self, conn: sqlite3.Connection, fleet: str, size: int,
             last: bytes | None) -> CompactTree:
        """A copy of ``fleet``'s tree of ``size`` leaves whose last is ``last``."""
        tree = self._trees.get(fleet)
        if tree is None or tree.size != size or tree.last != last:
            tree = CompactTree()
            for (leaf,) in conn.execute("SELECT leaf FROM ledger_entries WHERE fleet = ?"
                                        " ORDER BY idx", (fleet,)):
                tree.append(bytes(leaf))
            self._trees[fleet] = tree
        return tree.copy()

    def keep(self, fleet: str, tree: CompactTree) -> None:
        """``tree`` (with the new entry) is the fleet's from now on; if the transaction
        rolls back, the next ``tree`` call sees the mismatch and rebuilds."""
        self._trees[fleet] = tree


def append_tx(conn: sqlite3.Connection, pending: PendingEntry,
              frontiers: Frontiers) -> AppendedEntry | None:
    """Append ``pending`` inside the caller's transaction (see the module doc).

    A round (or FedBuff release) already in the ledger (the same round and resulting
    model version) is not appended again (None): a
    release is re-derived only when its entry was not committed, so this is another
    aggregator object writing what one on the same store already wrote.
    """
    fleet = pending.fleet
    for (header,) in conn.execute("SELECT header FROM ledger_entries WHERE fleet = ? AND"
                                  " round = ?", (fleet, pending.round)).fetchall():
        if json.loads(header).get("model_version") == pending.model_version:
            pending.appended = None
            return None
    last = conn.execute("SELECT idx, leaf FROM ledger_entries WHERE fleet = ?"
                        " ORDER BY idx DESC LIMIT 1", (fleet,)).fetchone()
    index = 0 if last is None else int(last[0]) + 1
    prev_entry = ZERO_HASH if last is None else bytes(last[1]).hex()
    lines = pending.accepted_lines()
    details = canonical(dict(pending.details))
    header_obj: dict[str, Any] = {
        "v": LEDGER_VERSION, "fleet": fleet, "index": index, "round": pending.round,
        "outcome": pending.outcome, "model_version": pending.model_version,
        "prev_entry": prev_entry,
        "prev_model": pending.prev_model, "model": pending.model,
        "rule": dict(pending.rule),
        "accepted_root": root_hash([leaf_hash(line) for line in lines]).hex(),
        "accepted_count": len(lines),
        "details_sha256": sha256_hex(details),
        "at": pending.at,
    }
    header = canonical(header_obj)
    leaf = leaf_hash(header)
    tree = frontiers.tree(conn, fleet, index, None if last is None else bytes(last[1]))
    path = tuple(tree.append(leaf))
    root = tree.root()
    size = tree.size
    stamp = int(time.time() * 1000)
    signature = pending.signer.sign(
        tree_head_bytes(fleet=fleet, size=size, timestamp_ms=stamp, root=root))
    saved = conn.execute("SELECT sha256 FROM checkpoints WHERE fleet = ? AND model_version = ?",
                         (fleet, pending.model_version)).fetchone()
    if saved is not None and str(saved[0]) != pending.model:
        raise LedgerError(f"ledger entry {index}: the checkpoint of version "
                          f"{pending.model_version} is not the entry's model")
    for added in pending.accepted:
        # The digest is the one the ingest pipeline computed over these journaled bytes
        # (``ledger verify`` hashes them again); a body already kept under it (the same
        # bytes from another update) is not referenced twice.
        s = added.source
        seq = _journal_row(conn, pending, s.device, s.round, s.attempt)
        if seq is None:
            raise LedgerError(f"the body of {s.device}'s update ({s.digest}) is not in the "
                              "journal for the ledger")
        conn.execute("INSERT INTO ledger_refs (sha256, seq) VALUES (?, ?)"
                     " ON CONFLICT DO NOTHING", (s.digest, seq))
    conn.execute(
        "INSERT INTO ledger_entries (fleet, idx, round, header, accepted, details, leaf,"
        " tree_size, root, timestamp_ms, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (fleet, index, pending.round, header, b"\n".join(lines), details, leaf, size,
         root, stamp, signature))
    frontiers.keep(fleet, tree)
    pending.appended = AppendedEntry(
        fleet=fleet, index=index, round=pending.round, header=header, accepted=tuple(lines),
        details=details, leaf=leaf, tree_size=size, root=root, timestamp_ms=stamp,
        signature=signature, path=path)
    return pending.appended


def _entry(row: Sequence[Any]) -> AppendedEntry:
    fleet, idx, rnd, header, accepted, details, leaf, size, root, stamp, sig = row
    return AppendedEntry(fleet=fleet, index=int(idx), round=int(rnd), header=bytes(header),
                         accepted=split_lines(bytes(accepted)), details=bytes(details),
                         leaf=bytes(leaf), tree_size=int(size), root=bytes(root),
                         timestamp_ms=int(stamp), signature=bytes(sig))


_SELECT = ("SELECT fleet, idx, round, header, accepted, details, leaf, tree_size, root,"
           " timestamp_ms, signature FROM ledger_entries")


class LedgerTables:
    """Reading the ledger tables (``Store`` mixes this in; its ``_read`` does the work)."""

    if TYPE_CHECKING:
        def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def ledger_entries(self, fleet: str | None = None) -> list[AppendedEntry]:
        """Every entry (of ``fleet``, or of every fleet), in index order."""
        if fleet is None:
            return [_entry(r) for r in self._read(_SELECT + " ORDER BY fleet, idx")]
        return [_entry(r) for r in self._read(_SELECT + " WHERE fleet = ? ORDER BY idx",
                                              (fleet,))]

    def ledger_leaves(self, fleet: str) -> list[bytes]:
        return [bytes(r[0]) for r in self._read(
            "SELECT leaf FROM ledger_entries WHERE fleet = ? ORDER BY idx", (fleet,))]

    def ledger_body(self, digest: str) -> bytes | None:
        """The kept body with this SHA-256 (hex), where the journal wrote it or, for an
        entry from before schema version 6, its copy."""
        rows = self._read("SELECT r.body FROM ledger_refs l JOIN round_updates r"
                          " ON r.seq = l.seq WHERE l.sha256 = ?", (digest,))
        if not rows:
            rows = self._read("SELECT body FROM ledger_bodies WHERE sha256 = ?", (digest,))
        return bytes(rows[0][0]) if rows else None

    def ledger_fleets(self) -> list[str]:
        return [str(r[0]) for r in self._read(
            "SELECT DISTINCT fleet FROM ledger_entries ORDER BY fleet")]
