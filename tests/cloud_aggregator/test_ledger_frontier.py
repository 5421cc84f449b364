"""The ledger's tree kept as a frontier (``_store_ledger.Frontiers``): an append costs
O(log n) hashes, and a frontier that disagrees with the table is rebuilt, never used."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from broker_bridge import leaf_hash, root_hash
from cloud_aggregator._store import Store
from cloud_aggregator._store_ledger import Frontiers


def _add_row(conn: sqlite3.Connection, fleet: str, idx: int, leaf: bytes) -> None:
    conn.execute("INSERT INTO ledger_entries (fleet, idx, round, header, accepted, details,"
                 " leaf, tree_size, root, timestamp_ms, signature) VALUES"
                 " (?, ?, ?, x'', x'', x'', ?, ?, x'', 0, x'')", (fleet, idx, idx, leaf, idx + 1))


def test_a_frontier_that_disagrees_with_the_table_is_rebuilt(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite")
    conn = sqlite3.connect(tmp_path / "state.sqlite", isolation_level=None)
    try:
        leaves = [leaf_hash(b"entry %d" % i) for i in range(5)]
        for i in range(3):
            _add_row(conn, "f", i, leaves[i])
        frontiers = Frontiers()
        tree = frontiers.tree(conn, "f", 3, leaves[2])
        assert tree.root() == root_hash(leaves[:3])
        # An append whose transaction rolled back: the frontier moved, the table did not.
        phantom = frontiers.tree(conn, "f", 3, leaves[2])
        phantom.append(leaf_hash(b"rolled back"))
        frontiers.keep("f", phantom)
        assert frontiers.tree(conn, "f", 3, leaves[2]).root() == root_hash(leaves[:3])
        # ... and then another writer appended a different entry at that index: the same
        # size, another last leaf.
        frontiers.keep("f", phantom)
        _add_row(conn, "f", 3, leaves[3])
        rebuilt = frontiers.tree(conn, "f", 4, leaves[3])
        assert rebuilt.root() == root_hash(leaves[:4])
        # Kept and consistent: used as is (a copy: the caller's appends stay its own).
        path = rebuilt.append(leaves[4])
        assert frontiers.tree(conn, "f", 4, leaves[3]).root() == root_hash(leaves[:4])
        frontiers.keep("f", rebuilt)
        _add_row(conn, "f", 4, leaves[4])
        assert frontiers.tree(conn, "f", 5, leaves[4]).root() == root_hash(leaves)
        assert len(path) == 1 and path[0] == root_hash(leaves[:4])
        # Fleets keep apart.
        assert frontiers.tree(conn, "g", 0, None).root() == root_hash([])
    finally:
        conn.close()
        store.close()
