"""Issue 12 over a real Mosquitto: start-up (item 9), freshness (5), per-sender
reassembly (4) and models named by content across an aggregator restart (7)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from agent_rig import expected_delta, make_data
from keys import enrol_agent
from mqtt_rig import Device, aggregator, transport
from waiting import wait_for

from broker_bridge import (
    Channel,
    Chunk,
    Kind,
    MosquittoProcess,
    MqttTransport,
    presence_message,
    split_message,
    update_body,
)
from cloud_aggregator import Aggregator


def test_start_does_not_stall_when_retained_presence_exists(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path
) -> None:
    fleet = "h9a"
    pub = Channel(transport=transport(mosquitto.url, "publisher", fleet, device=False),
                  fleet=fleet)
    pub.transport.connect()
    for i in range(30):
        pub.send(pub.topics.presence(f"dev-{i}"),
                 presence_message(fleet=fleet, device=f"dev-{i}", status="online"), retain=True)
    assert pub.transport.flush(timeout=10)
    pub.transport.close()
    agg = aggregator(mosquitto.url, fleet, tmp_path, artifacts)
    try:
        agg.start()
        # Before: start() held the aggregator's lock while waiting for the second
        # subscription's grant, the network thread blocked on it delivering a retained
        # presence, and the grant came only after a 10 s timeout.
        mqtt = agg.channel.transport
        assert isinstance(mqtt, MqttTransport) and mqtt.suback_timeouts == 0
        assert wait_for(lambda: len(agg.registry.online()) == 30)
    finally:
        agg.close()
        agg.channel.transport.close()


def test_what_devices_sent_while_the_aggregator_was_away_is_handled(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path
) -> None:
    fleet = "h9b"
    first = aggregator(mosquitto.url, fleet, tmp_path, artifacts)
    first.start()
    first.abort()  # killed: its persistent session stays subscribed
    dev = Device(mosquitto.url, fleet, "dev-1")  # its hello is queued for the aggregator
    assert dev.channel.transport.flush(timeout=10)
    again = aggregator(mosquitto.url, fleet, tmp_path, artifacts)
    try:
        again.start()  # registers its handlers, then connects
        # Before: the CLI connected first, the broker delivered the queued hello before
        # any handler existed, and it was dropped.
        assert wait_for(lambda: (info := again.registry.get("dev-1")) is not None
                        and info.hello_seen and info.num_samples == 50, 10)
    finally:
        dev.close()
        again.close()
        again.channel.transport.close()


def test_a_restamped_copy_is_refused_over_mosquitto(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path
) -> None:
    fleet = "h5"
    agg = aggregator(mosquitto.url, fleet, tmp_path, artifacts)
    agg.start()
    devs = [Device(mosquitto.url, fleet, f"dev-{i}") for i in range(2)]
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 60}, daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: all(d.tasks for d in devs))
        for d in devs:
            d.send(d.update(agg.layout.size, layout=agg.layout))
        assert wait_for(lambda: all((a := d.ack(1)) and a.status == "accepted" for d in devs))
        assert wait_for(lambda: all(d.tasks[-1].round == 2 for d in devs))
        d0 = devs[0]
        copy = replace(d0.sent[0], round=2, model_version=1, transfer_id=0)
        d0.send(copy)  # its signature names round 1
        assert wait_for(lambda: d0.ack(2) is not None)
        ack = d0.ack(2)
        assert ack is not None and ack.status == "rejected" and "bad_signature" in ack.reason
        with d0.lock:
            d0.acks.clear()
        # Signed again by the device's own key: the body still answers round 1's task.
        resigned = replace(copy, body=update_body(copy.body))
        d0.send(resigned)
        assert wait_for(lambda: d0.ack(2) is not None)
        ack = d0.ack(2)
        assert ack is not None and ack.status == "rejected" and "wrong_nonce" in ack.reason
    finally:
        agg.stop()
        runner.join(10)
        for d in devs:
            d.close()
        agg.close()
        agg.channel.transport.close()


def test_one_device_cannot_evict_anothers_update_or_grow_the_aggregator(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path
) -> None:
    fleet = "h4"
    agg = aggregator(mosquitto.url, fleet, tmp_path, artifacts, codec="fp32")
    agg.start()
    honest = Device(mosquitto.url, fleet, "dev-0", max_payload=8192)
    noisy = Device(mosquitto.url, fleet, "dev-1")
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 60}, daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: honest.tasks and noisy.tasks)
        update = honest.key.sign_update(honest.update(agg.layout.size, layout=agg.layout))
        parts = split_message(update, max_payload=8192)
        assert len(parts) >= 12
        topic = honest.channel.topics.up("dev-0", "update")
        for p in parts[:6]:
            honest.channel.transport.publish(topic, p)
        noisy_topic = noisy.channel.topics.up("dev-1", "update")
        for tid in range(300):  # small incomplete sets: the first of two chunks each
            chunk = Chunk(kind=Kind.UPDATE, fleet=fleet, device="dev-1", round=1,
                          model_version=0, attempt=0, codec="fp32", transfer_id=tid + 1,
                          chunk_index=0, chunk_count=2, total_length=2048, offset=0,
                          body_crc32=0, data=b"x" * 1024)
            noisy.channel.transport.publish(noisy_topic, chunk.to_bytes())
        for tid in range(2000):  # zero-byte chunks of a huge set
            chunk = Chunk(kind=Kind.UPDATE, fleet=fleet, device="dev-1", round=1,
                          model_version=0, attempt=0, codec="fp32", transfer_id=10**6,
                          chunk_index=tid, chunk_count=65536, total_length=100, offset=0,
                          body_crc32=0, data=b"")
            noisy.channel.transport.publish(noisy_topic, chunk.to_bytes())
        assert noisy.channel.transport.flush(timeout=20)
        for p in parts[6:]:
            honest.channel.transport.publish(topic, p)
        # Before: the 300 sets (one global limit of 256) evicted dev-0's set, whose
        # update never completed, and the zero-byte chunks were held at 0 bytes counted.
        assert wait_for(lambda: (a := honest.ack(1)) is not None and a.status == "accepted")
        reassembler = agg.channel.reassembler
        sets, held = reassembler.sender_usage(fleet, "dev-1")
        assert sets <= 8 and held <= 8 * 2 * (1024 + 512)
        assert agg.channel.dropped["EnvelopeError"] >= 2000  # empty chunks refused
    finally:
        agg.stop()
        runner.join(10)
        honest.close()
        noisy.close()
        agg.close()
        agg.channel.transport.close()


@pytest.fixture(scope="module")
def other_run_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same mlp architecture with other initial weights (another run's model)."""
    from cloud_aggregator._artifacts import build_artifacts
    from cloud_aggregator._models import build_reference_model

    out = tmp_path_factory.mktemp("mlp-seed1")
    build_artifacts(build_reference_model("mlp", 1), out)
    return out


def test_agents_follow_a_fresh_aggregator_by_content_not_by_number(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path, other_run_artifacts: Path
) -> None:
    from edge_runtime import Agent, AgentSettings, DeviceStatus, make_agent_transport

    fleet = "h7"
    data = {f"dev-{i}": make_data(n=64, seed=i) for i in range(2)}
    agents = []
    for device, local in data.items():
        t = make_agent_transport(mosquitto.url, fleet=fleet, device_id=device,
                                 backoff_min_s=0.1, backoff_max_s=1.0)
        agent = Agent(device_id=device, channel=Channel(transport=t, fleet=fleet), data=local,
                      state_dir=tmp_path / device, status_probe=lambda: DeviceStatus(),
                      settings=AgentSettings(request_timeout_s=10.0), owns_transport=True)
        enrol_agent(agent)
        agent.start()
        agents.append(agent)

    def run(agg: Aggregator, versions: int) -> None:
        agg.start()
        runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 90}, daemon=True)
        runner.start()
        runner.join(95)
        assert agg.model_version == versions, [m.to_json() for m in agg.history]

    first = aggregator(mosquitto.url, fleet, tmp_path / "run-a", artifacts, rounds=3)
    try:
        run(first, 3)  # the agents now hold versions 1, 2 and 3 of run A
    finally:
        first.close()
        first.channel.transport.close()
    # A fresh state dir (another run, another initial model) while the agents keep
    # running. Before: version 0 of the new run was evicted by the cached 1, 2, 3, and
    # a new version 2 would have been taken for run A's: the agents trained from
    # another run's weights, or not at all.
    second = aggregator(mosquitto.url, fleet, tmp_path / "run-b", other_run_artifacts,
                        rounds=2)
    try:
        run(second, 2)
        v1 = second.store.load_checkpoint(fleet, model_version=1)[1]
        deltas = []
        for agent in agents:
            record = agent.state.record
            assert record is not None and record.task.model_version == 1
            assert record.task.run == second._run.run_id  # type: ignore[union-attr]
            local = data[agent.device_id]
            deltas.append(expected_delta(other_run_artifacts, v1, local.x, local.y,
                                         record.task))
        np.testing.assert_allclose(second.params, v1 + np.mean(deltas, axis=0), atol=2e-5)
    finally:
        for agent in agents:
            agent.stop()
        second.close()
        second.channel.transport.close()


def test_the_aggregator_publishes_under_its_lock_without_waiting_for_its_handlers(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path
) -> None:
    """Found by the ingest benchmark over Mosquitto: FedBuff's run loop sent 200 tasks
    under the aggregator's lock while the network thread waited for that lock in an
    update's handler. The transport's queue (2,000 unacknowledged messages) filled, the
    publish waited for room that only the network thread could make, and the aggregator
    hung, one 60 s publish timeout per message. The aggregator now lifts the bound of
    its transport (one round's messages is what it queues), whoever built it."""
    fleet = "h-queue"
    agg = aggregator(mosquitto.url, fleet, tmp_path, artifacts)
    mqtt = agg.channel.transport
    assert isinstance(mqtt, MqttTransport)
    mqtt.set_max_queued(5)  # a bounded transport, as a library user may pass one
    dev = None
    try:
        agg.start()
        assert mqtt.max_queued == 0
        dev = Device(mosquitto.url, fleet, "dev-1")
        assert wait_for(lambda: agg.registry.get("dev-1") is not None, 10)
        with agg.condition:  # as the run loop holds it while it opens a round
            dev.hello()  # its handler now waits for the lock on the network thread
            assert wait_for(lambda: (mqtt.busy_s or 0.0) > 0.5, 10)
            for i in range(100):  # before: the 6th waited for the network thread
                agg.channel.transport.publish(f"fl/{fleet}/devices/dev-1/down/noise", b"%d" % i)
        assert mqtt.flush(timeout=10)
    finally:
        if dev is not None:
            dev.close()
        agg.close()
        agg.channel.transport.close()
