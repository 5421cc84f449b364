"""Secure-aggregation messages: frozen dataclasses with ``to_bytes``/``from_bytes``.

Every body starts with the same 28 bytes (docs/PROTOCOL.md section 11 has the layouts)::

    0   4  magic b"FLSA"
    4   1  version 1
    5   1  step (Step)
    6   2  reserved, 0
    8   4  round (u32)
    12 16  session: random per secure round, chosen by the aggregator

A receiver checks sizes before it allocates anything and raises ``SecAggRejected``
(``malformed``) for any body that breaks its layout.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from broker_bridge._envelope import Kind, Message
from broker_bridge._secagg import SHARE_BYTES, U32, Words, rejected
from broker_bridge._skellam import EXTENSION, SkellamParams

MAGIC = b"FLSA"
VERSION = 1
HEADER = struct.Struct("<4sBBHI16s")
CIPHERTEXT_BYTES = 2 * SHARE_BYTES + 16
"""An encrypted share pair: the self-mask seed's share, the mask key's, a Poly1305 tag."""
MAX_DEVICES = 1 << 20
MAX_NEIGHBOURS = 1 << 16
MAX_WORDS = 1 << 28
_NEIGHBOUR = struct.Struct("<I32s32s")
_SETUP = struct.Struct("<dddII32s")


class Step(enum.IntEnum):
    SETUP = 1       # aggregator -> device: the round's parameters
    ADVERTISE = 2   # device -> aggregator: its two public keys and seed commitment
    KEYS = 3        # aggregator -> device: its round index and its neighbours' keys
    SHARES = 4      # device -> aggregator: encrypted shares, one per neighbour
    DELIVER = 5     # aggregator -> device: the encrypted shares addressed to it
    MASKED = 6      # device -> aggregator: the masked vector
    UNMASK = 7      # aggregator -> device: which neighbours survived, which dropped
    REVEAL = 8      # device -> aggregator: the shares the unmask request asks for


class ShareKind(enum.IntEnum):
    SELF_MASK_SEED = 0  # for a neighbour whose masked vector arrived
    MASK_KEY = 1        # for a neighbour that dropped before its masked vector


M = TypeVar("M", bound="_Body")


@dataclass(frozen=True, kw_only=True)
class _Body:
    STEP: ClassVar[Step]
    round: int
    session: bytes

    def _head(self) -> bytes:
        if len(self.session) != 16 or not 0 <= self.round < 1 << 32:
            raise ValueError("session is 16 bytes and round a u32")
        return HEADER.pack(MAGIC, VERSION, self.STEP, 0, self.round, self.session)

    def to_bytes(self) -> bytes:
        return self._head() + self._tail()

    def _tail(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def from_bytes(cls: type[M], data: bytes) -> M:
        step, round_index, session = read_head(data)
        if step != cls.STEP:
            raise rejected("unexpected", f"a {step.name} body, expected {cls.STEP.name}")
        return cls._parse(memoryview(data)[HEADER.size:], round=round_index, session=session)

    @classmethod
    def _parse(cls: type[M], tail: memoryview, *, round: int, session: bytes) -> M:
        raise NotImplementedError


def read_head(data: bytes) -> tuple[Step, int, bytes]:
    """(step, round, session) of a body, checked."""
    if len(data) < HEADER.size:
        raise rejected("malformed", f"secagg body of {len(data)} bytes")
    magic, version, step, _, round_index, session = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise rejected("malformed", "not a version 1 secagg body")
    try:
        return Step(step), round_index, session
    except ValueError:
        raise rejected("malformed", f"unknown secagg step {step}") from None


def _count(tail: memoryview, at: int, each: int, limit: int, what: str) -> int:
    if len(tail) < at + 4:
        raise rejected("malformed", f"truncated before the {what} count")
    (count,) = struct.unpack_from("<I", tail, at)
    if count > limit or len(tail) != at + 4 + count * each:
        raise rejected("malformed", f"{count} {what} do not fit the body")
    return int(count)


def _unique(indices: list[int], what: str) -> None:
    if len(set(indices)) != len(indices) or any(i < 1 for i in indices):
        raise rejected("malformed", f"{what}: indices must be distinct and >= 1")


@dataclass(frozen=True, kw_only=True)
class Setup(_Body):
    """The round's parameters: fixed point (clip, scale, max_devices), the shared
    coordinate subset (fraction of the layout's size, seed) and, in a private round,
    the DP extension (``dp``: clip to L2 norm ``clip``, round within ``norm_bound``, add
    Skellam noise; ``_skellam``)."""

    STEP: ClassVar[Step] = Step.SETUP
    clip: float
    scale: float
    fraction: float
    max_devices: int
    size: int
    subset_seed: bytes
    dp: SkellamParams | None = None

    def _tail(self) -> bytes:
        return _SETUP.pack(self.clip, self.scale, self.fraction, self.max_devices, self.size,
                           self.subset_seed) + (b"" if self.dp is None else self.dp.to_bytes())

    @classmethod
    def _parse(cls, tail: memoryview, *, round: int, session: bytes) -> Setup:
        dp = None
        if len(tail) == _SETUP.size + EXTENSION.size:
            dp = SkellamParams.from_bytes(tail[_SETUP.size:])
            if dp is None:
                raise rejected("malformed", "setup: DP extension out of bounds")
        elif len(tail) != _SETUP.size:
            raise rejected("malformed", "setup body size")
        clip, scale, fraction, max_devices, size, seed = _SETUP.unpack_from(tail)
        if not (clip > 0 and scale > 0 and 0 < fraction <= 1 and 1 <= max_devices <= MAX_DEVICES
                and 1 <= size <= MAX_WORDS) or not all(np.isfinite([clip, scale, fraction])):
            raise rejected("malformed", "setup parameters out of bounds")
        if dp is not None and (dp.clip != clip or dp.norm_bound < clip * scale):
            # rounding towards zero must always fit the bound (section 11.4)
            raise rejected("malformed", "setup: the DP clip is not the round's, or its norm "
                                        "bound is below clip x scale")
        return cls(round=round, session=session, clip=clip, scale=scale, fraction=fraction,
                   max_devices=max_devices, size=size, subset_seed=seed, dp=dp)


@dataclass(frozen=True, kw_only=True)
class Advertise(_Body):
    STEP: ClassVar[Step] = Step.ADVERTISE
    share_public: bytes    # X25519, encrypts shares
    mask_public: bytes     # X25519, pairwise masks
    seed_commitment: bytes  # SHA-256 of the self-mask seed

    def _tail(self) -> bytes:
        return self.share_public + self.mask_public + self.seed_commitment

    @classmethod
    def _parse(cls, tail: memoryview, *, round: int, session: bytes) -> Advertise:
        if len(tail) != 96:
            raise rejected("malformed", "advertisement body size")
        raw = bytes(tail)
        return cls(round=round, session=session, share_public=raw[:32],
                   mask_public=raw[32:64], seed_commitment=raw[64:])


@dataclass(frozen=True, kw_only=True)
class Neighbour:
    index: int
    share_public: bytes
    mask_public: bytes


@dataclass(frozen=True, kw_only=True)
class Keys(_Body):
    """Round index of the receiver, the round's size, degree and threshold, the graph's
    seed, and each neighbour's keys (increasing index)."""

    STEP: ClassVar[Step] = Step.KEYS
    index: int
    devices: int
    degree: int
    threshold: int
    graph_seed: bytes
    neighbours: tuple[Neighbour, ...]

    def _tail(self) -> bytes:
        head = struct.pack("<IIII32s", self.index, self.devices, self.degree, self.threshold,
                           self.graph_seed)
        body = b"".join(_NEIGHBOUR.pack(n.index, n.share_public, n.mask_public)
                        for n in self.neighbours)
        return head + struct.pack("<I", len(self.neighbours)) + body

    @classmethod
    def _parse(cls, tail: memoryview, *, round: int, session: bytes) -> Keys:
        if len(tail) < 48:
            raise rejected("malformed", "keys body size")
        index, devices, deg, thr, seed = struct.unpack_from("<IIII32s", tail)
        count = _count(tail, 48, _NEIGHBOUR.size, MAX_NEIGHBOURS, "neighbours")
        entries = tuple(Neighbour(index=i, share_public=c, mask_public=s)
                        for i, c, s in _NEIGHBOUR.iter_unpack(tail[52:]))
        _unique([n.index for n in entries] + [index], "keys")
        if not (2 <= devices <= MAX_DEVICES and index <= devices and count == deg
                and 1 <= thr <= deg and all(n.index <= devices for n in entries)):
            raise rejected("malformed", "keys: index, degree or threshold out of bounds")
        return cls(round=round, session=session, index=index, devices=devices, degree=deg,
                   threshold=thr, graph_seed=seed, neighbours=entries)


@dataclass(frozen=True, kw_only=True)
class Sealed:
    """An encrypted share pair: ``peer`` is the receiver (in SHARES) or the sender
    (in DELIVER)."""

    peer: int
    ciphertext: bytes


@dataclass(frozen=True, kw_only=True)
class _SealedList(_Body):
    sealed: tuple[Sealed, ...]

    def _tail(self) -> bytes:
        return struct.pack("<I", len(self.sealed)) + b"".join(
            struct.pack("<I", s.peer) + s.ciphertext for s in self.sealed)

    @classmethod
    def _parse(cls: type[M], tail: memoryview, *, round: int, session: bytes) -> M:
        _count(tail, 0, 4 + CIPHERTEXT_BYTES, MAX_NEIGHBOURS, "sealed shares")
        raw = bytes(tail[4:])
        each = 4 + CIPHERTEXT_BYTES
        sealed = tuple(Sealed(peer=int.from_bytes(raw[o:o + 4], "little"),
                              ciphertext=raw[o + 4:o + each])
                       for o in range(0, len(raw), each))
        _unique([s.peer for s in sealed], "sealed shares")
        return cls(round=round, session=session, sealed=sealed)  # type: ignore[call-arg]


@dataclass(frozen=True, kw_only=True)
class Shares(_SealedList):
    STEP: ClassVar[Step] = Step.SHARES


@dataclass(frozen=True, kw_only=True)
class Deliver(_SealedList):
    STEP: ClassVar[Step] = Step.DELIVER


@dataclass(frozen=True, kw_only=True)
class Masked(_Body):
    STEP: ClassVar[Step] = Step.MASKED
    words: Words

    def _tail(self) -> bytes:
        return struct.pack("<I", len(self.words)) + self.words.astype(U32).tobytes()

    @classmethod
    def _parse(cls, tail: memoryview, *, round: int, session: bytes) -> Masked:
        _count(tail, 0, 4, MAX_WORDS, "words")
        words = np.frombuffer(tail[4:], dtype=U32).astype(np.uint32)
        return cls(round=round, session=session, words=words)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Masked) and (self.round, self.session) ==
                (other.round, other.session) and np.array_equal(self.words, other.words))

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, kw_only=True)
class Unmask(_Body):
    """Among the receiver's neighbours that delivered shares: whose masked vector arrived
    (``survivors``: reveal self-mask seed shares) and whose did not (``dropped``: reveal
    mask key shares). Each neighbour is in exactly one list."""

    STEP: ClassVar[Step] = Step.UNMASK
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def _tail(self) -> bytes:
        return (struct.pack(f"<I{len(self.survivors)}I", len(self.survivors), *self.survivors)
                + struct.pack(f"<I{len(self.dropped)}I", len(self.dropped), *self.dropped))

    @classmethod
    def _parse(cls, tail: memoryview, *, round: int, session: bytes) -> Unmask:
        if len(tail) < 8:
            raise rejected("malformed", "unmask body size")
        (ns,) = struct.unpack_from("<I", tail)
        if ns > MAX_NEIGHBOURS or len(tail) < 8 + 4 * ns:
            raise rejected("malformed", "unmask survivors do not fit")
        survivors = struct.unpack_from(f"<{ns}I", tail, 4)
        _count(tail, 4 + 4 * ns, 4, MAX_NEIGHBOURS, "dropped")
        dropped = struct.unpack_from(f"<{(len(tail) - 8 - 4 * ns) // 4}I", tail, 8 + 4 * ns)
        _unique(list(survivors) + list(dropped), "unmask")
        return cls(round=round, session=session, survivors=tuple(survivors),
                   dropped=tuple(dropped))


@dataclass(frozen=True, kw_only=True)
class Revealed:
    peer: int
    kind: ShareKind
    share: bytes


@dataclass(frozen=True, kw_only=True)
class Reveal(_Body):
    STEP: ClassVar[Step] = Step.REVEAL
    revealed: tuple[Revealed, ...]

    def _tail(self) -> bytes:
        return struct.pack("<I", len(self.revealed)) + b"".join(
            struct.pack("<IB", r.peer, r.kind) + r.share for r in self.revealed)

    @classmethod
    def _parse(cls, tail: memoryview, *, round: int, session: bytes) -> Reveal:
        each = 5 + SHARE_BYTES
        _count(tail, 0, each, MAX_NEIGHBOURS, "revealed shares")
        raw = bytes(tail[4:])
        out = []
        for o in range(0, len(raw), each):
            peer, kind = struct.unpack_from("<IB", raw, o)
            if kind not in (0, 1):
                raise rejected("malformed", f"share kind {kind}")
            out.append(Revealed(peer=peer, kind=ShareKind(kind), share=raw[o + 5:o + each]))
        _unique([r.peer for r in out], "revealed shares")
        return cls(round=round, session=session, revealed=tuple(out))


BODIES: dict[Step, type[_Body]] = {cls.STEP: cls for cls in
                                   (Setup, Advertise, Keys, Shares, Deliver, Masked, Unmask,
                                    Reveal)}


def parse(data: bytes) -> _Body:
    """Any secure-aggregation body, by its step."""
    step, _, _ = read_head(data)
    return BODIES[step].from_bytes(data)


CODEC = "secagg"
"""The envelope codec of every secure-aggregation message (kind 12)."""


def secagg_message(body: _Body, *, fleet: str, device: str) -> Message:
    """The envelope of a secure-aggregation body: kind ``secagg``, on the device's
    ``up/secagg`` or ``down/secagg`` topic, with the body's round."""
    return Message(kind=Kind.SECAGG, fleet=fleet, device=device, codec=CODEC,
                   round=body.round, body=body.to_bytes())


def read_secagg(message: Message) -> _Body:
    """The body of a ``secagg`` message; its envelope round must be the body's."""
    if message.kind != Kind.SECAGG or message.codec != CODEC:
        raise rejected("malformed", f"a {message.kind.topic_name} message with codec "
                                    f"{message.codec!r} is not a secagg message")
    body = parse(message.body)
    if body.round != message.round:
        raise rejected("wrong_round", f"envelope round {message.round}, body round "
                                      f"{body.round}")
    return body
