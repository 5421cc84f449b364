"""An edge site behind a Mosquitto bridge: the edge talks to its site's broker only, the
site's broker bridges exactly the edge's topics of the cloud's fleet to the cloud's
broker (two real Mosquittos started here on free ports), real agents train."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from keys import ENROLMENT, device_key

from broker_bridge import Channel, MosquittoProcess, MqttTransport, render_edge_bridge
from broker_bridge._brokers import _child_user, render_mosquitto_conf
from broker_bridge._ports import free_port
from cloud_aggregator import Aggregator, AggregatorConfig
from device_profiles import ConfigError
from edge_runtime import DeviceStatus, FailoverAgent, LocalData, ParentLink, load_mnist1d
from fleetlearn._edge import EdgeAggregator


def test_bridge_configuration_is_checked() -> None:
    text = render_edge_bridge(parent="mqtts://cloud.example:8883", parent_fleet="cloud",
                              edge_id="edge-1", password="pw", cafile=Path("ca.pem"))
    assert "address cloud.example:8883" in text and "bridge_cafile ca.pem" in text
    assert "topic fl/cloud/devices/edge-1/up/# out 1" in text
    assert "topic fl/cloud/broadcast/# in 1" in text
    for bad in ({"parent": "mqtts://cloud:8883"},  # no CA for TLS
                {"parent": "mqtt://u:pw@cloud:1883"},  # a password in the URL
                {"parent": "mqtt://cloud:1883", "edge_id": "edge.1"},
                {"parent": "mqtt://cloud:1883", "password": "a\nconnection x"}):
        kwargs = {"parent_fleet": "cloud", "edge_id": "edge-1", **bad}
        with pytest.raises(ConfigError):
            render_edge_bridge(**kwargs)  # type: ignore[arg-type]


def test_an_edge_behind_a_bridge_trains_and_only_its_topics_cross(
        tmp_path: Path, artifacts: Path, mosquittos: Callable[..., MosquittoProcess]) -> None:
    cloud_broker = mosquittos()
    port = free_port()
    site_conf = render_mosquitto_conf(
        port=port, bind_address="127.0.0.1", password_file=None, acl_file=None,
        persistence_dir=None, run_as_user=_child_user()) + render_edge_bridge(
        parent=cloud_broker.url, parent_fleet="cloud", edge_id="edge-1")
    site_broker = mosquittos(conf_text=site_conf, port=port)
    seen: list[str] = []
    lock = threading.Lock()

    def sniff(topic: str, _payload: bytes) -> None:
        with lock:
            seen.append(topic)

    sniffer = MqttTransport(url=cloud_broker.url, client_id="sniffer")
    sniffer.subscribe("fl/#", sniff)
    sniffer.connect()
    cloud = Aggregator(
        config=AggregatorConfig(
            fleet="cloud", model="mlp", rounds=2, devices_per_round=1, over_selection=1.0,
            quorum=1, min_devices=1, deadline_s=120.0, local_epochs=1, server_opt="fedavg",
            state_dir=tmp_path / "cloud", store_synchronous="NORMAL"),
        channel=Channel(transport=MqttTransport(url=cloud_broker.url, client_id="aggregator",
                                                clean_session=False, backoff_min_s=0.1,
                                                backoff_max_s=1.0), fleet="cloud"),
        artifacts_dir=artifacts, enrolment=ENROLMENT)
    edge = EdgeAggregator(
        config=AggregatorConfig(fleet="site-1", model="mlp", devices_per_round=2,
                                over_selection=1.0, quorum=2, min_devices=2, deadline_s=60.0,
                                local_epochs=1, server_opt="fedavg",
                                store_synchronous="NORMAL"),
        broker=site_broker.url, device_id="edge-1", state_dir=tmp_path / "edge",
        parents=[ParentLink(broker=site_broker.url, fleet="cloud")],  # via the bridge
        artifacts_dir=artifacts, key=device_key("edge-1"), enrolment=ENROLMENT)
    data = load_mnist1d(cache_dir=tmp_path.parent.parent / "fleetlearn-cache")
    devices = [FailoverAgent(device_id=f"dev-{i}", state_dir=tmp_path / f"dev-{i}",
                             parents=[ParentLink(broker=site_broker.url, fleet="site-1")],
                             data=LocalData(x=data.x_train[i * 300:(i + 1) * 300],
                                            y=data.y_train[i * 300:(i + 1) * 300]),
                             status_probe=DeviceStatus, key=device_key(f"dev-{i}"))
               for i in range(2)]
    try:
        cloud.start()
        edge.start()
        for device in devices:
            device.start()
        cloud.run(timeout_s=180)
        assert cloud.model_version == 2, cloud.status_line()
        assert [k.device_id for k in cloud.store.accepted_keys("cloud")] == ["edge-1"] * 2
        with lock:
            topics = set(seen)
        assert any(t.startswith("fl/cloud/devices/edge-1/up/update") for t in topics)
        # Nothing of the site's own fleet crossed to the cloud's broker.
        assert not [t for t in topics if not t.startswith("fl/cloud/")]
    finally:
        for device in devices:
            device.stop()
        edge.stop()
        cloud.stop()
        cloud.close()
        cloud.channel.transport.close()
        sniffer.close()
