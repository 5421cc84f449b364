"""docs/schemas/ against the code, both ways (issue 12, item 16).

- The files are what ``broker_bridge.message_schemas()`` makes from the payload classes.
- What a schema allows is what the receiver accepts: every field of every message is
  mutated (removed, null, each JSON type, each bound and one past it, each enum value and
  one more, patterns met and missed, list items) and random bodies are generated, and
  for each one the schema's verdict (tests/schema_validator.py) must equal the parser's.
- Every JSON body a real aggregator and a real agent put on the wire during a round is
  valid under its schema.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_rig import make_data
from aggregator_rig import FLEET, devices, make
from conformance import SCHEMA_DIR, differences, schema_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keys import enrol_agent
from schema_validator import SchemaError, Validator, check_keywords
from waiting import wait_for

from broker_bridge import (
    Ack,
    AckCode,
    Channel,
    Eligibility,
    ErrorReport,
    Hello,
    Kind,
    MemoryBroker,
    MemoryTransport,
    Message,
    ProtocolError,
    ack_code,
    message_schemas,
    presence_will,
    schema_id,
    update_body,
)
from broker_bridge._schema import MESSAGES
from cloud_aggregator._rounds import ManualClock
from device_profiles import ConfigError, DeviceProfile, ProfileError, get_profile
from edge_runtime import Agent, AgentSettings, DeviceStatus

SCHEMAS = message_schemas()
VALIDATOR = Validator(SCHEMAS)
SHA = "0123456789abcdef" * 4

FULL: dict[str, dict[str, Any]] = {
    "presence": {"status": "online"},
    "hello": {"protocol": 2, "agent": "fleetlearn/0.1.0",
              "profile": get_profile("pi4").to_dict(),
              "eligibility": {"eligible": True, "reasons": [], "free_memory_mb": 812.0,
                              "battery_percent": 64.0, "charging": True, "metered": False,
                              "idle": True},
              "num_samples": 83, "artifacts_hash": SHA, "model_versions": [4, 5],
              "busy_round": None},
    "eligibility": {"eligible": False, "reasons": ["battery 12% < 20%"],
                    "free_memory_mb": 812.0, "battery_percent": 12.0, "charging": False,
                    "metered": None, "idle": None},
    "task": {"round": 7, "model_version": 6, "artifacts_hash": SHA, "model_hash": SHA,
             "nonce": "3f1c0a9b8d7e6f5a", "run": "run-1", "codec": "topk:0.01+q8+zstd:3",
             "epochs": 1, "batch_size": 32, "lr": 0.05, "max_steps": None, "deadline_s": 60.0,
             "seed": 1234, "evaluate": False, "num_classes": 10},
    "update_meta": {"num_samples": 83, "steps": 3, "nonce": "3f1c0a9b8d7e6f5a",
                    "train_loss": 1.71, "duration_s": 0.41, "emulated_s": None,
                    "stopped_early": False, "eval_loss": None, "eval_accuracy": None,
                    "eval_samples": 0},
    "model_meta": {"run": "run-1", "model_version": 6, "model_hash": SHA},
    "ack": {"round": 7, "attempt": 1, "what": "update", "status": "rejected",
            "reason": "codec: body payload is 92192 bytes, header implies 92200"},
    "cancel": {"round": 7, "reason": "round closed: target reached"},
    "error": {"round": None, "code": "data", "message": "labels outside [0, 10)"},
    "request": {"want": "model", "artifacts_hash": SHA, "model_version": 6,
                "model_hash": SHA, "have_versions": [4, 5]},
    "device_profile": get_profile("pi4").to_dict(),
}


def accepts(name: str, body: Any) -> bool:
    """What the receiver does with ``body``: True when it takes it as valid."""
    try:
        if name == "device_profile":
            DeviceProfile.from_dict(body, strict=False)
            return True
        MESSAGES[name].from_dict(body)
        if name == "hello":
            # Checked apart from the hello (a bad profile is ignored, a bad eligibility
            # makes the device ineligible: the hello still counts; see the schema).
            if body.get("profile"):
                DeviceProfile.from_dict(body["profile"], strict=False)
            Eligibility.from_dict(body.get("eligibility", {}))
        return True
    except (ProtocolError, ProfileError, ConfigError):
        return False


def empty_window(body: Any) -> bool:
    """The one profile rule JSON Schema cannot state (see device_profiles._schema)."""
    av = body.get("availability") if isinstance(body, dict) else None
    if not isinstance(av, dict) or av.get("kind") not in ("diurnal", "charging"):
        return False
    start, end = av.get("start_hour"), av.get("end_hour")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (start, end))
    return numbers and start % 24.0 == end % 24.0  # type: ignore[operator]


def agree(name: str, body: Any) -> None:
    errors = VALIDATOR.errors(body, schema_id(name))
    took = accepts(name, body)
    if name == "device_profile" and empty_window(body):
        assert not took  # the receiver refuses it; the schema's description says so
        return
    assert took == (not errors), (
        f"{name}: receiver {'accepts' if took else 'refuses'} but schema says "
        f"{errors or 'valid'}: {json.dumps(body)[:300]}")


# -- mutations derived from each property's schema ----------------------------------------


WRONG_TYPES: list[Any] = [None, True, 3, 2.5, "x", [], {}, [1], {"a": 1}]


def values_for(prop: dict[str, Any]) -> list[Any]:
    """Values at and around every bound of ``prop`` (valid ones and invalid ones)."""
    out: list[Any] = list(WRONG_TYPES)
    types = prop.get("type", [])
    types = types if isinstance(types, list) else [types]
    for key in ("minimum", "maximum", "exclusiveMinimum"):
        if key in prop:
            b = prop[key]
            out += [b, b - 1, b + 1, float(b), b - 0.5, b + 0.5, b + 1e-9, b - 1e-9]
    if "integer" in types:
        out += [0, 1, -1, 2**53 - 1, 2**53, -(2**53), 4.0, 1e300]
    if "number" in types:
        out += [0.0, -0.0, 1e-300, -1e300, 1e300]
    if "string" in types:
        out += ["", "a", "A" * 64, "0" * 64, "0" * 63, "g" * 64, "é" * 8, "\x00" * 8,
                "a" * 65, "a" * 256, "run-1", "a b"]
        for key in ("minLength", "maxLength"):
            if key in prop:
                n = prop[key]
                out += ["a" * max(0, n - 1), "a" * n, "a" * (n + 1)]
    for value in prop.get("enum", []):
        out += [value, value.upper() if isinstance(value, str) else value]
    out.append("bogus")
    if "array" in types:
        items = prop.get("items", {})
        out += [[v] for v in values_for(items)] if items else []
        out += [[1, 2, 3], ["a", "b"]]
    return out


def mutations(name: str, base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    schema = SCHEMAS[name]
    for field_name, prop in schema["properties"].items():
        without = dict(base)
        without.pop(field_name, None)
        yield without
        for value in values_for(prop):
            yield {**base, field_name: copy.deepcopy(value)}
    yield {**base, "an_unknown_field": {"ignored": True}}


def minimal(name: str) -> dict[str, Any]:
    required = SCHEMAS[name]["required"]
    return {k: v for k, v in FULL[name].items() if k in required}


# -- the tests ------------------------------------------------------------------------------


def test_schema_files_are_what_the_code_makes() -> None:
    problems = differences(SCHEMA_DIR, schema_files())
    assert not problems, (f"docs/schemas/ is out of date ({problems}); run "
                          "`python tests/conformance.py --write` and review the diff")


def test_schemas_are_draft_2020_12_with_keywords_the_validator_checks() -> None:
    for name, schema in SCHEMAS.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == schema_id(name)
        check_keywords(schema)
    with pytest.raises(SchemaError):
        check_keywords({"properties": {"x": {"minimun": 1}}})  # a typo is caught


@pytest.mark.parametrize("name", list(FULL))
def test_examples_are_valid(name: str) -> None:
    for body in (FULL[name], minimal(name)):
        assert VALIDATOR.errors(body, schema_id(name)) == []
        assert accepts(name, body)


@pytest.mark.parametrize("name", list(FULL))
def test_every_field_mutation_gets_the_same_verdict(name: str) -> None:
    count = 0
    for base in (FULL[name], minimal(name)):
        for body in mutations(name, base):
            agree(name, body)
            count += 1
    assert count > 50 * len(SCHEMAS[name]["properties"]) or count > 100


def test_profile_availability_kinds_get_the_same_verdict() -> None:
    base = FULL["device_profile"]
    kinds = {
        "always_on": {},
        "diurnal": {"start_hour": 8.0, "end_hour": 20.0},
        "charging": {"start_hour": 23.0, "end_hour": 7.0, "daily_probability": 0.8},
        "flaky": {"mean_up_s": 3600.0, "mean_down_s": 600.0},
    }
    every = {"start_hour": 1.0, "end_hour": 2.0, "daily_probability": 0.5, "mean_up_s": 1.0,
             "mean_down_s": 1.0}
    for kind, fields in kinds.items():
        for av in ({"kind": kind, **fields}, {"kind": kind, **every}, {"kind": kind}):
            agree("device_profile", {**base, "availability": av})
            for key in every:
                for value in (-1, 0, 0.5, 1, 24, 25, "x", None):
                    agree("device_profile", {**base, "availability": {**av, key: value}})
                without = {k: v for k, v in av.items() if k != key}
                agree("device_profile", {**base, "availability": without})
    for bad in ({"kind": "sometimes"}, {}, [], "always_on", {"kind": None}):
        agree("device_profile", {**base, "availability": bad})


def _json_values() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(-(2**60), 2**60)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=70))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                        max_leaves=8)


@functools.cache
def _bodies(name: str) -> st.SearchStrategy[dict[str, Any]]:
    props = SCHEMAS[name]["properties"]
    per_field = {
        key: st.one_of(st.just(FULL[name].get(key)), st.sampled_from(values_for(prop)),
                       _json_values())
        for key, prop in props.items()
    }
    return st.fixed_dictionaries({}, optional=per_field)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(FULL))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_bodies_get_the_same_verdict(name: str, data: st.DataObject) -> None:
    agree(name, data.draw(_bodies(name)))


def test_integers_may_be_written_with_a_zero_fraction() -> None:
    """JSON and JSON Schema make no difference between 7 and 7.0; neither does a receiver."""
    body = {**FULL["task"], "round": 7.0, "epochs": 1.0}
    assert VALIDATOR.valid(body, schema_id("task")) and accepts("task", body)
    assert accepts("device_profile", {**FULL["device_profile"], "cores": 4.0})
    assert not accepts("task", {**FULL["task"], "round": 7.5})


# -- what the implementation really sends ------------------------------------------------------


_SCHEMA_OF_KIND = {Kind.PRESENCE: "presence", Kind.HELLO: "hello", Kind.TASK: "task",
                   Kind.ACK: "ack", Kind.CANCEL: "cancel", Kind.ERROR: "error",
                   Kind.CONTROL: "request"}


def test_every_json_body_on_the_wire_of_a_round_is_valid(tmp_path: Path, artifacts: Path) -> None:
    """A real aggregator and a real agent (with hand-made devices) play a round; a spy
    reads every message of the fleet and checks each JSON body against its schema."""
    broker = MemoryBroker()
    seen: dict[str, int] = {}
    problems: list[str] = []
    spy_t = MemoryTransport(broker=broker, client_id="spy")
    spy = Channel(transport=spy_t, fleet=FLEET)
    spy_t.connect()

    def check(topic: str, m: Message) -> None:
        if m.kind in (Kind.UPDATE, Kind.MODEL):  # u32 meta_len | meta JSON | codec body
            name = "update_meta" if m.kind == Kind.UPDATE else "model_meta"
            raw = update_body(m.body)  # behind an update's signature block
            body = json.loads(raw[4:4 + int.from_bytes(raw[:4], "little")])
        elif m.kind in _SCHEMA_OF_KIND:
            name, body = _SCHEMA_OF_KIND[m.kind], m.json()
        else:
            return
        seen[name] = seen.get(name, 0) + 1
        errors = VALIDATOR.errors(body, schema_id(name))
        if errors:
            problems.append(f"{topic}: {errors}")

    spy.subscribe(f"fl/{FLEET}/#", check)
    fleet = devices(broker, 2)
    clock = ManualClock()
    t = MemoryTransport(broker=broker, client_id="dev-real",
                        will=presence_will(fleet=FLEET, device="dev-real"))
    agent = Agent(device_id="dev-real", channel=Channel(transport=t, fleet=FLEET),
                  data=make_data(), state_dir=tmp_path / "dev-real", profile=get_profile("pi4"),
                  status_probe=lambda: DeviceStatus(free_memory_mb=1000.0, battery_percent=80.0),
                  settings=AgentSettings(request_timeout_s=30.0, status_interval_s=None))
    enrol_agent(agent)
    agent.start(timer=False)
    agg = make(tmp_path / "agg", artifacts, broker, manual=clock, devices_per_round=3,
               min_devices=3, quorum=2, rounds=1)
    try:
        assert agg.tick()  # round 1: the two hand-made devices and the agent
        fleet["d0"].send_update(layout=agg.layout)
        assert wait_for(lambda: agent.stats.acked == 1, 60)
        fleet["d0"].send_update(layout=agg.layout, round_index=9)  # rejected: stale_round
        fleet["d1"].channel.send(fleet["d1"].channel.topics.up("d1", "error"), ErrorReport(
            round=None, code="data", message="x").to_message(fleet=FLEET, device="d1"))
        clock.advance(31)
        assert agg.tick() and agg.model_version == 1  # d1 never reported: it is cancelled
    finally:
        agent.stop()
        agg.close()
    assert not problems, problems
    assert set(seen) == set(_SCHEMA_OF_KIND.values()) | {"update_meta", "model_meta"}, seen


def test_an_update_ack_starts_with_its_code_and_matches_what_it_acknowledges() -> None:
    ack = Ack(round=1, status="rejected", reason="codec: cut short")
    assert ack_code(ack) == AckCode.CODEC and ack_code(Ack(round=1)) == ""
    with pytest.raises(ValueError, match="task ack"):
        Ack(round=1, what="task", status="duplicate")
    with pytest.raises(ProtocolError):
        Ack.from_dict({"round": 1, "what": "update", "status": "declined"})
    assert not accepts("hello", Hello(profile={"name": "x"}).to_dict())  # profile incomplete
