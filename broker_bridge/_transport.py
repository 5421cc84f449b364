"""The ``Transport`` interface, and an in-memory implementation for fast unit tests.

A transport moves opaque payloads on MQTT topics with MQTT 3.1.1 semantics: QoS 0/1,
retained messages, a last will, ``+``/``#`` filters. Subscriptions are remembered and
restored after a reconnect. ``MqttTransport`` (``_mqtt.py``) is the real one;
``MemoryBroker``/``MemoryTransport`` run in one process with no network, for unit
tests only: every wire feature is also tested over a real broker.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from broker_bridge._errors import BrokerUnavailable
from broker_bridge._topics import topic_matches

log = logging.getLogger(__name__)

PayloadHandler = Callable[[str, bytes], None]


@dataclass(frozen=True, kw_only=True)
class Will:
    """The message the broker publishes for a client whose connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Transport(ABC):
    """Publish/subscribe over a broker. Handlers run on the transport's own thread."""

    client_id: str

    @abstractmethod
    def connect(self, *, timeout: float = 10.0) -> None:
        """Connect (and keep reconnecting in the background); BrokerUnavailable on timeout."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly: the broker does not publish the will."""

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT, as a crash would: the broker
        publishes the will. (This default closes cleanly; the real transports override it.)"""
        self.close()

    @abstractmethod
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue one message. QoS 1 messages accepted here are delivered at least once,
        across reconnects; TransportError if the outgoing queue stays full."""

    @abstractmethod
    def subscribe(self, topic_filter: str, handler: PayloadHandler, *, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (also after reconnects)."""

    @abstractmethod
    def unsubscribe(self, topic_filter: str) -> None: ...

    @abstractmethod
    def flush(self, *, timeout: float = 30.0) -> bool:
        """Wait until every QoS 1 message published so far is acknowledged by the broker."""

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    def set_will(self, will: Will) -> bool:
        """Use ``will`` as the last will from the next connection on; False when this
        transport cannot (already connected once, or it has no wills)."""
        return False

    def on_connect(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after each (re)connection, e.g. to republish presence."""
        self._connect_callbacks().append(callback)

    def _connect_callbacks(self) -> list[Callable[[], None]]:
        if not hasattr(self, "_on_connect_cbs"):
            self._on_connect_cbs: list[Callable[[], None]] = []
        return self._on_connect_cbs

    def _run_connect_callbacks(self) -> None:
        for cb in list(self._connect_callbacks()):
            try:
                cb()
            except Exception:
                log.exception("on_connect callback failed for %s", self.client_id)

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dispatch(
    subs: dict[str, PayloadHandler], topic: str, payload: bytes, *, client_id: str
) -> None:
    """Call every handler whose filter matches; a failing handler is logged, never raised."""
    for topic_filter, handler in list(subs.items()):
        if topic_matches(topic_filter, topic):
            try:
                handler(topic, payload)
            except Exception:
                log.exception("handler for %s failed in %s", topic_filter, client_id)


def _filter_key(topic_filter: str) -> tuple[str, str]:
    """How a filter is indexed: ``("exact", topic)``, ``("prefix", p)`` for ``p/#``, or
    ``("any", "")`` for filters with ``+`` (matched one by one)."""
    if "+" in topic_filter or topic_filter == "#":
        return "any", ""
    if topic_filter.endswith("/#"):
        return "prefix", topic_filter[:-2]
    return "exact", topic_filter


class MemoryBroker:
    """An in-process broker: topic matching, retained messages, wills. Unit tests and
    in-process benchmarks.

    Subscriptions are indexed (exact topics, ``prefix/#`` filters, the rest), so a
    publish reaches the few clients whose filters can match instead of asking every
    client: a thousand simulated devices cost no more per message than ten.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: dict[str, MemoryTransport] = {}
        self._order: dict[str, int] = {}
        self._retained: dict[str, bytes] = {}
        self._index: dict[tuple[str, str], dict[str, int]] = {}

    def _attach(self, client: MemoryTransport) -> None:
        with self._lock:
            self._clients[client.client_id] = client
            self._order.setdefault(client.client_id, len(self._order))

    def _detach(self, client: MemoryTransport, *, clean: bool) -> None:
        with self._lock:
            if self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]
        if not clean and client.will is not None:
            w = client.will
            self.route(w.topic, w.payload, retain=w.retain)

    def _subscribed(self, client_id: str, topic_filter: str, *, add: bool) -> None:
        with self._lock:
            holders = self._index.setdefault(_filter_key(topic_filter), {})
            count = holders.get(client_id, 0) + (1 if add else -1)
            if count > 0:
                holders[client_id] = count
            else:
                holders.pop(client_id, None)

    def _targets(self, topic: str) -> list[MemoryTransport]:
        ids: set[str] = set(self._index.get(("exact", topic), ()))
        ids.update(self._index.get(("any", ""), ()))
        parts = topic.split("/")
        for i in range(1, len(parts) + 1):
            ids.update(self._index.get(("prefix", "/".join(parts[:i])), ()))
        found = [self._clients[c] for c in ids if c in self._clients]
        found.sort(key=lambda c: self._order.get(c.client_id, 0))
        return found

    def route(self, topic: str, payload: bytes, *, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            clients = self._targets(topic)
        for client in clients:
            client._deliver(topic, payload)


class MemoryTransport(Transport):
    """A client of a ``MemoryBroker``; delivery is synchronous in the publisher's thread."""

    def __init__(self, *, broker: MemoryBroker, client_id: str, will: Will | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._subs: dict[str, PayloadHandler] = {}
        self._connected = False

    def connect(self, *, timeout: float = 10.0) -> None:
        self._connected = True
        self.broker._attach(self)
        self._run_connect_callbacks()

    def close(self) -> None:
        if self._connected:
            self._connected = False
            self.broker._detach(self, clean=True)

    def set_will(self, will: Will) -> bool:
        if self._connected:
            return False
        self.will = will
        return True

    def kill(self) -> None:
        """Drop the connection uncleanly, as a crashed device would (the will fires)."""
        if self._connected:
            self._connected = False
            self.broker._detach(self, clean=False)

    def abort(self) -> None:
        self.kill()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if not self._connected:
            raise BrokerUnavailable(f"{self.client_id} is not connected")
        self.broker.route(topic, bytes(payload), retain=retain)

    def subscribe(self, topic_filter: str, handler: PayloadHandler, *, qos: int = 1) -> None:
        if topic_filter not in self._subs:
            self.broker._subscribed(self.client_id, topic_filter, add=True)
        self._subs[topic_filter] = handler
        with self.broker._lock:
            retained = [(t, p) for t, p in self.broker._retained.items()
                        if topic_matches(topic_filter, t)]
        for topic, payload in retained:
            handler(topic, payload)

    def unsubscribe(self, topic_filter: str) -> None:
        if self._subs.pop(topic_filter, None) is not None:
            self.broker._subscribed(self.client_id, topic_filter, add=False)

    def flush(self, *, timeout: float = 30.0) -> bool:
        return True

    @property
    def connected(self) -> bool:
        return self._connected

    def _deliver(self, topic: str, payload: bytes) -> None:
        if self._connected:
            dispatch(self._subs, topic, payload, client_id=self.client_id)

