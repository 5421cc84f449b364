"""A small JSON Schema (draft 2020-12) validator for the keywords docs/schemas/ uses.

The project's schemas use a subset of the draft; this checks instances against exactly
that subset, written from the specification (json-schema.org, "JSON Schema Validation"
and "Core", 2020-12), and refuses any keyword it does not know, so a schema cannot use
one that nothing checks. Points where the draft is easy to get wrong:

- ``integer`` is any number with a zero fractional part (``4.0`` is an integer);
  booleans are not numbers;
- ``minLength``/``maxLength`` count code points; ``pattern`` is searched, not matched
  whole (the schemas anchor their patterns);
- ``properties``/``required``/... apply only to objects, ``items`` only to arrays,
  numeric keywords only to numbers: other types pass them;
- ``if`` without ``then``/``else`` changes nothing; ``enum``/``const`` compare JSON
  values (``1`` equals ``1.0``, ``true`` does not equal ``1``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

KNOWN = frozenset({
    "$schema", "$id", "$ref", "$defs", "title", "description", "default",
    "type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "properties", "required", "additionalProperties",
    "maxProperties", "minProperties", "items", "minItems", "maxItems",
    "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
})


class SchemaError(Exception):
    """The schema itself uses something this validator does not know."""


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _type_ok(x: Any, name: str) -> bool:
    if name == "null":
        return x is None
    if name == "boolean":
        return isinstance(x, bool)
    if name == "number":
        return _is_number(x)
    if name == "integer":
        return _is_number(x) and math.isfinite(x) and float(x).is_integer()
    if name == "string":
        return isinstance(x, str)
    if name == "array":
        return isinstance(x, list)
    if name == "object":
        return isinstance(x, dict)
    raise SchemaError(f"unknown type {name!r}")


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value, booleans apart from numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


class Validator:
    """Validates instances against schemas that refer to each other by ``$id``."""

    def __init__(self, schemas: Mapping[str, Mapping[str, Any]]) -> None:
        self.by_id: dict[str, Mapping[str, Any]] = {}
        for schema in schemas.values():
            self._register(schema)

    def _register(self, schema: Mapping[str, Any]) -> None:
        sid = schema.get("$id")
        if not isinstance(sid, str):
            raise SchemaError("every top-level schema needs an $id")
        self.by_id[sid] = schema

    def errors(self, instance: Any, schema_id: str) -> list[str]:
        out: list[str] = []
        root = self.by_id[schema_id]
        self._check(instance, root, root, "$", out)
        return out

    def valid(self, instance: Any, schema_id: str) -> bool:
        return not self.errors(instance, schema_id)

    def _resolve(self, ref: str, root: Mapping[str, Any]) -> tuple[Mapping[str, Any],
                                                                    Mapping[str, Any]]:
        if ref.startswith("#/$defs/"):
            return root["$defs"][ref[len("#/$defs/"):]], root
        target = self.by_id.get(ref)
        if target is None:
            raise SchemaError(f"unresolvable $ref {ref!r}")
        return target, target

    def _check(self, x: Any, s: Any, root: Mapping[str, Any], at: str, out: list[str]) -> None:
        if s is True:
            return
        if s is False:
            out.append(f"{at}: nothing is allowed here")
            return
        if not isinstance(s, Mapping):
            raise SchemaError(f"{at}: a schema must be an object or a boolean")
        unknown = set(s) - KNOWN
        if unknown:
            raise SchemaError(f"{at}: unknown keywords {sorted(unknown)}")
        if "$ref" in s:
            target, target_root = self._resolve(s["$ref"], root)
            self._check(x, target, target_root, at, out)
        if "type" in s:
            types = s["type"] if isinstance(s["type"], list) else [s["type"]]
            if not any(_type_ok(x, t) for t in types):
                out.append(f"{at}: {x!r:.60} is not of type {types}")
                return  # the other keywords would only repeat the same fault
        if "enum" in s and not any(_equal(x, v) for v in s["enum"]):
            out.append(f"{at}: {x!r:.60} is not one of {s['enum']}")
        if "const" in s and not _equal(x, s["const"]):
            out.append(f"{at}: {x!r:.60} is not {s['const']!r}")
        if _is_number(x):
            if "minimum" in s and x < s["minimum"]:
                out.append(f"{at}: {x} < minimum {s['minimum']}")
            if "maximum" in s and x > s["maximum"]:
                out.append(f"{at}: {x} > maximum {s['maximum']}")
            if "exclusiveMinimum" in s and not x > s["exclusiveMinimum"]:
                out.append(f"{at}: {x} <= exclusiveMinimum {s['exclusiveMinimum']}")
            if "exclusiveMaximum" in s and not x < s["exclusiveMaximum"]:
                out.append(f"{at}: {x} >= exclusiveMaximum {s['exclusiveMaximum']}")
        if isinstance(x, str):
            if "minLength" in s and len(x) < s["minLength"]:
                out.append(f"{at}: shorter than {s['minLength']}")
            if "maxLength" in s and len(x) > s["maxLength"]:
                out.append(f"{at}: longer than {s['maxLength']}")
            if "pattern" in s and not re.search(s["pattern"], x):
                out.append(f"{at}: does not match {s['pattern']}")
        if isinstance(x, dict):
            for name in s.get("required", ()):
                if name not in x:
                    out.append(f"{at}: lacks required {name!r}")
            props = s.get("properties", {})
            for name, value in x.items():
                if name in props:
                    self._check(value, props[name], root, f"{at}.{name}", out)
                elif "additionalProperties" in s:
                    self._check(value, s["additionalProperties"], root, f"{at}.{name}", out)
            if "maxProperties" in s and len(x) > s["maxProperties"]:
                out.append(f"{at}: more than {s['maxProperties']} properties")
            if "minProperties" in s and len(x) < s["minProperties"]:
                out.append(f"{at}: fewer than {s['minProperties']} properties")
        if isinstance(x, list):
            if "items" in s:
                for i, item in enumerate(x):
                    self._check(item, s["items"], root, f"{at}[{i}]", out)
            if "minItems" in s and len(x) < s["minItems"]:
                out.append(f"{at}: fewer than {s['minItems']} items")
            if "maxItems" in s and len(x) > s["maxItems"]:
                out.append(f"{at}: more than {s['maxItems']} items")
        for sub in s.get("allOf", ()):
            self._check(x, sub, root, at, out)
        if "anyOf" in s and not any(self._passes(x, sub, root) for sub in s["anyOf"]):
            out.append(f"{at}: matches none of anyOf")
        if "oneOf" in s and sum(self._passes(x, sub, root) for sub in s["oneOf"]) != 1:
            out.append(f"{at}: does not match exactly one of oneOf")
        if "not" in s and self._passes(x, s["not"], root):
            out.append(f"{at}: matches 'not'")
        if "if" in s:
            branch = "then" if self._passes(x, s["if"], root) else "else"
            if branch in s:
                self._check(x, s[branch], root, at, out)

    def _passes(self, x: Any, s: Any, root: Mapping[str, Any]) -> bool:
        sub: list[str] = []
        self._check(x, s, root, "", sub)
        return not sub


def check_keywords(schema: Any, at: str = "$") -> None:
    """Raise SchemaError if ``schema`` (walked whole) uses a keyword not in ``KNOWN``."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise SchemaError(f"{at}: a schema must be an object or a boolean")
    unknown = set(schema) - KNOWN
    if unknown:
        raise SchemaError(f"{at}: unknown keywords {sorted(unknown)}")
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        if key in schema:
            check_keywords(schema[key], f"{at}.{key}")
    for key in ("properties", "$defs"):
        for name, sub in schema.get(key, {}).items():
            check_keywords(sub, f"{at}.{key}.{name}")
    for key in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(schema.get(key, ())):
            check_keywords(sub, f"{at}.{key}[{i}]")
