"""What differs between MQTT 3.1.1 brokers must not change what the fleet does.

Over Mosquitto, RabbitMQ's MQTT plugin and NATS' MQTT gateway (``any_broker``):
ids keep their identity through wildcard subscriptions, a broker that refuses a client
for good makes a clear error instead of an endless reconnect loop.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from brokers import Nats, RabbitMq, wait_until

from broker_bridge import (
    BrokerRefused,
    Channel,
    ConfigError,
    Kind,
    Message,
    MqttTransport,
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
        assert wait_until(lambda: len(got) >= 1, 10)
        time.sleep(0.3)
    assert got == ["fl/dots/devices/pi/02/up/hello"]


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
