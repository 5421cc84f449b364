"""Deployment as documented: files Mosquitto can read, passwords out of ``ps``, TLS for
the aggregator, one password-file format for everyone, a loopback metrics endpoint."""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from pathlib import Path

import pytest
from tls_files import make_ca_and_server

from broker_bridge import (
    Channel,
    ConfigError,
    Kind,
    Message,
    MosquittoProcess,
    MqttTransport,
    TlsConfig,
    TlsFiles,
    free_port,
    read_password_file,
    write_broker_config,
)
from broker_bridge._broker_files import default_run_as
from broker_bridge._brokers import _child_user
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._connect import broker_settings
from cloud_aggregator._metrics import Counters, MetricsServer

ROOT_WITH_MOSQUITTO_USER = (hasattr(os, "geteuid") and os.geteuid() == 0
                            and default_run_as() is not None)


@pytest.mark.skipif(not ROOT_WITH_MOSQUITTO_USER,
                    reason="needs root and a 'mosquitto' account (CI has both)")
def test_a_root_started_mosquitto_reads_everything_broker_config_wrote(open_dir: Path) -> None:
    certs = open_dir / "certs"
    certs.mkdir()
    ca, cert, key = make_ca_and_server(certs, "plant")
    assert key.stat().st_mode & 0o777 == 0o600 and key.stat().st_uid == 0
    port = free_port()
    files = write_broker_config(
        open_dir / "broker", fleet="plant", devices=["dev-1"], port=port,
        bind_address="127.0.0.1", tls=TlsFiles(certfile=str(cert), keyfile=str(key)),
        run_as_user="mosquitto")
    conf = files.conf.read_text()
    assert "user mosquitto" in conf and files.notes == ()
    creds = tomllib.loads(files.credentials.read_text())
    # Mosquitto, started as root, drops to user mosquitto before it reads passwd and
    # the ACL and writes its persistence.
    with MosquittoProcess(conf_text=conf, port=port, workdir=open_dir / "broker") as broker:
        dev = Channel(transport=MqttTransport(
            url=f"mqtts://127.0.0.1:{port}", client_id="dev-1", username="dev-1",
            password=creds["dev-1"], tls=TlsConfig(ca_certs=str(ca))), fleet="plant")
        with dev.transport:
            dev.send(dev.topics.up("dev-1", "hello"),
                     Message(kind=Kind.HELLO, fleet="plant", device="dev-1", body=b"{}"))
            assert dev.transport.flush(timeout=10)
        broker.stop()  # saves its persistence as user mosquitto
        log = broker.log_text()
    # The start-up readiness probe opens a TCP connection and closes it before any TLS
    # handshake; Mosquitto may log that as an OpenSSL "unexpected eof". Anything else
    # that says Error (an unreadable file, a refused login) fails the test.
    errors = [line for line in log.splitlines() if "Error" in line
              and "unexpected eof while reading" not in line]
    assert not errors, log
    assert (open_dir / "broker" / "data" / "mosquitto.db").exists()


@pytest.mark.skipif(not ROOT_WITH_MOSQUITTO_USER,
                    reason="needs root and a 'mosquitto' account (CI has both)")
def test_broker_config_says_when_mosquitto_cannot_reach_its_folder(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    files = write_broker_config(closed / "broker", fleet="f", devices=["d"],
                                run_as_user="mosquitto")
    assert any("cannot enter" in n and str(closed) in n for n in files.notes), files.notes
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700  # noted, not changed


def test_writing_the_config_again_keeps_every_password(tmp_path: Path) -> None:
    first = write_broker_config(tmp_path, fleet="f", devices=["d1", "d2"])
    before = tomllib.loads(first.credentials.read_text())
    again = write_broker_config(tmp_path, fleet="f", devices=["d1", "d2", "d3"])
    after = tomllib.loads(again.credentials.read_text())
    assert {k: after[k] for k in before} == before and set(after) == {*before, "d3"}


def test_a_password_file_may_be_the_password_or_credentials_toml(tmp_path: Path) -> None:
    bare = tmp_path / "pw"
    bare.write_text("s3cret\n")
    assert read_password_file(bare, user="anyone") == "s3cret"
    files = write_broker_config(tmp_path / "broker", fleet="f", devices=["dev-1"])
    creds = tomllib.loads(files.credentials.read_text())
    assert read_password_file(files.credentials, user="dev-1") == creds["dev-1"]
    assert read_password_file(files.credentials, user="aggregator") == creds["aggregator"]
    with pytest.raises(ConfigError, match="no entry for 'dev-9'"):
        read_password_file(files.credentials, user="dev-9")
    two = tmp_path / "two"
    two.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="one line"):
        read_password_file(two, user="x")
    with pytest.raises(ConfigError, match="cannot read"):
        read_password_file(tmp_path / "missing", user="x")


def test_the_agent_reads_its_entry_of_credentials_toml(tmp_path: Path) -> None:
    from edge_runtime._config import load_config

    files = write_broker_config(tmp_path, fleet="f", devices=["dev-1", "dev-2"])
    creds = tomllib.loads(files.credentials.read_text())
    config = load_config(flags={"broker": "mqtt://h", "device_id": "dev-2", "data": "d.npz",
                                "password_file": str(files.credentials)}, env={})
    assert config.password == creds["dev-2"]


def test_aggregator_password_file_environment_and_tls(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = write_broker_config(tmp_path, fleet="f", devices=["dev-1"])
    creds = tomllib.loads(files.credentials.read_text())
    s = broker_settings(broker="mqtt://broker:1883", password_file=str(files.credentials),
                        env={})
    assert (s.username, s.client_id, s.password) == ("aggregator", "aggregator",
                                                     creds["aggregator"])
    assert "PASS" not in repr(s) and creds["aggregator"] not in repr(s)
    s = broker_settings(broker="mqtt://broker", env={"FLEETLEARN_PASSWORD": "from-env"})
    assert s.password == "from-env"
    with caplog.at_level(logging.WARNING):
        s = broker_settings(broker="mqtt://ops:in-url@broker", env={})
    assert (s.username, s.password) == ("ops", "in-url")
    assert "(ps)" in caplog.text and "--password-file" in caplog.text
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = broker_settings(broker="mqtts://broker", tls_ca=str(ca), env={})
    assert s.tls is not None and s.tls.ca_certs == str(ca) and s.url.port == 8883
    with pytest.raises(ConfigError, match="not mqtts"):
        broker_settings(broker="mqtt://broker", tls_ca=str(ca), env={})
    with pytest.raises(ConfigError, match="not found"):
        broker_settings(broker="mqtts://broker", tls_ca=str(tmp_path / "nope.pem"), env={})


def test_the_metrics_endpoint_listens_on_loopback_unless_told(tmp_path: Path) -> None:
    assert AggregatorConfig().metrics_bind == "127.0.0.1"
    server = MetricsServer(Counters(), port=0)
    try:
        assert server._server.server_address[0] == "127.0.0.1"
    finally:
        server.close()
    with pytest.raises(ConfigError, match="metrics_bind"):
        AggregatorConfig(metrics_bind="")


def test_agent_and_aggregator_with_a_wrong_password_stop_with_a_clear_error(
        tmp_path: Path) -> None:
    """They used to retry for ever ('still trying'), printing nothing useful."""
    import subprocess
    import sys

    import numpy as np

    port = free_port()
    files = write_broker_config(tmp_path / "broker", fleet="f", devices=["dev-1"], port=port,
                                bind_address="127.0.0.1", run_as_user=_child_user())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 40)).astype(np.float32),
             y=rng.integers(0, 10, 16))
    (tmp_path / "wrong").write_text("not-the-password\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    env.pop("FLEETLEARN_PASSWORD", None)
    url = f"mqtt://127.0.0.1:{port}"
    commands = {
        "agent": ["agent", "--broker", url, "--fleet", "f", "--device-id", "dev-1",
                  "--password-file", str(tmp_path / "wrong"), "--data", str(tmp_path / "d.npz"),
                  "--state-dir", str(tmp_path / "state"), "--profile", "pi4"],
        "aggregator": ["aggregator", "--broker", url, "--fleet", "f", "--model", "mlp",
                       "--password-file", str(tmp_path / "wrong"),
                       "--state-dir", str(tmp_path / "agg")],
    }
    with MosquittoProcess(conf_text=files.conf.read_text(), port=port,
                          workdir=tmp_path / "broker"):
        for name, argv in commands.items():
            done = subprocess.run([sys.executable, "-m", "fleetlearn", *argv], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, (name, done.stdout, done.stderr)
            assert "refused the connection: not authorized" in done.stderr, (name, done.stderr)
