"""``fleetlearn broker``: the local broker it runs listens where it is told."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from broker_bridge import MqttTransport
from broker_bridge._brokers import find_mosquitto, free_port


def test_broker_command_listens_on_the_host_it_is_given() -> None:
    """``--host`` reaches Mosquitto (the kind ``auto`` picks when it is installed): the
    broker listens on that address, not on 127.0.0.1."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; scripts/test.sh installs it (apt-get)")
    host = "127.0.0.2"  # a loopback address other than the default (Linux: all of 127/8)
    port = free_port(host)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetlearn", "broker", "--host", host, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # ends when the command exits
            lines.append(line)
            if "listening on" in line:
                break
        assert f"(mosquitto) listening on mqtt://{host}:{port}" in lines[-1], lines
        probe = MqttTransport(url=f"mqtt://{host}:{port}", client_id="probe")
        probe.connect(timeout=10)
        probe.close()
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # nothing listens there
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the command stops its broker
        assert proc.wait(timeout=30) == 0
