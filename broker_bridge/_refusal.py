"""Telling a broker that is down from a broker that refuses us for good.

A client that reconnects for ever is right while the broker or the network is down,
and wrong when the broker refuses it for a reason no retry will change: it then loops
silently, and the fleet waits for a device that will never come. ``Refusals`` watches
the outcome of each connection attempt of one ``MqttTransport`` and names a final
refusal, which the transport raises as ``BrokerRefused`` (a ``ConfigError``: the fix
is in the configuration, the broker's or ours) and stops retrying:

- a CONNACK refusing the protocol version, the client id, the user name or password,
  or the authorisation (MQTT 3.1.1 return codes 1, 2, 4, 5; code 3 "server
  unavailable" stays a reason to retry);
- the broker closing the connection before it answers CONNECT, several attempts in a
  row: how a broker rejects what it cannot accept in a CONNECT without a return code
  for it (NATS' MQTT gateway does this for a '.' or ' ' in a client id or last-will
  topic);
- a TLS certificate that does not verify (unknown CA, wrong host name).
"""

from __future__ import annotations

import ssl
from typing import Any

from broker_bridge._errors import BrokerRefused

# paho 2.x reports a 3.1.1 CONNACK return code as an MQTT 5 reason code.
_FINAL_CONNACK = {
    132: "the broker does not accept MQTT 3.1.1 (unsupported protocol version)",
    133: "the broker rejects the client id",
    134: "bad user name or password",
    135: "not authorized: a wrong user name or password (Mosquitto says so for both), or a "
         "user the broker does not let in",
}

CLOSES_BEFORE_CONNACK = 4
"""Consecutive connections the broker closes before answering CONNECT that make a
refusal (one or two happen when a broker is stopping or starting)."""


class Refusals:
    """The connection attempts of one client, and whether the broker refused it for good."""

    def __init__(self, *, where: str, closes_before_connack: int = CLOSES_BEFORE_CONNACK):
        self._where = where
        self._limit = closes_before_connack
        self._closes = 0
        self.awaiting_connack = False
        self.final: str | None = None

    def attempt_started(self) -> None:
        """A socket is open and CONNECT is on its way."""
        self.awaiting_connack = True

    def connack(self, reason: Any) -> str | None:
        """A CONNACK arrived; the final refusal it means, if any."""
        self.awaiting_connack = False
        self._closes = 0
        code = getattr(reason, "value", reason)
        if not getattr(reason, "is_failure", False):
            return None
        text = _FINAL_CONNACK.get(int(code)) if isinstance(code, int) else None
        if text is not None:
            self.final = f"{self._where} refused the connection: {text} ({reason})"
        return self.final

    def lost(self, *, closed_by_broker: bool) -> str | None:
        """The connection ended; the final refusal it means, if any."""
        if not self.awaiting_connack:
            return None
        self.awaiting_connack = False
        if not closed_by_broker:
            return None
        self._closes += 1
        if self._closes >= self._limit:
            self.final = (
                f"{self._where} closed the connection {self._closes} times in a row before "
                "answering CONNECT: it refuses this client (its log says why; NATS, for "
                "one, refuses '.' and ' ' in a client id or last-will topic)")
        return self.final

    def connect_failed(self, exc: BaseException) -> str | None:
        """Opening the socket (TCP, then TLS) raised ``exc``; the final refusal, if any."""
        self.awaiting_connack = False
        if isinstance(exc, ssl.SSLCertVerificationError):
            self.final = (
                f"{self._where}: TLS certificate verification failed ({exc.verify_message or exc}):"
                " give the CA that signed the broker's certificate (--tls-ca), and connect "
                "by a host name the certificate names")
        return self.final

    def error(self) -> BrokerRefused:
        return BrokerRefused(self.final or f"{self._where} refused the connection")
