"""The update codec: encode a flat float32 update (or a model) into a self-describing body.

An update is (locally trained weights) - (global weights) flattened by a ``Layout``.
A ``CodecSpec`` (see ``broker_bridge._codec_spec`` for the grammar) says how it is
sparsified, quantized and compressed; the body carries the canonical spec, so
``decode_update(body, layout)`` needs nothing else. The downlink uses the same body for
a full model or for a delta against a model version the device already holds.

Body format, version 1. Little-endian throughout; ``uN`` is an unsigned N-bit integer::

    offset    size  field
    0         4     magic b"FLCB"
    4         1     format version: 1
    5         1     body kind: 0 update, 1 full model, 2 model delta against a base
    6         1     S: spec length, 1..255
    7         S     canonical spec string, ASCII (must equal str(CodecSpec.parse(it)))
    7+S       8     layout fingerprint (``Layout.fingerprint``)
    15+S      4     n: u32, total parameters; must equal the layout's size
    19+S      4     k: u32, number of coded values (n when there is no topk/thresh)
    23+S      1     index coding: 0 none (dense), 1 delta-varint, 2 bitmap
    24+S      4     X: u32, bytes of the index section (0 when dense)
    28+S      8     base version, u64: present only when body kind is 2
    H         ...   payload, exactly P bytes; when the spec has ``zstd`` the rest of the
                    body is instead ONE zstd frame that declares its content size, and
                    that size must be P. Nothing may follow the payload or the frame.

Payload (P = X + 4*C + V)::

    X bytes   indices of the k coded values (sparse specs only), strictly increasing,
              each < n. Coding 1: LEB128 varints (7 bits per byte, low group first, high
              bit set on all but the last byte, at most 5 bytes) of the gaps
              g[0] = i[0], g[j] = i[j] - i[j-1] - 1; X = total varint bytes.
              Coding 2: a bitmap of n bits, bit i of byte i//8 (LSB first) set when
              parameter i is coded; X = ceil(n/8); padding bits are zero; k bits set.
    4*C bytes C float32 scales, quantizers only (C = 0 for fp32/fp16): with ``block=B``
              one per B consecutive coded values, C = ceil(k/B); otherwise one per layout
              tensor in layout order (C = tensors in the layout), covering the coded
              values that fall in that tensor. Scales are finite and >= 0.
    V bytes   the k values, in index order:
                fp32  k float32 (finite)             fp16  k float16 (finite)
                q8    k int8 levels in -127..127      value = level * scale
                q4    ceil(k/2) bytes, 4-bit code = level + 7 (level -7..7, code 15
                      forbidden), value i in bits 4*(i%2) of byte i//2 (low nibble first)
                tern  ceil(k/4) bytes, 2-bit code = level + 1 (level -1..1, code 3
                      forbidden), value i in bits 2*(i%4) of byte i//4
                q1    ceil(k/8) bytes, bit i%8 (LSB first) of byte i//8: 1 is +scale,
                      0 is -scale
              Unused bits of the last byte are zero.

The decoded vector is zero except at the coded indices (all of them when dense). For
body kind 2 it is added to the base weights of the declared base version.

For ``topk`` the decoder also checks k: ``min(n, max(1, ceil(F*n)))`` for a fraction F
(IEEE double arithmetic) or ``min(N, n)`` for a count N, summed per tensor with
``:per_tensor``. Quantizers: ``scale = max|x| / L`` over the scale's values with
L = 127 (q8), 7 (q4), 1 (tern :sr); level = round-half-even(x/scale), or
floor(x/scale + u) with u ~ U[0,1) for ``:sr`` (unbiased). Deterministic ``tern`` zeroes
|x| <= 0.7 * mean|x| and scales the rest by their mean magnitude (ternary weight
networks). ``q1`` sends sign(x) (x >= 0 is +) with scale = mean|x|, or with ``:sr`` +1
with probability (1 + x/max|x|)/2 and scale = max|x| (unbiased). These are encoder
choices: a decoder only computes level * scale.

Why this module is longer than 400 lines: every stage's encoder sits beside its decoder,
so that the two cannot drift apart (index coding is in ``_codec_pack``).
"""

from __future__ import annotations

import enum
import functools
import itertools
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zstandard

from broker_bridge._codec_pack import (
    INDEX_BITMAP,
    INDEX_NONE,
    INDEX_VARINT,
    code_bytes,
    decode_indices,
    encode_indices,
    pack_codes,
    unpack_levels,
)
from broker_bridge._codec_spec import CodecSpec, Quantize, Threshold, TopK
from broker_bridge._errors import CodecError
from broker_bridge._files import atomic_write
from broker_bridge._layout import MAX_PARAMS, Layout
from device_profiles._errors import ConfigError

__all__ = [
    "BodyHeader",
    "BodyKind",
    "EncodedUpdate",
    "ErrorFeedback",
    "ModelVersion",
    "decode_model",
    "decode_update",
    "decode_update_sparse",
    "encode_model",
    "encode_update",
    "read_header",
]

Vector = npt.NDArray[np.float32]
Indices = npt.NDArray[np.int64]

_MAGIC = b"FLCB"
_VERSION = 1
_FIXED = struct.Struct("<4sBBB")
_TAIL = struct.Struct("<8sIIBI")
_BASE = struct.Struct("<Q")
_FP16_MAX = float(np.finfo(np.float16).max)
_FP32_MAX = float(np.finfo(np.float32).max)


class BodyKind(enum.IntEnum):
    """What a body holds: an update, a full model, or a model delta against a base."""

    UPDATE = 0
    MODEL = 1
    MODEL_DELTA = 2


@functools.lru_cache(maxsize=256)
def _spec_from_wire(text: str) -> CodecSpec:
    try:
        spec = CodecSpec.parse(text)
    except ConfigError as exc:
        raise CodecError(f"body spec {text!r} is invalid: {exc}") from exc
    if str(spec) != text:
        raise CodecError(f"body spec {text!r} is not canonical (expected {str(spec)!r})")
    return spec


@dataclass(frozen=True, kw_only=True)
class BodyHeader:
    """The fixed part of a body: enough to size and check everything before decoding."""

    kind: BodyKind
    spec: CodecSpec
    fingerprint: bytes
    size: int
    count: int
    index_coding: int
    index_bytes: int
    base_version: int | None = None

    def to_bytes(self) -> bytes:
        spec = str(self.spec).encode("ascii")
        if len(spec) > 255:
            raise CodecError(f"canonical spec {self.spec} is longer than 255 bytes")
        head = _FIXED.pack(_MAGIC, _VERSION, int(self.kind), len(spec)) + spec
        head += _TAIL.pack(
            self.fingerprint, self.size, self.count, self.index_coding, self.index_bytes
        )
        if self.kind == BodyKind.MODEL_DELTA:
            assert self.base_version is not None
            head += _BASE.pack(self.base_version)
        return head

    @classmethod
    def from_bytes(cls, data: bytes) -> BodyHeader:
        """The header of a body (the payload after it is not read)."""
        return cls.from_prefix(data)[0]

    @classmethod
    def from_prefix(cls, data: bytes | memoryview) -> tuple[BodyHeader, int]:
        """Parse the header at the start of ``data``; return it and its length."""
        if len(data) < _FIXED.size:
            raise CodecError("body truncated: shorter than its fixed header")
        magic, version, kind, spec_len = _FIXED.unpack_from(data, 0)
        if magic != _MAGIC:
            raise CodecError("not a fleetlearn codec body (bad magic)")
        if version != _VERSION:
            raise CodecError(f"unsupported codec body version {version}")
        if kind not in BodyKind._value2member_map_:
            raise CodecError(f"unknown body kind {kind}")
        body_kind = BodyKind(kind)
        end = _FIXED.size + spec_len + _TAIL.size
        if body_kind == BodyKind.MODEL_DELTA:
            end += _BASE.size
        if spec_len == 0 or len(data) < end:
            raise CodecError("body truncated inside its header")
        raw_spec = bytes(data[_FIXED.size : _FIXED.size + spec_len])
        if not raw_spec.isascii():
            raise CodecError("body spec is not ASCII")
        spec = _spec_from_wire(raw_spec.decode("ascii"))
        fingerprint, size, count, coding, index_bytes = _TAIL.unpack_from(
            data, _FIXED.size + spec_len
        )
        base = None
        if body_kind == BodyKind.MODEL_DELTA:
            (base,) = _BASE.unpack_from(data, end - _BASE.size)
        header = cls(
            kind=body_kind,
            spec=spec,
            fingerprint=fingerprint,
            size=size,
            count=count,
            index_coding=coding,
            index_bytes=index_bytes,
            base_version=base,
        )
        return header, end


def read_header(body: bytes) -> BodyHeader:
    """Peek at a body's header (spec, sizes, base version) without decoding it."""
    return BodyHeader.from_bytes(body)


@dataclass(frozen=True, kw_only=True, eq=False)
class ErrorFeedback:
    """Per-device error-feedback state: what earlier updates did not send.

    The caller owns it: pass it to ``encode_update``, keep the one returned, and
    persist it (``save``/``load``) so a restarted device carries on where it stopped.
    """

    fingerprint: bytes
    residual: Vector
    rounds: int = 0

    _HEAD = struct.Struct("<4sB8sQII")
    _MAGIC = b"FLEF"

    def __post_init__(self) -> None:
        residual = np.array(self.residual, dtype=np.float32)
        if residual.ndim != 1 or len(self.fingerprint) != 8 or self.rounds < 0:
            raise CodecError("error feedback needs a 1-D residual and an 8-byte fingerprint")
        residual.setflags(write=False)
        object.__setattr__(self, "residual", residual)

    @classmethod
    def zeros(cls, layout: Layout) -> ErrorFeedback:
        return cls(fingerprint=layout.fingerprint, residual=np.zeros(layout.size, np.float32))

    def check(self, layout: Layout) -> None:
        if self.fingerprint != layout.fingerprint or self.residual.size != layout.size:
            raise CodecError("error feedback state belongs to another layout; reset it")

    def to_bytes(self) -> bytes:
        """magic b"FLEF", u8 version 1, 8-byte fingerprint, u64 rounds, u32 n,
        u32 crc32 of the values, then n float32."""
        values = self.residual.tobytes()
        head = self._HEAD.pack(
            self._MAGIC, 1, self.fingerprint, self.rounds, self.residual.size, zlib.crc32(values)
        )
        return head + values

    @classmethod
    def from_bytes(cls, data: bytes, layout: Layout) -> ErrorFeedback:
        if len(data) < cls._HEAD.size:
            raise CodecError("error feedback state truncated")
        magic, version, fingerprint, rounds, size, crc = cls._HEAD.unpack_from(data, 0)
        if magic != cls._MAGIC or version != 1:
            raise CodecError("not a fleetlearn error feedback state (magic or version)")
        if fingerprint != layout.fingerprint or size != layout.size:
            raise CodecError("error feedback state belongs to another layout; reset it")
        if len(data) != cls._HEAD.size + 4 * size:
            raise CodecError("error feedback state has the wrong length")
        values = memoryview(data)[cls._HEAD.size :]
        if zlib.crc32(values) != crc:
            raise CodecError("error feedback state is corrupt (crc mismatch)")
        residual = np.frombuffer(values, dtype=np.float32)
        if not np.isfinite(residual).all():
            raise CodecError("error feedback state holds NaN or Inf")
        return cls(fingerprint=fingerprint, residual=residual, rounds=rounds)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: temp file in the same folder, fsync, rename, fsync folder."""
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str], layout: Layout) -> ErrorFeedback:
        return cls.from_bytes(Path(path).read_bytes(), layout)


@dataclass(frozen=True, kw_only=True, eq=False)
class EncodedUpdate:
    """An encoded body, what the receiver will decode from it, and the new EF state."""

    body: bytes
    sent: Vector
    feedback: ErrorFeedback | None


@dataclass(frozen=True, kw_only=True, eq=False)
class ModelVersion:
    """A model's flat weights tagged with the version number the aggregator gave it."""

    version: int
    weights: Vector

    def __post_init__(self) -> None:
        if not 0 <= self.version < 2**64:
            raise CodecError(f"model version must fit in u64, got {self.version}")
        weights = np.array(self.weights, dtype=np.float32)
        weights.setflags(write=False)
        object.__setattr__(self, "weights", weights)


# --------------------------------------------------------------------------- encoding


def _vector(values: npt.ArrayLike, layout: Layout, what: str) -> Vector:
    vec = np.asarray(values, dtype=np.float32)
    if vec.shape != (layout.size,):
        raise CodecError(f"{what} has shape {vec.shape}, the layout needs ({layout.size},)")
    if not np.isfinite(vec).all():
        raise CodecError(f"{what} holds NaN or Inf")
    return vec


def _top(magnitude: Vector, k: int) -> Indices:
    if k >= magnitude.size:
        return np.arange(magnitude.size, dtype=np.int64)
    split = magnitude.size - k
    return np.sort(np.argpartition(magnitude, split)[split:]).astype(np.int64)


def _select(x: Vector, layout: Layout, sparsify: TopK | Threshold) -> Indices:
    magnitude = np.abs(x)
    if isinstance(sparsify, Threshold):
        return np.flatnonzero(magnitude >= sparsify.value).astype(np.int64)
    if not sparsify.per_tensor:
        return _top(magnitude, sparsify.kept(x.size))
    offsets = layout.offsets
    parts = [_top(magnitude[a:b], sparsify.kept(b - a)) + a for a, b in itertools.pairwise(offsets)]
    return np.concatenate(parts)


def _expected_topk(topk: TopK, layout: Layout) -> int:
    if not topk.per_tensor:
        return topk.kept(layout.size)
    sizes = np.diff(np.asarray(layout.offsets, dtype=np.int64))
    if topk.count is not None:
        return int(np.minimum(sizes, topk.count).sum())
    assert topk.fraction is not None
    kept = np.minimum(sizes, np.maximum(1, np.ceil(topk.fraction * sizes.astype(np.float64))))
    return int(kept.sum())


def _segments(q: Quantize, count: int, layout: Layout, indices: Indices | None) -> Indices:
    """How many coded values each scale covers, in order."""
    if q.block is not None:
        full, rest = divmod(count, q.block)
        lengths = np.full(full + (1 if rest else 0), q.block, dtype=np.int64)
        if rest:
            lengths[-1] = rest
        return lengths
    offsets = np.asarray(layout.offsets, dtype=np.int64)
    if indices is None:
        return np.diff(offsets)
    return np.diff(np.searchsorted(indices, offsets)).astype(np.int64)


def _expand(scales: npt.NDArray[np.float32], lengths: Indices, q: Quantize) -> Vector:
    """One scale per coded value (a scalar repeat is much faster for blocks)."""
    if q.block is not None:
        return np.repeat(scales, q.block)[: int(lengths.sum())]
    return np.repeat(scales, lengths)


def _segment_reduce(ufunc: np.ufunc, values: Vector, lengths: Indices) -> npt.NDArray[np.float64]:
    out = np.zeros(lengths.size, dtype=np.float64)
    present = lengths > 0
    if values.size:
        starts = (np.cumsum(lengths) - lengths)[present]
        out[present] = ufunc.reduceat(values, starts, dtype=np.float64)
    return out


def _quantize(
    q: Quantize, values: Vector, lengths: Indices, rng: np.random.Generator | None
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Integer levels and float32 scales for ``values``, one scale per segment."""
    magnitude = np.abs(values)
    if q.kind == "q1" and not q.stochastic:
        mean = _segment_reduce(np.add, magnitude, lengths) / np.maximum(lengths, 1)
        return np.where(values >= 0, 1, -1).astype(np.int8), mean.astype(np.float32)
    if q.kind == "tern" and not q.stochastic:
        # Ternary weight networks' rule: zero below 0.7 * mean|x|, scale = mean of the rest.
        mean = _segment_reduce(np.add, magnitude, lengths) / np.maximum(lengths, 1)
        keep = magnitude > _expand((0.7 * mean).astype(np.float32), lengths, q)
        kept = _segment_reduce(np.add, keep.astype(np.float32), lengths)
        total = _segment_reduce(np.add, np.where(keep, magnitude, 0), lengths)
        scales = (total / np.maximum(kept, 1)).astype(np.float32)
        return (np.sign(values) * keep).astype(np.int8), scales
    scales = (_segment_reduce(np.maximum, magnitude, lengths) / q.levels).astype(np.float32)
    expanded = _expand(scales, lengths, q)
    ratio = np.divide(values, expanded, out=np.zeros_like(values), where=expanded > 0)
    if q.stochastic:
        assert rng is not None
        noise = rng.random(values.size, dtype=np.float32)
        if q.kind == "q1":
            levels = np.where(noise < 0.5 * (1.0 + ratio), 1.0, -1.0)
        else:
            levels = np.floor(ratio + noise)
    else:
        levels = np.rint(ratio)
    return np.clip(levels, -q.levels, q.levels).astype(np.int8), scales


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


_local = threading.local()


def _encode(
    x: Vector,
    layout: Layout,
    spec: CodecSpec,
    kind: BodyKind,
    base_version: int | None,
    rng: np.random.Generator | None,
) -> tuple[bytes, Vector]:
    """Body bytes and the exact vector a decoder will rebuild from them."""
    if spec.values.stochastic and rng is None:
        raise CodecError(f"spec {spec} uses stochastic rounding: pass rng=np.random.Generator")
    indices = None if spec.sparsify is None else _select(x, layout, spec.sparsify)
    values = x if indices is None else x[indices]
    q = spec.values
    parts: list[bytes] = []
    coding, index_bytes = INDEX_NONE, b""
    if indices is not None:
        coding, index_bytes = encode_indices(indices, layout.size)
        parts.append(index_bytes)
    if q.quantized:
        lengths = _segments(q, values.size, layout, indices)
        levels, scales = _quantize(q, values, lengths, rng)
        parts += [scales.tobytes(), pack_codes(q.kind, levels)]
        rebuilt = levels.astype(np.float32) * _expand(scales, lengths, q)
    elif q.kind == "fp16":
        if values.size and float(np.abs(values).max()) > _FP16_MAX:
            raise CodecError("a value exceeds the float16 range; use a quantizer with scales")
        half = values.astype(np.float16)
        parts.append(half.tobytes())
        rebuilt = half.astype(np.float32)
    else:
        parts.append(values.tobytes())
        rebuilt = values.copy()
    payload = b"".join(parts)
    if spec.zstd_level is not None:
        payload = _compressor(spec.zstd_level).compress(payload)
    header = BodyHeader(
        kind=kind,
        spec=spec,
        fingerprint=layout.fingerprint,
        size=layout.size,
        count=int(values.size),
        index_coding=coding,
        index_bytes=len(index_bytes),
        base_version=base_version,
    )
    if indices is None:
        sent = rebuilt
    else:
        sent = np.zeros(layout.size, dtype=np.float32)
        sent[indices] = rebuilt
    return header.to_bytes() + payload, sent


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator | None:
    return np.random.default_rng(rng) if isinstance(rng, int) else rng


def encode_update(
    update: npt.ArrayLike,
    layout: Layout,
    spec: CodecSpec,
    *,
    feedback: ErrorFeedback | None = None,
    rng: np.random.Generator | int | None = None,
) -> EncodedUpdate:
    """Encode (trained - global) weights. With ``ef`` in the spec, the residual in
    ``feedback`` (zeros when None) is added first and the new residual is returned."""
    x = _vector(update, layout, "update")
    if feedback is not None and not spec.error_feedback:
        raise CodecError(f"error feedback state given, but spec {spec} has no ef stage")
    if spec.error_feedback:
        state = feedback if feedback is not None else ErrorFeedback.zeros(layout)
        state.check(layout)
        x = x + state.residual
    body, sent = _encode(x, layout, spec, BodyKind.UPDATE, None, _rng(rng))
    new_state = None
    if spec.error_feedback:
        new_state = ErrorFeedback(
            fingerprint=layout.fingerprint, residual=x - sent, rounds=state.rounds + 1
        )
    return EncodedUpdate(body=body, sent=sent, feedback=new_state)


def encode_model(
    weights: npt.ArrayLike,
    layout: Layout,
    spec: CodecSpec,
    *,
    base: ModelVersion | None = None,
    rng: np.random.Generator | int | None = None,
) -> bytes:
    """Encode a global model for the downlink: in full, or as a delta against ``base``
    (a version devices already hold; the body names it and decoding needs it)."""
    if spec.error_feedback:
        raise CodecError("ef keeps per-device state; it is not for the downlink")
    w = _vector(weights, layout, "weights")
    if base is None:
        return _encode(w, layout, spec, BodyKind.MODEL, None, _rng(rng))[0]
    base_weights = _vector(base.weights, layout, "base weights")
    delta = w - base_weights
    return _encode(delta, layout, spec, BodyKind.MODEL_DELTA, base.version, _rng(rng))[0]


# --------------------------------------------------------------------------- decoding


def _payload(body: memoryview, start: int, expected: int, compressed: bool) -> bytes | memoryview:
    """The payload, exactly ``expected`` bytes; a zstd frame must declare that size."""
    rest = body[start:]
    if not compressed:
        if len(rest) != expected:
            raise CodecError(f"body payload is {len(rest)} bytes, header implies {expected}")
        return rest
    try:
        declared = zstandard.frame_content_size(rest)
    except zstandard.ZstdError as exc:
        raise CodecError(f"payload is not a zstd frame: {exc}") from exc
    if declared != expected:
        raise CodecError(
            f"zstd frame declares {declared} bytes (-1: unknown), header implies {expected}"
        )
    try:
        payload = _decompressor().decompress(rest, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd payload does not decompress: {exc}") from exc
    if len(payload) != expected:
        raise CodecError("zstd payload size differs from its declaration")
    return payload


def _decode(
    body: bytes | memoryview, layout: Layout, kinds: tuple[BodyKind, ...]
) -> tuple[BodyHeader, Indices | None, Vector]:
    view = memoryview(body)
    header, start = BodyHeader.from_prefix(view)
    if header.kind not in kinds:
        raise CodecError(f"body is a {header.kind.name.lower()}, expected {kinds[0].name.lower()}")
    if header.fingerprint != layout.fingerprint:
        raise CodecError("body was encoded for another layout (fingerprint mismatch)")
    n, k, spec = header.size, header.count, header.spec
    if n != layout.size or n > MAX_PARAMS:
        raise CodecError(f"body declares {n} parameters, the layout has {layout.size}")
    sparse = spec.sparsify is not None
    if not sparse:
        if k != n or header.index_coding != INDEX_NONE or header.index_bytes:
            raise CodecError("dense body must code every value and carry no indices")
    else:
        if k > n:
            raise CodecError(f"body declares {k} values for {n} parameters")
        if isinstance(spec.sparsify, TopK) and k != _expected_topk(spec.sparsify, layout):
            raise CodecError(f"body declares {k} values, {spec.sparsify} keeps another count")
        if header.index_coding == INDEX_VARINT:
            if not k <= header.index_bytes <= 5 * k:
                raise CodecError("varint index section size is impossible for its count")
        elif header.index_coding == INDEX_BITMAP:
            if header.index_bytes != (n + 7) // 8:
                raise CodecError("bitmap index section size does not match the layout")
        else:
            raise CodecError(f"sparse body has index coding {header.index_coding}")
    q = spec.values
    if not q.quantized:
        scale_count = 0
    elif q.block is not None:
        scale_count = -(-k // q.block)
    else:
        scale_count = len(layout.tensors)
    values_bytes = code_bytes(q.kind, k)
    expected = header.index_bytes + 4 * scale_count + values_bytes
    payload = _payload(view, start, expected, spec.zstd_level is not None)

    indices = None
    pos = header.index_bytes
    if sparse:
        indices = decode_indices(header.index_coding, payload[:pos], k, n)
    if q.quantized:
        scales = np.frombuffer(payload, dtype=np.float32, count=scale_count, offset=pos)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError("scales must be finite and non-negative")
        if scale_count and float(scales.max()) > _FP32_MAX / q.levels:
            raise CodecError("a scale is too large for its levels")
        pos += 4 * scale_count
        lengths = _segments(q, k, layout, indices)
        levels = unpack_levels(q.kind, payload[pos:], k)
        values = levels * _expand(scales, lengths, q)
    else:
        dtype = np.float32 if q.kind == "fp32" else np.float16
        raw = np.frombuffer(payload, dtype=dtype, count=k, offset=pos)
        if not np.isfinite(raw).all():
            raise CodecError("values hold NaN or Inf")
        values = raw.astype(np.float32)
    return header, indices, values


def decode_update_sparse(body: bytes | memoryview, layout: Layout
                         ) -> tuple[Indices | None, Vector]:
    """The coded indices (None when dense) and their values: for aggregators that
    accumulate sparse updates without building a dense vector each time."""
    _, indices, values = _decode(body, layout, (BodyKind.UPDATE,))
    return indices, values


def decode_update(body: bytes, layout: Layout) -> Vector:
    """Decode an update body into a fresh flat float32 vector of ``layout.size``."""
    _, indices, values = _decode(body, layout, (BodyKind.UPDATE,))
    if indices is None:
        return values
    out = np.zeros(layout.size, dtype=np.float32)
    out[indices] = values
    return out


def decode_model(body: bytes, layout: Layout, *, base: ModelVersion | None = None) -> Vector:
    """Decode a downlink model body; a delta body needs the base version it names."""
    header, indices, values = _decode(body, layout, (BodyKind.MODEL, BodyKind.MODEL_DELTA))
    if header.kind == BodyKind.MODEL:
        out = np.zeros(layout.size, dtype=np.float32) if indices is not None else values
    else:
        if base is None:
            raise CodecError(f"body is a delta against version {header.base_version}: no base")
        if base.version != header.base_version:
            raise CodecError(
                f"body is a delta against version {header.base_version}, base is {base.version}"
            )
        if base.weights.shape != (layout.size,):
            raise CodecError("base weights do not match the layout")
        out = base.weights.copy() if indices is not None else base.weights + values
    if indices is not None:
        out[indices] += values
    if not np.isfinite(out).all():
        raise CodecError("decoded model holds NaN or Inf")
    return out
