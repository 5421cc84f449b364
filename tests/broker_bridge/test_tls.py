"""TLS end to end: a generated broker config with TLS, Mosquitto, and mqtts:// clients."""

from __future__ import annotations

import shutil
import threading
import tomllib
from pathlib import Path

import pytest
from tls_files import make_ca_and_server

from broker_bridge import (
    BrokerRefused,
    Channel,
    Kind,
    Message,
    MosquittoProcess,
    MqttTransport,
    TlsConfig,
    TlsFiles,
    write_broker_config,
)
from broker_bridge._brokers import _child_user, free_port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")






def test_devices_connect_over_tls_and_a_wrong_ca_is_refused(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server(tmp_path, "fleet")
    other_ca, _, _ = make_ca_and_server(tmp_path, "other")
    port = free_port()
    files = write_broker_config(
        tmp_path / "broker", fleet="tls", devices=["dev-1"], port=port,
        bind_address="127.0.0.1", tls=TlsFiles(certfile=str(cert), keyfile=str(key)),
        run_as_user=_child_user(),
    )
    conf = files.conf.read_text()
    # copied next to the rest, every path absolute, the key readable by its owner only
    copied = tmp_path / "broker" / "tls"
    assert f"certfile {copied / 'server.pem'}\n" in conf
    assert f"keyfile {copied / 'server.key'}\n" in conf and "tls_version tlsv1.2" in conf
    assert (copied / "server.key").stat().st_mode & 0o777 == 0o600
    creds = tomllib.loads(files.credentials.read_text())
    url = f"mqtts://127.0.0.1:{port}"
    with MosquittoProcess(conf_text=conf, port=port, workdir=tmp_path / "broker"):
        agg = Channel(transport=MqttTransport(
            url=url, client_id="aggregator", username="aggregator",
            password=creds["aggregator"], tls=TlsConfig(ca_certs=str(ca))), fleet="tls")
        dev = Channel(transport=MqttTransport(
            url=url, client_id="dev-1", username="dev-1", password=creds["dev-1"],
            tls=TlsConfig(ca_certs=str(ca))), fleet="tls")
        got: list[bytes] = []
        done = threading.Event()
        with agg.transport, dev.transport:
            agg.subscribe(agg.topics.all_up, lambda _t, m: (got.append(m.body), done.set()))
            dev.send(dev.topics.up("dev-1", "update"),
                     Message(kind=Kind.UPDATE, fleet="tls", device="dev-1", body=b"over tls"))
            assert done.wait(10)
        assert got == [b"over tls"]
        # A client that trusts another CA must not connect (no silent downgrade).
        rogue = MqttTransport(url=url, client_id="dev-1", username="dev-1",
                              password=creds["dev-1"], tls=TlsConfig(ca_certs=str(other_ca)),
                              backoff_min_s=0.1, backoff_max_s=0.2)
        # ... and says so at once, instead of retrying for ever.
        with pytest.raises(BrokerRefused, match=r"certificate verification failed.*--tls-ca"):
            rogue.connect(timeout=30)
        rogue.close()
        rogue.close()
