"""The outbox: an encoded update, durably committed, sent and re-sent until acknowledged.

An update enters the outbox through :meth:`Outbox.commit` (``AgentState.commit``: after it,
the update is only ever re-sent, byte for byte, with the same attempt; never trained
again). It is sent at once, again when no ack came within ``ack_timeout_s`` (at most
``max_resends`` times), after each reconnect, and when its task is sent again; a
restarted agent finds it in its state folder (:meth:`Outbox.resume`). It leaves the outbox
when the aggregator acknowledges it (``accepted`` or ``duplicate``: status ``acked``;
``rejected``: status ``rejected``, docs/PROTOCOL.md section 5.1; a rejection that says
the update's signature did not prove this device, ``IDENTITY``, is no answer: it is
sent again), when its round is cancelled, or when the re-sends are used up. Each send
is signed with the device's key (``_identity``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from broker_bridge import (
    IDENTITY,
    Ack,
    CodecError,
    CodecSpec,
    ErrorFeedback,
    Kind,
    Layout,
    Message,
    TaskSpec,
    UpdateMeta,
    ack_code,
    encode_update,
    may_retry,
    pack_update_body,
)
from edge_runtime._emulation import Emulation
from edge_runtime._hooks import AgentHooks, UpdateDraft, notify
from edge_runtime._settings import AgentSettings, AgentStats
from edge_runtime._state import AgentState, Submission, TaskStatus

Log = logging.LoggerAdapter[logging.Logger]


@dataclass
class Pending:
    """The update in the outbox and how often it was handed to the transport."""

    submission: Submission
    sent_at: float = 0.0
    sends: int = 0


def encode_submission(
    *, task: TaskSpec, attempt: int, layout: Layout, draft: UpdateDraft,
    residual: bytes | None, emulation: Emulation | None, log: Log,
) -> tuple[Submission, float]:
    """Encode ``draft`` with the task's codec (and the error-feedback residual) into the
    submission to commit; also the emulated seconds (0 without emulation)."""
    spec = CodecSpec.parse(task.codec)
    feedback: ErrorFeedback | None = None
    if spec.error_feedback and residual is not None:
        try:
            feedback = ErrorFeedback.from_bytes(residual, layout)
        except CodecError as exc:
            log.warning("residual does not fit this model (%s); starting at zero", exc)
    encoded = encode_update(draft.delta, layout, spec, feedback=feedback, rng=task.seed)
    meta = draft.meta
    emulated = 0.0
    if emulation is not None:
        emulated = emulation.emulated_s(
            task=task, num_parameters=layout.size, samples=meta.num_samples,
            steps=meta.steps, update_bytes=len(encoded.body),
        )
        meta = UpdateMeta(**{**meta.to_dict(), "emulated_s": round(emulated, 6)})
    submission = Submission(
        round=task.round, attempt=attempt, model_version=task.model_version,
        codec=str(spec), body=pack_update_body(meta, encoded.body),
        residual=encoded.feedback.to_bytes() if encoded.feedback is not None else None,
    )
    return submission, emulated


class Outbox:
    """Holds at most one update (the last committed) until it is acknowledged.

    ``lock`` is the agent's: the outbox's changes and the agent's phase move together.
    """

    def __init__(
        self, *, state: AgentState, publish: Callable[[Message], None], fleet: str, device: str,
        settings: AgentSettings, stats: AgentStats, hooks: AgentHooks, lock: threading.RLock,
        log: Log, sign: Callable[[Message], Message],
    ) -> None:
        self._state = state
        self._publish = publish
        self._fleet = fleet
        self._device = device
        self._settings = settings
        self._stats = stats
        self._hooks = hooks
        self._lock = lock
        self._log = log
        self._sign = sign
        """Signs an update message with the device's key (``DeviceKey.sign_update``)."""
        self._pending: Pending | None = None
        self._dropped: Submission | None = None
        """The update last dropped (acknowledged, or its round closed)."""

    @property
    def pending(self) -> Pending | None:
        with self._lock:
            return self._pending

    def resume(self) -> bool:
        """Take up a committed, unacknowledged update from the state folder."""
        record, submission = self._state.record, self._state.submission
        if record is None or record.status != TaskStatus.ENCODED or submission is None:
            return False
        with self._lock:
            self._pending = Pending(submission=submission)
        return True

    def commit(self, submission: Submission) -> None:
        """Persist ``submission`` (the commit point); from now on it is only re-sent."""
        self._state.commit(submission)
        with self._lock:
            self._pending = Pending(submission=submission)
        notify(self._hooks.on_committed, submission, self._log)

    def send(self, submission: Submission) -> bool:
        """Hand ``submission`` to the transport (the first send or a re-send); False when
        it is no longer to be sent.

        The outbox takes ``submission`` up again (a task sent again after the re-sends
        were used up) only while the state record still holds it unacknowledged and its
        round was not closed: the caller decided to send without the lock
        (``Agent.poll``), and an ack, a cancel or a newer commit may have come in between.
        """
        # Signed as it is sent (Ed25519 is deterministic: every send is the same bytes),
        # so an update committed by an agent older than signing is signed too.
        message = self._sign(Message(
            kind=Kind.UPDATE, fleet=self._fleet, device=self._device, round=submission.round,
            model_version=submission.model_version, attempt=submission.attempt,
            codec=submission.codec, body=submission.body,
        ))
        with self._lock:
            if self._pending is None or self._pending.submission is not submission:
                if not self._unacknowledged(submission):
                    self._log.debug("round %d attempt %d: not sent again (acknowledged, its "
                                    "round closed, or superseded meanwhile)", submission.round,
                                    submission.attempt)
                    return False
                self._pending = Pending(submission=submission)
            self._pending.sends += 1
            self._pending.sent_at = time.monotonic()
        self._publish(message)
        self._stats.updates_sent += 1
        notify(self._hooks.on_sent, submission, self._log)
        return True

    def _unacknowledged(self, submission: Submission) -> bool:
        """The state record is ``submission``'s round and attempt, still ``encoded``, and
        the outbox did not drop it since."""
        record = self._state.record
        dropped = self._dropped
        if dropped is not None and (dropped.round, dropped.attempt, dropped.body) == (
                submission.round, submission.attempt, submission.body):
            return False
        return (record is not None and record.status == TaskStatus.ENCODED
                and record.task.round == submission.round
                and record.attempt == submission.attempt)

    def send_pending(self) -> None:
        """Send the held update again, if any (after a reconnect)."""
        with self._lock:
            pending = self._pending.submission if self._pending is not None else None
        if pending is not None:
            self.send(pending)

    def due(self, now: float) -> tuple[Submission | None, bool]:
        """The update to re-send now (no ack within ``ack_timeout_s``), and whether the
        outbox gave it up (re-sends used up) and is now empty."""
        with self._lock:
            p = self._pending
            if p is None or p.sends == 0 or now - p.sent_at < self._settings.ack_timeout_s:
                return None, False
            if p.sends > self._settings.max_resends:
                self._log.warning("round %d: no ack after %d sends; giving up until restart",
                                  p.submission.round, p.sends)
                self._pending = None
                return None, True
            return p.submission, False

    def on_ack(self, ack: Ack) -> bool:
        """Apply an update ack (section 5.1); True when it emptied the outbox."""
        if ack.what != "update":
            return False
        with self._lock:
            record = self._state.record
            if record is None or record.task.round != ack.round or record.attempt != ack.attempt:
                return False
            if record.status != TaskStatus.ENCODED:
                return False
            if ack.status in ("accepted", "duplicate"):
                self._state.set_status(TaskStatus.ACKED)
                self._stats.acked += 1
            elif ack.status == "rejected" and ack_code(ack) in IDENTITY:
                # The aggregator could not tell this update was ours (no key enrolled for
                # us yet, or a forged copy's answer): nothing was judged, so keep it and
                # send it again after the ack timeout, like an update with no answer.
                self._log.error("round %d update not verified (%s): enrol this device's "
                                "public key (fleetlearn devices key) with the aggregator",
                                ack.round, ack.reason)
                return False
            elif ack.status == "rejected":
                # Not counted. The reference encoder is deterministic (a corrected attempt
                # would be the same bytes), so this agent does not retry on its own; it
                # trains again (attempt + 1) only if the task is sent again.
                self._log.warning("round %d update rejected (%s): %s", ack.round,
                                  "a corrected update may still count"
                                  if may_retry(ack_code(ack)) else "final for this round",
                                  ack.reason)
                self._state.set_status(TaskStatus.REJECTED)
            else:
                return False
            return self.drop_round(ack.round)

    def drop_round(self, round_: int) -> bool:
        """Forget the held update of ``round_`` (acknowledged, or its round closed)."""
        with self._lock:
            if self._pending is not None and self._pending.submission.round == round_:
                self._dropped, self._pending = self._pending.submission, None
                return True
            return False
