"""Signed updates on the wire: the statement's bytes, the signature block, keys as text."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker_bridge import (
    Kind,
    Message,
    ProtocolError,
    SignatureError,
    SignedBody,
    UpdateMeta,
    is_signed,
    key_text,
    message_statement,
    parse_key_text,
    sign_update,
    statement,
    unpack_update_body,
    update_body,
    update_message,
    verify_signature,
)
from broker_bridge._protocol import MAX_META_BYTES
from broker_bridge._signing import PREFIX_BYTES

DIGEST = hashlib.sha256(b"body").digest()
BASE = dict(fleet="demo", device="pi-01", round=7, model_version=6, attempt=1,
            codec="topk:0.25+q8", body_sha256=DIGEST)


def keypair(seed: int = 1) -> tuple[Ed25519PrivateKey, bytes]:
    key = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def an_update(**change: object) -> Message:
    meta = UpdateMeta(num_samples=10, steps=1, nonce="n" * 16, train_loss=1.0, duration_s=0.1)
    fields: dict[str, object] = dict(fleet="demo", device="pi-01", round=7, model_version=6,
                                     attempt=1, codec="fp32", meta=meta,
                                     codec_body=b"\x01\x02\x03")
    fields.update(change)
    return update_message(**fields)  # type: ignore[arg-type]


def test_the_statement_layout_is_length_prefixed_fields_then_the_body_hash() -> None:
    got = statement(**BASE)  # type: ignore[arg-type]
    ctx = b"fleetlearn/update-signature/1"
    expected = (bytes([len(ctx)]) + ctx + b"\x04demo" + b"\x05pi-01"
                + struct.pack("<IIH", 7, 6, 1) + b"\x0ctopk:0.25+q8" + DIGEST)
    assert got == expected
    assert len(got) == 1 + 29 + 1 + 4 + 1 + 5 + 10 + 1 + 12 + 32


def test_every_field_changes_the_statement_and_no_two_tuples_collide() -> None:
    """Length prefixes: moving a character from one string field to the next changes the
    bytes (a plain concatenation would not)."""
    seen = {statement(**BASE)}  # type: ignore[arg-type]
    for name, value in [("fleet", "demo2"), ("device", "pi-02"), ("round", 8),
                        ("model_version", 7), ("attempt", 2), ("codec", "fp32"),
                        ("body_sha256", hashlib.sha256(b"other").digest())]:
        seen.add(statement(**{**BASE, name: value}))  # type: ignore[arg-type]
    assert len(seen) == 8
    shifted = [statement(**{**BASE, "fleet": f, "device": d})  # type: ignore[arg-type]
               for f, d in (("ab", "c1"), ("a", "bc1"), ("abc", "1"))]
    assert len(set(shifted)) == 3


@pytest.mark.parametrize("change, match", [
    ({"fleet": ""}, "fleet id"), ({"device": "x" * 65}, "device id"),
    ({"codec": "c" * 256}, "codec spec"), ({"round": 2**32}, "out of range"),
    ({"attempt": -1}, "out of range"), ({"body_sha256": b"short"}, "32 bytes"),
])
def test_a_statement_of_impossible_fields_is_refused(change: dict[str, object],
                                                     match: str) -> None:
    with pytest.raises(SignatureError, match=match):
        statement(**{**BASE, **change})  # type: ignore[arg-type]


def test_sign_then_verify_and_every_tampering_fails() -> None:
    key, public = keypair()
    message = an_update()
    signed = sign_update(message, public_key=public, sign=key.sign)
    assert is_signed(signed.body) and not is_signed(message.body)
    assert len(signed.body) == len(message.body) + PREFIX_BYTES
    block = SignedBody.from_bytes(signed.body)
    assert block is not None and block.public_key == public and block.body == message.body
    assert verify_signature(public, block.signature,
                            message_statement(signed, block.body_sha256))
    # the same signature over any other envelope or body does not verify
    for change in ({"round": 8}, {"attempt": 2}, {"model_version": 7}, {"device": "pi-02"},
                   {"fleet": "other"}, {"codec": "fp16"}):
        moved = dataclasses.replace(signed, **change)  # type: ignore[arg-type]
        assert not verify_signature(public, block.signature,
                                    message_statement(moved, block.body_sha256)), change
    altered = hashlib.sha256(block.body[:-1] + b"\x09").digest()
    assert not verify_signature(public, block.signature, message_statement(signed, altered))
    _, other = keypair(2)
    assert not verify_signature(other, block.signature,
                                message_statement(signed, block.body_sha256))
    assert not verify_signature(b"\x00" * 32, block.signature, b"x")  # not even a key


def test_signing_is_deterministic_so_a_resend_is_the_same_bytes() -> None:
    key, public = keypair()
    one = sign_update(an_update(), public_key=public, sign=key.sign)
    two = sign_update(an_update(), public_key=public, sign=key.sign)
    assert one.body == two.body


def test_only_unsigned_updates_are_signed() -> None:
    key, public = keypair()
    signed = sign_update(an_update(), public_key=public, sign=key.sign)
    with pytest.raises(SignatureError, match="signed already"):
        sign_update(signed, public_key=public, sign=key.sign)
    with pytest.raises(SignatureError, match="only updates"):
        sign_update(Message(kind=Kind.HELLO, fleet="demo", device="pi-01", body=b"{}"),
                    public_key=public, sign=key.sign)
    with pytest.raises(SignatureError, match="32 bytes"):
        sign_update(an_update(), public_key=public[:31], sign=key.sign)
    with pytest.raises(SignatureError, match="64 bytes"):
        sign_update(an_update(), public_key=public, sign=lambda _d: b"short")


def test_a_malformed_block_is_a_typed_error_and_unsigned_bodies_pass_through() -> None:
    key, public = keypair()
    signed = sign_update(an_update(), public_key=public, sign=key.sign).body
    for cut in (4, 5, 37, 100):
        with pytest.raises(SignatureError, match="shorter"):
            SignedBody.from_bytes(signed[:cut])
    with pytest.raises(SignatureError, match="scheme 7"):
        SignedBody.from_bytes(signed[:4] + b"\x07" + signed[5:])
    plain = an_update().body
    assert SignedBody.from_bytes(plain) is None and update_body(plain) == plain
    assert update_body(signed) == plain
    with pytest.raises(ProtocolError, match="shorter"):  # what an update parser sees
        unpack_update_body(signed[:50])


def test_the_block_is_never_read_as_an_unsigned_bodys_meta_length() -> None:
    """An aggregator that predates signatures refuses a signed body (bad_body)."""
    assert struct.unpack("<I", b"FLSG")[0] > MAX_META_BYTES
    key, public = keypair()
    signed = sign_update(an_update(), public_key=public, sign=key.sign).body
    meta, codec_body = unpack_update_body(signed)  # this one skips the block
    assert meta.nonce == "n" * 16 and codec_body == b"\x01\x02\x03"


def test_public_keys_as_text() -> None:
    _, public = keypair()
    text = key_text(public)
    assert text == "ed25519:" + public.hex()
    assert parse_key_text(text) == public == parse_key_text(public.hex())
    for bad in ("rsa:" + public.hex(), "ed25519:" + public.hex()[:-2],
                "ed25519:" + public.hex().upper(), "ed25519:zz" + public.hex()[2:], ""):
        with pytest.raises(ValueError):
            parse_key_text(bad)
    with pytest.raises(SignatureError):
        key_text(public + b"\x00")


@pytest.mark.parametrize("cut", list(itertools.chain(range(0, 8), range(95, 110))))
def test_every_truncation_of_a_signed_body_is_refused_or_parses(cut: int) -> None:
    key, public = keypair()
    signed = sign_update(an_update(), public_key=public, sign=key.sign).body
    try:
        block = SignedBody.from_bytes(signed[:cut])
    except SignatureError:
        return
    assert block is None or block.body == signed[PREFIX_BYTES:cut]
