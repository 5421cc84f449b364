"""``EmbeddedBroker``: a pure-Python MQTT broker (amqtt) in a background thread.

For simulations and trials on a machine without Mosquitto. It speaks MQTT 3.1.1 and,
with the corrections in ``_amqtt_fixes``, keeps QoS 1 messages for a persistent
session while its client is away and sends retained messages only for the
subscription just made. What it lacks is in ``EMBEDDED_LIMITS``, which
``local_broker`` logs whenever it is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from broker_bridge._errors import BrokerUnavailable
from broker_bridge._ports import free_port

EMBEDDED_LIMITS = (
    "using the embedded Python broker (amqtt), not Mosquitto: it admits every client "
    "without a password or ACL, keeps nothing across its own restart, has no TLS, and "
    "is slow beyond a few hundred clients on two cores; install mosquitto for anything "
    "but a trial (Debian/Ubuntu: apt-get install mosquitto)"
)


class EmbeddedBroker:
    """amqtt (pure Python, MQTT 3.1.1) in a background thread on 127.0.0.1."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, *, timeout: float = 15.0) -> EmbeddedBroker:
        try:
            import amqtt.broker  # noqa: F401  (checked here to fail with a clear message)
        except ImportError as exc:
            raise BrokerUnavailable(
                "the embedded broker needs amqtt: pip install 'fleetlearn[sim]'"
            ) from exc
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise BrokerUnavailable(f"embedded broker did not start: {self._error}")
        # No TCP probe here: the listener is up once broker.start() returned, and amqtt
        # spends an error path on a connection that closes without a CONNECT.
        return self

    def _run(self) -> None:
        from broker_bridge._amqtt_fixes import PLUGIN_PATH, SubscribedRetainBroker

        async def main() -> None:
            config = {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                          "max_connections": 0}},
                "plugins": {PLUGIN_PATH: {}},
            }
            broker = SubscribedRetainBroker(config)
            self._stopped = asyncio.Event()
            try:
                await broker.start()
            except BaseException as exc:  # reported to start()
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stopped.wait()
            await broker.shutdown()

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
