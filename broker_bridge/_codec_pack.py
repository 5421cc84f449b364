"""Vectorised bit packing for the update codec: index coding and quantized codes.

Everything here is whole-array numpy (a handful of passes, no per-element Python), and
every unpacker validates what it reads and raises ``CodecError``. The byte formats are
described in ``broker_bridge._codec``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from broker_bridge._errors import CodecError

__all__ = [
    "INDEX_BITMAP",
    "INDEX_NONE",
    "INDEX_VARINT",
    "code_bytes",
    "decode_indices",
    "encode_indices",
    "pack_codes",
    "unpack_levels",
]

INDEX_NONE = 0
INDEX_VARINT = 1
INDEX_BITMAP = 2

_VARINT_MAX_BYTES = 5  # gaps are < 2**31, so at most 5 groups of 7 bits
_PER_BYTE = {"q8": 1, "q4": 2, "tern": 4, "q1": 8}


def _varint_lengths(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    lengths = np.ones(values.shape, dtype=np.int64)
    for j in range(1, _VARINT_MAX_BYTES):
        lengths += values >= np.uint64(1 << (7 * j))
    return lengths


def _varint_encode(values: npt.NDArray[np.uint64], lengths: npt.NDArray[np.int64]) -> bytes:
    """LEB128: 7 bits per byte, least significant group first, high bit = more follows."""
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    for j in range(int(lengths.max(initial=0))):
        sel = lengths > j
        group = (values[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = np.where(lengths[sel] > j + 1, 0x80, 0).astype(np.uint8)
        out[starts[sel] + j] = group.astype(np.uint8) | more
    return out.tobytes()


def _varint_decode(buf: npt.NDArray[np.uint8], count: int) -> npt.NDArray[np.uint64]:
    if buf.size == 0:
        if count:
            raise CodecError(f"index section is empty but {count} indices are declared")
        return np.empty(0, dtype=np.uint64)
    last = buf < 0x80
    if not last[-1]:
        raise CodecError("index varint is truncated (last byte has the continuation bit)")
    ends = np.flatnonzero(last)
    if ends.size != count:
        raise CodecError(f"index section holds {ends.size} varints, {count} declared")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > _VARINT_MAX_BYTES:
        raise CodecError("index varint longer than 5 bytes")
    values = (buf[starts] & 0x7F).astype(np.uint64)
    for j in range(1, int(lengths.max())):
        sel = np.flatnonzero(lengths > j)
        values[sel] |= (buf[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return values


def encode_indices(indices: npt.NDArray[np.int64], size: int) -> tuple[int, bytes]:
    """Code sorted distinct indices as delta-varint or bitmap, whichever is smaller."""
    gaps = np.diff(indices, prepend=-1) - 1
    gaps_u = gaps.astype(np.uint64)
    lengths = _varint_lengths(gaps_u)
    if int(lengths.sum()) <= (size + 7) // 8:
        return INDEX_VARINT, _varint_encode(gaps_u, lengths)
    mask = np.zeros(size, dtype=np.bool_)
    mask[indices] = True
    return INDEX_BITMAP, np.packbits(mask, bitorder="little").tobytes()


def decode_indices(
    coding: int, data: bytes | memoryview, count: int, size: int
) -> npt.NDArray[np.int64]:
    """Indices from their coded form; strictly increasing, in range, exactly ``count``."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if coding == INDEX_VARINT:
        gaps = _varint_decode(buf, count)
        if gaps.size and int(gaps.max()) >= size:
            raise CodecError("index gap beyond the layout size")
        indices = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if indices.size and int(indices[-1]) >= size:
            raise CodecError(f"index {int(indices[-1])} out of range for {size} parameters")
        return indices
    if coding == INDEX_BITMAP:
        if buf.size != (size + 7) // 8:
            raise CodecError("bitmap length does not match the layout size")
        bits = np.unpackbits(buf, bitorder="little")
        if bits[size:].any():
            raise CodecError("bitmap padding bits are not zero")
        indices = np.flatnonzero(bits[:size])
        if indices.size != count:
            raise CodecError(f"bitmap marks {indices.size} indices, {count} declared")
        return indices.astype(np.int64, copy=False)
    raise CodecError(f"unknown index coding {coding}")


def code_bytes(kind: str, count: int) -> int:
    """Bytes taken by ``count`` values written as ``kind``."""
    if kind == "fp32":
        return 4 * count
    if kind == "fp16":
        return 2 * count
    per = _PER_BYTE[kind]
    return (count + per - 1) // per


def pack_codes(kind: str, levels: npt.NDArray[np.int8]) -> bytes:
    """Pack integer levels (q8: -127..127, q4: -7..7, tern: -1..1, q1: -1 or 1)."""
    if kind == "q8":
        return levels.astype(np.int8, copy=False).tobytes()
    if kind == "q1":
        return np.packbits(levels > 0, bitorder="little").tobytes()
    bits = 4 if kind == "q4" else 2
    per = 8 // bits
    offset = 7 if kind == "q4" else 1
    codes = np.zeros(-(-levels.size // per) * per, dtype=np.uint8)
    codes[: levels.size] = (levels + offset).astype(np.uint8)
    grid = codes.reshape(-1, per)
    packed = grid[:, 0].copy()
    for j in range(1, per):
        packed |= grid[:, j] << np.uint8(bits * j)
    return packed.tobytes()


def _tables(bits: int, offset: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Per byte value: its levels as float32, and whether it holds a forbidden code."""
    per = 8 // bits
    byte = np.arange(256, dtype=np.int64)[:, None]
    codes = (byte >> (bits * np.arange(per))) & ((1 << bits) - 1)
    forbidden = (codes == 2 * offset + 1).any(axis=1)
    return (codes - offset).astype(np.float32), forbidden


_Q4_LEVELS, _Q4_BAD = _tables(4, 7)
_TERN_LEVELS, _TERN_BAD = _tables(2, 1)
_Q1_LEVELS = np.where(
    (np.arange(256)[:, None] >> np.arange(8)) & 1, np.float32(1), np.float32(-1)
).astype(np.float32)


def unpack_levels(kind: str, data: bytes | memoryview, count: int) -> npt.NDArray[np.float32]:
    """Integer levels as float32, rejecting forbidden codes and non-zero padding."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != code_bytes(kind, count):
        raise CodecError(f"{kind} codes take {buf.size} bytes, {count} values need more/less")
    if kind == "q8":
        signed = buf.view(np.int8)
        if (signed == -128).any():
            raise CodecError("q8 code -128 is not allowed")
        return signed.astype(np.float32)
    per = _PER_BYTE[kind]
    spare = buf.size * per - count
    if spare and int(buf[-1]) >> ((8 // per) * (per - spare)):
        raise CodecError(f"{kind} padding bits are not zero")
    if kind == "q1":
        return _Q1_LEVELS[buf].reshape(-1)[:count]
    levels, bad = (_Q4_LEVELS, _Q4_BAD) if kind == "q4" else (_TERN_LEVELS, _TERN_BAD)
    if bad[buf].any():
        raise CodecError(f"{kind} codes hold a forbidden value")
    return levels[buf].reshape(-1)[:count]
