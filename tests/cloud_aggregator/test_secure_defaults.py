"""The default configuration survives one malicious device (issue 12, items 1, 2, 4, 5, 6).

Each test plays the symptom seen with the old defaults on an in-memory fleet speaking
the protocol (``FakeDevice``), and checks what the defaults do now.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import FakeDevice, devices, fake_update, make

import cloud_aggregator._runtime as service_module
from broker_bridge import ErrorReport, Hello, Kind, MemoryBroker, Message, Request, update_body
from cloud_aggregator import Status
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._rounds import ManualClock

FLEET = "test"


def scaled(device: str, round_index: int, size: int, norm: float) -> np.ndarray:
    v = fake_update(device, round_index, size)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


def play_round(agg: object, fleet: dict[str, FakeDevice], norms: dict[str, float],
               **kw: object) -> dict[str, str]:
    """Every tasked device sends an update of the given norm; returns ack reasons."""
    out = {}
    index = agg.round_index  # type: ignore[attr-defined]
    for d in fleet.values():
        if d.tasks and d.tasks[-1].round == index:
            size = agg.layout.size  # type: ignore[attr-defined]
            d.send_update(layout=agg.layout, values=scaled(d.id, index, size,  # type: ignore[attr-defined]
                                                           norms.get(d.id, 0.3)), **kw)  # type: ignore[arg-type]
            out[d.id] = f"{d.last_ack().status}:{d.last_ack().reason}"
    return out


def test_defaults_have_a_relative_screen_and_no_absolute_cap() -> None:
    config = AggregatorConfig()
    assert config.max_update_norm is None  # a broken model cannot trip it for everyone
    assert config.norm_median_multiple is not None and config.max_weight_multiple is not None


def test_a_norm_9000_update_cannot_break_the_model(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg = make(tmp_path, artifacts, broker, devices_per_round=4)
    # Round 1: no history yet. The old defaults accepted the update and the model
    # moved by 2,250; now the round judges its first updates together when it closes.
    agg.tick()
    before = agg.params.copy()
    acks = play_round(agg, fleet, {"d0": 9000.0})
    assert all(a.startswith("accepted") for a in acks.values())
    assert agg.tick() and agg.model_version == 1
    moved = float(np.linalg.norm(agg.params - before))
    assert moved < 1.0, moved  # the attacker was cut to 4 x the round's median (0.3)
    assert agg.counters.snapshot()["updates"]["clipped:norm"] == 1
    # Round 2: with a history, the same update is refused outright; the rest count.
    agg.tick()
    before = agg.params.copy()
    acks = play_round(agg, fleet, {"d0": 9000.0})
    assert acks["d0"].startswith("rejected:norm_above_median")
    assert sum(a.startswith("accepted") for a in acks.values()) == 3
    assert agg.tick() and agg.model_version == 2
    assert float(np.linalg.norm(agg.params - before)) < 1.0


def test_when_every_honest_norm_grows_the_screen_adapts(tmp_path: Path, artifacts: Path) -> None:
    """The old absolute cap refused every update of a model that broke, for ever. A
    relative screen must not do the same when the whole fleet's norms change."""
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    clock = ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, devices_per_round=4, rounds=5)
    agg.tick()
    play_round(agg, fleet, {})
    assert agg.tick() and agg.model_version == 1
    # One device alone cannot move the screen: it is refused and the history stays.
    agg.tick()
    history = agg.screen.history
    acks = play_round(agg, fleet, {"d0": 1.7e7})
    assert acks["d0"].startswith("rejected:norm_above_median")
    assert agg.tick() and agg.screen.history[: len(history)] == history
    # Every device's norm grows (a new learning rate, a broken model): round refused...
    agg.tick()
    big = {d: 1.7e7 for d in fleet}
    acks = play_round(agg, fleet, big)
    assert all(a.startswith("rejected:norm_above_median") for a in acks.values())
    clock.advance(31)
    assert agg.tick() and agg.history[-1].outcome == "abandoned"
    # ...and the next one accepted: the majority's norms are the new history.
    agg.tick()
    acks = play_round(agg, fleet, big)
    assert all(a.startswith("accepted") for a in acks.values()), acks
    assert agg.tick() and agg.history[-1].outcome == "closed"


def test_an_inflated_sample_count_is_bounded(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg = make(tmp_path, artifacts, broker, devices_per_round=4, rounds=3)
    for d in fleet.values():
        d.hello()  # each announces 50 samples; local_epochs is 1
    agg.tick()
    before = agg.params.copy()
    index = agg.round_index
    assert index is not None
    for d in fleet.values():
        d.send_update(layout=agg.layout, values=scaled(d.id, index, agg.layout.size, 0.3),
                      num_samples=10**12 if d.id == "d0" else None)
    assert agg.tick()
    share = _share(agg.params - before, scaled("d0", index, agg.layout.size, 0.3))
    assert share == pytest.approx(0.25, abs=0.05)  # the old defaults: 1.0
    # A device that also lies in its hello is cut to 4 x the median weight of the fleet.
    liar = fleet["d1"]
    liar.num_samples = 10**12
    liar.hello()
    agg.tick()
    before = agg.params.copy()
    index = agg.round_index
    assert index is not None
    for d in fleet.values():
        d.send_update(layout=agg.layout, values=scaled(d.id, index, agg.layout.size, 0.3))
    assert agg.tick()
    share = _share(agg.params - before, scaled("d1", index, agg.layout.size, 0.3))
    assert share == pytest.approx(4 / 7, abs=0.05)
    assert agg.counters.snapshot()["updates"]["bounded:weight"] >= 2


def _share(moved: np.ndarray, attacker: np.ndarray) -> float:
    """How much of ``attacker`` the model moved by (the others are nearly orthogonal)."""
    return float(np.dot(moved.astype(np.float64), attacker) / np.dot(attacker, attacker))


def test_a_restamped_copy_of_an_accepted_update_is_refused(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    sent: list[Message] = []
    d0 = fleet["d0"]
    send = d0.channel.send

    def spy(topic: str, message: Message, **kw: object) -> int:
        if message.kind == Kind.UPDATE:
            sent.append(message)
        return send(topic, message, **kw)  # type: ignore[arg-type]

    d0.channel.send = spy  # type: ignore[method-assign]
    agg.tick()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
    assert d0.last_ack().status == "accepted" and agg.tick()
    agg.tick()  # round 2 trains version 1
    copy = replace(sent[0], round=2, model_version=1, transfer_id=0)
    d0.channel.send(d0.channel.topics.up("d0", "update"), copy)
    assert d0.last_ack().status == "rejected"  # the old defaults: accepted
    assert d0.last_ack().reason.startswith("bad_signature")  # it signed round 1
    # Signed again with the device's own key, the copy still answers round 1's task.
    d0.channel.send(d0.channel.topics.up("d0", "update"),
                    d0.key.sign_update(replace(copy, body=update_body(copy.body))))
    assert d0.last_ack().status == "rejected"
    assert d0.last_ack().reason.startswith("wrong_nonce")
    d0.send_update(layout=agg.layout)  # its real round-2 update still counts
    assert d0.last_ack().status == "accepted"


def test_requests_and_log_lines_per_device_are_bounded(
    tmp_path: Path, artifacts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 2)
    agg = make(tmp_path, artifacts, broker, devices_per_round=2)
    greedy, other = fleet["d0"], fleet["d1"]
    up = greedy.channel.topics.up("d0", "request")
    for i in range(200):
        want = "artifacts" if i % 2 else "model"
        greedy.channel.send(up, Request(want=want).to_message(fleet=FLEET, device="d0"))
    served = [m for m in greedy.other if m.kind == Kind.ARTIFACTS]
    assert 1 <= len(served) <= 3  # was 100 (18 MB with the cnn)
    assert 1 <= len(greedy.models) <= 10 + 1  # + the broadcast
    counts = agg.counters.snapshot()["updates"]
    assert counts["requests_limited:artifacts"] >= 90 and counts["requests_limited:model"] >= 80
    other.channel.send(other.channel.topics.up("d1", "request"),
                       Request(want="artifacts").to_message(fleet=FLEET, device="d1"))
    assert [m for m in other.other if m.kind == Kind.ARTIFACTS]  # others are still served
    # 500 malformed messages from one device: a few log lines, not 500.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(500):
            greedy.channel.send(greedy.channel.topics.up("d0", "hello"), Message(
                kind=Kind.HELLO, fleet=FLEET, device="d0", codec="json", body=b"{nope"))
            greedy.channel.transport.publish(greedy.channel.topics.up("d0", "hello"), b"junk")
    lines = [r for r in caplog.records if "d0" in r.getMessage()]
    assert 1 <= len(lines) <= 12, len(lines)
    assert agg.counters.snapshot()["updates"]["malformed:hello"] == 500


def test_status_lines_say_what_the_aggregator_waits_for(
    tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "STATUS_INTERVAL_S", 0.0)
    broker = MemoryBroker()
    said: list[str] = []
    agg = make(tmp_path, artifacts, broker, devices_per_round=10)
    agg.subscribe(lambda e: said.append(e.text) if isinstance(e, Status) else None)
    assert not agg.tick()
    assert said and "0 devices online in fleet 'test'" in said[-1]
    assert "--fleet test" in said[-1]
    devices(broker, 4)
    agg.tick()
    assert "4 devices online" in said[-1] and "needs 10" in said[-1]
    assert "only 4 devices have ever been seen" in said[-1]
    assert "--devices-per-round" in said[-1]
    agg.close()
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path / "b", artifacts, broker, devices_per_round=3)
    agg.subscribe(lambda e: said.append(e.text) if isinstance(e, Status) else None)
    agg.tick()  # opens round 1
    fleet["d0"].send_update(layout=agg.layout)
    agg.tick()
    assert said[-1].startswith("round 1: 1 of 3 selected devices reported")
    assert "3 needed" not in said[-1] and "1 needed" in said[-1]


def test_a_device_of_another_protocol_version_is_not_selected(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, devices_per_round=2, min_devices=2)
    old = fleet["d2"]
    old.channel.send(old.channel.topics.up("d2", "hello"), Hello(
        protocol=1, eligibility={"eligible": True}, num_samples=50,
    ).to_message(fleet=FLEET, device="d2"))
    info = agg.registry.get("d2")
    assert info is not None and not info.eligible and "protocol 1" in info.reasons[0]
    agg.tick()
    assert not old.tasks and all(d.tasks for d in (fleet["d0"], fleet["d1"]))


def test_a_device_reporting_a_data_error_is_left_out_until_its_next_hello(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, devices_per_round=2, min_devices=2, quorum=1)
    agg.tick()
    bad = next(d for d in fleet.values() if d.tasks)
    report = ErrorReport(round=1, code="data", message="class labels range over [0, 11]; "
                                                       "the model has 10 classes")
    bad.channel.send(bad.channel.topics.up(bad.id, "error"),
                     report.to_message(fleet=FLEET, device=bad.id, round=1))
    info = agg.registry.get(bad.id)
    assert info is not None and not info.eligible and "data" in info.reasons[0]
    assert bad.id not in {c.device_id for c in agg.registry.candidates()}
    bad.hello()  # fixed its data and restarted: selectable again
    assert bad.id in {c.device_id for c in agg.registry.candidates()}


def test_a_bootstrap_round_resumed_after_a_crash_gives_the_same_model(
    tmp_path: Path, artifacts: Path
) -> None:
    """The updates a first round keeps aside are in the store: a restart judges them
    as the aggregator that never stopped would have."""
    from broker_bridge import MemoryTransport

    norms = {"d0": 9000.0}
    broker0 = MemoryBroker()
    fleet0 = devices(broker0, 4)
    agg0 = make(tmp_path / "a", artifacts, broker0, devices_per_round=4)
    agg0.tick()
    play_round(agg0, fleet0, norms)
    assert agg0.tick()
    reference = agg0.params.copy()
    agg0.close()

    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg1 = make(tmp_path / "b", artifacts, broker, devices_per_round=4)
    agg1.tick()
    index = agg1.round_index
    assert index is not None
    for d in ("d0", "d1"):
        fleet[d].send_update(layout=agg1.layout,
                             values=scaled(d, index, agg1.layout.size, norms.get(d, 0.3)))
    assert isinstance(agg1.channel.transport, MemoryTransport)
    agg1.abort()  # crash, mid bootstrap round
    agg2 = make(tmp_path / "b", artifacts, broker, devices_per_round=4)
    assert agg2.current_round is not None and agg2.current_round.counted == 2
    assert len(agg2.strategy.deferred) == 2  # type: ignore[attr-defined]
    for d in ("d2", "d3"):
        fleet[d].send_update(layout=agg2.layout,
                             values=scaled(d, index, agg2.layout.size, 0.3))
    assert agg2.tick() and agg2.model_version == 1
    np.testing.assert_allclose(agg2.params, reference, atol=1e-7)
