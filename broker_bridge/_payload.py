"""Typed JSON payloads: the checks every control message goes through, in one place.

A payload is a frozen dataclass (``_Payload``). Its type hints say the JSON types
(``int``, ``float``, ``str``, ``bool``, lists of those, ``dict`` for an object, ``X |
None`` for nullable); a field without a default is required. ``rule(...)`` attaches the
rest as JSON Schema keywords (``minimum``, ``maximum``, ``exclusiveMinimum``,
``minLength``, ``maxLength``, ``pattern``, ``enum``, ``items`` for a list's items) plus
a ``description``. ``from_dict`` enforces exactly these, and ``broker_bridge._schema``
writes the same facts as JSON Schema (docs/schemas/), so what the schema allows and what
a receiver accepts cannot drift apart (tests/broker_bridge/test_schemas.py checks both ways).

Every integer lies within +-(2^53 - 1), every number is finite: what any JSON
implementation reads exactly. As in JSON Schema, ``4.0`` is the integer 4.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import field
from functools import cache
from typing import Any, TypeVar

from broker_bridge._envelope import Kind, Message, json_message
from broker_bridge._errors import WireError

MAX_SAFE_INT = 2**53 - 1
"""Integers in control messages stay within what every JSON implementation reads
exactly (a double's integer range)."""
U32 = 2**32 - 1
U16 = 2**16 - 1
SHA256_HEX = "^[0-9a-f]{64}$"
"""A lowercase hex SHA-256 digest."""
ASCII = "\\u0000-\\u007f"

RULE_KEYS = frozenset({"minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength",
                       "pattern", "enum", "items", "description"})


class ProtocolError(WireError):
    """A well-formed envelope whose body does not follow the protocol."""


T = TypeVar("T", bound="_Payload")


def rule(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
         **keywords: Any) -> Any:
    """A dataclass field with JSON Schema keywords (see the module doc)."""
    unknown = set(keywords) - RULE_KEYS
    if unknown:
        raise TypeError(f"unknown rule keywords {sorted(unknown)}")
    return field(default=default, default_factory=factory, metadata={"rule": keywords})


def rules_of(f: dataclasses.Field[Any]) -> dict[str, Any]:
    return dict(f.metadata.get("rule", {}))


_SCALARS: dict[type, tuple[type, ...]] = {
    int: (int,), float: (int, float), str: (str,), bool: (bool,),
}


@cache
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


def _checked(keywords: dict[str, Any]) -> dict[str, Any]:
    """The keywords a value is checked against, a list's ``items`` too (a
    ``description`` checks nothing); resolved once per field by ``_schema``."""
    out = {k: v for k, v in keywords.items() if k != "description"}
    if "items" in out:
        out["items"] = _checked(out["items"])
    return out


Checker = Callable[[str, Any], None]
"""``check(field_name, value)``: raises ``ProtocolError`` when a rule does not hold."""


def compile_rules(keywords: dict[str, Any]) -> Checker | None:
    """``keywords`` (``_checked``'s) as one function (None: nothing to check). A payload
    class's fields are compiled once (``_schema``): every message built or parsed runs
    them, and a proof carries dozens of hashes, each matched against its pattern."""
    enum = keywords.get("enum")
    bounds = [(k, keywords[k]) for k in ("minimum", "maximum", "exclusiveMinimum")
              if k in keywords]
    min_len, max_len = keywords.get("minLength"), keywords.get("maxLength")
    pattern = keywords.get("pattern")
    search = None if pattern is None else _pattern(pattern).search
    items = compile_rules(keywords["items"]) if keywords.get("items") else None
    if enum is None and not bounds and min_len is None and max_len is None and (
            search is None and items is None):
        return None

    def check(name: str, value: Any) -> None:
        if value is None:
            return
        if enum is not None and value not in enum:
            raise ProtocolError(f"field {name!r} must be one of {list(enum)}")
        if bounds and isinstance(value, int | float) and not isinstance(value, bool):
            for key, bound in bounds:
                if key == "minimum" and value < bound:
                    raise ProtocolError(f"field {name!r} must be >= {bound}")
                if key == "maximum" and value > bound:
                    raise ProtocolError(f"field {name!r} must be <= {bound}")
                if key == "exclusiveMinimum" and not value > bound:
                    raise ProtocolError(f"field {name!r} must be > {bound}")
        if isinstance(value, str):
            # JSON Schema counts code points, as len() does.
            if min_len is not None and len(value) < min_len:
                raise ProtocolError(f"field {name!r} must have at least {min_len} characters")
            if max_len is not None and len(value) > max_len:
                raise ProtocolError(f"field {name!r} must have at most {max_len} characters")
            if search is not None and not search(value):
                raise ProtocolError(f"field {name!r} does not match {pattern}")
        if items is not None and isinstance(value, list):
            item_name = f"{name}[]"
            for item in value:
                items(item_name, item)

    return check


@cache
def _hint(tp: Any) -> tuple[str, Any]:
    """What a type hint asks for: ("optional", inner), ("list", item), ("object", None)
    or ("scalar", tp) (resolved once per hint: ``typing`` introspection is slow)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        return ("optional" if type(None) in args else "union"), inner[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        return "list", item
    if origin is dict or tp is dict:
        return "object", None
    return "scalar", tp


def check_value(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the type hint ``tp`` (see the module doc)."""
    what, inner = _hint(tp)
    if what in ("optional", "union"):
        if value is None and what == "optional":
            return None
        return check_value(name, value, inner)
    if what == "list":
        if not isinstance(value, list):
            raise ProtocolError(f"field {name!r} must be a list")
        item_name = f"{name}[]"
        return [check_value(item_name, v, inner) for v in value]
    if what == "object":
        if not isinstance(value, dict):
            raise ProtocolError(f"field {name!r} must be an object")
        return value
    if tp in _SCALARS:
        if isinstance(value, bool) and tp is not bool:
            raise ProtocolError(f"field {name!r} must be {tp.__name__}, not bool")
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON (and JSON Schema) make no difference between 4 and 4.0
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
    raise TypeError(f"unsupported protocol field type {tp!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, _Payload):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@cache
def _schema(cls: type) -> tuple[tuple[str, Any, Checker | None, dataclasses.Field[Any]], ...]:
    """A payload class's fields with their resolved types and rules, resolved once
    (``typing.get_type_hints`` is slow, and a task is parsed for every device, every round)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name], compile_rules(_checked(rules_of(f))), f)
                 for f in dataclasses.fields(cls))


_RULES_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fleetlearn_payload_rules_checked", default=False)
"""True while ``from_dict`` builds the payload whose rules it has just checked."""


class _Payload:
    """JSON (de)serialisation with type and rule checks, for frozen dataclasses."""

    KIND: typing.ClassVar[Kind]

    def __post_init__(self) -> None:
        """Rules hold for a payload built in code too (a programming error otherwise);
        ``from_dict`` checked them already, field by field, with its own errors."""
        if _RULES_CHECKED.get():
            return
        for name, _, check, _ in _schema(type(self)):  # type: ignore[arg-type]
            if check is not None:
                try:
                    check(name, getattr(self, name))
                except ProtocolError as exc:
                    raise ValueError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        """The payload as plain JSON values (``dataclasses.asdict`` without its deep
        copies: a task is written for every device, every round)."""
        return {name: _plain(getattr(self, name))
                for name, *_ in _schema(type(self))}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[T], data: Any) -> T:
        if not isinstance(data, dict):
            raise ProtocolError(f"{cls.__name__} body must be a JSON object")
        kwargs: dict[str, Any] = {}
        for name, hint, check, f in _schema(cls):  # type: ignore[arg-type]
            if name in data:
                value = check_value(name, data[name], hint)
                if check is not None:
                    check(name, value)
                kwargs[name] = value
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.__name__} lacks required field {name!r}")
        checked = _RULES_CHECKED.set(True)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"invalid {cls.__name__}: {exc}") from exc
        finally:
            _RULES_CHECKED.reset(checked)

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
