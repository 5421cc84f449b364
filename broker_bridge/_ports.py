"""Free ports and waiting for a listener (brokers this process starts)."""

from __future__ import annotations

import socket
import time

from broker_bridge._errors import BrokerUnavailable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"nothing listens on {host}:{port}") from exc
            time.sleep(0.05)
