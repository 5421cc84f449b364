"""Merkle trees as RFC 6962 / RFC 9162 (Certificate Transparency) define them.

    leaf hash  = SHA-256(0x00 || data)
    node hash  = SHA-256(0x01 || left || right)
    MTH({})    = SHA-256("")
    MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])), k the largest power of two < n

An inclusion proof of leaf ``m`` in a tree of ``n`` leaves is RFC 9162 section 2.1.3.1's
``PATH(m, D[n])``; ``verify_inclusion`` is its section 2.1.3.2 algorithm, which needs only
the leaf hash, the index, the size, the path and the root. The aggregator's training
ledger commits its entries in such a tree and each entry's accepted updates in another;
a device verifies the proof it is sent with these few hashes (docs/PROTOCOL.md).

The functions take leaf *hashes* (``leaf_hash(data)``), so a tree of n leaves is built
from n stored 32-byte hashes without the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """The tree level by level, leaves first: pairs hashed, an odd last node carried up
    unchanged, which builds exactly RFC 6962's left-balanced tree."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        level = levels[-1]
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
    return levels


def root_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH of the leaves (given as leaf hashes); SHA-256("") for none. O(n) hashes."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    return _levels(leaves)[-1][0]


def _path(index: int, levels: list[list[bytes]]) -> list[bytes]:
    # A node's sibling at each level where it has one; a carried-up node has none there
    # (RFC 9162's PATH skips exactly those levels), nearest sibling first.
    path: list[bytes] = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index >>= 1
    return path


def inclusion_path(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """RFC 9162 ``PATH(index, D[n])`` over the leaf hashes, nearest sibling first."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaves)}")
    return _path(index, _levels(leaves))


def inclusion_paths(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every leaf's ``inclusion_path``, building the tree once (O(n log n))."""
    levels = _levels(leaves)
    return [_path(i, levels) for i in range(len(leaves))]


class CompactTree:
    """A growing tree kept as its perfect subtrees' roots (O(log n) hashes): ``root()``
    after each ``append`` without the leaves (a verifier walking a long ledger; the
    aggregator appending to one). ``append`` also returns the new leaf's inclusion path:
    the subtrees it merges with, then the other subtrees' roots, nearest first."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (height, root), tallest first
        self.size = 0
        self.last: bytes | None = None
        """The last leaf appended (None: empty)."""

    def copy(self) -> CompactTree:
        other = CompactTree()
        other._stack, other.size, other.last = list(self._stack), self.size, self.last
        return other

    def append(self, leaf: bytes) -> list[bytes]:
        """Add ``leaf`` (a leaf hash) as leaf ``size``; return RFC 9162 ``PATH(size,
        D[size + 1])``, as ``inclusion_path`` over every leaf would (O(log n) here)."""
        node, height = leaf, 0
        path: list[bytes] = []
        while self._stack and self._stack[-1][0] == height:
            _, left = self._stack.pop()
            path.append(left)
            node, height = node_hash(left, node), height + 1
        path.extend(root for _, root in reversed(self._stack))
        self._stack.append((height, node))
        self.size += 1
        self.last = leaf
        return path

    def root(self) -> bytes:
        if not self._stack:
            return hashlib.sha256(b"").digest()
        node = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node


def verify_inclusion(*, leaf: bytes, index: int, size: int, path: Sequence[bytes],
                     root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: does ``path`` prove ``leaf`` (a leaf hash) at ``index``
    in the tree of ``size`` leaves whose root is ``root``?"""
    if not 0 <= index < size or len(leaf) != HASH_SIZE or len(root) != HASH_SIZE:
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if len(p) != HASH_SIZE or sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root
