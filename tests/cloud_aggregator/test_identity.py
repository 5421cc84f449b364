"""The aggregator's ``verify`` stage: only an update signed by its device's key counts.

In-memory broker, fake devices that sign with their own keys (``keys.device_key``). Each
identity refusal is answered with its code, counted, and changes nothing of the device's
round (the real update, same attempt, still counts afterwards) nor the model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import FakeDevice, devices, make

from broker_bridge import (
    Enrolment,
    EnrolmentError,
    MemoryBroker,
    SignedBody,
    key_text,
    update_body,
)
from edge_runtime import DeviceKey

THIEF = DeviceKey.from_seed(b"\x07" * 32)
"""A key no device is enrolled with (a compromised device's own, say)."""


def reason(device: FakeDevice) -> str:
    ack = device.last_ack()
    return ack.reason.split(":", 1)[0] if ack.status == "rejected" else ack.status


def test_an_unsigned_update_is_refused_counted_and_changes_nothing(
        tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    assert agg.pipeline.names[0] == "verify"
    agg.tick()
    d0 = fleet["d0"]
    params = agg.params.copy()
    d0.send_update(layout=agg.layout, signed=False)
    assert d0.last_ack().status == "rejected" and reason(d0) == "unsigned"
    assert agg.counters.snapshot()["updates"]["rejected:unsigned"] == 1
    assert 'outcome="rejected:unsigned"' in agg.counters.render()
    d0.send_update(layout=agg.layout)  # the same attempt, signed: judged afresh
    assert d0.last_ack().status == "accepted"
    for d in ("d1", "d2"):
        fleet[d].send_update(layout=agg.layout)
    assert agg.tick() and agg.model_version == 1
    assert not np.array_equal(agg.params, params)
    assert agg.store.count_accepted("test", 1) == 3


def test_forgeries_under_a_devices_name_never_use_up_its_attempts(
        tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    d0 = fleet["d0"]
    for attempt in range(6):  # more than the 4 refused attempts a device may have
        d0.send_update(layout=agg.layout, attempt=attempt, key=THIEF)
        assert reason(d0) == "wrong_key", d0.last_ack()
    assert agg.counters.snapshot()["updates"]["rejected:wrong_key"] == 6
    d0.send_update(layout=agg.layout, attempt=0)  # the device's own, attempt 0
    assert d0.last_ack().status == "accepted"
    assert agg.store.accepted_attempt("test", 1, "d0") == 0


def test_a_devices_update_presented_by_another_is_refused(tmp_path: Path,
                                                          artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    d0, d1 = fleet["d0"], fleet["d1"]
    captured = d0.send_update(layout=agg.layout)
    assert d0.last_ack().status == "accepted"
    as_d1 = dataclasses.replace(captured, device="d1", transfer_id=0)
    d1.channel.send(d1.channel.topics.up("d1", "update"), as_d1)
    assert reason(d1) == "wrong_key"  # d0's key in the block
    block = SignedBody.from_bytes(captured.body)
    assert block is not None
    swapped = dataclasses.replace(block, public_key=d1.key.public_key).to_bytes()
    d1.channel.send(d1.channel.topics.up("d1", "update"),
                    dataclasses.replace(as_d1, body=swapped))
    assert reason(d1) == "bad_signature"  # d1's key, d0's signature
    d1.send_update(layout=agg.layout)  # d1's own answer is untouched
    assert d1.last_ack().status == "accepted"
    assert agg.store.count_accepted("test", 1) == 2


def test_a_signature_for_another_round_attempt_or_body_is_refused(
        tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    d0 = fleet["d0"]
    unsent = d0.key.sign_update(dataclasses.replace(
        d0.send_update(layout=agg.layout, signed=False), attempt=3))
    assert reason(d0) == "unsigned"
    topic = d0.channel.topics.up("d0", "update")
    for change in ({"attempt": 4}, {"model_version": 5}, {"codec": "fp16"}):
        d0.channel.send(topic, dataclasses.replace(unsent, transfer_id=0, **change))
        assert reason(d0) == "bad_signature", change
    # A forger's wrong model version would be a judged refusal: not before proof.
    for attempt in range(5, 10):
        d0.channel.send(topic, THIEF.sign_update(dataclasses.replace(
            unsent, model_version=5, attempt=attempt, body=update_body(unsent.body))))
        assert reason(d0) == "wrong_key"
    block = SignedBody.from_bytes(unsent.body)
    assert block is not None
    bigger = dataclasses.replace(block, body=block.body[:-4] + b"\x00\x00\x80\x3f")
    d0.channel.send(topic, dataclasses.replace(unsent, body=bigger.to_bytes(), transfer_id=0))
    assert reason(d0) == "bad_signature"
    d0.channel.send(topic, unsent)  # the genuine attempt 3
    assert d0.last_ack().status == "accepted"
    assert agg.store.accepted_attempt("test", 1, "d0") == 3
    assert agg.counters.snapshot()["updates"]["rejected:bad_signature"] == 4
    assert "rejected:wrong_model_version" not in agg.counters.snapshot()["updates"]


def test_a_replayed_signed_update_never_counts_twice(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    d0 = fleet["d0"]
    captured = {d: fleet[d].send_update(layout=agg.layout) for d in fleet}
    assert agg.tick() and agg.model_version == 1
    agg.tick()  # round 2 is open, d0 asked again
    topic = d0.channel.topics.up("d0", "update")
    d0.channel.send(topic, dataclasses.replace(captured["d0"], transfer_id=0))  # as it was
    assert d0.last_ack().status == "duplicate"  # round 1: counted once, already
    d0.channel.send(topic, dataclasses.replace(captured["d0"], round=2, model_version=1,
                                               transfer_id=0))
    assert reason(d0) == "bad_signature"  # restamped for round 2
    d0.channel.send(topic, d0.key.sign_update(dataclasses.replace(
        captured["d0"], round=2, model_version=1, body=update_body(captured["d0"].body))))
    assert reason(d0) == "wrong_nonce"  # re-signed: still round 1's answer
    assert agg.store.count_accepted("test", 1) == 3
    assert agg.store.count_accepted("test", 2) == 0
    d0.send_update(layout=agg.layout)
    assert d0.last_ack().status == "accepted"


def test_with_no_enrolled_key_every_update_is_refused(tmp_path: Path, artifacts: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, enrolment=None)  # the defaults: no file
    assert "no device key is enrolled" in caplog.text
    agg.tick()
    params = agg.params.copy()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
        assert reason(d) == "unknown_device"
    assert agg.counters.snapshot()["updates"]["rejected:unknown_device"] == 3
    assert agg.store.count_accepted("test", 1) == 0 and np.array_equal(agg.params, params)


def test_trust_on_first_use_keeps_the_first_key_for_good(tmp_path: Path,
                                                         artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, enrolment=Enrolment(), trust_on_first_use=True)
    agg.tick()
    d0 = fleet["d0"]
    topic = d0.channel.topics.up("d0", "update")
    forged = d0.send_update(layout=agg.layout, signed=False)
    assert reason(d0) == "unsigned"
    d0.channel.send(topic, dataclasses.replace(THIEF.sign_update(forged), attempt=1))
    assert reason(d0) == "bad_signature"  # a key is learned only from what it signed
    assert agg.store.device_key("d0") is None
    for d in fleet.values():
        d.send_update(layout=agg.layout)
        assert d.last_ack().status == "accepted"
    assert agg.store.device_key("d0") == d0.key.public_key
    assert agg.tick() and agg.model_version == 1
    agg.tick()
    d0.send_update(layout=agg.layout, key=THIEF)  # a valid signature, another key
    assert reason(d0) == "wrong_key"
    agg.close()
    again = make(tmp_path, artifacts, MemoryBroker(), enrolment=Enrolment(),
                 trust_on_first_use=True)
    assert again.store.device_key("d0") == d0.key.public_key  # durable
    assert again.store.first_key("d0", THIEF.public_key) == d0.key.public_key  # not replaced


def test_the_enrolment_file_is_read_again_when_it_changes(tmp_path: Path,
                                                          artifacts: Path) -> None:
    path = tmp_path / "enrolment.toml"
    book = Enrolment(fleet="test")
    book.list_devices(["d0", "d1", "d2"])
    book.write(path)
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path / "agg", artifacts, broker, enrolment=path)
    agg.tick()
    d0 = fleet["d0"]
    d0.send_update(layout=agg.layout)
    assert reason(d0) == "unknown_device"
    for d in fleet.values():
        book.enrol(d.id, d.key.public_key)
    time.sleep(1.1)  # the file is looked at again at most once a second
    book.write(path)
    d0.send_update(layout=agg.layout)
    assert d0.last_ack().status == "accepted"
    assert key_text(d0.key.public_key) in path.read_text()
    # d1 is re-keyed on purpose (--replace): its new key counts once the file says so.
    d1 = fleet["d1"]
    d1.send_update(layout=agg.layout, key=THIEF)
    assert reason(d1) == "wrong_key"
    book.enrol("d1", THIEF.public_key, replace=True)
    time.sleep(1.1)
    book.write(path)
    d1.send_update(layout=agg.layout, key=THIEF)
    assert d1.last_ack().status == "accepted"


def test_an_enrolment_file_others_may_write_stops_the_start(tmp_path: Path,
                                                            artifacts: Path) -> None:
    path = tmp_path / "enrolment.toml"
    Enrolment(fleet="test").write(path)
    os.chmod(path, 0o646)
    with pytest.raises(EnrolmentError, match="writable by other users"):
        make(tmp_path / "agg", artifacts, MemoryBroker(), enrolment=path)
    os.chmod(path, 0o644)
    Enrolment(fleet="other").write(path)
    with pytest.raises(EnrolmentError, match="fleet 'other''s"):
        make(tmp_path / "agg2", artifacts, MemoryBroker(), enrolment=path)
