"""The aggregator service on an in-memory broker with fake devices speaking the protocol.

Fake devices send real encoded updates (``encode_update``) whose values depend only on
(device, round), so two runs given the same updates must end with the same model.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import FLEET, FakeDevice, devices, fake_update, make
from waiting import wait_for

from broker_bridge import (
    CodecSpec,
    Kind,
    Layout,
    MemoryBroker,
    MemoryTransport,
    Request,
    TaskSpec,
    decode_model,
    encode_update,
    read_model_message,
    unpack_bundle,
    weights_hash,
)
from cloud_aggregator import Aggregator
from cloud_aggregator._config import load_config
from cloud_aggregator._rounds import ManualClock
from device_profiles import ConfigError


def test_a_round_averages_what_devices_sent(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    fleet["d2"].num_samples = 150
    fleet["d2"].hello()
    agg = make(tmp_path, artifacts, broker)
    start = agg.params.copy()
    assert agg.tick()  # opens round 1
    assert agg.round_index == 1
    for dev in fleet.values():
        assert dev.tasks[-1].round == 1 and dev.tasks[-1].model_version == 0
        dev.send_update(layout=agg.layout)
        assert dev.last_ack().status == "accepted"
    assert agg.tick()  # every device answered: closes
    assert agg.model_version == 1 and agg.round_index is None
    ups = {d: fake_update(d, 1, agg.layout.size).astype(np.float64) for d in fleet}
    expected = (50 * ups["d0"] + 50 * ups["d1"] + 150 * ups["d2"]) / 250
    np.testing.assert_allclose(agg.params, start + expected.astype(np.float32), atol=1e-6)
    # the new model went out once on broadcast/model and decodes to the global weights
    meta, body = read_model_message(fleet["d0"].models[1])
    np.testing.assert_array_equal(decode_model(body, agg.layout), agg.params)
    assert meta.model_hash == weights_hash(agg.params)
    rows = agg.metrics_log.read()
    assert rows[-1]["round"] == 1 and rows[-1]["devices_reported"] == 3
    assert rows[-1]["bytes_up"] > 3 * 4 * agg.layout.size


def test_duplicates_count_once_whatever_the_attempt(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    d0 = fleet["d0"]
    d0.send_update(layout=agg.layout)
    d0.send_update(layout=agg.layout)  # QoS 1 redelivery: same key
    assert d0.last_ack().status == "duplicate"
    d0.send_update(layout=agg.layout, attempt=1, values=np.ones(agg.layout.size, np.float32))
    assert d0.last_ack().status == "duplicate"
    assert agg.current_round is not None and agg.current_round.counted == 1
    assert agg.store.count_accepted(FLEET, 1) == 1


def test_bad_updates_are_rejected_by_rule(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 5)
    agg = make(tmp_path, artifacts, broker, devices_per_round=4, quorum=1, min_devices=4,
               max_update_norm=1e4)  # an absolute cap, as an option (off by default)
    agg.tick()
    chosen = [d for d in fleet.values() if d.tasks]
    outsider = next(d for d in fleet.values() if not d.tasks)
    nan_dev, layout_dev, replay_dev, good = chosen
    before = agg.params.copy()

    vec = fake_update(nan_dev.id, 1, agg.layout.size)
    body = bytearray(encode_update(vec, agg.layout, CodecSpec.parse("fp32")).body)
    at = len(body) - 4 * agg.layout.size + 4 * 7  # dense fp32: the values end the body
    body[at:at + 4] = np.float32(np.nan).tobytes()
    nan_dev.send_update(layout=agg.layout, codec_body=bytes(body))
    assert nan_dev.last_ack().status == "rejected"
    nan_reason = nan_dev.last_ack().reason.split(":")[0]
    assert nan_reason in ("codec", "non_finite")

    other = Layout(tensors=(("w", (10,)),))
    layout_dev.send_update(layout=other, values=np.zeros(10, np.float32))
    assert layout_dev.last_ack().status == "rejected"
    assert "codec" in layout_dev.last_ack().reason

    replay_dev.send_update(layout=agg.layout, round_index=0)  # an old round
    assert replay_dev.last_ack().status == "rejected"
    assert "stale_round" in replay_dev.last_ack().reason

    outsider.tasks.append(TaskSpec(round=1, model_version=0, artifacts_hash="0" * 64,
                                   model_hash="0" * 64, nonce="forged-nonce"))
    outsider.send_update(layout=agg.layout)
    assert outsider.last_ack().status == "rejected"
    assert "not_selected" in outsider.last_ack().reason

    good.send_update(layout=agg.layout, values=np.full(agg.layout.size, 1e5, np.float32))
    assert good.last_ack().status == "rejected"  # norm way above max_update_norm
    assert "norm_above_cap" in good.last_ack().reason

    counts = agg.counters.snapshot()["updates"]
    assert counts[f"rejected:{nan_reason}"] >= 1 and counts["rejected:not_selected"] == 1
    assert counts["rejected:stale_round"] == 1 and counts["rejected:codec"] >= 1
    # replay_dev may still send its real update; then the round closes with it alone
    replay_dev.send_update(layout=agg.layout)
    assert replay_dev.last_ack().status == "accepted"
    assert agg.tick()
    expected = before + fake_update(replay_dev.id, 1, agg.layout.size)
    np.testing.assert_allclose(agg.params, expected, atol=1e-6)
    assert np.isfinite(agg.params).all()


def test_deadline_without_quorum_abandons_and_retries(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    clock = ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, quorum=2, devices_per_round=3)
    agg.tick()
    first = [d for d in fleet.values() if d.tasks]
    first[0].send_update(layout=agg.layout)
    clock.advance(31)
    assert agg.tick()  # deadline, 1 < quorum 2
    assert agg.model_version == 0
    assert agg.store.round(FLEET, 1).state == "abandoned"  # type: ignore[union-attr]
    assert all(1 in d.cancels for d in first[1:])
    assert agg.history[-1].outcome == "abandoned"
    assert agg.tick()  # a fresh selection, a new round index, the same model version
    assert agg.round_index == 2
    chosen = [d for d in fleet.values() if d.tasks and d.tasks[-1].round == 2]
    assert chosen and all(d.tasks[-1].model_version == 0 for d in chosen)


def test_decliner_is_replaced(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg = make(tmp_path, artifacts, broker)
    agg.tick()
    first = [d for d in fleet.values() if d.tasks]
    spare = next(d for d in fleet.values() if not d.tasks)
    first[0].decline()
    assert spare.tasks and spare.tasks[-1].round == 1


def test_virtual_clock_judges_emulated_time(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, clock="virtual", deadline_s=100.0, quorum=2,
               min_devices=3)
    agg.tick()
    a, b, c = fleet.values()
    a.send_update(layout=agg.layout, emulated_s=40.0)
    b.send_update(layout=agg.layout, emulated_s=70.0)
    assert not agg.tick()  # c still working: virtual rounds wait for every device
    c.send_update(layout=agg.layout, emulated_s=250.0)  # misses the emulated deadline
    assert c.last_ack().status == "rejected" and "missed_deadline" in c.last_ack().reason
    assert agg.tick()
    m = agg.history[-1]
    assert m.outcome == "closed" and m.devices_reported == 2
    assert m.emulated_s == 100.0  # someone missed: the round lasted the whole deadline
    agg.tick()
    for dev in fleet.values():
        dev.send_update(layout=agg.layout, emulated_s=20.0 + len(dev.id))
    agg.tick()
    assert agg.history[-1].emulated_s == pytest.approx(22.0)
    assert agg.emulated_total_s == pytest.approx(122.0)


def test_offline_device_ends_a_virtual_round(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, clock="virtual", quorum=2, min_devices=3)
    agg.tick()
    fleet["d0"].send_update(layout=agg.layout, emulated_s=5.0)
    fleet["d1"].send_update(layout=agg.layout, emulated_s=6.0)
    fleet["d2"].transport.kill()  # the last will says offline
    assert agg.tick()
    assert agg.model_version == 1 and agg.history[-1].devices_dropped == 1
    assert agg.registry.get("d2").online is False  # type: ignore[union-attr]


def test_serves_artifacts_and_models(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    dev = FakeDevice(broker, "d0")
    agg = make(tmp_path, artifacts, broker, devices_per_round=1, downlink_codec="fp16")
    req = Request(want="artifacts", artifacts_hash=agg.model.info.content_hash)
    dev.channel.send(dev.channel.topics.up("d0", "request"),
                     req.to_message(fleet=FLEET, device="d0"))
    (bundle,) = [m for m in dev.other if m.kind == Kind.ARTIFACTS]
    files = unpack_bundle(bundle.body)
    assert {"train.onnx", "eval.onnx", "parameters.f32", "artifacts.json"} <= set(files)
    dev.models.clear()
    dev.channel.send(dev.channel.topics.up("d0", "request"),
                     Request(want="model", model_version=0).to_message(fleet=FLEET, device="d0"))
    meta, body = read_model_message(dev.models[0])
    weights = decode_model(body, agg.layout)
    np.testing.assert_allclose(weights, agg.params, rtol=1e-3, atol=1e-3)  # fp16 downlink
    assert meta.model_hash == weights_hash(weights)  # the hash of what a device decodes


def _drive(agg: Aggregator, fleet: dict[str, FakeDevice], rounds: int) -> None:
    """Answer every open task in device-id order until ``rounds`` versions exist."""
    while agg.model_version < rounds:
        agg.tick()
        rnd = agg.current_round
        if rnd is None:
            continue
        for device_id in sorted(rnd.pending()):
            dev = fleet[device_id]
            if dev.tasks and dev.tasks[-1].round == rnd.spec.index:
                dev.send_update(layout=agg.layout)
        agg.tick()


def test_resume_after_a_crash_gives_the_same_model(tmp_path: Path, artifacts: Path) -> None:
    opts = {"rounds": 3, "server_opt": "fedavgm", "devices_per_round": 4, "min_devices": 4}
    # The run that never stopped.
    broker0 = MemoryBroker()
    fleet0 = devices(broker0, 4)
    agg0 = make(tmp_path / "a", artifacts, broker0, **opts)
    _drive(agg0, fleet0, 3)
    reference = agg0.params.copy()
    agg0.close()

    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg1 = make(tmp_path / "b", artifacts, broker, **opts)
    _drive(agg1, fleet, 1)
    agg1.tick()  # round 2 opens
    assert agg1.round_index == 2
    fleet["d0"].send_update(layout=agg1.layout)
    fleet["d1"].send_update(layout=agg1.layout)
    # Crash: no clean shutdown, the connection just dies.
    assert isinstance(agg1.channel.transport, MemoryTransport)
    agg1.abort()

    for dev in fleet.values():
        dev.tasks.clear()
    agg2 = make(tmp_path / "b", artifacts, broker, **opts)
    assert agg2.round_index == 2 and agg2.model_version == 1
    assert agg2.current_round is not None and agg2.current_round.counted == 2
    # The two that had reported get no new task; the others are asked again.
    assert not fleet["d0"].tasks and not fleet["d1"].tasks
    assert fleet["d2"].tasks[-1].round == 2 and fleet["d3"].tasks[-1].round == 2
    fleet["d0"].send_update(layout=agg2.layout, round_index=2, model_version=1)  # redelivery
    assert fleet["d0"].last_ack().status == "duplicate"
    _drive(agg2, fleet, 3)
    np.testing.assert_array_equal(agg2.params, reference)
    assert agg2.store.count_accepted(FLEET, 2) == 4


def test_async_mode_buffers_k_updates_with_staleness(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=3, buffer_size=2,
               rounds=5, staleness="polynomial", max_staleness=1)
    start = agg.params.copy()
    agg.tick()
    busy = [d for d in fleet.values() if d.tasks]
    assert len(busy) == 3  # bounded concurrency
    busy[0].send_update(layout=agg.layout)
    assert agg.model_version == 0
    busy[1].send_update(layout=agg.layout)
    assert agg.model_version == 1  # K = 2 updates -> a new version
    u0 = fake_update(busy[0].id, busy[0].tasks[-1].round, agg.layout.size)
    u1 = fake_update(busy[1].id, busy[1].tasks[-1].round, agg.layout.size)
    np.testing.assert_allclose(agg.params, start + (u0 + u1) / 2, atol=1e-6)
    agg.tick()  # refill the freed slots from version 1
    stale = busy[2]  # still on version 0: staleness 1, discounted by (1+1)^-0.5
    stale.send_update(layout=agg.layout)
    assert stale.last_ack().status == "accepted"
    fresh = next(d for d in fleet.values() if d.tasks and d.tasks[-1].model_version == 1)
    fresh.send_update(layout=agg.layout)
    assert agg.model_version == 2
    stale.send_update(layout=agg.layout)
    assert stale.last_ack().status == "duplicate"


def test_config_from_toml_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text('[aggregator]\nfleet = "f1"\nmodel = "mlp"\ndeadline_s = 5\nrounds = 7\n')
    cfg = load_config(path, rounds=9)
    assert cfg.fleet == "f1" and cfg.rounds == 9 and cfg.deadline_s == 5.0
    assert cfg.selected_per_round == math.ceil(10 * 1.3)
    for bad in ({"rounds": 0}, {"quorum": 99}, {"codec": "zz"}, {"server_opt": "sgd"},
                {"selection": "best"}, {"nope": 1}, {"downlink_codec": "ef+topk:0.1"},
                {"max_selected": 5}, {"max_selected": -1}):
        with pytest.raises(ConfigError):
            load_config(None, **bad)
    path.write_text("rounds = [")
    with pytest.raises(ConfigError):
        load_config(path)


def test_prometheus_endpoint(tmp_path: Path, artifacts: Path) -> None:
    import urllib.request

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, metrics_port=0)
    agg.tick()
    for dev in fleet.values():
        dev.send_update(layout=agg.layout)
    fleet["d0"].send_update(layout=agg.layout, round_index=9)
    agg.tick()
    assert agg.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{agg.metrics_port}/metrics") as resp:
        text = resp.read().decode()
    assert 'fleetlearn_updates_total{outcome="accepted"} 3' in text
    assert 'fleetlearn_updates_total{outcome="rejected:stale_round"} 1' in text
    assert "fleetlearn_model_version 1" in text and "fleetlearn_bytes_up_total" in text


def test_norm_screen_remembers_earlier_rounds(tmp_path: Path, artifacts: Path) -> None:
    """The first reporter of a round is screened against the norms of earlier rounds."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, norm_median_multiple=4.0)
    assert agg.tick()  # round 1: three honest updates
    for dev in fleet.values():
        dev.send_update(layout=agg.layout)
        assert dev.last_ack().status == "accepted"
    assert agg.tick()  # closes
    assert agg.tick()  # round 2 opens
    attacker = fleet["d0"]
    scaled = -10 * fake_update(attacker.id, 2, agg.layout.size)
    attacker.send_update(layout=agg.layout, values=scaled)  # the round's first report
    assert attacker.last_ack().status == "rejected"
    assert "norm_above_median" in attacker.last_ack().reason
    fleet["d1"].send_update(layout=agg.layout)
    assert fleet["d1"].last_ack().status == "accepted"


def test_a_policy_choosing_too_few_devices_is_topped_up(
    tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A strict policy cannot stall the fleet: the round still reaches its quorum."""
    broker = MemoryBroker()
    devices(broker, 4)
    agg = make(tmp_path, artifacts, broker)
    monkeypatch.setattr(agg.policy, "select", lambda cands, k, **kw: [cands[0].device_id])
    assert agg.tick()  # opens instead of waiting forever
    rnd = agg.current_round
    assert rnd is not None and len(rnd.selected) >= agg.config.effective_quorum


def test_done_waits_for_the_release_in_progress(tmp_path: Path, artifacts: Path) -> None:
    """A reader on another thread never sees ``done`` before the round that made it so
    is in ``history``: a simulation that stops on ``done`` reports every round it ran
    (a secure round closes on the handler thread while the driver polls)."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1)
    agg.tick()
    seen: dict[str, object] = {}
    record = agg.recorder.record

    def slow_record(metrics: object, **kw: object) -> object:
        def look() -> None:
            done = agg.done
            seen["done"], seen["rounds"] = done, len(agg.history)

        reader = threading.Thread(target=look)
        reader.start()
        reader.join(0.5)  # the release is under way: the version has already moved
        return record(metrics, **kw)  # type: ignore[arg-type]

    agg.recorder.record = slow_record  # type: ignore[method-assign]
    for dev in fleet.values():
        dev.send_update(layout=agg.layout)
    assert agg.tick()
    assert wait_for(lambda: "done" in seen, 10)
    assert seen == {"done": True, "rounds": 1}
