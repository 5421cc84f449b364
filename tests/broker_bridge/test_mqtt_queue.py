"""The bounded outgoing queue of ``MqttTransport`` over a real Mosquitto: only the network
thread makes room (it reads the broker's acknowledgements), so a publish that waits for
room must not be waiting for that thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
from waiting import wait_for

from broker_bridge import MosquittoProcess, MqttTransport, TransportError
from broker_bridge import _mqtt as mqtt_module


def _transport(url: str, cid: str, **kw: object) -> MqttTransport:
    return MqttTransport(url=url, client_id=cid, backoff_min_s=0.1, backoff_max_s=1.0, **kw)  # type: ignore[arg-type]


def _waits_for(lock: threading.Lock) -> Callable[[str, bytes], None]:
    """A message handler that waits for ``lock``."""
    def handler(_topic: str, _payload: bytes) -> None:
        with lock:
            pass
    return handler


def test_a_handler_that_fills_the_queue_is_told_at_once(mosquitto: MosquittoProcess) -> None:
    """Before: a publish on the network thread waited ``publish_timeout_s`` for room that
    only that same thread could make, then failed with 'stayed full'."""
    errors: list[TransportError] = []
    done = threading.Event()
    rx = _transport(mosquitto.url, "q-handler", max_queued=5, publish_timeout_s=30.0)
    tx = _transport(mosquitto.url, "q-sender")

    def handler(_topic: str, _payload: bytes) -> None:
        try:
            for _ in range(50):
                rx.publish("fl/q/out", b"y" * 100)
        except TransportError as exc:
            errors.append(exc)
        done.set()

    with rx, tx:
        rx.subscribe("fl/q/in", handler)
        tx.publish("fl/q/in", b"x")
        assert done.wait(20)
    assert len(errors) == 1
    assert "network thread" in str(errors[0]) and "cannot wait" in str(errors[0])


def test_a_publisher_holding_the_handlers_lock_says_what_it_waits_for(
    mosquitto: MosquittoProcess, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """The hazard the aggregator had: it publishes under a lock that its handlers take.
    With a bounded queue the publish waits for the network thread, which waits for the
    lock. It says so while it waits, and gives up after ``publish_timeout_s``."""
    monkeypatch.setattr(mqtt_module, "PUBLISH_WAIT_SAY_S", 0.3)
    lock = threading.Lock()
    rx = _transport(mosquitto.url, "q-holder", max_queued=5, publish_timeout_s=1.5)
    tx = _transport(mosquitto.url, "q-greeter")
    with rx, tx:
        rx.subscribe("fl/q/in", _waits_for(lock))
        with lock, caplog.at_level(logging.WARNING, logger="broker_bridge._mqtt"):
            tx.publish("fl/q/in", b"x")
            assert wait_for(lambda: (rx.busy_s or 0.0) > 0.5, 10)
            with pytest.raises(TransportError, match="stayed full"):
                for _ in range(50):
                    rx.publish("fl/q/out", b"y" * 100)
        assert any("in a message handler" in r.getMessage() for r in caplog.records)
        # The lock released, the network thread reads the acknowledgements again.
        assert rx.flush(timeout=10)


def test_an_unbounded_queue_does_not_wait(mosquitto: MosquittoProcess) -> None:
    """``set_max_queued(0)``: the same publisher goes on while the handler waits."""
    lock = threading.Lock()
    rx = _transport(mosquitto.url, "q-free", max_queued=5, publish_timeout_s=30.0)
    tx = _transport(mosquitto.url, "q-greeter2")
    rx.set_max_queued(0)
    assert rx.max_queued == 0
    with pytest.raises(Exception, match="max_queued must be >= 0"):
        rx.set_max_queued(-1)
    with rx, tx:
        rx.subscribe("fl/q/in", _waits_for(lock))
        with lock:
            tx.publish("fl/q/in", b"x")
            assert wait_for(lambda: (rx.busy_s or 0.0) > 0.5, 10)
            for _ in range(200):
                rx.publish("fl/q/out", b"y" * 100)
            assert rx.unacknowledged > 5
        assert rx.flush(timeout=10)
        assert rx.unacknowledged == 0
