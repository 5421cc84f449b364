"""The application protocol between device agents and the aggregator.

Each control message is a ``Message`` whose body is JSON (``codec="json"``); this
module gives each one a typed, frozen dataclass that checks what it parses, so a
malformed message becomes a ``ProtocolError`` (a ``WireError``) at the edge and
never reaches domain code. ``docs/PROTOCOL.md`` is the language-neutral description.

Updates carry a binary body: ``u32 meta_len | meta JSON (UpdateMeta) | codec body``;
models the same with ``ModelMeta`` (``_model_msg.py``). Artifact bundles are zip
archives checked against their manifest (``_bundle.py``).

Version 2 binds each update to the task that asked for it (``TaskSpec.nonce``, echoed
in ``UpdateMeta.nonce``) and names the global model by content
(``TaskSpec.model_hash``) rather than by its number alone.
"""

from __future__ import annotations

import json
import struct
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from broker_bridge._envelope import Kind, Message, parse_json
from broker_bridge._errors import WireError
from broker_bridge._payload import (
    ASCII,
    SHA256_HEX,
    U16,
    U32,
    ProtocolError,
    T,
    _Payload,
    rule,
)
from broker_bridge._signing import SignatureError, update_body_view

PROTOCOL_VERSION = 2
MAX_META_BYTES = 64 * 1024
B = TypeVar("B", bytes, memoryview)


def schema_id(name: str) -> str:
    """The ``$id`` of a protocol JSON Schema (docs/schemas/<name>.schema.json)."""
    return f"urn:fleetlearn:protocol:{PROTOCOL_VERSION}:{name}"


_ROUND = {"minimum": 0, "maximum": U32}
UPDATE_ACK_STATUSES = ("accepted", "duplicate", "rejected")
TASK_ACK_STATUSES = ("accepted", "declined")


@dataclass(frozen=True, kw_only=True)
class Presence(_Payload):
    """Device -> all, retained, on ``presence``: there or not (the will says offline).
    Other fields may follow and are ignored."""

    KIND: typing.ClassVar[Kind] = Kind.PRESENCE
    status: str = rule(enum=["online", "offline"])


@dataclass(frozen=True, kw_only=True)
class Eligibility(_Payload):
    """What the device can do right now, and why not when it cannot (in a hello)."""

    KIND: typing.ClassVar[Kind] = Kind.HELLO
    eligible: bool = rule(True, description="whether the device takes tasks now")
    reasons: list[str] = rule(factory=list, description="why not, for people")
    free_memory_mb: float | None = rule(None, minimum=0)
    battery_percent: float | None = rule(None, minimum=0, maximum=100)
    charging: bool | None = None
    metered: bool | None = None
    idle: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Hello(_Payload):
    """Device -> aggregator on ``up/hello`` after each connect, on a roll call and when
    its eligibility changes."""

    KIND: typing.ClassVar[Kind] = Kind.HELLO
    protocol: int = rule(PROTOCOL_VERSION, minimum=1, maximum=U16,
                         description="protocol version the device speaks")
    agent: str = rule("", description="agent name and version, for people")
    profile: dict[str, Any] = rule(
        factory=dict, description="the device profile (device_profile.schema.json), or {} "
        "when unknown; a profile that is not valid is ignored, not the hello")
    eligibility: dict[str, Any] = rule(
        factory=dict, description="an Eligibility object; one that is not valid makes the "
        "device ineligible")
    num_samples: int = rule(0, minimum=0, description="local training samples")
    artifacts_hash: str | None = rule(None, pattern=SHA256_HEX,
                                      description="content hash of artifacts it holds")
    model_versions: list[int] = rule(factory=list, items=_ROUND,
                                     description="global model versions it holds")
    busy_round: int | None = rule(None, **_ROUND, description="the round (or async task) "
                                  "it is working on, if any")

    SCHEMA_EXTRA: typing.ClassVar[dict[str, Any]] = {"properties": {
        "profile": {"anyOf": [{"type": "object", "maxProperties": 0},
                              {"$ref": schema_id("device_profile")}]},
        "eligibility": {"$ref": schema_id("eligibility")},
    }}
    """What the profile and eligibility must be. The aggregator checks them apart from the
    hello: a profile that is not valid is ignored (the cost model guesses), an eligibility
    that is not valid makes the device ineligible; the hello still counts."""

    def eligibility_info(self) -> Eligibility:
        return Eligibility.from_dict(self.eligibility)


@dataclass(frozen=True, kw_only=True)
class TaskSpec(_Payload):
    """Aggregator -> device on ``down/task``: train from ``model_version`` and report."""

    KIND: typing.ClassVar[Kind] = Kind.TASK
    round: int = rule(**_ROUND, description="round (or async task) number; the envelope's")
    model_version: int = rule(**_ROUND, description="the envelope's model_version")
    artifacts_hash: str = rule(pattern=SHA256_HEX,
                               description="content_hash of the training artifacts")
    model_hash: str = rule(pattern=SHA256_HEX, description=(
        "sha256 of the global weights to train from (little-endian float32): the model is "
        "found by this, never by model_version alone"))
    """sha256 (hex) of the global weights to train from, as float32 little-endian: the
    model is found by this, never by ``model_version`` alone (see ``ModelMeta``)."""
    nonce: str = rule(minLength=8, maxLength=64, pattern=f"^[{ASCII}]*$", description=(
        "random per task, the same when the task is sent again; the update echoes it"))
    """Random per task; the update echoes it (``UpdateMeta.nonce``) so a copy of an
    update made for another task is refused."""
    run: str = rule("", maxLength=64, pattern=f"^[{ASCII}]*$",
                    description="the aggregator's run id (informative)")
    """The aggregator's run id (informative: the hash names the model)."""
    codec: str = rule("fp32", minLength=1, maxLength=255, pattern=f"^[{ASCII}]*$",
                      description="uplink codec spec; a device that cannot encode it "
                      "declines the task")
    epochs: int = rule(1, minimum=1)
    batch_size: int = rule(32, minimum=1)
    lr: float = rule(0.05, exclusiveMinimum=0)
    max_steps: int | None = rule(None, minimum=1,
                                 description="at most this many optimizer steps")
    deadline_s: float = rule(600.0, exclusiveMinimum=0,
                             description="wall-clock budget from receipt")
    seed: int = rule(0, minimum=0, description="seeds shuffling and stochastic rounding")
    evaluate: bool = rule(False, description="also evaluate on local held-out data")
    num_classes: int | None = rule(None, minimum=1, description=(
        "classification models: labels must lie in [0, num_classes)"))
    """Classification models: labels must lie in [0, num_classes)."""


@dataclass(frozen=True, kw_only=True)
class UpdateMeta(_Payload):
    """What a device says about its update (JSON prefix of the update body)."""

    KIND: typing.ClassVar[Kind] = Kind.UPDATE
    num_samples: int = rule(minimum=0, description="samples trained on (the weight)")
    steps: int = rule(minimum=0, description="optimizer steps taken")
    nonce: str = rule(description="the nonce of the task this update answers")
    """The ``nonce`` of the task this update answers."""
    train_loss: float = rule(description="mean training loss")
    duration_s: float = rule(minimum=0, description="wall seconds the task took")
    emulated_s: float | None = rule(None, minimum=0, description=(
        "simulated fleets: seconds the device's profile implies"))
    stopped_early: bool = rule(False, description="stopped at the deadline")
    eval_loss: float | None = None
    eval_accuracy: float | None = rule(None, minimum=0, maximum=1)
    eval_samples: int = rule(0, minimum=0)


@dataclass(frozen=True, kw_only=True)
class Ack(_Payload):
    """Either side acknowledges: the aggregator an update, the device a task."""

    KIND: typing.ClassVar[Kind] = Kind.ACK
    round: int = rule(**_ROUND)
    attempt: int = rule(0, minimum=0, maximum=U16,
                        description="the acknowledged update's (or task's) attempt")
    what: str = rule("update", enum=["update", "task"])
    status: str = rule("accepted", enum=["accepted", "duplicate", "rejected", "declined"],
                       description="update: accepted, duplicate or rejected; task: "
                       "accepted or declined")
    reason: str = rule("", description=(
        "update acks: \"\", \"<code>\" or \"<code>: <detail>\" (docs/PROTOCOL.md "
        "section 5.1); task acks: why it was declined"))

    SCHEMA_EXTRA: typing.ClassVar[dict[str, Any]] = {
        "if": {"properties": {"what": {"const": "task"}}, "required": ["what"]},
        "then": {"properties": {"status": {"enum": list(TASK_ACK_STATUSES)}}},
        "else": {"properties": {"status": {"enum": list(UPDATE_ACK_STATUSES)}}},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = TASK_ACK_STATUSES if self.what == "task" else UPDATE_ACK_STATUSES
        if self.status not in allowed:
            raise ValueError(f"a {self.what} ack is {' or '.join(allowed)}, not {self.status}")


@dataclass(frozen=True, kw_only=True)
class Cancel(_Payload):
    """Aggregator -> device: stop working on ``round`` (it closed or was abandoned)."""

    KIND: typing.ClassVar[Kind] = Kind.CANCEL
    round: int = rule(**_ROUND)
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ErrorReport(_Payload):
    """Device -> aggregator on ``up/error``: a typed failure the device could not fix."""

    KIND: typing.ClassVar[Kind] = Kind.ERROR
    round: int | None = rule(None, **_ROUND)
    code: str = rule("error", description=(
        "artifact, data, disk_full, model_version, backend or internal; after artifact, "
        "data or backend the device is not selected until its next hello"))
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Request(_Payload):
    """Device -> aggregator on ``up/request``: send me artifacts or a model version.
    Aggregator -> fleet on ``broadcast/control``: ``want="hello"``, the roll call (every
    device connected answers with its presence and a hello). Aggregator -> device on
    ``down/control``: ``want="move"``, this parent is at capacity (a device that knows
    other parents moves to one; others wait)."""

    KIND: typing.ClassVar[Kind] = Kind.CONTROL
    want: str = rule(enum=["artifacts", "model", "hello", "move"], description=(
        "artifacts or model (from a device); hello (the roll call); move (to one device: "
        "this parent is at capacity)"))
    artifacts_hash: str | None = rule(None, pattern=SHA256_HEX)
    model_version: int | None = rule(None, **_ROUND)
    model_hash: str | None = rule(None, pattern=SHA256_HEX)
    have_versions: list[int] = rule(factory=list, items=_ROUND)


_HEX = frozenset("0123456789abcdef")


def is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


_META = struct.Struct("<I")


def pack_prefixed(meta: _Payload, codec_body: bytes) -> bytes:
    """``u32 meta_len | meta JSON | codec body`` (update and model bodies)."""
    raw = json.dumps(meta.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    return _META.pack(len(raw)) + raw + codec_body


def unpack_prefixed(body: B, cls: type[T]) -> tuple[T, B]:
    """Split a ``pack_prefixed`` body; ProtocolError when the prefix is malformed. The
    rest is a slice of ``body`` (a view when ``body`` is one: no copy of a large body)."""
    what = cls.KIND.topic_name
    if len(body) < _META.size:
        raise ProtocolError(f"{what} body too short for its metadata length")
    (n,) = _META.unpack_from(body, 0)
    if n > MAX_META_BYTES or _META.size + n > len(body):
        raise ProtocolError(f"{what} metadata length {n} is out of bounds")
    try:
        meta_obj = parse_json(bytes(body[_META.size:_META.size + n]), what=f"{what} metadata",
                              max_bytes=MAX_META_BYTES)
    except WireError as exc:
        raise ProtocolError(str(exc)) from exc
    return cls.from_dict(meta_obj), body[_META.size + n:]


def pack_update_body(meta: UpdateMeta, codec_body: bytes) -> bytes:
    return pack_prefixed(meta, codec_body)


def unpack_update_body(body: bytes) -> tuple[UpdateMeta, bytes]:
    """Split an update body (signed or not: a signature block is skipped, not checked;
    ``_signing``); ProtocolError when the prefix (or the signature block) is malformed."""
    meta, codec_body = unpack_update_view(body)
    return meta, bytes(codec_body)


def unpack_update_view(body: bytes) -> tuple[UpdateMeta, memoryview]:
    """``unpack_update_body`` with the codec body a view of ``body``, not a copy (the
    aggregator's ingest: a dense update is megabytes)."""
    try:
        inner = update_body_view(body)
    except SignatureError as exc:
        raise ProtocolError(str(exc)) from exc
    return unpack_prefixed(inner, UpdateMeta)


def update_message(
    *, fleet: str, device: str, round: int, model_version: int, attempt: int, codec: str,
    meta: UpdateMeta, codec_body: bytes,
) -> Message:
    return Message(kind=Kind.UPDATE, fleet=fleet, device=device, round=round,
                   model_version=model_version, attempt=attempt, codec=codec,
                   body=pack_update_body(meta, codec_body))
