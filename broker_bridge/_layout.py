"""The parameter layout of a model: which float32 tensors, in which order, of which shape.

An update travels as one flat float32 vector; the layout says how to cut it back into
named tensors. Both sides hold the layout already (it comes with the model), so a body
carries only its 8-byte fingerprint, which lets a decoder refuse an update made for
another model instead of silently mixing weights.

Wire format of ``Layout.to_bytes`` (little-endian)::

    offset  size  field
    0       4     magic b"FLLO"
    4       1     format version (1)
    5       4     T: number of tensors, u32, 1 <= T <= MAX_TENSORS
    9       ...   T entries, in order:
                    u16  name length L (1..MAX_NAME_BYTES)
                    L    name, UTF-8, unique within the layout
                    u8   ndim (0..MAX_NDIM; 0 is a scalar)
                    u32  each dimension, >= 1
    (nothing after the last entry)

The fingerprint is the first 8 bytes of SHA-256 over the entries (everything from
offset 9 on), so it depends on names, order and shapes only.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from broker_bridge._errors import CodecError

__all__ = ["MAX_NAME_BYTES", "MAX_NDIM", "MAX_PARAMS", "MAX_TENSORS", "Layout"]

MAX_TENSORS = 65_536
MAX_NAME_BYTES = 1_024
MAX_NDIM = 8
MAX_PARAMS = 1 << 30
"""Hard cap on parameters in one layout (4 GiB of float32): bounds every allocation."""

_MAGIC = b"FLLO"
_VERSION = 1
_HEAD = struct.Struct("<4sBI")
_MIN_ENTRY = 2 + 1 + 1  # name length, one name byte, ndim


def _entry_bytes(name: str, shape: tuple[int, ...]) -> bytes:
    raw = name.encode("utf-8")
    return struct.pack("<H", len(raw)) + raw + struct.pack(f"<B{len(shape)}I", len(shape), *shape)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Ordered (name, shape) float32 tensors of a model; an update is their flat concat."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    size: int = field(init=False, repr=False, compare=False)
    offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    fingerprint: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tensors = tuple((name, tuple(int(d) for d in shape)) for name, shape in self.tensors)
        if not 1 <= len(tensors) <= MAX_TENSORS:
            raise CodecError(f"a layout needs 1..{MAX_TENSORS} tensors, got {len(tensors)}")
        names = [name for name, _ in tensors]
        if len(set(names)) != len(names):
            raise CodecError("layout tensor names must be unique")
        offsets = [0]
        for name, shape in tensors:
            if not isinstance(name, str) or not 1 <= len(name.encode("utf-8")) <= MAX_NAME_BYTES:
                raise CodecError(f"tensor name must be 1..{MAX_NAME_BYTES} UTF-8 bytes: {name!r}")
            if len(shape) > MAX_NDIM or any(not 1 <= d < 2**32 for d in shape):
                raise CodecError(f"tensor {name!r} has an unsupported shape {shape}")
            offsets.append(offsets[-1] + math.prod(shape))
            if offsets[-1] > MAX_PARAMS:
                raise CodecError(f"layout exceeds {MAX_PARAMS} parameters")
        entries = b"".join(_entry_bytes(name, shape) for name, shape in tensors)
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "size", offsets[-1])
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "fingerprint", hashlib.sha256(entries).digest()[:8])

    @classmethod
    def of(cls, arrays: Mapping[str, npt.ArrayLike]) -> Layout:
        """The layout of named arrays, in the mapping's order."""
        return cls(tensors=tuple((name, np.shape(a)) for name, a in arrays.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tensors)

    def flatten(self, arrays: Mapping[str, npt.ArrayLike]) -> npt.NDArray[np.float32]:
        """Concatenate named arrays into one float32 vector in layout order."""
        if set(arrays) != set(self.names):
            missing = sorted(set(self.names) - set(arrays))
            extra = sorted(set(arrays) - set(self.names))
            raise CodecError(f"arrays do not match the layout: missing {missing}, extra {extra}")
        parts = []
        for name, shape in self.tensors:
            a = np.asarray(arrays[name])
            if a.shape != shape:
                raise CodecError(f"tensor {name!r} has shape {a.shape}, layout says {shape}")
            parts.append(a.astype(np.float32, copy=False).ravel())
        return np.concatenate(parts)

    def unflatten(self, flat: npt.ArrayLike) -> dict[str, npt.NDArray[np.float32]]:
        """Cut a flat vector into named tensors (views into ``flat`` when it is float32)."""
        vec = np.asarray(flat, dtype=np.float32)
        if vec.shape != (self.size,):
            raise CodecError(f"flat vector has shape {vec.shape}, layout needs ({self.size},)")
        return {
            name: vec[self.offsets[i] : self.offsets[i + 1]].reshape(shape)
            for i, (name, shape) in enumerate(self.tensors)
        }

    def to_bytes(self) -> bytes:
        entries = b"".join(_entry_bytes(name, shape) for name, shape in self.tensors)
        return _HEAD.pack(_MAGIC, _VERSION, len(self.tensors)) + entries

    @classmethod
    def from_bytes(cls, data: bytes) -> Layout:
        """Decode a layout, checking every count against the bytes actually present."""
        view = memoryview(data)
        if len(view) < _HEAD.size:
            raise CodecError("layout truncated: shorter than its header")
        magic, version, count = _HEAD.unpack_from(view, 0)
        if magic != _MAGIC:
            raise CodecError("not a fleetlearn layout (bad magic)")
        if version != _VERSION:
            raise CodecError(f"unsupported layout version {version}")
        if not 1 <= count <= MAX_TENSORS or count * _MIN_ENTRY > len(view) - _HEAD.size:
            raise CodecError(f"layout declares {count} tensors, impossible in {len(view)} bytes")
        pos = _HEAD.size
        tensors: list[tuple[str, tuple[int, ...]]] = []
        for _ in range(count):
            if pos + 2 > len(view):
                raise CodecError("layout truncated in a tensor entry")
            (name_len,) = struct.unpack_from("<H", view, pos)
            pos += 2
            if not 1 <= name_len <= MAX_NAME_BYTES or pos + name_len + 1 > len(view):
                raise CodecError("layout tensor name length is out of range or truncated")
            try:
                name = bytes(view[pos : pos + name_len]).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CodecError("layout tensor name is not UTF-8") from exc
            pos += name_len
            ndim = view[pos]
            pos += 1
            if ndim > MAX_NDIM or pos + 4 * ndim > len(view):
                raise CodecError("layout tensor rank is out of range or truncated")
            shape = struct.unpack_from(f"<{ndim}I", view, pos)
            pos += 4 * ndim
            tensors.append((name, shape))
        if pos != len(view):
            raise CodecError(f"layout has {len(view) - pos} trailing bytes")
        return cls(tensors=tuple(tensors))
