"""Which checkpoint files the store keeps (``AggregatorConfig.keep_checkpoints``).

Every release of a sync round, and a FedBuff buffer at most every
``checkpoint_every_s``, writes the whole model to a file (4.4 MB for ``mlp-xl``): kept
forever, a FedBuff run filled a disk by the hour. A checkpoint is now deleted once a
newer one has committed, unless it is

- one of the newest ``keep_checkpoints`` (a restart needs the newest; the model server
  answers a device asking for a recent version from them);
- the oldest the store holds (version 0, or where a store from before the training
  ledger started it): ``fleetlearn ledger verify`` re-derives every other model from it;
- ``keep``-marked: the model of a ledger entry that can only be checked against its
  file (``_ledger.recorded_only``: a secure or private round, a strategy combining its
  own way).

The rows go in the transaction of the checkpoint that replaces them; the files after it
commits (a crash in between leaves a file no row names, never a row without its file;
so does a crash between a checkpoint's file and its row). ``orphans`` names such files:
the aggregator that owns the state dir (``_ownership``) deletes them when it starts
(``Store.sweep_checkpoints``; the temporary files of a write cut short go then too,
``_startup.clean_stale_temp_files``).
Schema version 7 adds the ``keep`` mark (``migrate_v7``).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Set
from pathlib import Path

from cloud_aggregator._ledger import recorded_only


def migrate_v7(conn: sqlite3.Connection) -> None:
    """Schema version 6 -> 7: a checkpoint can be marked to be kept; the ones the ledger
    written so far checks models against are marked (one pass over its entries)."""
    conn.execute("ALTER TABLE checkpoints ADD COLUMN keep INTEGER NOT NULL DEFAULT 0")
    has_ledger = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND"
                              " name = 'ledger_entries'").fetchone()
    if has_ledger is None:
        return
    for fleet, header in conn.execute("SELECT fleet, header FROM ledger_entries").fetchall():
        try:
            head = json.loads(header)
            pinned = (head.get("outcome") in ("closed", "aggregated")
                      and recorded_only(head.get("rule") or {}))
            version = int(head["model_version"])
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # a broken entry: ledger verify names it; nothing to keep for it
        if pinned:
            mark_kept(conn, fleet, version)


def mark_kept(conn: sqlite3.Connection, fleet: str, version: int) -> None:
    """The checkpoint of ``version`` (if there is one) is never pruned."""
    conn.execute("UPDATE checkpoints SET keep = 1 WHERE fleet = ? AND model_version = ?",
                 (fleet, version))


def prune_tx(conn: sqlite3.Connection, fleet: str, newest: int) -> list[str]:
    """Delete, inside the caller's transaction, the rows of ``fleet``'s checkpoints that
    are neither among the ``newest``, nor the oldest, nor marked to be kept; return their
    file names (relative to the checkpoint directory) for the caller to remove once the
    transaction has committed. ``newest`` 0: keep every one."""
    if newest <= 0:
        return []
    rows = conn.execute(
        "SELECT model_version, path FROM checkpoints WHERE fleet = ? AND keep = 0"
        " AND model_version > (SELECT min(model_version) FROM checkpoints WHERE fleet = ?)"
        " AND model_version < (SELECT model_version FROM checkpoints WHERE fleet = ?"
        " ORDER BY model_version DESC LIMIT 1 OFFSET ?)",
        (fleet, fleet, fleet, newest - 1)).fetchall()
    for version, _ in rows:
        conn.execute("DELETE FROM checkpoints WHERE fleet = ? AND model_version = ?",
                     (fleet, version))
    return [str(path) for _, path in rows]


CHECKPOINT_FILE = re.compile(r"(?P<prefix>.+)-v(?P<version>\d{10})\.npy")
"""A checkpoint file's name (``checkpoint_name``)."""


def checkpoint_name(prefix: str, version: int) -> str:
    """The file of model ``version`` of the fleet whose file-name-safe id is ``prefix``."""
    return f"{prefix}-v{version:010d}.npy"


def orphans(directory: Path, prefix: str, recorded: Set[str]) -> list[Path]:
    """Files of one fleet's checkpoints in ``directory`` (``checkpoint_name``) that no
    row names (``recorded``: the file names the rows hold); nothing else is ever listed."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if p.name not in recorded and p.is_file() and (
        (m := CHECKPOINT_FILE.fullmatch(p.name)) is not None and m["prefix"] == prefix))
