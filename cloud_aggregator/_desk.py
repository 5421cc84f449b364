"""The aggregator's side of the conversation with devices: what comes up, what goes down.

``DeviceDesk`` handles every message a device sends (presence, hello, task acks, model
and artifact requests, error reports, updates) and sends everything a device is told
(tasks, cancels, update acks). The runtime (``_runtime.Aggregator``) calls its
handlers with the aggregator's lock held, and owns when things happen; the desk owns
what is said.

An update's way (docs/PROTOCOL.md section 5.1): the strategy's ``admit`` (is it an
answer to a task of ours, was this attempt judged before; a refusal it would remember
waits until the ``verify`` stage proved the update is the device's), the ingest
pipeline (``verify`` first), the
strategy's ``check``, then the journal; it is acknowledged ``accepted`` only once its
journal transaction committed. A refusal of a judged attempt is remembered in the
``AttemptLedger`` (the same attempt gets the same answer) and the strategy settles
the device's part (``Strategy.refused``); an update that answers no task of this
device (``Rejection.copy``) is answered without touching the device's own task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from broker_bridge import (
    PROTOCOL_VERSION,
    Ack,
    AckCode,
    Cancel,
    Channel,
    CodecSpec,
    ErrorReport,
    Hello,
    Kind,
    LogLimiter,
    Message,
    Presence,
    Request,
    SecAggRejected,
    WireError,
    printable,
)
from broker_bridge._secagg_msg import secagg_message
from cloud_aggregator._answers import ACCEPTED, Answer, AttemptLedger, after_round, refused
from cloud_aggregator._events import (
    DeviceOffline,
    DeviceOnline,
    EventBus,
    UpdateAccepted,
    UpdateRefused,
)
from cloud_aggregator._ingest import IngestPipeline, UpdateItem
from cloud_aggregator._journal import Journal, Outcome
from cloud_aggregator._metrics import Counters
from cloud_aggregator._planner import WorkPlanner
from cloud_aggregator._recorder import RoundRecorder
from cloud_aggregator._registry import FleetRegistry
from cloud_aggregator._rounds import Clock
from cloud_aggregator._serving import ModelServer
from cloud_aggregator._store import JournalEntry, Store, StoreError, UpdateKey
from cloud_aggregator._strategy import Admit, ModelState, Reply, Strategy

log = logging.getLogger(__name__)

DEVICE_ERRORS_EXCLUDE = ("data", "artifact", "backend")
"""Error codes after which a device is not selected again until its next hello."""
DEVICE_ERROR_CODES = frozenset({"error", "artifact", "data", "disk_full", "model_version",
                                "backend", "internal"})
"""The error codes docs/PROTOCOL.md names (each counted under its own name)."""


class DeviceDesk:
    """Handles what devices send and sends what they are told (see the module doc)."""

    def __init__(self, *, fleet: str, channel: Channel, clock: Clock, store: Store,
                 registry: FleetRegistry, counters: Counters, events: EventBus,
                 recorder: RoundRecorder, ledger: AttemptLedger, journal: Journal,
                 pipeline: IngestPipeline, model: ModelState, strategy: Strategy,
                 uplink: CodecSpec | str, planner: Callable[[], WorkPlanner],
                 server: Callable[[], ModelServer], running: Callable[[], bool],
                 commit: Callable[[], None], commit_full: Callable[[], None],
                 max_children: int | None = None,
                 verifiable: Callable[[str], bool] = lambda device: True) -> None:
        self.fleet = fleet
        self.channel = channel
        self.clock = clock
        self.store = store
        self.registry = registry
        self.counters = counters
        self.events = events
        self.recorder = recorder
        self.ledger = ledger
        self.journal = journal
        self.pipeline = pipeline
        self.model = model
        self.strategy = strategy
        self._uplink = str(uplink)
        self._planner = planner
        self._server = server
        self._running = running
        self._commit = commit
        self._commit_full = commit_full
        self.max_children = max_children
        self._verifiable = verifiable
        """Could an update of this device be verified (its key enrolled, or first use)?"""
        self._kept: set[str] = set()
        """With ``max_children``: the online devices this parent serves (first come)."""
        self._log = LogLimiter()

    # -- sending ----------------------------------------------------------------------

    def send(self, topic: str, message: Message) -> None:
        owner = self.channel.topics.device_of(topic)
        if owner is not None and message.device != owner:
            # Receivers drop a message on a device topic whose envelope names another
            # device; the aggregator's messages to a device carry that device's id.
            message = replace(message, device=owner)
        try:
            self.channel.send(topic, message)
        except Exception as exc:  # a dead link or a vanished broker is data here
            log.warning("send on %s failed: %s", topic, exc)
            return
        self.counters.add_bytes(down=len(message.body))

    def send_task(self, device: str, task_round: int, model_version: int) -> bool:
        """Send ``device`` its task of ``task_round``; False when none could go."""
        try:
            model_hash = self._server().hash_of(
                model_version, self.model.params if model_version == self.model.version else None)
        except StoreError as exc:
            log.error("device %s: no task for round %d: model version %d is gone (%s)",
                      device, task_round, model_version, exc)
            return False
        task = self._planner().task(device, task_round=task_round, model_version=model_version,
                                    model_hash=model_hash, codec=self._uplink)
        self._server().expect(device, model_version)
        self.send(self.channel.topics.down(device, "task"),
                  task.to_message(fleet=self.fleet, device=device, round=task_round,
                                  model_version=model_version))
        return True

    def send_secagg(self, device: str, body: Any) -> None:
        """A secure-aggregation body to ``device`` (docs/PROTOCOL.md section 11)."""
        self.send(self.channel.topics.down(device, "secagg"),
                  secagg_message(body, fleet=self.fleet, device=device))

    def cancel(self, device: str, round_index: int, reason: str) -> None:
        self.send(self.channel.topics.down(device, "cancel"),
                  Cancel(round=round_index, reason=reason)
                  .to_message(fleet=self.fleet, device=device, round=round_index))

    def note(self, device: str, level: int, msg: str, *args: object) -> None:
        """Log a line about ``device``: a few a minute per device at most."""
        self._log.log(log, level, device, msg, *args)

    def answer(self, device: str, message: Message, answer: Answer) -> None:
        """Acknowledge an update (docs/PROTOCOL.md section 5.1)."""
        if answer.status == "rejected":
            self.note(device, logging.WARNING,
                      "device %s: update for round %d (attempt %d) rejected (%s): %s", device,
                      message.round, message.attempt, answer.code, answer.detail)
            self.counters.update(f"rejected:{answer.code}")
            self.recorder.rejected(device, str(answer.code), round=message.round,
                                   attempt=message.attempt)
            self.events.emit(UpdateRefused(device=device, task_round=message.round,
                                           reason=answer.code, detail=answer.detail))
        elif answer.status == "duplicate":
            self.counters.update("duplicate")
        ack = Ack(round=message.round, attempt=message.attempt, what="update",
                  status=answer.status, reason=answer.reason)
        self.send(self.channel.topics.down(device, "ack"),
                  ack.to_message(fleet=self.fleet, device=device, round=message.round,
                                 model_version=message.model_version, attempt=message.attempt))

    def refuse(self, device: str, message: Message, answer: Answer) -> None:
        """Refuse a judged attempt: remember the answer (the same attempt gets it again),
        let the strategy settle the device's part, and ack."""
        self.ledger.record(message.round, device, message.attempt, answer)
        self.strategy.refused(device, message.round, answer)
        self.answer(device, message, answer)

    # -- what devices send ------------------------------------------------------------

    def on_presence(self, topic: str, message: Message) -> None:
        device = self.channel.topics.device_of(topic)
        if device is None or message.kind != Kind.PRESENCE:
            return
        try:
            status = Presence.from_message(message).status
        except WireError as exc:
            self.counters.update("malformed:presence")
            self.note(device, logging.WARNING, "device %s: malformed presence: %s", device,
                      printable(exc))
            return
        self.registry.on_presence(device, online=status == "online", at=self.clock.now())
        if status == "offline":
            self._kept.discard(device)
            self.strategy.on_offline(device)
            self.events.emit(DeviceOffline(device=device))
        else:
            self.events.emit(DeviceOnline(device=device))
        self.counters.set("devices_online", self.registry.online_count)
        if not self._running():  # driven by hand (tick): write the change now
            self.registry.flush()

    def on_up(self, topic: str, message: Message) -> None:
        device = self.channel.topics.device_of(topic)
        if device is None:
            return
        try:
            if message.kind == Kind.UPDATE:
                self.counters.add_bytes(up=len(message.body))
                self._on_update(device, message)
            elif message.kind == Kind.HELLO:
                self._on_hello(device, Hello.from_message(message))
            elif message.kind == Kind.ACK:
                ack = Ack.from_message(message)
                if ack.what == "task":
                    self._settle_first(device)
                    self.strategy.on_task_ack(device, ack)
            elif message.kind == Kind.CONTROL:
                self._server().serve(device, Request.from_message(message),
                                     current_version=self.model.version,
                                     params=self.model.params)
            elif message.kind == Kind.SECAGG:
                on_secagg = getattr(self.strategy, "on_secagg", None)
                if on_secagg is None:
                    raise SecAggRejected("unexpected", "no secure round runs here")
                on_secagg(device, message)
            elif message.kind == Kind.ERROR:
                report = ErrorReport.from_message(message)
                self._settle_first(device)
                self._on_error(device, report)
            else:
                self.note(device, logging.WARNING, "device %s: unexpected %s message on %s",
                          device, message.kind.topic_name, printable(topic))
        except WireError as exc:
            self.counters.update(f"malformed:{message.kind.topic_name}")
            self.note(device, logging.WARNING, "device %s: malformed %s message: %s",
                      device, message.kind.topic_name, printable(exc, 300))
        if not self._running():  # driven by hand (tick): write what a hello changed now
            self.registry.flush()

    def _settle_first(self, device: str) -> None:
        """An update of ``device`` admitted before this message is still waiting for its
        commit: commit it first, so the device's messages act in the order they came
        (a decline after an update does not unmake the update)."""
        if self.journal.holds(device):
            self._commit()

    def _on_hello(self, device: str, hello: Hello) -> None:
        before = self.registry.get(device)
        back = before is not None and not before.greeted  # its first hello since offline
        info = self.registry.on_hello(device, hello, at=self.clock.now())
        if info.profile_problem is not None:
            self.counters.update("malformed:profile")
        log.debug("device %s: hello (eligible=%s, samples=%d)", device, info.eligible,
                  info.num_samples)
        if hello.protocol != PROTOCOL_VERSION:
            why = f"speaks protocol {hello.protocol}; this aggregator speaks {PROTOCOL_VERSION}"
            self.registry.exclude(device, why)
            self.note(device, logging.WARNING, "device %s %s: not selected (update the agent)",
                      device, why)
            return
        if self._over_capacity(device):
            return
        self.strategy.on_hello(device, hello, back=back)

    def _over_capacity(self, device: str) -> bool:
        """With ``max_children``, the first devices to greet are served; one beyond is told
        to move (``Request(want="move")`` on its ``down/control``) and not selected here
        until a place frees (a served device goes offline) and it greets again. A device
        whose updates could not be verified (no enrolled key) takes no place: a hello is
        not signed, and holding places must not let it push enrolled devices away."""
        if self.max_children is None or device in self._kept or not self._verifiable(device):
            return False
        if len(self._kept) < self.max_children:
            self._kept.add(device)
            return False
        self.registry.exclude(device, f"this parent is at capacity "
                                      f"(max_children = {self.max_children})")
        self.counters.update("turned_away:capacity")
        self.note(device, logging.INFO, "device %s: at capacity (%d devices); asked to move",
                  device, self.max_children)
        self.send(self.channel.topics.down(device, "control"),
                  Request(want="move").to_message(fleet=self.fleet, device=device))
        return True

    def _on_error(self, device: str, report: ErrorReport) -> None:
        code = printable(report.code, 32)
        self.note(device, logging.WARNING, "device %s reports error %s (round %s): %s", device,
                  code, report.round, printable(report.message, 300))
        # Counter names are ours: a code a device makes up is counted as "other".
        self.counters.update(f"device_error:{code if code in DEVICE_ERROR_CODES else 'other'}")
        if report.code in DEVICE_ERRORS_EXCLUDE:
            # It would fail the same way next round: leave it out until its next hello.
            self.registry.exclude(
                device, f"reported {code} error: {printable(report.message, 120)}")
        self.strategy.on_error(device, report)

    # -- updates ----------------------------------------------------------------------

    def _on_update(self, device: str, message: Message) -> None:
        gate = self.strategy.admit(device, message)
        if isinstance(gate, Reply):
            if gate.judged:
                # A judged refusal is remembered and may settle the device's round: only
                # for an update that proves it is the device's (a forger must not use up
                # its attempts with, say, a wrong model version).
                unproven = self.pipeline.run_stage("verify", UpdateItem(
                    device=device, message=message, task_round=message.round))
                if unproven is not None:
                    self.answer(device, message, refused(unproven.reason, unproven.detail))
                    return
                self.refuse(device, message, gate.answer)
            else:
                self.answer(device, message, gate.answer)
            return
        assert isinstance(gate, Admit)
        waiting = self.journal.queued_attempt(message.round, device)
        if waiting is not None:  # this task's answer is being committed: one per task
            self.answer(device, message, Answer(
                status="duplicate", code=AckCode.ALREADY_COUNTED,
                detail=f"attempt {waiting} counts in round {message.round}"))
            return
        item = UpdateItem(device=device, message=message, task_round=gate.task_round,
                          max_steps=self._planner().sent_steps(gate.task_round, device))
        rejection = self.pipeline.run(item) or self.strategy.check(item)
        for counter, text in item.notes:
            self.counters.update(counter)
            self.note(device, logging.WARNING, "device %s: %s", device, text)
        if rejection is not None:
            answer = refused(rejection.reason, rejection.detail)
            if rejection.copy:  # answers no task of this device: not one of its attempts
                self.answer(device, message, answer)
            else:
                self.refuse(device, message, answer)
            return
        key = UpdateKey(fleet=self.fleet, round=message.round, device_id=device,
                        attempt=message.attempt)
        meta = self.strategy.journal_meta(item)
        meta["model_version"] = message.model_version  # for the training ledger
        meta["codec"] = message.codec
        if item.signature is not None:  # kept for the training ledger (after a restart)
            meta["signature"] = item.signature.hex()
        if item.body_sha256 is not None:
            meta["body_sha256"] = item.body_sha256.hex()
        entry = JournalEntry(key=key, stream=self.strategy.stream(item), body=message.body,
                             meta=meta)
        self.journal.submit(entry, lambda outcome: self._journaled(item, outcome),
                            stream=lambda: self.strategy.stream(item))
        if not self._running():
            self._commit()
        elif self.journal.full:
            self._commit_full()

    def _journaled(self, item: UpdateItem, outcome: Outcome) -> None:
        device, message = item.device, item.message
        if outcome == "failed":  # not acknowledged: the device will send it again
            return
        if outcome == "duplicate":
            self.answer(device, message, after_round(
                self.store, self.ledger, fleet=self.fleet, task_round=message.round,
                device=device, attempt=message.attempt))
            return
        assert item.meta is not None
        self.strategy.accepted(item)
        self._planner().observe_body(item.body_bytes)
        self.recorder.note_report(item.meta, weight=item.weight)
        self.counters.update("accepted")
        self.answer(device, message, ACCEPTED)
        self.events.emit(UpdateAccepted(device=device, task_round=item.task_round,
                                        model_version=message.model_version,
                                        num_samples=item.meta.num_samples, weight=item.weight,
                                        norm=item.norm))
