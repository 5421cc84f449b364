"""What happens in a fleet, as typed events an application can subscribe to.

``Aggregator.subscribe(callback)`` calls ``callback(event)`` for each of the events
below, on the aggregator's own threads and under its lock: keep callbacks short (hand
work to a queue), and never call back into the aggregator from one. An exception in a
callback is logged and does not reach the aggregator.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cloud_aggregator._metrics import RoundMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DeviceOnline:
    device: str


@dataclass(frozen=True, kw_only=True)
class DeviceOffline:
    device: str


@dataclass(frozen=True, kw_only=True)
class UpdateAccepted:
    """An update is durable and counted (its device has been told)."""

    device: str
    task_round: int
    model_version: int
    """The model version it was trained from."""
    num_samples: int
    weight: float
    """The weight it counts with (bounded)."""
    norm: float


@dataclass(frozen=True, kw_only=True)
class UpdateRefused:
    device: str
    task_round: int
    reason: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class RoundOpened:
    round: int
    model_version: int
    selected: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class RoundEnded:
    """A sync round closed or was abandoned, or a FedBuff buffer was released."""

    metrics: RoundMetrics


@dataclass(frozen=True, kw_only=True)
class ModelReleased:
    model_version: int


@dataclass(frozen=True, kw_only=True)
class Status:
    """What the aggregator is waiting for, said once a wait has lasted a while."""

    text: str


Event = (DeviceOnline | DeviceOffline | UpdateAccepted | UpdateRefused | RoundOpened
         | RoundEnded | ModelReleased | Status)
Subscriber = Callable[[Event], None]


class EventBus:
    """Subscribers and emission (see the module doc)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = threading.Lock()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add ``callback``; returns a function that removes it."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", callback, type(event).__name__)
