"""The codec spec: a short string such as ``ef+topk:0.01+q8:block=256+zstd:3``.

It is parsed once (from configuration, or from a body's header) into a typed, frozen
``CodecSpec``; ``str(spec)`` gives the canonical string back, which is what a body
carries. Grammar (stages joined by ``+``, in this order, each at most once)::

    ef                       error feedback: the part not sent is carried to the next update
    topk:F | topk:N          keep the F fraction (0 < F <= 1, a float such as 0.01) or the
                             N (an integer >= 1) largest-magnitude values, over the whole
                             model; add ``:per_tensor`` to pick F (or N) within each tensor
    thresh:T                 keep values with |x| >= T (T > 0)
    fp32 | fp16              dense floats (fp32 is the default value coding)
    q8 | q4 | tern | q1      symmetric quantization: 127, 7 or 1 level(s) per sign with a
                             float32 scale, or sign bit times a scale; options
                             ``:block=B`` (a scale per B values; default one per tensor)
                             and ``:sr`` (unbiased stochastic rounding)
    zstd | zstd:L            zstd at level L (1..22, default 3) over the payload

``ef`` needs a lossy stage after it. Options of a stage may come in any order; the
canonical form writes ``block`` before ``sr``, floats with Python's shortest ``repr``,
always writes the zstd level, and leaves out ``fp32`` unless it is the only stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from device_profiles._errors import ConfigError

__all__ = ["CodecSpec", "Quantize", "Threshold", "TopK", "ValueKind"]

ValueKind = Literal["fp32", "fp16", "q8", "q4", "tern", "q1"]
_VALUE_KINDS: tuple[str, ...] = get_args(ValueKind)
_MAX_COUNT = 1 << 30
_MAX_BLOCK = 1 << 24
_ORDER = "ef, topk|thresh, fp32|fp16|q8|q4|tern|q1, zstd"


@dataclass(frozen=True, kw_only=True)
class TopK:
    """Keep the largest-magnitude values: a fraction or a count, global or per tensor."""

    fraction: float | None = None
    count: int | None = None
    per_tensor: bool = False

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise ConfigError("topk takes exactly one of a fraction or a count")
        if self.fraction is not None and not (
            math.isfinite(self.fraction) and 0.0 < self.fraction <= 1.0
        ):
            raise ConfigError(f"topk fraction must be in (0, 1], got {self.fraction}")
        if self.count is not None and not 1 <= self.count <= _MAX_COUNT:
            raise ConfigError(f"topk count must be in 1..{_MAX_COUNT}, got {self.count}")

    def kept(self, size: int) -> int:
        """How many of ``size`` values are kept: min(size, max(1, ceil(F * size))) or N."""
        if self.count is not None:
            return min(self.count, size)
        assert self.fraction is not None
        return min(size, max(1, math.ceil(self.fraction * size)))

    def __str__(self) -> str:
        arg = repr(self.fraction) if self.fraction is not None else str(self.count)
        return f"topk:{arg}" + (":per_tensor" if self.per_tensor else "")


@dataclass(frozen=True, kw_only=True)
class Threshold:
    """Keep the values with magnitude at least ``value``."""

    value: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.value) and self.value > 0.0):
            raise ConfigError(f"thresh needs a finite threshold > 0, got {self.value}")

    def __str__(self) -> str:
        return f"thresh:{self.value!r}"


@dataclass(frozen=True, kw_only=True)
class Quantize:
    """How values are written: dense floats or a quantizer with scales."""

    kind: ValueKind = "fp32"
    block: int | None = None
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _VALUE_KINDS:
            raise ConfigError(f"unknown value coding {self.kind!r}")
        if self.kind in ("fp32", "fp16") and (self.block is not None or self.stochastic):
            raise ConfigError(f"{self.kind} takes no options (block, sr are for quantizers)")
        if self.block is not None and not 1 <= self.block <= _MAX_BLOCK:
            raise ConfigError(f"block must be in 1..{_MAX_BLOCK}, got {self.block}")

    @property
    def levels(self) -> int:
        """Largest integer level per sign (q1 is a sign times a scale: 1)."""
        return {"q8": 127, "q4": 7, "tern": 1, "q1": 1}.get(self.kind, 0)

    @property
    def quantized(self) -> bool:
        return self.kind not in ("fp32", "fp16")

    def __str__(self) -> str:
        text: str = self.kind
        if self.block is not None:
            text += f":block={self.block}"
        if self.stochastic:
            text += ":sr"
        return text


@dataclass(frozen=True, kw_only=True)
class CodecSpec:
    """A parsed codec pipeline; build it with ``CodecSpec.parse("topk:0.01+q8+zstd")``."""

    error_feedback: bool = False
    sparsify: TopK | Threshold | None = None
    values: Quantize = field(default_factory=Quantize)
    zstd_level: int | None = None

    def __post_init__(self) -> None:
        if self.zstd_level is not None and not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"zstd level must be in 1..22, got {self.zstd_level}")
        if self.error_feedback and self.lossless:
            raise ConfigError("ef needs a lossy stage after it (topk, thresh, fp16 or a quantizer)")

    @property
    def lossless(self) -> bool:
        return self.sparsify is None and self.values.kind == "fp32"

    def __str__(self) -> str:
        parts: list[str] = []
        if self.error_feedback:
            parts.append("ef")
        if self.sparsify is not None:
            parts.append(str(self.sparsify))
        if self.values.kind != "fp32" or not (parts or self.zstd_level is not None):
            parts.append(str(self.values))
        if self.zstd_level is not None:
            parts.append(f"zstd:{self.zstd_level}")
        return "+".join(parts)

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """Parse a spec string; every mistake is a ``ConfigError`` naming the stage."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("empty codec spec (try 'fp32' or 'topk:0.01+q8+zstd')")
        if len(text) > 255 or not text.isascii():
            raise ConfigError("codec spec must be ASCII and at most 255 characters")
        fields: dict[str, object] = {}
        rank = -1
        for raw in text.strip().split("+"):
            name, *args = raw.strip().split(":")
            stage_rank = _rank(name)
            if stage_rank <= rank:
                raise ConfigError(
                    f"stage {name!r} in {text!r} is repeated or out of order (order: {_ORDER})"
                )
            rank = stage_rank
            if name == "ef":
                _no_args(name, args)
                fields["error_feedback"] = True
            elif name == "topk":
                fields["sparsify"] = _parse_topk(args)
            elif name == "thresh":
                if len(args) != 1:
                    raise ConfigError("thresh takes one threshold, e.g. thresh:0.001")
                fields["sparsify"] = Threshold(value=_float(name, args[0]))
            elif name == "zstd":
                if len(args) > 1:
                    raise ConfigError("zstd takes at most a level, e.g. zstd:3")
                fields["zstd_level"] = _int(name, args[0]) if args else 3
            else:
                fields["values"] = _parse_values(name, args)
        return cls(**fields)  # type: ignore[arg-type]


def _rank(name: str) -> int:
    if name == "ef":
        return 0
    if name in ("topk", "thresh"):
        return 1
    if name in _VALUE_KINDS:
        return 2
    if name == "zstd":
        return 3
    raise ConfigError(f"unknown codec stage {name!r} (stages: {_ORDER})")


def _no_args(name: str, args: list[str]) -> None:
    if args:
        raise ConfigError(f"{name} takes no arguments, got {':'.join(args)!r}")


def _float(stage: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise ConfigError(f"{stage}: {text!r} is not a number") from exc
    if not math.isfinite(value):
        raise ConfigError(f"{stage}: {text!r} is not a finite number")
    return value


def _int(stage: str, text: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"{stage}: {text!r} is not a non-negative integer")
    return int(text)


def _parse_topk(args: list[str]) -> TopK:
    if not args:
        raise ConfigError("topk needs a fraction or a count, e.g. topk:0.01 or topk:5000")
    amount, *options = args
    per_tensor = False
    for option in options:
        if option != "per_tensor" or per_tensor:
            raise ConfigError(f"topk: unknown or repeated option {option!r} (known: per_tensor)")
        per_tensor = True
    if amount.isdigit():
        return TopK(count=int(amount), per_tensor=per_tensor)
    fraction = _float("topk", amount)
    if fraction > 1.0:
        raise ConfigError(f"topk fraction {amount!r} is above 1; write a count as an integer")
    return TopK(fraction=fraction, per_tensor=per_tensor)


def _parse_values(kind: str, args: list[str]) -> Quantize:
    block: int | None = None
    stochastic = False
    for option in args:
        if option == "sr" and not stochastic:
            stochastic = True
        elif option.startswith("block=") and block is None:
            block = _int(kind, option.removeprefix("block="))
        else:
            raise ConfigError(f"{kind}: unknown or repeated option {option!r} (known: block=B, sr)")
    return Quantize(kind=kind, block=block, stochastic=stochastic)  # type: ignore[arg-type]
