"""The agent's protocol state machine: what one device is doing, and which moves are legal.

- ``IDLE``: no task in hand and no update waiting for an acknowledgement.
- ``FETCHING``: a task was accepted; the artifacts and the global model it names are
  being fetched (from the caches, or requested from the aggregator).
- ``TRAINING``: local training runs (the replaceable training callable).
- ``ENCODING``: the trained weights become an update: the transform hook, the codec,
  the emulated wait and the durable commit.
- ``AWAITING_ACK``: the committed update is sent, and re-sent until the aggregator
  acknowledges it (docs/PROTOCOL.md section 5.1); the agent takes new tasks meanwhile.
- ``STOPPED``: ``stop`` or ``abort`` was called; nothing leaves it.

The edges (``_LEGAL``)::

    IDLE          -> FETCHING (a task taken), AWAITING_ACK (restart with an unacked update)
    FETCHING      -> TRAINING
    TRAINING      -> ENCODING
    ENCODING      -> AWAITING_ACK (committed; the first send follows)
    FETCHING, TRAINING, ENCODING
                  -> IDLE or AWAITING_ACK (the job ended with nothing sent: cancelled,
                     failed, withdrawn at its deadline; AWAITING_ACK when an earlier
                     update still waits for its ack)
    AWAITING_ACK  -> IDLE (acknowledged, its round cancelled, or given up on),
                     FETCHING (a new task while the update waits for its ack)
    any           -> STOPPED

Any other move is a bug in the agent and raises ``IllegalTransition`` before anything is
written or sent for it. Staying in a phase is not a move.
"""

from __future__ import annotations

import threading
from enum import StrEnum

from edge_runtime._errors import IllegalTransition


class Phase(StrEnum):
    """What the agent is doing (the module docstring says what each means)."""

    IDLE = "idle"
    FETCHING = "fetching"
    TRAINING = "training"
    ENCODING = "encoding"
    AWAITING_ACK = "awaiting_ack"
    STOPPED = "stopped"

    @property
    def working(self) -> bool:
        """A task is in hand (another task is declined as busy)."""
        return self in (Phase.FETCHING, Phase.TRAINING, Phase.ENCODING)


_LEGAL: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.FETCHING, Phase.AWAITING_ACK, Phase.STOPPED}),
    Phase.FETCHING: frozenset({Phase.TRAINING, Phase.IDLE, Phase.AWAITING_ACK, Phase.STOPPED}),
    Phase.TRAINING: frozenset({Phase.ENCODING, Phase.IDLE, Phase.AWAITING_ACK, Phase.STOPPED}),
    Phase.ENCODING: frozenset({Phase.AWAITING_ACK, Phase.IDLE, Phase.STOPPED}),
    Phase.AWAITING_ACK: frozenset({Phase.IDLE, Phase.FETCHING, Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}


def legal(current: Phase, target: Phase) -> bool:
    return target in _LEGAL[current]


class PhaseMachine:
    """The current phase, moved only along legal edges; thread-safe."""

    def __init__(self, initial: Phase = Phase.IDLE) -> None:
        self._phase = initial
        self._lock = threading.Lock()

    @property
    def phase(self) -> Phase:
        with self._lock:
            return self._phase

    def move(self, target: Phase, *, expect: frozenset[Phase] | None = None) -> Phase:
        """Go to ``target``; refuse an illegal move (``IllegalTransition``).

        With ``expect``, move only from one of those phases and otherwise return the
        current phase unchanged (for moves that race with others, such as an ack
        arriving while a new task is already being fetched). Returns the phase left.
        """
        with self._lock:
            old = self._phase
            if expect is not None and old not in expect:
                return old
            if old == target:
                return old
            if not legal(old, target):
                raise IllegalTransition(old, target)
            self._phase = target
        return old
