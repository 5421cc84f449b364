"""Signed updates: the statement a device signs, and the signed body that carries it.

Every update is signed by its device's Ed25519 key over a *statement*: the canonical
byte string below, which names everything that makes the update this device's answer to
this task and nothing else (docs/PROTOCOL.md section 5.2 is the language-neutral
description, ``docs/vectors/signature.json`` a worked example)::

    u8 len | "fleetlearn/update-signature/1"     context (29 bytes)
    u8 len | fleet id (UTF-8, 1-64 bytes)
    u8 len | device id (UTF-8, 1-64 bytes)
    u32    | round (the envelope's)
    u32    | model_version (the envelope's)
    u16    | attempt (the envelope's)
    u8 len | codec spec (the envelope's, ASCII, 1-255 bytes)
    32     | SHA-256 of the update body (``u32 meta_len | meta | codec body``)

Integers are little-endian; every variable field carries its length, so no two
different tuples give the same bytes. The body hash covers the metadata, so the task's
``nonce`` (echoed there) is signed too.

A signed update's body is the update body behind a fixed 101-byte prefix::

    "FLSG" | u8 scheme (1 = Ed25519) | 32-byte public key | 64-byte signature | update body

Read as the unsigned body's ``u32 meta_len``, ``"FLSG"`` is 1,196,641,350, far above the
65,536 a receiver allows: an aggregator that predates signatures refuses a signed update
as ``bad_body`` instead of misreading it, and a receiver tells the two apart from the
first four bytes. The public key travels with the signature so that a receiver checks
*which* key signed before it checks the signature (``wrong_key`` against
``bad_signature``), and so that trust on first use learns a key only from an update it
signed.

Keys are the ``cryptography`` package's Ed25519 (RFC 8032); nothing here invents
cryptography.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker_bridge._envelope import Kind, Message
from broker_bridge._errors import WireError

CONTEXT = b"fleetlearn/update-signature/1"
"""The first field of every statement: a signature over it means nothing elsewhere."""
MAGIC = b"FLSG"
SCHEME_ED25519 = 1
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PREFIX_BYTES = len(MAGIC) + 1 + PUBLIC_KEY_BYTES + SIGNATURE_BYTES
KEY_PREFIX = "ed25519:"
"""The text form of a public key: ``ed25519:`` then 64 lowercase hex digits."""

_FIXED = struct.Struct("<IIH")

Signer = Callable[[bytes], bytes]
"""Signs a statement with a device's private key: 64 bytes of Ed25519 signature."""


class SignatureError(WireError):
    """A signed update whose signature block is malformed, or a statement whose fields
    cannot be encoded (an id or codec too long)."""


def _field(value: str, what: str, *, low: int, high: int) -> bytes:
    raw = value.encode("utf-8")
    if not low <= len(raw) <= high:
        raise SignatureError(f"{what} is {len(raw)} bytes; a statement takes {low}-{high}")
    return bytes([len(raw)]) + raw


def statement(*, fleet: str, device: str, round: int, model_version: int, attempt: int,
              codec: str, body_sha256: bytes) -> bytes:
    """The canonical bytes a device signs for one update (see the module doc)."""
    if len(body_sha256) != 32:
        raise SignatureError(f"body_sha256 must be 32 bytes, got {len(body_sha256)}")
    try:
        fixed = _FIXED.pack(round, model_version, attempt)
    except struct.error as exc:
        raise SignatureError(f"round, model_version or attempt out of range: {exc}") from exc
    return b"".join((
        _field(CONTEXT.decode(), "context", low=1, high=255),
        _field(fleet, "fleet id", low=1, high=64),
        _field(device, "device id", low=1, high=64),
        fixed,
        _field(codec, "codec spec", low=1, high=255),
        body_sha256,
    ))


def message_statement(message: Message, body_sha256: bytes) -> bytes:
    """The statement for an update message whose (unsigned) body hashes to ``body_sha256``."""
    return statement(fleet=message.fleet, device=message.device, round=message.round,
                     model_version=message.model_version, attempt=message.attempt,
                     codec=message.codec, body_sha256=body_sha256)


@dataclass(frozen=True)
class SignedBody:
    """A signed update body, split: who signed (``public_key``), the ``signature`` and
    the update body it covers (``body``: ``u32 meta_len | meta | codec body``)."""

    public_key: bytes
    signature: bytes
    body: bytes | memoryview
    """The update body (``from_bytes(..., copy=False)``: a view of the signed body)."""

    @property
    def body_sha256(self) -> bytes:
        return hashlib.sha256(self.body).digest()

    def to_bytes(self) -> bytes:
        return b"".join((MAGIC, bytes([SCHEME_ED25519]), self.public_key, self.signature,
                         self.body))

    @classmethod
    def from_bytes(cls, data: bytes, *, copy: bool = True) -> SignedBody | None:
        """The parts of a signed body; None for an unsigned one (no ``FLSG`` prefix);
        ``SignatureError`` for a prefix that is cut short or names another scheme.
        ``copy=False``: ``body`` is a view of ``data`` (a dense update is megabytes)."""
        if not is_signed(data):
            return None
        if len(data) < PREFIX_BYTES:
            raise SignatureError(f"signed body of {len(data)} bytes is shorter than its "
                                 f"{PREFIX_BYTES}-byte signature block")
        if data[4] != SCHEME_ED25519:
            raise SignatureError(f"unknown signature scheme {data[4]} (1 is Ed25519)")
        key_end = 5 + PUBLIC_KEY_BYTES
        return cls(public_key=bytes(data[5:key_end]),
                   signature=bytes(data[key_end:PREFIX_BYTES]),
                   body=bytes(data[PREFIX_BYTES:]) if copy else memoryview(data)[PREFIX_BYTES:])


def is_signed(body: bytes) -> bool:
    """Does ``body`` start with the signature block's magic?"""
    return body[:len(MAGIC)] == MAGIC


def update_body(body: bytes) -> bytes:
    """The update body inside ``body`` (its signature block removed, if it has one)."""
    return bytes(update_body_view(body))


def update_body_view(body: bytes) -> memoryview:
    """``update_body`` as a view of ``body``, not a copy."""
    signed = SignedBody.from_bytes(body, copy=False)
    return memoryview(body) if signed is None else memoryview(signed.body)


def sign_update(message: Message, *, public_key: bytes, sign: Signer) -> Message:
    """``message`` (an unsigned update) with its body signed by ``sign``."""
    if message.kind != Kind.UPDATE:
        raise SignatureError(f"only updates are signed, not {message.kind.topic_name}")
    if is_signed(message.body):
        raise SignatureError("the update is signed already")
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise SignatureError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    digest = hashlib.sha256(message.body).digest()
    signature = sign(message_statement(message, digest))
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"an Ed25519 signature is 64 bytes, got {len(signature)}")
    signed = SignedBody(public_key=public_key, signature=signature, body=message.body)
    return dataclasses.replace(message, body=signed.to_bytes())


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Does ``signature`` verify over ``data`` under the Ed25519 ``public_key``?
    (A key that is not a valid curve point verifies nothing.)"""
    try:
        _public_key(bytes(public_key)).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=16384)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    """The key object of ``raw`` (decoding a point costs a fifth of a verification; a
    fleet's devices sign with the same keys all day). ValueError: not a valid key (not
    cached: ``lru_cache`` keeps only results)."""
    return Ed25519PublicKey.from_public_bytes(raw)


def key_text(public_key: bytes) -> str:
    """``ed25519:<64 hex>``: how a public key is written in files and printed."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise SignatureError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    return KEY_PREFIX + public_key.hex()


def parse_key_text(text: str) -> bytes:
    """The 32 bytes of ``ed25519:<64 hex>`` (the prefix may be left out); ValueError
    when it is not that, or not a valid Ed25519 public key."""
    value = text.strip()
    if value.startswith(KEY_PREFIX):
        value = value[len(KEY_PREFIX):]
    elif ":" in value:
        raise ValueError(f"unknown key type {value.split(':', 1)[0]!r} (only ed25519)")
    if len(value) != 2 * PUBLIC_KEY_BYTES or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("an Ed25519 public key is 'ed25519:' and 64 lowercase hex digits")
    raw = bytes.fromhex(value)
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"not an Ed25519 public key: {exc}") from exc
    return raw
