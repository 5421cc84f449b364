"""``MqttTransport``: the real transport, on paho-mqtt 2.x, MQTT 3.1.1.

What it adds to paho:

- connect by URL (``mqtt://`` / ``mqtts://``, user and password in the URL or given
  apart, client certificates through ``TlsConfig``);
- its own network thread, reconnecting with exponential backoff and full jitter so a
  fleet that lost its broker does not come back in one thundering herd;
- no reconnecting when the broker refuses the client for good (``_refusal``): bad
  credentials, a rejected client id or topic, an untrusted certificate raise
  ``BrokerRefused`` from ``connect`` and show in ``refused``;
- subscriptions remembered and restored after every reconnect;
- QoS 1 delivery across reconnects (paho re-sends unacknowledged messages), with a
  bounded outgoing queue: ``publish`` waits for room (saying after a few seconds what
  it waits for), then raises ``TransportError``. Only the network thread frees room
  (it reads the broker's acknowledgements), so a publish on that thread never waits,
  and a publisher holding a lock that the handlers take must not wait either: it
  lifts the bound (``set_max_queued(0)``; the aggregator does);
- paho's return codes translated into fleetlearn's exceptions in one place
  (``_check``).

Over 400 lines on purpose: ``NetworkLoop`` drives each transport through its private
``_on_io``/``_tick``, and the transport's connect, lose, retry and refuse steps share
paho's client state; telling a final refusal from a broker that is down lives apart,
in ``_refusal``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import selectors
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from broker_bridge._errors import BrokerUnavailable, TransportError
from broker_bridge._refusal import Refusals
from broker_bridge._transport import PayloadHandler, Transport, Will, dispatch
from device_profiles import ConfigError

log = logging.getLogger(__name__)

PUBLISH_WAIT_SAY_S = 5.0
"""A publish that has waited this long for room in the outgoing queue says why."""

# Reconnect jitter draws from its own generator: the global one belongs to the
# application (a simulation seeds it), and a background thread must not disturb it.
_JITTER = random.Random()


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """TLS settings for ``mqtts://``: CA bundle, optional client certificate and key."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False  # skip hostname verification (test setups only)


@dataclass(frozen=True, kw_only=True)
class BrokerUrl:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS, port 8883)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} has no host")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: bad port") from exc
        return cls(
            host=parts.hostname, port=port, tls=tls,
            username=urllib.parse.unquote(parts.username) if parts.username else None,
            password=urllib.parse.unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def _check(rc: MQTTErrorCode | int, what: str) -> None:
    """The one place paho's error codes become fleetlearn exceptions."""
    if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
        return
    if rc in (MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST,
              MQTTErrorCode.MQTT_ERR_CONN_REFUSED):
        raise BrokerUnavailable(f"{what}: {paho.error_string(rc)}")
    raise TransportError(f"{what}: {paho.error_string(rc)}")


class NetworkLoop:
    """One thread that drives the sockets of any number of ``MqttTransport`` clients.

    Every transport runs on a loop: by default its own, private one; a fleet simulator
    shares a few loops between thousands of clients (one selector, no thread or
    polling per client). Selector changes happen on the loop thread only; other
    threads post them with ``call_soon``. Message handlers run on this thread, so they
    must hand real work to an executor.
    """

    def __init__(self, *, name: str = "fleetlearn-mqtt", tick_s: float = 0.5) -> None:
        self._name = name
        self._tick_s = tick_s
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._members: set[MqttTransport] = set()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.busy_since: float | None = None
        """When the loop thread entered the I/O (and so the message handlers) it is in
        now; None between them."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    @property
    def members(self) -> int:
        with self._lock:
            return len(self._members)

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread (now, if already on it)."""
        if self.in_loop():
            fn()
            return
        self._calls.append(fn)
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def attach(self, transport: MqttTransport) -> None:
        with self._lock:
            self._members.add(transport)
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def detach(self, transport: MqttTransport) -> None:
        with self._lock:
            self._members.discard(transport)

    def close(self) -> None:
        """Stop the thread (after detaching every transport)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            self.call_soon(lambda: None)
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # selector bookkeeping: loop thread only
    def _watch(self, sock: Any, transport: MqttTransport, *, write: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self._sel.modify(sock, events, transport)
        except KeyError:
            with contextlib.suppress(ValueError, OSError):
                self._sel.register(sock, events, transport)
        except (ValueError, OSError):
            pass

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=self._tick_s / 2)
            except (OSError, ValueError):
                events = []
            for key, mask in events:
                member = key.data
                if member is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                self.busy_since = time.monotonic()
                try:
                    member._on_io(key.fileobj, mask)
                finally:
                    self.busy_since = None
            while self._calls:
                try:
                    self._calls.popleft()()
                except Exception:
                    log.exception("%s: scheduled call failed", self._name)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self._tick_s
                with self._lock:
                    members = list(self._members)
                for member in members:
                    member._tick(now)


class MqttTransport(Transport):
    """A paho-mqtt client with reconnects, re-subscription, presence and bounded queues."""

    def __init__(
        self,
        *,
        url: str | BrokerUrl,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: TlsConfig | None = None,
        will: Will | None = None,
        clean_session: bool = False,
        keepalive_s: int = 30,
        max_inflight: int = 50,
        max_queued: int = 2000,
        publish_timeout_s: float = 60.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        loop: NetworkLoop | None = None,
    ) -> None:
        self.url = url if isinstance(url, BrokerUrl) else BrokerUrl.parse(url)
        self.client_id = client_id
        self._publish_timeout = publish_timeout_s
        self._backoff = (backoff_min_s, backoff_max_s)
        self._keepalive = keepalive_s
        self._subs: dict[str, tuple[PayloadHandler, int]] = {}
        self._subs_lock = threading.Lock()
        self._unacked: dict[int, paho.MQTTMessageInfo] = {}
        """QoS 1 publishes the broker has not acknowledged yet, by message id: entered at
        publish, removed by ``_on_publish``, so it holds only what is in flight."""
        self._subacked: set[int] = set()
        self._suback_timeout = 10.0
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._private_loop = loop is None
        self._loop = loop or NetworkLoop(name=f"mqtt-{client_id}")
        self._active = False  # between connect() and close()/abort()
        self._started = False  # paho's connect() was called once
        self._next_attempt = 0.0
        self._attempt = 0
        self._ever_connected = False
        self._last_error = "not connected yet"
        self._refusals = Refusals(where=f"{self.url} (client {client_id})")
        self.reconnects = 0
        self.suback_timeouts = 0
        """Subscriptions whose grant did not come within ``_suback_timeout`` (a stall)."""

        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        user = username if username is not None else self.url.username
        pw = password if password is not None else self.url.password
        if user is not None:
            c.username_pw_set(user, pw)
        if self.url.tls or tls is not None:
            t = tls or TlsConfig()
            try:
                c.tls_set(ca_certs=t.ca_certs, certfile=t.certfile, keyfile=t.keyfile,
                          cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"TLS settings unusable: {exc}") from exc
            c.tls_insecure_set(t.insecure)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(max_queued)
        self._max_queued = max_queued
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        # The loop watches our socket; paho tells it when there is something to write.
        c.on_socket_open = lambda _c, _u, sock: self._loop.call_soon(
            lambda: self._loop._watch(sock, self, write=True))
        c.on_socket_close = lambda _c, _u, sock: self._loop.call_soon(
            lambda: self._loop._unwatch(sock))
        c.on_socket_register_write = lambda _c, _u, sock: self._loop.call_soon(
            lambda: self._loop._watch(sock, self, write=True))
        c.on_socket_unregister_write = lambda _c, _u, sock: self._loop.call_soon(
            lambda: self._loop._watch(sock, self, write=False))
        self._client = c

    # -- life cycle ----------------------------------------------------------------------
    def set_will(self, will: Will) -> bool:
        """Paho sends the will in CONNECT: it can be set until the first connection."""
        if self._started:
            return False
        self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        return True

    def connect(self, *, timeout: float = 10.0) -> None:
        if not self._active:
            self._active = True
            self._next_attempt = 0.0
            self._loop.attach(self)
            self._loop.call_soon(lambda: self._tick(time.monotonic()))
        deadline = time.monotonic() + timeout
        while not self._connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self._refusals.final is not None:
                raise self._refusals.error()
            if time.monotonic() >= deadline:
                raise BrokerUnavailable(
                    f"no connection to {self.url} within {timeout:g}s: {self._last_error}"
                )

    @property
    def refused(self) -> str | None:
        """Why the broker refused this client for good (then it stops retrying), or None."""
        return self._refusals.final

    def check_refused(self) -> None:
        """Raise ``BrokerRefused`` if the broker refused this client for good."""
        if self._refusals.final is not None:
            raise self._refusals.error()

    def close(self) -> None:
        """Disconnect cleanly (no will) and stop driving this client."""
        if not self._active:
            return
        done = threading.Event()

        def shut() -> None:
            self._active = False
            if self._client.socket() is not None:
                with contextlib.suppress(Exception):
                    self._client.disconnect()
                    self._client.loop_write()
                self._client._sock_close()
            done.set()

        self._finish(shut, done)

    def abort(self) -> None:
        """Drop the socket without DISCONNECT, as a crash would (the will fires)."""
        if not self._active:
            return
        done = threading.Event()

        def kill() -> None:
            self._active = False
            self._client._sock_close()
            done.set()

        self._finish(kill, done)

    def _finish(self, action: Callable[[], None], done: threading.Event) -> None:
        self._loop.call_soon(action)
        done.wait(5)
        self._loop.detach(self)
        self._connected.clear()
        if self._private_loop:
            self._loop.close()
            self._loop = NetworkLoop(name=f"mqtt-{self.client_id}")

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        """Why the last connection attempt failed or ended (None while connected)."""
        return None if self._connected.is_set() else self._last_error

    # -- publish / subscribe -------------------------------------------------------------
    @property
    def busy_s(self) -> float | None:
        """How long the network thread has been in its current read or write, message
        handlers included (None: it is waiting for I/O)."""
        since = self._loop.busy_since
        return None if since is None else time.monotonic() - since

    @property
    def max_queued(self) -> int:
        """How many QoS 1 messages may wait for the broker's acknowledgement before
        ``publish`` waits for room (0: no bound)."""
        return self._max_queued

    def set_max_queued(self, count: int) -> None:
        """Change the bound (0: none). A publisher that holds a lock its own message
        handlers take must not wait for room: the room is made by the network thread,
        which would be waiting for that lock."""
        if count < 0:
            raise ConfigError(f"max_queued must be >= 0, got {count}")
        self._max_queued = count
        self._client.max_queued_messages_set(count)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        # Never hold our lock while calling into paho: paho calls _on_publish (which
        # takes our lock) while holding its own.
        deadline = time.monotonic() + self._publish_timeout
        said = False
        while True:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc != MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                break
            if self._loop.in_loop():
                raise TransportError(
                    f"outgoing queue of {self.client_id} is full ({self._max_queued} "
                    f"messages wait for the broker's acknowledgement) and this publish to "
                    f"{topic} runs on the network thread, which alone reads those "
                    "acknowledgements: it cannot wait for room")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(
                    f"outgoing queue of {self.client_id} stayed full for "
                    f"{self._publish_timeout:g}s; message to {topic} not accepted"
                )
            if not said and self._publish_timeout - left >= PUBLISH_WAIT_SAY_S:
                said = True
                busy = self.busy_s
                log.warning(
                    "%s: a publish to %s has waited %.0fs for room in the outgoing queue "
                    "(%d messages wait for the broker's acknowledgement; %s); it gives up "
                    "after %gs", self.client_id, topic, self._publish_timeout - left,
                    self._max_queued, "the network thread is reading" if busy is None else
                    f"the network thread has been in a message handler for {busy:.0f}s: "
                    "a handler waiting for a lock that this publisher holds?",
                    self._publish_timeout)
            with self._cond:
                self._cond.wait(min(left, 0.2))
        if qos > 0:
            with self._cond:
                # The acknowledgement may already have come (on the loop thread, between
                # paho's publish() and here): then there is nothing to wait for.
                if not info._published:
                    self._unacked[info.mid] = info
        # Not connected: QoS 1 messages stay queued in paho and go out after reconnect.
        if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN or qos == 0:
            _check(info.rc, f"publish to {topic}")

    def subscribe(self, topic_filter: str, handler: PayloadHandler, *, qos: int = 1) -> None:
        with self._subs_lock:
            self._subs[topic_filter] = (handler, qos)
        if self._connected.is_set():
            rc, mid = self._client.subscribe(topic_filter, qos=qos)  # never under our lock
            if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                return  # re-subscribed on reconnect anyway
            _check(rc, f"subscribe to {topic_filter}")
            # Return once the broker has granted it, so that what is published afterwards
            # reaches us (not possible from our own loop thread).
            timed_out = False
            with self._cond:
                if not self._loop.in_loop():
                    deadline = time.monotonic() + self._suback_timeout
                    while mid not in self._subacked and time.monotonic() < deadline:
                        self._cond.wait(0.1)
                    timed_out = mid not in self._subacked
                self._subacked.discard(mid)
            if timed_out:
                # Usually a handler blocking the network thread (it cannot read the grant).
                self.suback_timeouts += 1
                log.warning("%s: no grant for subscription %s within %gs; continuing",
                            self.client_id, topic_filter, self._suback_timeout)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._subs_lock:
            self._subs.pop(topic_filter, None)
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def flush(self, *, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if not self._prune_unacked():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))

    @property
    def unacknowledged(self) -> int:
        with self._cond:
            return self._prune_unacked()

    def _prune_unacked(self) -> int:
        """Forget publishes acknowledged before ``publish`` recorded them (paho calls
        ``_on_publish`` just before it marks the message published); with ``_cond`` held."""
        done = [mid for mid, info in self._unacked.items() if info._published]
        for mid in done:
            del self._unacked[mid]
        return len(self._unacked)

    # -- driven by the NetworkLoop's thread -------------------------------------------------
    def _on_io(self, sock: Any, mask: int) -> None:
        if sock is not self._client.socket():
            return  # a socket closed since the selector reported it
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        if mask & selectors.EVENT_READ:
            rc = self._client.loop_read()
        if (rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mask & selectors.EVENT_WRITE
                and self._client.socket() is not None):
            rc = self._client.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(rc)

    def _tick(self, now: float) -> None:
        if not self._active or self._refusals.final is not None:
            return
        if self._client.socket() is None:
            if now < self._next_attempt:
                return
            try:
                if not self._started:
                    self._client.connect(self.url.host, self.url.port, self._keepalive)
                    self._started = True
                else:
                    self._client.reconnect()
                self._refusals.attempt_started()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                if self._refusals.connect_failed(exc) is not None:
                    log.error("%s", self._refusals.final)
                else:
                    self._schedule_retry(now)
            return
        rc = self._client.loop_misc()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(rc)

    def _lost(self, rc: MQTTErrorCode) -> None:
        self._connected.clear()
        if not self._last_error.startswith("connection refused"):
            self._last_error = paho.error_string(rc)
        if self._client.socket() is not None:
            self._client._sock_close()
        if self._refusals.final is None and self._refusals.lost(
                closed_by_broker=rc == MQTTErrorCode.MQTT_ERR_CONN_LOST) is not None:
            log.error("%s", self._refusals.final)
        if self._refusals.final is None:
            self._schedule_retry(time.monotonic())

    def _schedule_retry(self, now: float) -> None:
        # Exponential backoff with jitter: uniform in [min/2, min(max, min * 2^attempt)],
        # so a fleet that lost its broker does not come back all at once.
        lo, hi = self._backoff
        self._next_attempt = now + _JITTER.uniform(lo / 2, min(hi, lo * 2**self._attempt))
        self._attempt += 1

    def _on_connect(
        self, client: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        final = self._refusals.connack(reason)
        if reason.is_failure:
            self._last_error = f"connection refused: {reason}"
            if final is not None:
                log.error("%s", final)
            else:
                log.warning("%s: broker refused connection: %s", self.client_id, reason)
            return
        with self._subs_lock:
            subs = list(self._subs.items())
        if subs:
            client.subscribe([(f, qos) for f, (_h, qos) in subs])
        was_connected_before = self._ever_connected
        self._ever_connected = True
        if was_connected_before:
            self.reconnects += 1
            log.info("%s reconnected to %s", self.client_id, self.url)
        self._attempt = 0
        self._connected.set()
        self._run_connect_callbacks()


    def _on_disconnect(
        self, _c: paho.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._connected.clear()
        self._last_error = f"disconnected: {reason}"

    def _on_publish(self, _c: paho.Client, _ud: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._cond:
            self._unacked.pop(mid, None)
            self._cond.notify_all()

    def _on_subscribe(self, _c: paho.Client, _ud: Any, mid: int, _rc: Any, _props: Any) -> None:
        with self._cond:
            self._subacked.add(mid)
            if len(self._subacked) > 1000:  # grants nobody waits for (resubscriptions)
                self._subacked.clear()
            self._cond.notify_all()

    def _on_message(self, _c: paho.Client, _ud: Any, msg: paho.MQTTMessage) -> None:
        with self._subs_lock:
            subs = {f: h for f, (h, _q) in self._subs.items()}
        dispatch(subs, msg.topic, bytes(msg.payload), client_id=self.client_id)

