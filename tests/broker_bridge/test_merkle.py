"""RFC 6962 / RFC 9162 Merkle trees: roots and inclusion proofs, every size up to 64."""

from __future__ import annotations

import hashlib

import pytest

from broker_bridge._merkle import (
    CompactTree,
    inclusion_path,
    inclusion_paths,
    leaf_hash,
    node_hash,
    root_hash,
    verify_inclusion,
)

# The leaves of the Certificate Transparency reference tests (RFC 6962's reference
# implementation, certificate-transparency/cpp merkletree tests), with the roots of the
# trees of their first 1..8 leaves and two inclusion paths.
CT_LEAVES = [bytes.fromhex(h) for h in (
    "", "00", "10", "2021", "3031", "40414243", "5051525354555657",
    "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328")]
CT_PATH_0_OF_8 = [bytes.fromhex(h) for h in (
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4")]


def _reference_mth(data: list[bytes]) -> bytes:
    """RFC 6962 section 2.1's recursive definition, over the data itself."""
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + data[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + _reference_mth(data[:k]) + _reference_mth(data[k:])).digest()


def _reference_path(m: int, data: list[bytes]) -> list[bytes]:
    """RFC 9162 section 2.1.3.1's PATH(m, D[n]), recursively."""
    n = len(data)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*_reference_path(m, data[:k]), _reference_mth(data[k:])]
    return [*_reference_path(m - k, data[k:]), _reference_mth(data[:k])]


def _data(n: int) -> list[bytes]:
    return [f"entry {i}".encode() * (i % 3 + 1) for i in range(n)]


def test_the_ct_reference_roots_and_path() -> None:
    hashes = [leaf_hash(d) for d in CT_LEAVES]
    for n in range(1, 9):
        assert root_hash(hashes[:n]) == CT_ROOTS[n - 1], n
    assert inclusion_path(0, hashes) == CT_PATH_0_OF_8
    assert verify_inclusion(leaf=hashes[0], index=0, size=8, path=CT_PATH_0_OF_8,
                            root=CT_ROOTS[7])


def test_empty_tree_and_hash_prefixes() -> None:
    assert root_hash([]) == hashlib.sha256(b"").digest()
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    inner = hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert node_hash(b"a" * 32, b"b" * 32) == inner
    # A leaf and an inner node over the same bytes never collide (domain separation).
    assert leaf_hash(b"a" * 32 + b"b" * 32) != node_hash(b"a" * 32, b"b" * 32)


@pytest.mark.parametrize("n", range(1, 65))
def test_every_size_up_to_64_matches_the_rfc_definitions(n: int) -> None:
    data = _data(n)
    hashes = [leaf_hash(d) for d in data]
    root = root_hash(hashes)
    assert root == _reference_mth(data)
    assert inclusion_paths(hashes) == [_reference_path(m, data) for m in range(n)]
    for m in range(n):
        path = inclusion_path(m, hashes)
        assert path == _reference_path(m, data)
        assert verify_inclusion(leaf=hashes[m], index=m, size=n, path=path, root=root)
        # Any other index, leaf, root, a flipped path byte or a path of another length
        # fails. (The size alone is not bound by the path: the signed tree head binds it.)
        assert not verify_inclusion(leaf=hashes[m], index=m, size=2 * n + 1, path=path,
                                    root=root)
        if n > 1:
            other = (m + 1) % n
            assert not verify_inclusion(leaf=hashes[m], index=other, size=n, path=path,
                                        root=root)
            assert not verify_inclusion(leaf=hashes[other], index=m, size=n, path=path,
                                        root=root)
            j = m % len(path)
            bad = [*path]
            bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
            assert not verify_inclusion(leaf=hashes[m], index=m, size=n, path=bad, root=root)
            assert not verify_inclusion(leaf=hashes[m], index=m, size=n, path=path[:-1],
                                        root=root)
        assert not verify_inclusion(leaf=hashes[m], index=m, size=n, path=[*path, root],
                                    root=root)
        assert not verify_inclusion(leaf=hashes[m], index=m, size=n, path=path,
                                    root=leaf_hash(b"forged"))


def test_a_compact_tree_has_the_root_of_every_size() -> None:
    tree = CompactTree()
    assert tree.root() == root_hash([])
    hashes = [leaf_hash(d) for d in _data(64)]
    for n, h in enumerate(hashes, start=1):
        tree.append(h)
        assert tree.size == n and tree.root() == root_hash(hashes[:n]), n


def test_out_of_range_and_malformed_inputs() -> None:
    hashes = [leaf_hash(d) for d in _data(5)]
    with pytest.raises(ValueError):
        inclusion_path(5, hashes)
    with pytest.raises(ValueError):
        inclusion_path(-1, hashes)
    root = root_hash(hashes)
    path = inclusion_path(2, hashes)
    assert not verify_inclusion(leaf=hashes[2], index=-1, size=5, path=path, root=root)
    assert not verify_inclusion(leaf=hashes[2], index=2, size=0, path=path, root=root)
    assert not verify_inclusion(leaf=hashes[2][:31], index=2, size=5, path=path, root=root)
    assert not verify_inclusion(leaf=hashes[2], index=2, size=5, path=[p[:16] for p in path],
                                root=root)


def test_a_compact_tree_gives_each_new_leaf_its_inclusion_path() -> None:
    """What the aggregator sends a device is the path ``append`` returned, in O(log n)."""
    tree = CompactTree()
    hashes = [leaf_hash(d) for d in _data(130)]
    for n, h in enumerate(hashes, start=1):
        path = tree.append(h)
        assert path == inclusion_path(n - 1, hashes[:n]), n
        assert verify_inclusion(leaf=h, index=n - 1, size=n, path=path, root=tree.root())
        assert tree.last == h
    copy = tree.copy()
    copy.append(leaf_hash(b"only in the copy"))
    assert tree.size == 130 and copy.size == 131 and tree.root() == root_hash(hashes)
