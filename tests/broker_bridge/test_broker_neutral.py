"""What differs between MQTT 3.1.1 brokers must not change what the fleet does.

Over Mosquitto, RabbitMQ's MQTT plugin and NATS' MQTT gateway (``any_broker``):
ids keep their identity through wildcard subscriptions, a broker that refuses a client
for good makes a clear error instead of an endless reconnect loop, and async devices
fetch each task's model where nothing is broadcast.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from brokers import Nats, RabbitMq, password_for, wait_until
from keys import ENROLMENT, enrol_agent

from broker_bridge import (
    BrokerRefused,
    Channel,
    ConfigError,
    Kind,
    Message,
    MqttTransport,
    Topics,
    Will,
    check_id,
    presence_message,
    presence_will,
)


def _transport(url: str, cid: str, **kw: object) -> MqttTransport:
    return MqttTransport(url=url, client_id=cid, backoff_min_s=0.1,  # type: ignore[arg-type]
                         backoff_max_s=0.5, **kw)


@pytest.mark.parametrize("bad", ["pi.02", "a b", "a/b", "a+b", "a#b", "", "-x", "x" * 65])
def test_ids_brokers_would_mangle_or_refuse_are_config_errors(bad: str) -> None:
    # '.': NATS refuses it in any topic (a last will included), RabbitMQ turns it into '/'.
    with pytest.raises(ConfigError, match="invalid device id"):
        check_id(bad, what="device id")


def test_an_id_with_a_dot_is_refused_by_agent_config_and_broker_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_runtime._config import load_config
    from fleetlearn.cli import main

    with pytest.raises(ConfigError, match=r"invalid device id 'pi\.02'.*'\.' is not allowed"):
        load_config(flags={"broker": "mqtt://h", "device_id": "pi.02", "data": "d.npz"},
                    env={})
    with pytest.raises(ConfigError, match="invalid fleet id"):
        load_config(flags={"broker": "mqtt://h", "device_id": "pi-02", "data": "d.npz",
                           "fleet": "plant.7"}, env={})
    code = main(["broker", "config", "--out", str(tmp_path), "--fleet", "f",
                 "--devices", "pi-01,pi.02"])
    assert code == 2
    assert "invalid device id 'pi.02'" in capsys.readouterr().err
    assert not (tmp_path / "passwd").exists()  # nothing half-written


@pytest.mark.slow
def test_rabbitmq_turns_a_dot_into_a_topic_level(rabbitmq: RabbitMq) -> None:
    """Why ids may not hold a '.': on RabbitMQ a device 'pi.02' would be invisible."""
    got: list[str] = []
    sub = _transport(rabbitmq.url, "dot-observer")
    pub = _transport(rabbitmq.url, "dot-publisher")
    with sub, pub:
        sub.subscribe("fl/dots/devices/+/up/#", lambda t, _p: got.append(t))
        sub.subscribe("fl/dots/devices/pi/#", lambda t, _p: got.append(t))
        pub.publish("fl/dots/devices/pi.02/up/hello", b"x")
        assert wait_until(lambda: len(got) >= 1, 30), got
        time.sleep(0.3)
    # QoS 1 is at least once: a duplicate is allowed, another topic is not
    assert set(got) == {"fl/dots/devices/pi/02/up/hello"}, got


def test_every_allowed_id_character_survives_every_broker(any_broker: tuple[str, str]) -> None:
    kind, url = any_broker
    fleet = f"ids-{kind}"
    device = "Pi_4:x-9"  # one of each class the id grammar allows
    observer = Channel(transport=_transport(url, f"obs-{kind}"), fleet=fleet)
    dev = Channel(transport=_transport(url, device, will=presence_will(fleet=fleet,
                                                                       device=device)),
                  fleet=fleet)
    seen: list[tuple[str | None, Kind]] = []
    lock = threading.Lock()

    def record(topic: str, m: Message) -> None:
        with lock:
            seen.append((observer.topics.device_of(topic), m.kind))

    with observer.transport:
        observer.subscribe(observer.topics.all_presence, record)
        observer.subscribe(observer.topics.all_up, record)
        with dev.transport:
            dev.send(dev.topics.presence(device),
                     presence_message(fleet=fleet, device=device, status="online"),
                     retain=True)
            dev.send(dev.topics.up(device, "hello"),
                     Message(kind=Kind.HELLO, fleet=fleet, device=device, codec="json",
                             body=b"{}"))
            assert wait_until(lambda: len(seen) >= 2, 15), seen
        # clear the retained presence for the next run on a shared broker
        cleaner = _transport(url, f"clean-{kind}")
        with cleaner:
            cleaner.publish(observer.topics.presence(device), b"", retain=True)
            cleaner.flush(timeout=5)
    assert (device, Kind.PRESENCE) in seen and (device, Kind.HELLO) in seen
    assert observer.dropped == {}


@pytest.mark.slow
def test_a_refused_connection_is_a_clear_error_not_an_endless_loop(nats: Nats) -> None:
    # NATS closes the connection, without CONNACK, of a client whose last-will topic
    # holds a '.': no retry will change that.
    t = _transport(nats.url, "refused-1",
                   will=Will(topic="fl/f/devices/pi.02/presence", payload=b"x"))
    started = time.monotonic()
    with pytest.raises(BrokerRefused, match="before answering CONNECT"):
        t.connect(timeout=30)
    assert time.monotonic() - started < 30  # gave up on its own, not by the timeout
    assert t.refused is not None
    complaints = nats.log_text().count('"refused-1"')
    time.sleep(1.5)  # several backoff periods: no more attempts
    assert nats.log_text().count('"refused-1"') == complaints
    t.close()


# -- presence: no dependence on retained messages reaching wildcard subscriptions ---------


def _start_agents(url: str, fleet: str, ids: list[str], tmp_path: Path) -> list[Any]:
    from edge_runtime import Agent, DeviceStatus, LocalData, make_agent_transport

    rng = np.random.default_rng(0)
    agents = []
    for did in ids:
        transport = make_agent_transport(url, fleet=fleet, device_id=did,
                                         password=password_for(did),
                                         backoff_min_s=0.1, backoff_max_s=1.0)
        agent = Agent(device_id=did, channel=Channel(transport=transport, fleet=fleet),
                      data=LocalData(x=rng.standard_normal((64, 40)).astype(np.float32),
                                     y=rng.integers(0, 10, 64).astype(np.int64)),
                      state_dir=tmp_path / did, owns_transport=True,
                      status_probe=lambda: DeviceStatus())
        enrol_agent(agent)
        agent.start(connect_timeout=30)
        agents.append(agent)
    return agents


@contextlib.contextmanager
def _agents(url: str, fleet: str, ids: list[str], tmp_path: Path) -> Iterator[list[Any]]:
    """Real agents of ``ids`` (``_start_agents``), stopped on the way out."""
    agents = _start_agents(url, fleet, ids, tmp_path)
    try:
        yield agents
    finally:
        for agent in agents:
            agent.stop()


@contextlib.contextmanager
def _closing(agg: Any) -> Iterator[Any]:
    """``agg``, closed with its transport on the way out."""
    try:
        yield agg
    finally:
        agg.close()
        agg.channel.transport.close()


def _aggregator(url: str, fleet: str, kind: str, tmp_path: Path, artifacts: Path,
                rounds: int, **settings: Any) -> Any:
    from cloud_aggregator import Aggregator
    from cloud_aggregator._config import AggregatorConfig

    config = AggregatorConfig(
        fleet=fleet, model="mlp", rounds=rounds, devices_per_round=2, over_selection=1.0,
        min_devices=2, quorum=2, deadline_s=30.0, local_epochs=1, state_dir=tmp_path / "agg",
        store_synchronous="NORMAL", progress=False, **settings)
    transport = MqttTransport(url=url, client_id=f"aggregator-{kind}", clean_session=False,
                              backoff_min_s=0.1, backoff_max_s=1.0)
    return Aggregator(config=config, channel=Channel(transport=transport, fleet=fleet),
                      artifacts_dir=artifacts, enrolment=ENROLMENT)


@pytest.mark.slow
def test_an_aggregator_started_after_its_fleet_and_restarted_finds_it(
        any_broker: tuple[str, str], tmp_path: Path, artifacts: Path) -> None:
    """RabbitMQ never delivers retained presence to the aggregator's ``+`` subscription:
    the aggregator must learn who is there by asking, on start and after a restart.
    A stale retained ``online`` of a device long gone must not make it selectable."""
    kind, url = any_broker
    fleet = f"late-{kind}"
    ghost = MqttTransport(url=url, client_id="ghost", backoff_min_s=0.1)
    with ghost:  # said 'online', then vanished without a will: its presence lies
        Channel(transport=ghost, fleet=fleet).send(
            Topics(fleet=fleet).presence("ghost"),
            presence_message(fleet=fleet, device="ghost", status="online"), retain=True)
        ghost.flush(timeout=5)
    try:
        with _agents(url, fleet, ["dev-1", "dev-2"], tmp_path):
            for rounds in (1, 2):  # first start, then a restart on the same state
                with _closing(_aggregator(url, fleet, kind, tmp_path, artifacts,
                                          rounds)) as agg:
                    agg.run(timeout_s=90)
                    assert agg.model_version == rounds, [m.to_json() for m in agg.history]
                    ready = {d.device_id for d in agg.registry.ready()}
                    assert ready == {"dev-1", "dev-2"}
                    assert agg.history[-1].devices_reported == 2
                    assert all(set(r.selected) <= {"dev-1", "dev-2"}
                               for r in agg.store.rounds(fleet))  # never the ghost
    finally:
        cleaner = MqttTransport(url=url, client_id=f"cleaner-{kind}")
        with cleaner:
            for did in ("ghost", "dev-1", "dev-2"):
                cleaner.publish(Topics(fleet=fleet).presence(did), b"", retain=True)
            cleaner.flush(timeout=5)


@pytest.mark.slow
def test_async_devices_fetch_each_tasks_model_on_every_broker(
        any_broker: tuple[str, str], tmp_path: Path, artifacts: Path) -> None:
    """FedBuff with a small model broadcasts nothing (``model_push``'s default): each real
    agent asks for the version its task names and trains from it, over every broker."""
    kind, url = any_broker
    fleet = f"fetch-{kind}"
    watcher = _transport(url, f"watcher-{kind}")
    broadcasts: list[bytes] = []
    with watcher:
        watcher.subscribe(Topics(fleet=fleet).broadcast("model"),
                          lambda _t, payload: broadcasts.append(payload))
        with _agents(url, fleet, ["dev-1", "dev-2"], tmp_path) as agents, _closing(
                _aggregator(url, fleet, kind, tmp_path, artifacts, 4, mode="async",
                            concurrency=2, buffer_size=1)) as agg:
            agg.run(timeout_s=120)
            assert agg.model_version == 4, [m.to_json() for m in agg.history]
            assert sum(m.devices_reported for m in agg.history) >= 4
    assert broadcasts == []
    assert all(agent.stats.acked >= 1 for agent in agents)
