"""What arrives for a device: parsing, the hand-off of reassembled bodies, task dedupe.

The transport's network thread calls :meth:`Inbox.handle` for every message on the
device's ``down/#`` and ``broadcast/#`` topics (chunked bodies arrive reassembled by the
``Channel``). The inbox parses, never raises, and hands each message on: tasks, cancels,
update acks and roll calls to the agent; global models to the shared ``ModelCache``;
artifact bundles to a small queue the fetcher takes them from. :meth:`Inbox.wait` lets
the executor wait for such an arrival without missing one.

:func:`admit` is the protocol's answer to a task (docs/PROTOCOL.md section 9): a task is
known by its round and nonce, so the same task again is answered and never trained
twice, and an older round of the same run is not trained at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from broker_bridge import (
    Ack,
    Cancel,
    CodecSpec,
    InclusionProof,
    Kind,
    Message,
    Request,
    TaskSpec,
    WireError,
    read_model_message,
)
from device_profiles import ConfigError
from edge_runtime._artifact_cache import ModelCache
from edge_runtime._secure import SECURE_CODEC
from edge_runtime._state import TaskRecord, TaskStatus

T = TypeVar("T")


class Cancelled(Exception):
    """The round was cancelled (or the agent stops): drop the work, send nothing."""


# -- task dedupe -----------------------------------------------------------------------


def same_task(a: TaskSpec, b: TaskSpec) -> bool:
    """Two copies of one task (a task sent again carries the same round and nonce)."""
    return a.round == b.round and a.nonce == b.nonce


def moved_past(held: TaskSpec, new: TaskSpec) -> bool:
    """``new`` is an older round of the run this device already worked for."""
    return bool(held.run) and held.run == new.run and new.round < held.round


@dataclass(frozen=True)
class Admission:
    """The protocol's answer to a task.

    - ``take``: train it with ``attempt`` (if eligible and the ``on_task`` hook agrees);
    - ``decline``: answer ``declined`` with ``reason``;
    - ``working``: a copy of the task in hand: answer ``accepted`` again;
    - ``answered``: its update exists: answer ``accepted``, and re-send the update when it
      is not acknowledged yet (``resend``).
    """

    action: Literal["take", "decline", "working", "answered"]
    attempt: int = 0
    reason: str = ""
    resend: bool = False


def admit(task: TaskSpec, *, record: TaskRecord | None, working: tuple[TaskSpec, int] | None
          ) -> Admission:
    """Decide on ``task`` from the state record and the task in hand (``(task, attempt)``)."""
    same = record is not None and same_task(record.task, task)
    attempt = record.attempt if same and record is not None else 0
    if record is not None and not same and moved_past(record.task, task):
        return Admission("decline", 0,
                         f"stale: this device has moved on to round {record.task.round}")
    if working is not None:
        held, held_attempt = working
        if same_task(held, task):
            return Admission("working", held_attempt)
        return Admission("decline", 0, f"busy with round {held.round}")
    if same and record is not None and record.status.submitted:
        if record.status != TaskStatus.REJECTED:
            # Already submitted: re-send those bytes, never train again.
            return Admission("answered", record.attempt,
                             resend=record.status == TaskStatus.ENCODED)
        attempt = record.attempt + 1
    return Admission("take", attempt)


def read_task(message: Message) -> tuple[TaskSpec, str | None]:
    """The task in ``message`` and, when its codec cannot be encoded here, why (a decline).

    ``WireError`` for a task that is not well-formed (dropped and counted as malformed).
    """
    task = TaskSpec.from_message(message)
    if message.round != task.round or message.model_version != task.model_version:
        raise WireError("task envelope round/model_version differ from its body")
    if task.codec == SECURE_CODEC:
        return task, None
    try:
        CodecSpec.parse(task.codec)
    except ConfigError as exc:
        return task, f"unsupported codec: {exc}"
    return task, None


# -- the inbox -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InboxHandlers:
    """Where the inbox hands messages that need the agent (on the network thread)."""

    task: Callable[[Message], None]
    cancel: Callable[[Cancel], None]
    ack: Callable[[Ack], None]
    roll_call: Callable[[], None]
    malformed: Callable[[], None]
    secagg: Callable[[Message], None] | None = None
    proof: Callable[[InclusionProof], object] | None = None


class Inbox:
    """Receives every message for one device; hands off models and artifact bundles."""

    def __init__(self, *, models: ModelCache, handlers: InboxHandlers,
                 log: logging.LoggerAdapter[logging.Logger]) -> None:
        self.models = models
        self._handlers = handlers
        self._log = log
        self._cond = threading.Condition()
        self._bundles: deque[bytes] = deque(maxlen=2)
        self._seq = 0

    def handle(self, topic: str, message: Message) -> None:
        """Parse and hand on one message; never raises (a bad one is logged and counted)."""
        try:
            kind = message.kind
            if kind == Kind.TASK:
                self._handlers.task(message)
            elif kind == Kind.CANCEL:
                self._handlers.cancel(Cancel.from_message(message))
            elif kind == Kind.ACK:
                self._handlers.ack(Ack.from_message(message))
            elif kind == Kind.MODEL:
                meta, body = read_model_message(message)
                if self.models.offer(meta, body):
                    self._log.debug("model version %d of run %s received", meta.model_version,
                                    meta.run)
                self.notify()
            elif kind == Kind.ARTIFACTS:
                with self._cond:
                    self._bundles.append(message.body)
                self.notify()
            elif kind == Kind.SECAGG and self._handlers.secagg is not None:
                self._handlers.secagg(message)
            elif kind == Kind.CONTROL and Request.from_message(message).want == "hello":
                self._handlers.roll_call()
            elif kind == Kind.PROOF and self._handlers.proof is not None:
                self._handlers.proof(InclusionProof.from_message(message))
            else:
                self._log.debug("ignoring %s message on %s", kind.topic_name, topic)
        except (WireError, ConfigError) as exc:
            self._handlers.malformed()
            self._log.warning("dropped malformed %s message on %s: %s",
                              message.kind.topic_name, topic, exc)
        except Exception:
            self._handlers.malformed()
            self._log.exception("handler failed for a message on %s", topic)

    # -- hand-off to the executor ------------------------------------------------------

    def clear_bundles(self) -> None:
        with self._cond:
            self._bundles.clear()

    def take_bundle(self) -> bytes | None:
        with self._cond:
            return self._bundles.popleft() if self._bundles else None

    def notify(self) -> None:
        """Something arrived (or a wait should look again: a cancel, a stop)."""
        with self._cond:
            self._seq += 1
            self._cond.notify_all()

    def wait(self, ready: Callable[[], T | None], *, seconds: float,
             cancelled: Callable[[], bool]) -> T | None:
        """Wait until ``ready()`` returns something (None after ``seconds``).

        ``ready`` runs without the inbox's lock (it may decode a model); a sequence number
        tells whether anything arrived meanwhile, so no notification is missed. Raises
        ``Cancelled`` once ``cancelled()`` is true.
        """
        end = time.monotonic() + max(seconds, 0.0)
        while True:
            if cancelled():
                raise Cancelled
            with self._cond:
                seen = self._seq
            value = ready()
            if value is not None:
                return value
            left = end - time.monotonic()
            if left <= 0:
                return None
            with self._cond:
                if self._seq == seen and not cancelled():
                    self._cond.wait(min(left, 0.5))
