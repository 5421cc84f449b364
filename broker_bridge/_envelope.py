"""The message envelope: a versioned, self-describing binary header, then the body.

Every MQTT payload fleetlearn sends is one *chunk*: a header followed by a slice of a
message body. Small messages are one chunk. All integers are little-endian.

Fixed header (64 bytes)::

    off size field
      0   2  magic          b"FL"
      2   1  version        1
      3   1  kind           Kind (1 hello, 2 presence, 3 task, 4 update, 5 model,
                            6 artifacts, 7 ack, 8 cancel, 9 error, 10 eval, 11 control,
                            12 secagg, 13 ledger, 14 proof)
      4   1  flags          0 (reserved; receivers ignore unknown bits)
      5   1  codec_len      length of the codec string (0-255)
      6   1  fleet_len      length of the fleet id (1-64)
      7   1  device_len     length of the device id (0-64): on a device's topics that
                            device's id, whoever sends; empty on broadcast topics
      8   4  round          round index (u32)
     12   4  model_version  global model version the message refers to (u32)
     16   2  attempt        attempt number of the sender for this round (u16)
     18   2  reserved       0
     20   8  transfer_id    random id shared by every chunk of one message (u64)
     28   4  chunk_index    0-based (u32)
     32   4  chunk_count    >= 1 (u32)
     36   8  total_length   length of the whole message body (u64)
     44   8  offset         where this chunk's data starts in the body (u64)
     52   4  chunk_length   bytes of body data in this chunk (u32)
     56   4  body_crc32     CRC-32 of the whole message body (u32)
     60   4  crc32          CRC-32 of header bytes 0-59 and the three strings

Then ``codec`` (ASCII), ``fleet`` and ``device`` (UTF-8), then ``chunk_length`` bytes of
body. ``codec`` names how the body is encoded: ``json`` for control messages, an
update codec spec such as ``topk:0.01+q8+zstd`` for updates, ``raw`` for opaque bytes.

The chunk data is covered by ``body_crc32``, checked once the body is whole (a
single-chunk message is checked at once); a corrupt chunk therefore drops its whole set.
Decoding never trusts a length: every one is checked against the payload's size and
against ``EnvelopeLimits`` before anything is sliced or allocated. A ``json`` body is
bounded far tighter than others (``MAX_JSON_BYTES``): control messages are small, and a
receiver parses them whole.
"""

from __future__ import annotations

import enum
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from broker_bridge._errors import EnvelopeError
from broker_bridge._topics import check_id
from device_profiles import ConfigError

MAGIC = b"FL"
VERSION = 1
_FIXED = struct.Struct("<2sBBBBBBIIHHQIIQQIII")
HEADER_SIZE = _FIXED.size  # 64
assert HEADER_SIZE == 64


class Kind(enum.IntEnum):
    """What a message is. The name (lower case) is also its topic's last level."""

    HELLO = 1
    PRESENCE = 2
    TASK = 3
    UPDATE = 4
    MODEL = 5
    ARTIFACTS = 6
    ACK = 7
    CANCEL = 8
    ERROR = 9
    EVAL = 10
    CONTROL = 11
    SECAGG = 12
    LEDGER = 13
    PROOF = 14

    @property
    def topic_name(self) -> str:
        return self.name.lower()


JSON_CODEC = "json"

MAX_JSON_BYTES = 64 * 1024
"""A JSON body (codec ``json``: hello, presence, task, ack, cancel, error, request) is at
most this many bytes. The largest the reference sends is a hello with its device profile
(under 2 KB with any catalogue profile; a task is under 1 KB); the JSON metadata of
update and model bodies has the same bound (``MAX_META_BYTES``). A receiver refuses a
longer ``json`` message from its header, before it holds any chunk of it, and
``parse_json`` refuses a longer text: one device cannot make the aggregator reassemble
and parse megabytes of JSON."""


@dataclass(frozen=True, kw_only=True)
class EnvelopeLimits:
    """Upper bounds a receiver enforces before it allocates anything."""

    max_body_bytes: int = 256 * 1024 * 1024
    max_chunks: int = 65536
    max_json_bytes: int = MAX_JSON_BYTES
    """The bound on bodies whose codec is ``json`` (control messages)."""

    def __post_init__(self) -> None:
        if self.max_body_bytes <= 0 or self.max_chunks <= 0 or self.max_json_bytes <= 0:
            raise ConfigError("envelope limits must be positive")


DEFAULT_LIMITS = EnvelopeLimits()


@dataclass(frozen=True, kw_only=True)
class Message:
    """One logical message, whatever the number of chunks it travels in."""

    kind: Kind
    fleet: str
    device: str = ""
    round: int = 0
    model_version: int = 0
    attempt: int = 0
    codec: str = "raw"
    body: bytes = b""
    transfer_id: int = 0
    body_crc32: int | None = field(default=None, compare=False, repr=False)
    """The CRC-32 of ``body`` when the sender knows it already (a body sent many times, as
    a model version served to every device that asks): ``split_message`` takes it rather
    than reading megabytes again. Never read from the wire (each chunk carries it)."""

    def __post_init__(self) -> None:
        check_id(self.fleet, what="fleet id")
        if self.device:
            check_id(self.device, what="device id")
        for name, value, top in (
            ("round", self.round, 0xFFFFFFFF),
            ("model_version", self.model_version, 0xFFFFFFFF),
            ("attempt", self.attempt, 0xFFFF),
            ("transfer_id", self.transfer_id, 0xFFFFFFFFFFFFFFFF),
        ):
            if not 0 <= value <= top:
                raise ConfigError(f"message {name} {value} out of range 0..{top}")
        if not self.codec.isascii() or len(self.codec) > 255:
            raise ConfigError(f"codec string must be ASCII, at most 255 bytes: {self.codec!r}")

    @property
    def idempotency_key(self) -> tuple[str, int, str, int]:
        """(fleet, round, device, attempt): the same update sent twice has the same key."""
        return (self.fleet, self.round, self.device, self.attempt)

    def json(self) -> Any:
        """The body parsed as JSON (control messages); EnvelopeError if it is not."""
        if self.codec != JSON_CODEC:
            raise EnvelopeError(f"{self.kind.topic_name} message body is {self.codec!r}, not json")
        return parse_json(self.body, what=f"{self.kind.topic_name} message")


MAX_JSON_INT_DIGITS = 19
"""Integers in JSON bodies are at most this many digits (any 64-bit value fits); a
longer one is refused before Python converts it (a 10,000-digit integer would cost
quadratic time, or raise past the interpreter's limit)."""


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} characters")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is not finite")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, *, what: str = "message", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse untrusted JSON: at most ``max_bytes`` bytes of UTF-8, finite numbers,
    integers of at most 19 digits, and nesting the parser can follow; anything else is
    an ``EnvelopeError``, never a ``RecursionError`` or a stray ``ValueError``."""
    if len(data) > max_bytes:
        raise EnvelopeError(
            f"json body of {len(data)} bytes exceeds the limit of {max_bytes} in {what}"
        )
    try:
        return json.loads(data.decode("utf-8"), parse_int=_json_int, parse_float=_json_float,
                          parse_constant=_json_constant)
    except RecursionError as exc:
        raise EnvelopeError(f"malformed json body in {what}: nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise EnvelopeError(f"malformed json body in {what}: {exc}") from exc


def json_message(kind: Kind, *, fleet: str, payload: Any, **fields: Any) -> Message:
    """A control message whose body is compact JSON (at most ``MAX_JSON_BYTES``: every
    receiver would drop a longer one, so it is an ``EnvelopeError`` here)."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(body) > MAX_JSON_BYTES:
        raise EnvelopeError(f"json body of {len(body)} bytes exceeds the limit of "
                            f"{MAX_JSON_BYTES} for a {kind.topic_name} message")
    return Message(kind=kind, fleet=fleet, codec=JSON_CODEC, body=body, **fields)


_IDS_PER_DRAW = 512
_transfer_ids: list[int] = []


def _forget_transfer_ids() -> None:
    _transfer_ids.clear()  # a forked child must not send its parent's next ids


os.register_at_fork(after_in_child=_forget_transfer_ids)


def new_transfer_id() -> int:
    """64 bits from the OS's CSPRNG, drawn 512 at a time: one ``getrandom`` call costs as
    much as encoding a small message, and every message sent needs an id."""
    try:
        return _transfer_ids.pop()
    except IndexError:  # empty (another thread may refill it at the same time: harmless)
        _transfer_ids.extend(struct.unpack(f"<{_IDS_PER_DRAW}Q",
                                           os.urandom(8 * _IDS_PER_DRAW)))
        return _transfer_ids.pop()


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One decoded payload: header fields plus a slice of the body (wire type)."""

    kind: Kind
    fleet: str
    device: str
    round: int
    model_version: int
    attempt: int
    codec: str
    transfer_id: int
    chunk_index: int
    chunk_count: int
    total_length: int
    offset: int
    body_crc32: int
    data: bytes | memoryview
    """The slice of the body (a view of the payload for a chunk of a larger set)."""

    def to_bytes(self) -> bytes:
        codec_b = self.codec.encode("ascii")
        fleet_b = self.fleet.encode("utf-8")
        device_b = self.device.encode("utf-8")
        fixed = _FIXED.pack(
            MAGIC, VERSION, int(self.kind), 0, len(codec_b), len(fleet_b), len(device_b),
            self.round, self.model_version, self.attempt, 0, self.transfer_id,
            self.chunk_index, self.chunk_count, self.total_length, self.offset,
            len(self.data), self.body_crc32, 0,
        )
        strings = codec_b + fleet_b + device_b
        crc = zlib.crc32(strings, zlib.crc32(fixed[:60]))
        return b"".join((fixed[:60], struct.pack("<I", crc), strings, self.data))

    @classmethod
    def from_bytes(cls, payload: bytes, *, limits: EnvelopeLimits = DEFAULT_LIMITS) -> Chunk:
        """Decode and check one payload; raise EnvelopeError for anything off."""
        n = len(payload)
        if n < HEADER_SIZE:
            raise EnvelopeError(f"truncated header: {n} bytes, need {HEADER_SIZE}")
        (magic, version, kind, _flags, codec_len, fleet_len, device_len, rnd, model_version,
         attempt, _reserved, transfer_id, index, count, total, offset, length, body_crc,
         crc) = _FIXED.unpack_from(payload, 0)
        if magic != MAGIC:
            raise EnvelopeError("not a fleetlearn message (bad magic)")
        if version != VERSION:
            raise EnvelopeError(
                f"unsupported envelope version {version} (this side speaks {VERSION})"
            )
        try:
            kind_e = Kind(kind)
        except ValueError as exc:
            raise EnvelopeError(f"unknown message kind {kind}") from exc
        if not 1 <= fleet_len <= 64 or device_len > 64:
            raise EnvelopeError("fleet or device id length out of range")
        strings_end = HEADER_SIZE + codec_len + fleet_len + device_len
        if strings_end + length != n:
            raise EnvelopeError(
                f"length mismatch: header declares {strings_end + length} bytes, payload has {n}"
            )
        if not 1 <= count <= limits.max_chunks:
            raise EnvelopeError(f"chunk count {count} outside 1..{limits.max_chunks}")
        if index >= count:
            raise EnvelopeError(f"chunk index {index} not below chunk count {count}")
        if total > limits.max_body_bytes:
            raise EnvelopeError(
                f"body of {total} bytes exceeds the limit of {limits.max_body_bytes}"
            )
        if offset + length > total:
            raise EnvelopeError("chunk extends past the declared body length")
        if count == 1 and (offset != 0 or length != total):
            raise EnvelopeError("single-chunk message does not carry the whole body")
        if count > 1 and length == 0:
            # A sender splits a body into non-empty slices; empty chunks of a large set
            # would only make a receiver hold chunk records that carry nothing.
            raise EnvelopeError("empty chunk in a multi-chunk message")
        strings = payload[HEADER_SIZE:strings_end]
        if zlib.crc32(strings, zlib.crc32(payload[:60])) != crc:
            raise EnvelopeError("header checksum mismatch")
        try:
            codec = strings[:codec_len].decode("ascii")
            fleet = strings[codec_len:codec_len + fleet_len].decode("utf-8")
            device = strings[codec_len + fleet_len:].decode("utf-8")
            check_id(fleet, what="fleet id")
            if device:
                check_id(device, what="device id")
        except (UnicodeDecodeError, ConfigError) as exc:
            raise EnvelopeError(f"bad id or codec string in header: {exc}") from exc
        if codec == JSON_CODEC and total > limits.max_json_bytes:
            # Refused from any chunk's header: no chunk of it is held or reassembled.
            raise EnvelopeError(
                f"json body of {total} bytes exceeds the limit of {limits.max_json_bytes}"
            )
        # A chunk of a larger set keeps a view of its payload (the set is joined once,
        # a dense update's 4.4 MB need not be copied twice); a whole message its bytes,
        # and so does a payload in a buffer its transport may reuse.
        data = (memoryview(payload)[strings_end:] if count > 1 and type(payload) is bytes
                else bytes(payload[strings_end:]))
        return cls(
            kind=kind_e, fleet=fleet, device=device, round=rnd, model_version=model_version,
            attempt=attempt, codec=codec, transfer_id=transfer_id, chunk_index=index,
            chunk_count=count, total_length=total, offset=offset, body_crc32=body_crc,
            data=data,
        )


def split_message(message: Message, *, max_payload: int) -> list[bytes]:
    """Encode ``message`` into payloads of at most ``max_payload`` bytes each."""
    overhead = HEADER_SIZE + len(message.codec) + len(message.fleet.encode()) + len(
        message.device.encode()
    )
    room = max_payload - overhead
    if room < 1024:
        raise ConfigError(f"max_payload {max_payload} leaves no room for data (header {overhead})")
    body = message.body
    total = len(body)
    count = max(1, -(-total // room))
    transfer_id = message.transfer_id or new_transfer_id()
    body_crc = zlib.crc32(body) if message.body_crc32 is None else message.body_crc32
    view = memoryview(body)
    out = []
    for index in range(count):
        start = index * room
        out.append(
            Chunk(
                kind=message.kind, fleet=message.fleet, device=message.device,
                round=message.round, model_version=message.model_version,
                attempt=message.attempt, codec=message.codec, transfer_id=transfer_id,
                chunk_index=index, chunk_count=count, total_length=total, offset=start,
                body_crc32=body_crc, data=view[start:start + room],  # copied once, joined
            ).to_bytes()
        )
    return out
