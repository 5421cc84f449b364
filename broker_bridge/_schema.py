"""JSON Schemas (draft 2020-12) of the control messages, from their payload classes.

``message_schemas()`` builds one schema per JSON body (docs/schemas/*.schema.json)
from the same facts the receivers enforce (``broker_bridge._payload``): type hints give
the JSON types, nullability and which fields are required; ``rule`` keywords give the
bounds; a class's ``SCHEMA_EXTRA`` adds what one field cannot say (the statuses an ack
may have for what it acknowledges) or what a receiver checks apart (a hello's profile and
eligibility). The device profile's schema comes from ``device_profiles``.

Unknown fields are allowed everywhere (receivers ignore them). Schemas refer to each
other by ``$id`` (``urn:fleetlearn:protocol:2:<name>``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
from typing import Any

from broker_bridge._ledger_msg import InclusionProof, TreeHead
from broker_bridge._model_msg import ModelMeta
from broker_bridge._payload import MAX_SAFE_INT, _Payload, rules_of
from broker_bridge._protocol import (
    Ack,
    Cancel,
    Eligibility,
    ErrorReport,
    Hello,
    Presence,
    Request,
    TaskSpec,
    UpdateMeta,
    schema_id,
)
from device_profiles import profile_schema

DIALECT = "https://json-schema.org/draft/2020-12/schema"


MESSAGES: dict[str, type[_Payload]] = {
    "presence": Presence,
    "hello": Hello,
    "eligibility": Eligibility,
    "task": TaskSpec,
    "update_meta": UpdateMeta,
    "model_meta": ModelMeta,
    "ack": Ack,
    "cancel": Cancel,
    "error": ErrorReport,
    "request": Request,
    "tree_head": TreeHead,
    "inclusion_proof": InclusionProof,
}
"""Schema name -> payload class (``ModelMeta`` and ``UpdateMeta`` are the JSON prefixes
of model and update bodies; ``Eligibility`` sits inside a hello)."""

WHERE = {
    "presence": "body of a presence message (kind 2, retained, on .../presence)",
    "hello": "body of a hello (kind 1, on .../up/hello)",
    "eligibility": "the eligibility object inside a hello",
    "task": "body of a task (kind 3, on .../down/task)",
    "update_meta": "JSON metadata at the start of an update body (kind 4)",
    "model_meta": "JSON metadata at the start of a model body (kind 5)",
    "ack": "body of an ack (kind 7): aggregator -> device on .../down/ack for an update, "
           "device -> aggregator on .../up/ack for a task",
    "cancel": "body of a cancel (kind 8, on .../down/cancel)",
    "error": "body of an error report (kind 9, on .../up/error)",
    "request": "body of a control message (kind 11): a device's request on .../up/request, "
               "or the aggregator's roll call on broadcast/control",
    "tree_head": "body of a ledger message (kind 12, retained, on broadcast/ledger): the "
                 "training ledger's signed tree head",
    "inclusion_proof": "body of a proof (kind 13, on .../down/proof): a counted update is in "
                       "the training ledger",
}


def _json_type(name: str, tp: Any) -> dict[str, Any]:
    """The JSON Schema of one type hint (the ``check_value`` side of a field)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{name}: only X | None unions are supported")
        out = _json_type(name, inner[0])
        out["type"] = [out["type"], "null"]
        return out
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _json_type(f"{name}[]", item)}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if tp is int:
        return {"type": "integer", "minimum": -MAX_SAFE_INT, "maximum": MAX_SAFE_INT}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    raise TypeError(f"{name}: no JSON Schema for {tp!r}")


def _with_rules(schema: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    for key, value in keywords.items():
        if key == "items":
            out["items"] = _with_rules(out["items"], value)
        elif key == "minimum" and "minimum" in out:
            out["minimum"] = max(out["minimum"], value)
        elif key == "maximum" and "maximum" in out:
            out["maximum"] = min(out["maximum"], value)
        else:
            out[key] = list(value) if key == "enum" else value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def payload_schema(name: str, cls: type[_Payload]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        keywords = rules_of(f)
        prop = _with_rules(_json_type(f.name, hints[f.name]), keywords)
        if f.default is not dataclasses.MISSING:
            prop["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            prop["default"] = f.default_factory()
        else:
            required.append(f.name)
        properties[f.name] = _ordered(prop, first=("description", "type", "enum"))
    doc = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    doc = doc.replace("``", "")
    schema: dict[str, Any] = {
        "$schema": DIALECT,
        "$id": schema_id(name),
        "title": cls.__name__,
        "description": f"{doc} ({WHERE[name]}; fields not listed are ignored)",
        "type": "object",
        "properties": properties,
        "required": required,
    }
    extra = getattr(cls, "SCHEMA_EXTRA", None)
    return _merge(schema, extra) if extra else schema


def _ordered(obj: dict[str, Any], *, first: tuple[str, ...]) -> dict[str, Any]:
    """``obj`` with the keys ``first`` in that order, then the others sorted."""
    def order(key: str) -> tuple[int, str]:
        return (first.index(key), key) if key in first else (len(first), key)

    return {k: obj[k] for k in sorted(obj, key=order)}


def message_schemas() -> dict[str, dict[str, Any]]:
    """Every schema of docs/schemas/, by file stem."""
    out = {name: payload_schema(name, cls) for name, cls in MESSAGES.items()}
    profile = profile_schema()
    profile.update({"$schema": DIALECT, "$id": schema_id("device_profile")})
    out["device_profile"] = _ordered(profile,
                                     first=("$schema", "$id", "title", "description", "type"))
    return out
