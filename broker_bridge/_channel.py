"""``Channel``: whole messages over a ``Transport`` (envelope, chunking, checks).

Sending splits a ``Message`` into payloads under ``max_payload`` bytes (default
128 KiB, AWS IoT Core's publish cap). Receiving decodes each payload, reassembles
chunk sets within bounds, and hands complete messages to the handler. A payload that
fails to decode is dropped, logged and counted in ``dropped``; it never reaches the
handler and never raises into the transport.

On device topics (``.../devices/<id>/...``) the envelope's device id must equal the
topic's: with a broker ACL confining each device to its own topics, this is what
stops one device from speaking for another. Dropped payloads are logged a few lines
per device a minute (``LogLimiter``): a device cannot grow the log at its own pace.

``roll_call`` asks the fleet who is there (presence without retained messages).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from broker_bridge._chunking import Reassembler, ReassemblyLimits
from broker_bridge._envelope import (
    DEFAULT_LIMITS,
    Chunk,
    EnvelopeLimits,
    Kind,
    Message,
    json_message,
    split_message,
)
from broker_bridge._errors import WireError
from broker_bridge._ratelimit import LogLimiter, printable
from broker_bridge._topics import Topics
from broker_bridge._transport import Transport, Will

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 128 * 1024

MessageHandler = Callable[[str, Message], None]


class Channel:
    """Send and receive fleetlearn messages for one fleet over one transport."""

    def __init__(
        self,
        *,
        transport: Transport,
        fleet: str,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        limits: EnvelopeLimits = DEFAULT_LIMITS,
        reassembly: ReassemblyLimits | None = None,
    ) -> None:
        self.transport = transport
        self.topics = Topics(fleet=fleet)
        self.max_payload = max_payload
        self._limits = limits
        self._reassembler = Reassembler(limits=reassembly)
        self.dropped: collections.Counter[str] = collections.Counter()
        self._log_limit = LogLimiter()

    @property
    def fleet(self) -> str:
        return self.topics.fleet

    @property
    def reassembler(self) -> Reassembler:
        return self._reassembler

    def send(self, topic: str, message: Message, *, qos: int = 1, retain: bool = False) -> int:
        """Publish ``message`` on ``topic`` in as many chunks as needed; return the count."""
        payloads = split_message(message, max_payload=self.max_payload)
        if retain and len(payloads) > 1:
            raise WireError("a retained message must fit in one chunk")
        for payload in payloads:
            self.transport.publish(topic, payload, qos=qos, retain=retain)
        return len(payloads)

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1) -> None:
        """Deliver complete, checked messages on ``topic_filter`` to ``handler``."""

        def on_payload(topic: str, payload: bytes) -> None:
            message = self.decode(topic, payload)
            if message is not None:
                handler(topic, message)

        self.transport.subscribe(topic_filter, on_payload, qos=qos)

    def decode(self, topic: str, payload: bytes) -> Message | None:
        """One payload in; a complete message out, or None (incomplete set or dropped)."""
        if not payload:
            return None  # an empty retained payload clears a topic; nothing to decode
        try:
            chunk = Chunk.from_bytes(payload, limits=self._limits)
            owner = self.topics.device_of(topic)
            if owner is not None and chunk.device != owner:
                self._drop("device_mismatch", topic, f"envelope says {chunk.device!r}")
                return None
            if chunk.fleet != self.fleet:
                self._drop("wrong_fleet", topic, f"envelope says {chunk.fleet!r}")
                return None
            return self._reassembler.feed(chunk)
        except WireError as exc:
            self._drop(type(exc).__name__, topic, str(exc))
            return None

    def _drop(self, reason: str, topic: str, detail: str) -> None:
        self.dropped[reason] += 1
        key = self.topics.device_of(topic) or "(no device)"
        self._log_limit.log(log, logging.WARNING, key, "dropped message on %s (%s): %s",
                            printable(topic), reason, printable(detail))


def presence_message(*, fleet: str, device: str, status: str, **info: object) -> Message:
    """The retained presence message of a device (``status``: online or offline)."""
    return json_message(Kind.PRESENCE, fleet=fleet, device=device,
                        payload={"status": status, **info})


def roll_call(channel: Channel) -> None:
    """Ask every connected device of the fleet for its presence and a hello.

    Presence must not depend on retained messages reaching a ``+`` subscription
    (RabbitMQ's MQTT plugin never delivers them there), nor trust a retained ``online``
    that may be stale: the aggregator sends this on start and after each reconnect,
    and counts a device as there once it answers.
    """
    from broker_bridge._protocol import Request

    channel.send(channel.topics.broadcast("control"),
                 Request(want="hello").to_message(fleet=channel.fleet))


AGGREGATOR_PRESENCE = "aggregator"
"""``broadcast/aggregator``: the aggregator's own retained presence (``online`` while it
serves the fleet; ``offline`` when it closes, or by its last will when it dies), so a
child that knows other parents can tell a dead aggregator behind a live broker."""


def aggregator_presence(*, fleet: str, status: str) -> Message:
    """The aggregator's retained presence message (``status``: online or offline)."""
    return json_message(Kind.PRESENCE, fleet=fleet, device="", payload={"status": status})


def aggregator_will(*, fleet: str) -> Will:
    """The last will an aggregator connects with: its presence turns ``offline``."""
    payload = split_message(aggregator_presence(fleet=fleet, status="offline"),
                            max_payload=DEFAULT_MAX_PAYLOAD)[0]
    return Will(topic=Topics(fleet=fleet).broadcast(AGGREGATOR_PRESENCE), payload=payload,
                qos=1, retain=True)


def presence_will(*, fleet: str, device: str) -> Will:
    """The last will a device connects with: its presence turns ``offline`` (retained)
    when its connection dies without a clean disconnect."""
    payload = split_message(presence_message(fleet=fleet, device=device, status="offline"),
                            max_payload=DEFAULT_MAX_PAYLOAD)[0]
    return Will(topic=Topics(fleet=fleet).presence(device), payload=payload, qos=1, retain=True)
