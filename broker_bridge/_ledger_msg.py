"""The training ledger on the wire: signed tree heads and inclusion proofs.

The aggregator keeps an append-only ledger of what each round (or FedBuff release) did,
committed in an RFC 6962 Merkle tree (``_merkle``). After each entry it publishes the
signed tree head, retained, on ``broadcast/ledger`` (``TreeHead``, kind ``ledger``), and
sends each device whose update the entry counts an ``InclusionProof`` (kind ``proof``)
on its ``down/proof`` topic. ``check_inclusion`` is what a device does with it: a few
hashes and one Ed25519 signature check against the aggregator's public key, pinned in
the device's configuration. docs/PROTOCOL.md section 4 gives the byte layout of what is
signed.
"""

from __future__ import annotations

import json
import struct
import typing
from dataclasses import dataclass
from typing import Any, Literal

from broker_bridge._envelope import Kind
from broker_bridge._merkle import leaf_hash, verify_inclusion
from broker_bridge._payload import SHA256_HEX, U32, _Payload, rule
from broker_bridge._signing import verify_signature

TREE_HEAD_CONTEXT = b"fleetlearn tree head v1\x00"
"""The first 24 bytes of what a tree head signature covers (domain separation)."""
SIGNATURE_HEX = "^[0-9a-f]{128}$"
PUBLIC_KEY_HEX = "^[0-9a-f]{64}$"
MAX_PATH = 64
"""A path has at most 64 hashes (a tree of up to 2^64 leaves)."""


def tree_head_bytes(*, fleet: str, size: int, timestamp_ms: int, root: bytes) -> bytes:
    """What the aggregator signs: context (24 bytes), u8 fleet length, fleet (UTF-8),
    u64 tree size, u64 timestamp (ms since the Unix epoch), 32-byte root; little-endian."""
    name = fleet.encode("utf-8")
    if not 1 <= len(name) <= 255 or len(root) != 32 or size < 0 or timestamp_ms < 0:
        raise ValueError("a tree head needs a fleet id, a size, a timestamp and a root")
    return (TREE_HEAD_CONTEXT + struct.pack("<B", len(name)) + name
            + struct.pack("<QQ", size, timestamp_ms) + root)


def ed25519_verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Does ``signature`` sign ``data`` under the raw 32-byte Ed25519 ``public_key``?"""
    return verify_signature(public_key, signature, data)


_HASHES = {"items": {"type": "string", "pattern": SHA256_HEX}}


@dataclass(frozen=True, kw_only=True)
class TreeHead(_Payload):
    """Aggregator -> fleet, retained, on ``broadcast/ledger``: the ledger's signed head
    after its latest entry."""

    KIND: typing.ClassVar[Kind] = Kind.LEDGER
    size: int = rule(minimum=1, description="entries in the ledger")
    timestamp_ms: int = rule(minimum=0, description="when it was signed, ms since the epoch")
    root: str = rule(pattern=SHA256_HEX, description="Merkle root of the entries")
    signature: str = rule(pattern=SIGNATURE_HEX, description=(
        "Ed25519 signature of the tree head bytes (docs/PROTOCOL.md section 4)"))
    key: str = rule("", description="the signer's raw public key, hex; informational: "
                    "a receiver checks against the key it has pinned")

    def signed_bytes(self, fleet: str) -> bytes:
        return tree_head_bytes(fleet=fleet, size=self.size, timestamp_ms=self.timestamp_ms,
                               root=bytes.fromhex(self.root))

    def verify(self, fleet: str, public_key: bytes) -> bool:
        return ed25519_verify(public_key, bytes.fromhex(self.signature),
                              self.signed_bytes(fleet))


@dataclass(frozen=True, kw_only=True)
class InclusionProof(_Payload):
    """Aggregator -> device on ``down/proof``: the device's accepted update is in ledger
    entry ``index``, and that entry in the signed tree."""

    KIND: typing.ClassVar[Kind] = Kind.PROOF
    round: int = rule(minimum=0, maximum=U32,
                      description="the round (or async task) the update answered")
    index: int = rule(minimum=0, description="the entry's index in the ledger (0-based)")
    entry: str = rule(description="the entry's leaf data: its header, canonical JSON text")
    entry_path: list[str] = rule(factory=list, **_HASHES,
                                 description="RFC 9162 inclusion path of the entry")
    update: str = rule(description="the update's record in the entry, canonical JSON text")
    update_index: int = rule(minimum=0, description="its index among the entry's updates")
    update_path: list[str] = rule(factory=list, **_HASHES,
                                  description="RFC 9162 path of the record to accepted_root")
    size: int = rule(minimum=1, description="tree size of the signed head")
    timestamp_ms: int = rule(minimum=0)
    root: str = rule(pattern=SHA256_HEX)
    signature: str = rule(pattern=SIGNATURE_HEX)

    def head(self) -> TreeHead:
        return TreeHead(size=self.size, timestamp_ms=self.timestamp_ms, root=self.root,
                        signature=self.signature)


InclusionStatus = Literal["verified", "unpinned", "failed"]


@dataclass(frozen=True, kw_only=True)
class InclusionOutcome:
    """What a device concluded from an ``InclusionProof``.

    ``verified``: the paths hold and the tree head is signed by the pinned key;
    ``unpinned``: the paths hold but no aggregator key is configured, so the head is not
    authenticated; ``failed``: ``detail`` says what did not hold."""

    status: InclusionStatus
    round: int
    index: int
    detail: str = ""
    digest: str = ""


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise ValueError(f"the {what} is not a JSON object")
    return value


def check_inclusion(proof: InclusionProof, *, fleet: str, device: str,
                    public_key: bytes | None, digest: str | None = None) -> InclusionOutcome:
    """Check ``proof`` as a device does (see ``InclusionOutcome``).

    ``digest``: the SHA-256 (hex) of the update body the device sent for that round, when
    it still knows it; the record must name it.
    """
    def failed(why: str) -> InclusionOutcome:
        return InclusionOutcome(status="failed", round=proof.round, index=proof.index,
                                detail=why)

    try:
        record = _json_object(proof.update, "update record")
        entry = _json_object(proof.entry, "entry")
        if len(proof.entry_path) > MAX_PATH or len(proof.update_path) > MAX_PATH:
            return failed("path too long")
        entry_path = [bytes.fromhex(h) for h in proof.entry_path]
        update_path = [bytes.fromhex(h) for h in proof.update_path]
        root = bytes.fromhex(proof.root)
        accepted_root = bytes.fromhex(str(entry.get("accepted_root", "")))
        count = int(entry.get("accepted_count", -1))
    except (ValueError, TypeError) as exc:
        return failed(str(exc))
    if record.get("device") != device:
        return failed(f"the record names device {record.get('device')!r}")
    if record.get("round") != proof.round:
        return failed(f"the record is of round {record.get('round')!r}, not {proof.round}")
    if digest is not None and record.get("digest") != digest:
        return failed("the record names another update body than the one sent")
    if entry.get("fleet") != fleet or entry.get("index") != proof.index:
        return failed("the entry is not the one named (fleet or index)")
    if not verify_inclusion(leaf=leaf_hash(proof.update.encode("utf-8")),
                            index=proof.update_index, size=count, path=update_path,
                            root=accepted_root):
        return failed("the update is not in the entry's accepted updates")
    if not verify_inclusion(leaf=leaf_hash(proof.entry.encode("utf-8")), index=proof.index,
                            size=proof.size, path=entry_path, root=root):
        return failed("the entry is not in the tree of the signed head")
    ok = InclusionOutcome(status="verified", round=proof.round, index=proof.index,
                          digest=str(record.get("digest", "")))
    if public_key is None:
        return InclusionOutcome(status="unpinned", round=proof.round, index=proof.index,
                                digest=ok.digest, detail="no aggregator key configured: the "
                                "tree head is not authenticated")
    if not proof.head().verify(fleet, public_key):
        return failed("the tree head's signature does not verify with the pinned key")
    return ok
