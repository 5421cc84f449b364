"""The wire over real brokers started by the tests: Mosquitto, and through ``any_broker``
also RabbitMQ's MQTT plugin and NATS' MQTT gateway (slow variants); the embedded broker.

RabbitMQ and NATS instances are shared by a test session: each test uses its own fleet
and client ids there, so persistent sessions of one test never meet another's."""

from __future__ import annotations

import gc
import random
import threading
import time
import tomllib
from pathlib import Path

import pytest
from waiting import wait_for

from broker_bridge import (
    BrokerRefused,
    BrokerUnavailable,
    Channel,
    EmbeddedBroker,
    Kind,
    Message,
    MosquittoProcess,
    MqttTransport,
    NetworkLoop,
    json_message,
    presence_message,
    presence_will,
    split_message,
    write_broker_config,
)
from broker_bridge._brokers import _child_user, free_port

FLEET = "wire"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.lock = threading.Lock()

    def __call__(self, _topic: str, m: Message) -> None:
        with self.lock:
            self.messages.append(m)


def _transport(url: str, cid: str, **kw: object) -> MqttTransport:
    return MqttTransport(url=url, client_id=cid, backoff_min_s=0.1, backoff_max_s=1.0, **kw)  # type: ignore[arg-type]


def test_20mb_body_crosses_in_128kb_chunks(any_broker: tuple[str, str]) -> None:
    kind, url = any_broker
    fleet = f"big-{kind}"
    body = random.Random(0).randbytes(20 * 1024 * 1024)
    rx = Channel(transport=_transport(url, f"agg-big-{kind}"), fleet=fleet)
    tx = Channel(transport=_transport(url, f"d1-big-{kind}"), fleet=fleet)
    inbox = Inbox()
    with rx.transport, tx.transport:
        rx.subscribe(rx.topics.all_up, inbox)
        n = tx.send(tx.topics.up("d1", "update"),
                    Message(kind=Kind.UPDATE, fleet=fleet, device="d1", body=body))
        assert n == 161  # 20 MiB / (128 KiB - header)
        assert wait_for(lambda: len(inbox.messages) == 1, 120)
    assert inbox.messages[0].body == body


def test_out_of_order_and_duplicated_chunks(any_broker: tuple[str, str]) -> None:
    kind, url = any_broker
    fleet = f"order-{kind}"
    body = random.Random(1).randbytes(20 * 1024 * 1024)
    payloads = split_message(Message(kind=Kind.MODEL, fleet=fleet, body=body),
                             max_payload=128 * 1024)
    order = payloads + random.Random(2).sample(payloads, 40)
    random.Random(3).shuffle(order)
    rx = Channel(transport=_transport(url, f"dev-order-{kind}"), fleet=fleet)
    pub = _transport(url, f"agg-order-{kind}")
    inbox = Inbox()
    with rx.transport, pub:
        rx.subscribe(rx.topics.all_broadcast, inbox)
        for p in order:
            pub.publish(rx.topics.broadcast("model"), p)
        assert wait_for(lambda: len(inbox.messages) == 1
                     and rx.reassembler.stats.duplicates >= 40, 120)
    assert len(inbox.messages) == 1 and inbox.messages[0].body == body
    assert rx.reassembler.pending_sets == 0


def test_an_oversized_json_message_is_dropped_before_reassembly(
        mosquitto: MosquittoProcess) -> None:
    """One device's 4 MiB hello (JSON) is refused chunk by chunk from its header: the
    receiver never holds or parses it, and the device's next, real hello still counts."""
    rx = Channel(transport=_transport(mosquitto.url, "agg-bigjson"), fleet=FLEET)
    tx = Channel(transport=_transport(mosquitto.url, "dev-bigjson"), fleet=FLEET)
    inbox = Inbox()
    topic = tx.topics.up("dev-bigjson", "hello")
    with rx.transport, tx.transport:
        rx.subscribe(rx.topics.all_up, inbox)
        n = tx.send(topic, Message(kind=Kind.HELLO, fleet=FLEET, device="dev-bigjson",
                                   codec="json",
                                   body=b'{"agent": "' + b"x" * (4 << 20) + b'"}'))
        tx.send(topic, json_message(Kind.HELLO, fleet=FLEET, device="dev-bigjson",
                                    payload={"agent": "real"}))
        assert wait_for(lambda: len(inbox.messages) >= 1, 30)
    assert [m.json() for m in inbox.messages] == [{"agent": "real"}]
    assert n == 33 and rx.dropped["EnvelopeError"] == n
    assert rx.reassembler.pending_bytes == 0 and rx.reassembler.stats.completed == 0


def test_acknowledged_publishes_leave_nothing_behind(mosquitto: MosquittoProcess) -> None:
    """Once the broker acknowledged a QoS 1 publish, the transport keeps nothing of it.
    The aggregator acks every update and never calls ``flush``: a record kept per
    publish (about 1.5 KB) grew without bound with the updates a device replays."""
    from paho.mqtt.client import MQTTMessageInfo

    def held() -> int:  # paho's per-publish records still alive in this process
        return sum(isinstance(o, MQTTMessageInfo) for o in gc.get_objects())

    n = 3000
    with _transport(mosquitto.url, "agg-acks") as tx:
        gc.collect()
        before = held()
        for i in range(n):
            tx.publish(f"fl/{FLEET}/devices/d{i % 50}/down/ack", b"a" * 200)
        # no flush: every record goes once its acknowledgement comes
        assert wait_for(lambda: held() <= before, 30), f"{held() - before} of {n} held"
        assert tx.unacknowledged == 0  # type: ignore[attr-defined]


def test_broker_restart_loses_no_accepted_qos1_message(mosquitto: MosquittoProcess) -> None:
    rx = Channel(transport=_transport(mosquitto.url, "agg-restart"), fleet=FLEET)
    tx = Channel(transport=_transport(mosquitto.url, "dev-restart"), fleet=FLEET)
    seen: set[int] = set()
    count = [0]

    def on_msg(_t: str, m: Message) -> None:
        seen.add(m.round)  # the sender's sequence number; duplicates allowed
        count[0] += 1

    rx.transport.connect()
    tx.transport.connect()
    rx.subscribe(rx.topics.all_up, on_msg)
    time.sleep(0.2)
    total = 400
    for i in range(total):
        tx.send(tx.topics.up("dev-restart", "update"),
                Message(kind=Kind.UPDATE, fleet=FLEET, device="dev-restart", round=i,
                        body=b"u" * 1024))
        if i == 150:
            mosquitto.stop()  # graceful: the broker saves sessions and queued messages
        if i == 250:
            mosquitto.start()
    try:
        missing = lambda: sorted(set(range(total)) - seen)[:20]  # noqa: E731
        assert wait_for(lambda: len(seen) == total, 60), f"missing {missing()}"
        assert tx.transport.flush(timeout=30)
        assert rx.transport.reconnects >= 1 and tx.transport.reconnects >= 1  # type: ignore[attr-defined]
    finally:
        tx.transport.close()
        rx.transport.close()
    assert count[0] >= total


def test_acl_confines_each_device_to_its_own_topics(tmp_path: Path) -> None:
    port = free_port()
    files = write_broker_config(tmp_path, fleet=FLEET, devices=["dev-a", "dev-b"], port=port,
                                bind_address="127.0.0.1", run_as_user=_child_user())
    creds = tomllib.loads(files.credentials.read_text())
    assert files.credentials.stat().st_mode & 0o777 == 0o600
    with MosquittoProcess(conf_text=files.conf.read_text(), port=port, workdir=tmp_path) as broker:
        url = broker.url
        agg = Channel(transport=_transport(url, "aggregator", username="aggregator",
                                           password=creds["aggregator"]), fleet=FLEET)
        # dev-a's credentials, whatever client id it claims:
        a = Channel(transport=_transport(url, "dev-b", username="dev-a",
                                         password=creds["dev-a"]), fleet=FLEET)
        inbox = Inbox()
        a_down = Inbox()
        with agg.transport, a.transport:
            agg.subscribe(agg.topics.all_up, inbox)
            a.subscribe(a.topics.device_down("dev-b"), a_down)  # someone else's tasks
            time.sleep(0.3)
            # impersonation attempt: dev-a writes on dev-b's topic as dev-b
            a.send(a.topics.up("dev-b", "update"),
                   Message(kind=Kind.UPDATE, fleet=FLEET, device="dev-b", body=b"forged"))
            agg.send(agg.topics.down("dev-b", "task"),
                     json_message(Kind.TASK, fleet=FLEET, payload={"secret": 1}))
            # the legitimate message, sent after, is the positive control
            a.send(a.topics.up("dev-a", "update"),
                   Message(kind=Kind.UPDATE, fleet=FLEET, device="dev-a", body=b"own"))
            assert wait_for(lambda: len(inbox.messages) >= 1)
            time.sleep(0.5)
        assert [m.body for m in inbox.messages] == [b"own"]
        assert a_down.messages == []
        # a wrong password is refused with a clear error, at once and for good
        bad = _transport(url, "dev-a", username="dev-a", password="wrong")
        with pytest.raises(BrokerRefused, match=r"not authorized: a wrong user name or password"):
            bad.connect(timeout=30)
        assert bad.refused is not None and not bad.connected
        bad.close()


def test_unclean_disconnect_marks_device_offline(any_broker: tuple[str, str]) -> None:
    kind, url = any_broker
    fleet = f"will-{kind}"
    observer = Channel(transport=_transport(url, f"agg-presence-{kind}"), fleet=fleet)
    dev_t = _transport(url, f"dev-p-{kind}", will=presence_will(fleet=fleet, device="dev-p"))
    dev = Channel(transport=dev_t, fleet=fleet)
    statuses: list[str] = []
    with observer.transport:
        observer.subscribe(observer.topics.all_presence,
                           lambda _t, m: statuses.append(m.json()["status"]))
        dev_t.connect()
        dev.send(dev.topics.presence("dev-p"),
                 presence_message(fleet=fleet, device="dev-p", status="online"), retain=True)
        assert wait_for(lambda: statuses == ["online"])
        dev_t.abort()  # the socket dies, no DISCONNECT: the broker publishes the will
        assert wait_for(lambda: statuses == ["online", "offline"])
    # a late subscriber to the device's own topic sees the retained status (a wildcard
    # subscriber would not on RabbitMQ, hence the aggregator's roll call)
    late = Channel(transport=_transport(url, f"late-{kind}"), fleet=fleet)
    got: list[str] = []
    with late.transport:
        late.subscribe(late.topics.presence("dev-p"), lambda _t, m: got.append(m.json()["status"]))
        assert wait_for(lambda: got == ["offline"])


def test_embedded_broker_round_trip() -> None:
    with EmbeddedBroker() as broker:
        rx = Channel(transport=_transport(broker.url, "agg"), fleet=FLEET)
        tx = Channel(transport=_transport(broker.url, "d1"), fleet=FLEET)
        inbox = Inbox()
        body = random.Random(4).randbytes(600_000)
        rx.transport.connect(timeout=30)  # a pure-Python broker is slow on a loaded machine
        tx.transport.connect(timeout=30)
        with rx.transport, tx.transport:
            rx.subscribe(rx.topics.all_up, inbox)
            time.sleep(0.2)
            tx.send(tx.topics.up("d1", "hello"),
                    json_message(Kind.HELLO, fleet=FLEET, device="d1", payload={"x": 1}))
            tx.send(tx.topics.up("d1", "update"),
                    Message(kind=Kind.UPDATE, fleet=FLEET, device="d1", body=body))
            assert wait_for(lambda: len(inbox.messages) == 2, 30)
        assert inbox.messages[0].json() == {"x": 1}
        assert inbox.messages[1].body == body


def test_connect_to_nothing_fails_with_broker_unavailable() -> None:
    t = _transport(f"mqtt://127.0.0.1:{free_port()}", "lonely")
    with pytest.raises(BrokerUnavailable, match="no connection"):
        t.connect(timeout=1)
    t.close()


def test_many_clients_share_one_network_loop(any_broker: tuple[str, str]) -> None:
    kind, url = any_broker
    fleet = f"many-{kind}"
    loop = NetworkLoop(name="shared-test")
    n = 200
    devices = [
        _transport(url, f"dev-{i}-many-{kind}", loop=loop,
                   will=presence_will(fleet=fleet, device=f"dev-{i}"))
        for i in range(n)
    ]
    got = [0]
    lock = threading.Lock()

    def on_model(_t: str, _p: bytes) -> None:
        with lock:
            got[0] += 1

    agg = Channel(transport=_transport(url, f"agg-many-{kind}"), fleet=fleet)
    offline: list[str] = []
    try:
        for d in devices:
            d.connect(timeout=20)
            # Connected first: subscribe() then returns once the broker granted it, so
            # the broadcast below reaches every device (a subscription sent with the
            # connection is not waited for, and a busy broker may route the publish first).
            d.subscribe(f"fl/{fleet}/broadcast/#", on_model)
        assert loop.members == n
        with agg.transport:
            agg.subscribe(agg.topics.all_presence,
                          lambda _t, m: offline.append(m.device)
                          if m.json()["status"] == "offline" else None)
            agg.transport.publish(agg.topics.broadcast("model"), b"m" * 5000)
            assert wait_for(lambda: got[0] == n)
            devices[7].abort()  # one device crashes; the others stay connected
            assert wait_for(lambda: offline == ["dev-7"])
            assert sum(d.connected for d in devices) == n - 1
    finally:
        for d in devices:
            d.close()
        loop.close()


def test_one_device_cannot_take_over_another_devices_session(tmp_path: Path) -> None:
    """dev-a's credentials with client id dev-b (or aggregator) must not close that
    client's session."""
    port = free_port()
    files = write_broker_config(tmp_path, fleet=FLEET, devices=["dev-a", "dev-b"], port=port,
                                bind_address="127.0.0.1", run_as_user=_child_user())
    creds = tomllib.loads(files.credentials.read_text())
    with MosquittoProcess(conf_text=files.conf.read_text(), port=port, workdir=tmp_path) as broker:
        agg = Channel(transport=_transport(broker.url, "aggregator", username="aggregator",
                                           password=creds["aggregator"]), fleet=FLEET)
        b = Channel(transport=_transport(broker.url, "dev-b", username="dev-b",
                                         password=creds["dev-b"]), fleet=FLEET)
        b_down = Inbox()
        with agg.transport, b.transport:
            b.subscribe(b.topics.device_down("dev-b"), b_down)
            attackers = [_transport(broker.url, victim, username="dev-a",
                                    password=creds["dev-a"]) for victim in ("dev-b", "aggregator")]
            try:
                for attacker in attackers:  # dev-a's credentials, the victims' client ids
                    attacker.connect(timeout=5)
                time.sleep(1.0)  # time for the broker to act on the CONNECTs
                agg.send(agg.topics.down("dev-b", "task"),
                         json_message(Kind.TASK, fleet=FLEET, device="dev-b",
                                      payload={"n": 1}))
                assert wait_for(lambda: len(b_down.messages) == 1, 10)
                for victim in (b.transport, agg.transport):
                    assert victim.connected
                    assert victim.reconnects == 0  # type: ignore[attr-defined]
            finally:
                for attacker in attackers:
                    attacker.close()
    log = broker.log_text()
    assert "as dev-a" in log  # the attackers' sessions are their own user's
    assert "dev-b already connected" not in log and "aggregator already connected" not in log
