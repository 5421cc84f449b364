"""The embedded Python broker behaves as MQTT 3.1.1 says where the fleet relies on it.

amqtt 0.12 out of the box (anonymous sessions) dropped QoS 1 messages for a client
with a persistent session while it was away, and on every connect pushed every
retained message matching any client's subscription to the new client (the whole
fleet's presence to each device: quadratic at fleet start).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from brokers import wait_until
from paho.mqtt.enums import CallbackAPIVersion

from broker_bridge import EmbeddedBroker, MqttTransport, local_broker


@pytest.fixture
def embedded() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


def _client(url: str, cid: str, **kw: object) -> MqttTransport:
    return MqttTransport(url=url, client_id=cid, backoff_min_s=0.1,  # type: ignore[arg-type]
                         backoff_max_s=0.5, **kw)


class Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.got.append((topic, payload))


def test_a_persistent_session_gets_what_was_sent_while_it_was_away(
        embedded: EmbeddedBroker) -> None:
    inbox = Inbox()
    device = _client(embedded.url, "dev-away", clean_session=False)
    device.subscribe("fl/e/devices/dev-away/down/#", inbox)
    device.connect(timeout=30)
    time.sleep(0.3)
    device.close()
    sender = _client(embedded.url, "aggregator")
    with sender:
        sender.publish("fl/e/devices/dev-away/down/task", b"while away", qos=1)
        assert sender.flush(timeout=10)
    back = _client(embedded.url, "dev-away", clean_session=False)
    back.subscribe("fl/e/devices/dev-away/down/#", inbox)
    with back:
        assert wait_until(lambda: inbox.got, 15)
    assert inbox.got == [("fl/e/devices/dev-away/down/task", b"while away")]


def test_a_connecting_client_gets_no_retained_messages_it_did_not_subscribe_to(
        embedded: EmbeddedBroker) -> None:
    publisher = _client(embedded.url, "devices")
    observer_inbox = Inbox()
    observer = _client(embedded.url, "aggregator")
    with publisher, observer:
        for i in range(20):
            publisher.publish(f"fl/e/devices/d{i}/presence", b"online", qos=1, retain=True)
        assert publisher.flush(timeout=10)
        observer.subscribe("fl/e/devices/+/presence", observer_inbox)
        assert wait_until(lambda: len(observer_inbox.got) == 20, 15)  # what it asked for
        # A raw client sees every PUBLISH the broker sends it, wanted or not.
        newcomer_got: list[str] = []
        newcomer = paho.Client(CallbackAPIVersion.VERSION2, client_id="d-new",
                               protocol=paho.MQTTv311)
        newcomer.on_message = lambda _c, _u, m: newcomer_got.append(m.topic)
        newcomer.on_connect = lambda c, _u, _f, _r, _p: c.subscribe(
            "fl/e/devices/d-new/down/#", qos=1)
        newcomer.connect("127.0.0.1", embedded.port)
        newcomer.loop_start()
        try:
            time.sleep(0.5)
            publisher.publish("fl/e/devices/d-new/down/task", b"mine", qos=1)
            assert wait_until(lambda: "fl/e/devices/d-new/down/task" in newcomer_got, 15)
            time.sleep(0.5)
        finally:
            newcomer.disconnect()
            newcomer.loop_stop()
    assert newcomer_got == ["fl/e/devices/d-new/down/task"]


def test_choosing_the_embedded_broker_warns_what_it_lacks(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"), local_broker(prefer="embedded") as url:
        assert url.startswith("mqtt://127.0.0.1:")
    assert any("embedded" in r.message and "Mosquitto" in r.message for r in caplog.records)
