"""Protocol payloads and artifact bundles: round trips, typed errors, fuzzing."""

from __future__ import annotations

import contextlib
import io
import json
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_bridge import (
    Ack,
    BundleError,
    Hello,
    Kind,
    Message,
    ProtocolError,
    TaskSpec,
    UpdateMeta,
    WireError,
    content_hash,
    pack_bundle,
    pack_update_body,
    unpack_bundle,
    unpack_update_body,
)

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=6),
    max_leaves=20,
)


_TASK = {"round": 4, "model_version": 3, "artifacts_hash": "a" * 64, "model_hash": "c" * 64,
         "nonce": "0123456789abcdef"}


def test_task_round_trip_and_field_checks() -> None:
    task = TaskSpec(**{**_TASK, "codec": "q8", "max_steps": 7, "num_classes": 10})  # type: ignore[arg-type]
    assert TaskSpec.from_message(task.to_message(fleet="f", device="d", round=4)) == task
    with pytest.raises(ProtocolError, match="round"):
        TaskSpec.from_dict({**_TASK, "round": "4"})
    with pytest.raises(ProtocolError, match="required field"):
        TaskSpec.from_dict({"round": 4})
    with pytest.raises(ProtocolError, match="lr"):
        TaskSpec.from_dict({**_TASK, "lr": -1})
    with pytest.raises(ProtocolError, match="bool"):
        TaskSpec.from_dict({**_TASK, "round": True})
    with pytest.raises(ProtocolError, match="expected a task"):
        TaskSpec.from_message(Ack(round=1).to_message(fleet="f", device="d"))
    # protocol 2: a task without a nonce or a model hash (protocol 1) is refused, typed
    for missing in ("nonce", "model_hash"):
        with pytest.raises(ProtocolError, match=f"required field '{missing}'"):
            TaskSpec.from_dict({k: v for k, v in _TASK.items() if k != missing})
    with pytest.raises(ProtocolError, match="model_hash"):
        TaskSpec.from_dict({**_TASK, "model_hash": "5"})


def test_numbers_in_control_messages_are_bounded() -> None:
    # 10,000 digits: refused before Python converts them (no ValueError, no slow parse)
    hello = Message(kind=Kind.HELLO, fleet="f", device="d", codec="json",
                    body=b'{"num_samples": ' + b"9" * 10_000 + b"}")
    with pytest.raises(WireError, match="integer"):
        Hello.from_message(hello)
    # within JSON's digits, above what every JSON reader holds exactly
    with pytest.raises(ProtocolError, match="out of range"):
        Hello.from_dict({"num_samples": 2**60})
    for literal in (b"NaN", b"Infinity", b"1e999"):
        msg = Message(kind=Kind.TASK, fleet="f", device="d", codec="json",
                      body=b'{"lr": ' + literal + b"}")
        with pytest.raises(WireError):
            msg.json()


def test_deeply_nested_json_is_a_typed_error() -> None:
    within_limit = b"[" * 30_000 + b"]" * 30_000  # JSON bodies are at most 64 KiB
    hello = Message(kind=Kind.HELLO, fleet="f", device="d", codec="json",
                    body=b'{"profile": ' + within_limit + b"}")
    with pytest.raises(WireError, match="nested too deeply"):
        Hello.from_message(hello)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        unpack_update_body(_raw_bytes(b'{"x": ' + within_limit + b"}"))


def _raw_bytes(raw: bytes) -> bytes:
    return len(raw).to_bytes(4, "little") + raw


def test_update_body_round_trip_and_bounds() -> None:
    meta = UpdateMeta(num_samples=80, steps=3, nonce="n" * 16, train_loss=1.5, duration_s=0.2)
    got, body = unpack_update_body(pack_update_body(meta, b"codec-bytes"))
    assert got == meta and body == b"codec-bytes"
    with pytest.raises(ProtocolError, match="too short"):
        unpack_update_body(b"\x01")
    with pytest.raises(ProtocolError, match="out of bounds"):
        unpack_update_body(b"\xff\xff\xff\x7f" + b"{}")
    with pytest.raises(ProtocolError, match="malformed json"):
        unpack_update_body(b"\x02\x00\x00\x00{x")
    with pytest.raises(ProtocolError, match=">= 0"):
        unpack_update_body(_raw_meta({"num_samples": -1, "steps": 0, "train_loss": 0.0,
                                      "duration_s": 0.0, "nonce": "n" * 16}))
    with pytest.raises(ProtocolError, match="required field 'nonce'"):
        unpack_update_body(_raw_meta({"num_samples": 1, "steps": 0, "train_loss": 0.0,
                                      "duration_s": 0.0}))


def _raw_meta(obj: object) -> bytes:
    raw = json.dumps(obj).encode()
    return len(raw).to_bytes(4, "little") + raw


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_payload_parsers_only_raise_protocol_errors(data: object) -> None:
    for cls in (TaskSpec, Hello, UpdateMeta, Ack):
        with contextlib.suppress(ProtocolError):
            cls.from_dict(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_update_body_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        unpack_update_body(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_bundle_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(BundleError):
        unpack_bundle(data)


def test_bundle_round_trip_and_hostile_archives() -> None:
    files = {"training_model.onnx": b"a" * 1000, "checkpoint": b"b" * 10}
    assert unpack_bundle(pack_bundle(files)) == files
    assert len(content_hash({"x": "1", "y": "2"})) == 64
    # a path in an entry name
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../etc/passwd", b"x")
    with pytest.raises(BundleError, match="flat name"):
        unpack_bundle(buf.getvalue())
    # a bomb: declares more than the limit allows, refused before decompression
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("checkpoint", b"\0" * (4 * 1024 * 1024))
    with pytest.raises(BundleError, match="declares"):
        unpack_bundle(buf.getvalue(), max_total_bytes=1024 * 1024)
    # truncated archive
    with pytest.raises(BundleError):
        unpack_bundle(pack_bundle(files)[:-30])
    assert issubclass(BundleError, WireError)


def test_message_json_helpers_reject_non_json() -> None:
    msg = Message(kind=Kind.HELLO, fleet="f", device="d", codec="raw", body=b"{}")
    with pytest.raises(WireError, match="not json"):
        Hello.from_message(msg)
