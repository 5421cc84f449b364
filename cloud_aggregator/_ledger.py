"""The verifiable training ledger: what each round or FedBuff release did, signed.

One entry per sync round (closed or abandoned) or FedBuff model release, appended in
the same SQLite transaction as the checkpoint or the round's close (``_store_ledger``),
so a crash leaves either the whole entry with its model or neither. FedBuff releases
are checkpointed at most every ``checkpoint_every_s``: their entries wait in memory for
that checkpoint, and a crash before it re-derives the releases, and so the entries, from
the journal. An entry is three
canonical JSON texts (sorted keys, no spaces, ASCII):

- the *header* (the Merkle leaf): fleet, index, round, outcome, model version, the
  previous entry's leaf hash, the previous and resulting model's SHA-256 (of the
  checkpoint file), the aggregation rule (robust rule and its parameters, clipping, the
  server optimizer and its hyper-parameters), ``accepted_root`` and ``accepted_count``
  (an RFC 6962 tree over the accepted-update records) and ``details_sha256``;
- the *accepted* records, one line each, in the order the aggregate added them (the
  canonical accumulation order): device, round, attempt, model version and codec, the
  SHA-256 of the update message body as kept (with its signature block), the device's
  signature and the hash of the update body it signed, and the weight, staleness scale,
  bootstrap cut and norm the update counted with;
- the *details*: devices selected, updates rejected with their reasons (at most
  ``MAX_REJECTED``), the model's layout, and contribution records when a hook gives them.

The entries' leaf hashes form the ledger's Merkle tree; after each entry the tree head
(size, root, timestamp) is signed with the aggregator's Ed25519 key (``AggregatorKey``,
``ledger_key.pem`` in the state dir, created at first start, mode 0600).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker_bridge import fsync_dir
from cloud_aggregator._errors import LedgerError

log = logging.getLogger(__name__)

LEDGER_VERSION = 1
KEY_FILE = "ledger_key.pem"
ZERO_HASH = "0" * 64
MAX_REJECTED = 1000
"""Rejections listed per entry (the rest are counted in ``rejected_more``)."""


def canonical(value: Any) -> bytes:
    """The one JSON form the ledger hashes: sorted keys, no spaces, ASCII, finite."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- the key


class AggregatorKey:
    """The aggregator's Ed25519 signing key, kept in ``ledger_key.pem`` (PKCS#8, 0600)."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_hex(self) -> str:
        return self.public_bytes.hex()

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> AggregatorKey:
        """The key in ``state_dir``, created (mode 0600, fsynced) when there is none."""
        path = state_dir / KEY_FILE
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            fsync_dir(state_dir)
            made = cls(key)
            log.info("ledger signing key created in %s (public key %s)", path, made.public_hex)
            return made
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> AggregatorKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise LedgerError(f"the ledger key {path} is unreadable: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"the ledger key {path} is not an Ed25519 key")
        return cls(key)


def read_public_key(state_dir: Path) -> bytes:
    """The raw public key of the aggregator whose state dir this is."""
    return AggregatorKey.load(state_dir / KEY_FILE).public_bytes


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True)
class UpdateSource:
    """Which update a contribution is: its key, body digest and signature (if any)."""

    device: str
    round: int
    attempt: int
    digest: str
    """SHA-256 (hex) of the update's message body, as journaled and kept."""
    signature: str | None = None
    body_sha256: str | None = None
    model_version: int | None = None
    codec: str | None = None
    """The envelope's model version and codec: with the key, round, attempt and body hash,
    the statement a device signs (docs/PROTOCOL.md section 5.2)."""


@dataclass(frozen=True, kw_only=True)
class AddedUpdate:
    """What the aggregate added, and how: one accepted record of an entry."""

    source: UpdateSource
    weight: float
    scale: float
    cut: float
    norm: float

    def record(self, position: int) -> dict[str, Any]:
        s = self.source
        return {"device": s.device, "round": s.round, "attempt": s.attempt,
                "digest": s.digest, "signature": s.signature, "body_sha256": s.body_sha256,
                "model_version": s.model_version, "codec": s.codec,
                "weight": self.weight, "scale": self.scale, "cut": self.cut,
                "norm": self.norm, "position": position}


@dataclass(frozen=True, kw_only=True)
class Rejected:
    """An update refused while the round (or buffer) was open."""

    device: str
    round: int
    attempt: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ContributionsHook = Callable[[int, Sequence[Mapping[str, Any]]], Sequence[Any] | None]
"""``hook(round, accepted_records)``: per-device contribution records for the entry
(each a mapping or an object with ``to_json()``: device, round, weight, cosine
alignment, marginal contribution or None), or None."""


@dataclass(kw_only=True)
class PendingEntry:
    """An entry to append, before the store gives it its index, chain and signature.

    ``appended`` is filled in inside the store's transaction (valid once it committed).
    """

    fleet: str
    round: int
    outcome: str
    model_version: int
    prev_model: str
    model: str
    """SHA-256 (hex) of the previous and the resulting model, saved as a checkpoint."""
    rule: Mapping[str, Any]
    accepted: Sequence[AddedUpdate]
    stream: int
    """The journal stream holding the accepted bodies (copied when the entry commits)."""
    details: Mapping[str, Any]
    signer: AggregatorKey = field(repr=False)
    at: float
    appended: AppendedEntry | None = None

    def accepted_lines(self) -> list[bytes]:
        return [canonical(a.record(i)) for i, a in enumerate(self.accepted)]


@dataclass(frozen=True, kw_only=True)
class AppendedEntry:
    """An entry as stored: its texts, leaf hash and the signed tree head after it."""

    fleet: str
    index: int
    round: int
    header: bytes
    accepted: tuple[bytes, ...]
    details: bytes
    leaf: bytes
    tree_size: int
    root: bytes
    timestamp_ms: int
    signature: bytes
    path: tuple[bytes, ...] | None = None
    """The entry's inclusion path in the tree of ``tree_size`` leaves, when appended by
    this process (None: read back from the store; ``publish`` derives it)."""

    def header_json(self) -> dict[str, Any]:
        value = json.loads(self.header)
        if not isinstance(value, dict):
            raise LedgerError(f"ledger entry {self.index} has no header object")
        return value


def recorded_only(rule: Mapping[str, Any]) -> bool:
    """Whether an entry's model can only be checked against its checkpoint file, not
    re-derived from the entry: a secure round's sum comes from the devices' reveals, a
    private round's carries noise, and a strategy's own combination is not a recorded
    rule (``_ledger_verify``; ``_retention`` keeps those files)."""
    return bool(rule.get("secure_aggregation") or rule.get("differential_privacy") is not None
                or rule.get("combine") is not None)


def model_sha256(params: npt.NDArray[np.float32]) -> str:
    """The SHA-256 of ``params`` saved as ``Store.save_checkpoint`` saves a checkpoint."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(params, dtype=np.float32), allow_pickle=False)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def split_lines(blob: bytes) -> tuple[bytes, ...]:
    """The accepted records of an entry as stored (one canonical JSON text a line)."""
    return tuple(blob.split(b"\n")) if blob else ()
