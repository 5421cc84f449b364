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

import dataclasses
import functools
import json
import math
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from broker_bridge._envelope import Kind, Message, json_message, parse_json
from broker_bridge._errors import WireError

PROTOCOL_VERSION = 2
MAX_META_BYTES = 64 * 1024
MAX_SAFE_INT = 2**53 - 1
"""Integers in control messages stay within what every JSON implementation reads
exactly (a double's integer range)."""


class ProtocolError(WireError):
    """A well-formed envelope whose body does not follow the protocol."""


T = TypeVar("T", bound="_Payload")

_SCALARS: dict[type, tuple[type, ...]] = {
    int: (int,), float: (int, float), str: (str,), bool: (bool,),
}


def _check_value(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(name, value, inner[0])
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ProtocolError(f"field {name!r} must be a list")
        (item,) = typing.get_args(tp)[:1]
        checked = [_check_value(f"{name}[]", v, item) for v in value]
        return tuple(checked) if origin is tuple else checked
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"field {name!r} must be an object")
        return value
    if tp in _SCALARS:
        if isinstance(value, bool) and tp is not bool:
            raise ProtocolError(f"field {name!r} must be {tp.__name__}, not bool")
        if not isinstance(value, _SCALARS[tp]):
            raise ProtocolError(f"field {name!r} must be {tp.__name__}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SAFE_INT:
            raise ProtocolError(f"field {name!r} is out of range (|value| > 2^53 - 1)")
        if tp is float:
            as_float = float(typing.cast(float, value))
            if not math.isfinite(as_float):
                raise ProtocolError(f"field {name!r} must be a finite number")
            return as_float
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported protocol field type {tp!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, _Payload):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], tuple[dataclasses.Field[Any], ...]]:
    """A payload class's resolved field types and fields (resolving them is slow: once)."""
    return typing.get_type_hints(cls), dataclasses.fields(cls)


class _Payload:
    """JSON (de)serialisation with type checks, for frozen dataclasses."""

    KIND: typing.ClassVar[Kind]

    def to_dict(self) -> dict[str, Any]:
        """The payload as plain JSON values (``dataclasses.asdict`` without its deep
        copies: a task is written for every device, every round)."""
        fields = _schema(type(self))[1]  # type: ignore[arg-type]
        return {f.name: _plain(getattr(self, f.name)) for f in fields}

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        if not isinstance(data, dict):
            raise ProtocolError(f"{cls.__name__} body must be a JSON object")
        hints, fields = _schema(cls)  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for f in fields:
            if f.name in data:
                kwargs[f.name] = _check_value(f.name, data[f.name], hints[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.__name__} lacks required field {f.name!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"invalid {cls.__name__}: {exc}") from exc

    @classmethod
    def from_message(cls: type[T], message: Message) -> T:
        if message.kind != cls.KIND:
            raise ProtocolError(
                f"expected a {cls.KIND.topic_name} message, got {message.kind.topic_name}"
            )
        return cls.from_dict(message.json())

    def to_message(self, *, fleet: str, device: str = "", **fields: Any) -> Message:
        return json_message(self.KIND, fleet=fleet, device=device, payload=self.to_dict(),
                            **fields)


@dataclass(frozen=True, kw_only=True)
class Eligibility(_Payload):
    """What the device can do right now, and why not when it cannot."""

    KIND: typing.ClassVar[Kind] = Kind.HELLO
    eligible: bool = True
    reasons: list[str] = field(default_factory=list)
    free_memory_mb: float | None = None
    battery_percent: float | None = None
    charging: bool | None = None
    metered: bool | None = None
    idle: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Hello(_Payload):
    """Device -> aggregator on ``up/hello`` after each connect and on changes."""

    KIND: typing.ClassVar[Kind] = Kind.HELLO
    protocol: int = PROTOCOL_VERSION
    agent: str = ""
    profile: dict[str, Any] = field(default_factory=dict)
    eligibility: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 0
    artifacts_hash: str | None = None
    model_versions: list[int] = field(default_factory=list)
    busy_round: int | None = None  # the round the device is working on, if any

    def eligibility_info(self) -> Eligibility:
        return Eligibility.from_dict(self.eligibility)


@dataclass(frozen=True, kw_only=True)
class TaskSpec(_Payload):
    """Aggregator -> device on ``down/task``: train from ``model_version`` and report."""

    KIND: typing.ClassVar[Kind] = Kind.TASK
    round: int
    model_version: int
    artifacts_hash: str
    model_hash: str
    """sha256 (hex) of the global weights to train from, as float32 little-endian: the
    model is found by this, never by ``model_version`` alone (see ``ModelMeta``)."""
    nonce: str
    """Random per task; the update echoes it (``UpdateMeta.nonce``) so a copy of an
    update made for another task is refused."""
    run: str = ""
    """The aggregator's run id (informative: the hash names the model)."""
    codec: str = "fp32"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    max_steps: int | None = None
    deadline_s: float = 600.0
    seed: int = 0
    evaluate: bool = False
    num_classes: int | None = None
    """Classification models: labels must lie in [0, num_classes)."""

    def __post_init__(self) -> None:
        if self.round < 0 or self.model_version < 0:
            raise ValueError("round and model_version must be >= 0")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or not self.deadline_s > 0:
            raise ValueError("epochs, batch_size, lr and deadline_s must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if not is_sha256_hex(self.model_hash):
            raise ValueError("model_hash must be a sha256 hex digest")
        if not 8 <= len(self.nonce) <= 64 or not self.nonce.isascii():
            raise ValueError("nonce must be 8 to 64 ASCII characters")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")


@dataclass(frozen=True, kw_only=True)
class UpdateMeta(_Payload):
    """What a device says about its update (JSON prefix of the update body)."""

    KIND: typing.ClassVar[Kind] = Kind.UPDATE
    num_samples: int
    steps: int
    nonce: str
    """The ``nonce`` of the task this update answers."""
    train_loss: float
    duration_s: float
    emulated_s: float | None = None  # simulated fleets: time the device's profile implies
    stopped_early: bool = False
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_samples: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.steps < 0 or self.duration_s < 0:
            raise ValueError("counts and durations must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Ack(_Payload):
    """Either side acknowledges: the aggregator an update, the device a task."""

    KIND: typing.ClassVar[Kind] = Kind.ACK
    round: int
    attempt: int = 0
    what: str = "update"  # "update" | "task"
    status: str = "accepted"  # accepted | duplicate | rejected | declined
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Cancel(_Payload):
    """Aggregator -> device: stop working on ``round`` (it closed or was abandoned)."""

    KIND: typing.ClassVar[Kind] = Kind.CANCEL
    round: int
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ErrorReport(_Payload):
    """Device -> aggregator on ``up/error``: a typed failure the device could not fix."""

    KIND: typing.ClassVar[Kind] = Kind.ERROR
    round: int | None = None
    code: str = "error"  # artifact | data | disk_full | model_version | backend | internal
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class Request(_Payload):
    """Device -> aggregator on ``up/request``: send me artifacts or a model version.
    Aggregator -> fleet on ``broadcast/control``: ``want="hello"``, the roll call (every
    device connected answers with its presence and a hello)."""

    KIND: typing.ClassVar[Kind] = Kind.CONTROL
    want: str  # "artifacts" | "model" (from a device) | "hello" (the roll call)
    artifacts_hash: str | None = None
    model_version: int | None = None
    model_hash: str | None = None
    have_versions: list[int] = field(default_factory=list)


_HEX = frozenset("0123456789abcdef")


def is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


_META = struct.Struct("<I")


def pack_prefixed(meta: _Payload, codec_body: bytes) -> bytes:
    """``u32 meta_len | meta JSON | codec body`` (update and model bodies)."""
    raw = json.dumps(meta.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    return _META.pack(len(raw)) + raw + codec_body


def unpack_prefixed(body: bytes, cls: type[T]) -> tuple[T, bytes]:
    """Split a ``pack_prefixed`` body; ProtocolError when the prefix is malformed."""
    what = cls.KIND.topic_name
    if len(body) < _META.size:
        raise ProtocolError(f"{what} body too short for its metadata length")
    (n,) = _META.unpack_from(body, 0)
    if n > MAX_META_BYTES or _META.size + n > len(body):
        raise ProtocolError(f"{what} metadata length {n} is out of bounds")
    try:
        meta_obj = parse_json(body[_META.size:_META.size + n], what=f"{what} metadata")
    except WireError as exc:
        raise ProtocolError(str(exc)) from exc
    return cls.from_dict(meta_obj), body[_META.size + n:]


def pack_update_body(meta: UpdateMeta, codec_body: bytes) -> bytes:
    return pack_prefixed(meta, codec_body)


def unpack_update_body(body: bytes) -> tuple[UpdateMeta, bytes]:
    """Split an update body; ProtocolError when the prefix is malformed."""
    return unpack_prefixed(body, UpdateMeta)


def update_message(
    *, fleet: str, device: str, round: int, model_version: int, attempt: int, codec: str,
    meta: UpdateMeta, codec_body: bytes,
) -> Message:
    return Message(kind=Kind.UPDATE, fleet=fleet, device=device, round=round,
                   model_version=model_version, attempt=attempt, codec=codec,
                   body=pack_update_body(meta, codec_body))
