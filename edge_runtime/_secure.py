"""The agent's side of secure aggregation (docs/PROTOCOL.md section 11).

``SecureSession`` answers the aggregator's ``secagg`` messages on the network thread
(``setup`` -> ``advertise``, ``keys`` -> ``shares``, ``deliver`` kept, ``unmask`` ->
``reveal``) with a ``SecAggDevice`` per round, and gives the worker what it needs to
send a masked update once its round's shares arrived (``masked_body``). Its secrets live
in memory only: an agent restarted mid-round has dropped out of that round's secure
part, which the round tolerates (its update, if already sent, is still summed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from broker_bridge import Message, TaskSpec
from broker_bridge._errors import SecAggRejected
from broker_bridge._secagg import shared_subset
from broker_bridge._secagg_device import SecAggDevice
from broker_bridge._secagg_msg import (
    CODEC,
    Deliver,
    Keys,
    Setup,
    Unmask,
    read_secagg,
    secagg_message,
)
from broker_bridge._skellam import privatize

SECURE_CODEC = CODEC
"""A task whose codec is this belongs to a secure round."""


class SecureSession:
    """One device's secure rounds (the current one; see the module doc)."""

    def __init__(self, *, fleet: str, device: str, publish: Callable[[Message], None],
                 notify: Callable[[], None], log: logging.LoggerAdapter[logging.Logger]
                 ) -> None:
        self.fleet, self.device = fleet, device
        self._publish, self._notify, self._log = publish, notify, log
        self._lock = threading.Lock()
        self._current: SecAggDevice | None = None
        self._delivered = False

    def _send(self, body: object) -> None:
        self._publish(secagg_message(body, fleet=self.fleet, device=self.device))  # type: ignore[arg-type]

    def handle(self, message: Message) -> None:
        """One ``secagg`` message; a refused one ends this device's part in the round."""
        try:
            body = read_secagg(message)
            with self._lock:
                if isinstance(body, Setup):
                    if self._current is None or self._current.setup.session != body.session:
                        self._current = SecAggDevice(fleet=self.fleet, setup=body)
                        self._delivered = False
                    reply: object = self._current.advertise()
                else:
                    current = self._current
                    if current is None:
                        raise SecAggRejected("unexpected", f"no secure round for a "
                                                           f"{type(body).__name__}")
                    if isinstance(body, Keys):
                        reply = current.on_keys(body)
                    elif isinstance(body, Deliver):
                        current.on_deliver(body)
                        self._delivered = True
                        reply = None
                    elif isinstance(body, Unmask):
                        reply = current.on_unmask(body)
                    else:
                        raise SecAggRejected("unexpected", type(body).__name__)
            if reply is not None:
                self._send(reply)
            self._notify()
        except SecAggRejected as exc:
            self._log.warning("secure aggregation: %s", exc)
            if exc.code in ("bad_share", "malformed"):
                with self._lock:  # this device leaves the round's secure part
                    self._current = None

    def ready(self, task: TaskSpec) -> SecAggDevice | None:
        """The round's device once its shares arrived (the worker waits for it)."""
        with self._lock:
            current = self._current
            if current is None or current.setup.round != task.round or not self._delivered:
                return None
            return current

    def masked_body(self, device: SecAggDevice, delta: np.ndarray, seed: int) -> bytes:
        """The masked vector of ``delta``: the round's coordinates, scaled by 1/fraction,
        clipped and in fixed point, then masked. In a private round (the setup's DP
        extension) the values are clipped to its L2 bound, rounded within its norm bound
        and noised (``broker_bridge._skellam``) from the OS CSPRNG, never from ``seed``."""
        setup = device.setup
        subset = shared_subset(setup.subset_seed, setup.size, setup.fraction)
        if delta.size != setup.size:
            raise SecAggRejected("malformed", f"the round has {setup.size} parameters, the "
                                              f"model {delta.size}")
        values = (delta[subset] / setup.fraction).astype(np.float32)
        if setup.dp is not None:
            levels = privatize(values, setup.dp, setup.scale).words
        else:
            rng = np.random.default_rng(seed)
            levels = device.fixed.encode(values, rng.random(len(subset)))
        with self._lock:
            return device.masked(levels).to_bytes()
