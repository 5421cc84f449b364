"""Two corrections to amqtt 0.12 (the embedded broker), imported only when it starts.

amqtt is pinned (``amqtt==0.12.1``); both corrections override its behaviour where it
departs from MQTT 3.1.1 in ways the fleet depends on, and
``tests/broker_bridge/test_embedded_broker.py`` fails if either stops working:

- ``SessionAuthPlugin`` admits every client as a named, not anonymous, session.
  amqtt marks every client anonymous when anonymous access is allowed, and never
  queues QoS 1 messages for an anonymous session while it is disconnected, so a
  persistent session (``clean_session = false``) lost what was sent while a device
  was away. The embedded broker checks no password in either case (see its warning).
- ``SubscribedRetainBroker`` sends retained messages only for the subscription just
  made. amqtt also sent, on every connect, every retained message matching *any*
  client's subscription to the connecting client: each device received the whole
  fleet's presence at start (quadratic in the fleet size).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

_SUBSCRIBING: contextvars.ContextVar[bool] = contextvars.ContextVar("subscribing", default=False)

PLUGIN_PATH = f"{__name__}.SessionAuthPlugin"


class SessionAuthPlugin(BaseAuthPlugin):
    """Admit every client, as a named session whose QoS 1 messages are kept while away."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool:
        session.is_anonymous = False
        return True


class SubscribedRetainBroker(Broker):
    """amqtt's broker, sending retained messages only when a subscription is made."""

    async def _handle_subscription(self, *args: Any, **kwargs: Any) -> None:
        token = _SUBSCRIBING.set(True)
        try:
            await super()._handle_subscription(*args, **kwargs)
        finally:
            _SUBSCRIBING.reset(token)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        if _SUBSCRIBING.get():  # not the on-connect pass over every client's filters
            await super()._publish_retained_messages_for_subscription(subscription, session)
