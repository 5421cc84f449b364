"""Parent failover: a device (or an edge aggregator's device side) that knows several
candidate parents at the same tier and re-attaches to another when its parent vanishes.

``FailoverAgent`` runs one ``Agent`` at a time, on the broker and fleet of the parent it
is attached to, always with the device's one state folder: the error-feedback residual
is the device's, not its parent's, so it survives a move. A parent has vanished when,
for ``failover_after_s``, the agent's connection to its broker has been down or the
parent's aggregator has said ``offline`` on ``broadcast/aggregator`` (its last will when
it dies behind a broker that stays up; an aggregator that never says anything counts as
there); then the agent is stopped and the next candidate (in the given order, wrapping)
is tried. A parent at capacity (its ``max_children``) tells a device that greets it to
move (``Request(want="move")`` on ``down/control``): the device moves at once to the next
candidate that has not turned it away within ``rebalance_after_s``; when every one has,
it stays where it is (that parent does not select it) and tries again later.

A committed update that the vanished parent never acknowledged answers that parent's
task (its nonce, its run) and no other parent can count it; so it is *parked* under
``parked/<fleet>/`` (its body and record; the residual it left is already the
device's) and the device starts afresh at the new parent. When the device comes back
to that parent (the parent restarted from its store), the parked update is restored
and re-sent byte for byte with the same attempt: counted once if the parent's round is
still open, answered "not counted" otherwise; never counted twice.

Crash safety: ``attached.json`` names the parent the state folder's record belongs to,
written before an agent starts there; a device killed mid-move parks or restores on its
next start from what the folder holds.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from broker_bridge import (
    AGGREGATOR_PRESENCE,
    BrokerUnavailable,
    Channel,
    Kind,
    Message,
    MqttTransport,
    Request,
    WireError,
    atomic_write,
    check_id,
)
from device_profiles import ConfigError
from edge_runtime._agent import Agent
from edge_runtime._presence import make_agent_transport
from edge_runtime._state import (
    SUBMISSION_FILE,
    TASK_FILE,
    AgentState,
    Submission,
    TaskRecord,
    TaskStatus,
    _sha256,
)

log = logging.getLogger(__name__)

ATTACHED_FILE = "attached.json"
PARKED_DIR = "parked"


@dataclass(frozen=True, kw_only=True)
class ParentLink:
    """One candidate parent: its broker and the fleet its children use there."""

    broker: str
    fleet: str
    name: str = ""

    def __post_init__(self) -> None:
        check_id(self.fleet, what="fleet id")
        if not self.broker.startswith(("mqtt://", "mqtts://")):
            raise ConfigError(f"parent broker must be an mqtt:// or mqtts:// URL, "
                              f"got {self.broker!r}")

    @property
    def label(self) -> str:
        return self.name or f"{self.fleet}@{self.broker}"


@dataclass(frozen=True, kw_only=True)
class Move:
    """One re-attachment, for the caller's record."""

    at: float
    from_parent: str | None
    to_parent: str
    parked: bool
    restored: bool


TransportFactory = Callable[[ParentLink, str], MqttTransport]


def _default_transport(parent: ParentLink, device_id: str) -> MqttTransport:
    return make_agent_transport(parent.broker, fleet=parent.fleet, device_id=device_id,
                                backoff_min_s=0.1, backoff_max_s=1.0)


class FailoverAgent:
    """An ``Agent`` that moves to another parent when its parent vanishes (see the
    module doc). ``agent_options`` go to each ``Agent`` it builds (``data``, ``hooks``,
    ``training``, ``status_probe``, ...)."""

    def __init__(self, *, device_id: str, parents: Sequence[ParentLink],
                 state_dir: str | Path, failover_after_s: float = 5.0,
                 rebalance_after_s: float = 300.0,
                 poll_s: float = 0.2, connect_timeout_s: float = 5.0,
                 transport: TransportFactory | None = None,
                 on_attach: Callable[[Agent, ParentLink], None] | None = None,
                 **agent_options: Any) -> None:
        if not parents:
            raise ConfigError("a failover agent needs at least one candidate parent")
        fleets = [p.fleet for p in parents]
        if len(set(fleets)) != len(fleets):
            raise ConfigError("candidate parents need distinct fleet names (a parked update "
                              "is kept per parent fleet)")
        if not failover_after_s > 0:
            raise ConfigError(f"failover_after_s must be > 0, got {failover_after_s}")
        self.device_id = check_id(device_id, what="device id")
        self.parents = list(parents)
        self.state_dir = Path(state_dir)
        self.failover_after_s = failover_after_s
        self.rebalance_after_s = rebalance_after_s
        self._poll_s = poll_s
        self._connect_timeout_s = connect_timeout_s
        self._transport = transport or _default_transport
        self._on_attach = on_attach
        self._options = agent_options
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._index = 0
        self._agent: Agent | None = None
        self._down_since: float | None = None
        self._parent_offline = False
        """The attached parent's aggregator said ``offline`` (and not ``online`` since)."""
        self._asked_to_move = False
        """The attached parent is at capacity and told this device to move."""
        self._turned_away: dict[str, float] = {}
        """When each parent (by fleet) last told this device to move (monotonic)."""
        self._generation = 0
        self.moves: list[Move] = []

    # -- what it is attached to ---------------------------------------------------------

    @property
    def agent(self) -> Agent | None:
        with self._lock:
            return self._agent

    @property
    def parent(self) -> ParentLink:
        with self._lock:
            return self.parents[self._index]

    # -- life cycle ---------------------------------------------------------------------

    def start(self, *, parent: int | None = None) -> None:
        """Attach to the parent the state folder names (else the first, or ``parent``)
        and watch the link."""
        with self._lock:
            if parent is not None:
                self._index = parent % len(self.parents)
            else:
                named = self._attached_fleet()
                for i, p in enumerate(self.parents):
                    if p.fleet == named:
                        self._index = i
            self._attach(None)
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name=f"failover-{self.device_id}")
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and stop the agent (it says ``offline``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self._agent is not None:
                self._agent.stop()
                self._agent = None

    def abort(self) -> None:
        """Stop at once, as a power cut would (see ``Agent.abort``)."""
        self._stop.set()
        with self._lock:
            if self._agent is not None:
                self._agent.abort()
                self._agent = None

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.check(time.monotonic())
            except Exception:
                log.exception("[%s] failover check failed", self.device_id)

    def check(self, now: float) -> bool:
        """Move to the next parent when this one has been unreachable for
        ``failover_after_s``; True when it moved."""
        with self._lock:
            agent = self._agent
            if agent is None or self._stop.is_set() or len(self.parents) == 1:
                return False  # with one parent, the agent's own reconnects are all there is
            if self._asked_to_move:
                return self._rebalance(agent, now)
            reachable = agent.channel.transport.connected
            if reachable and not self._parent_offline:
                self._down_since = None
                return False
            if self._down_since is None:
                self._down_since = now
                return False
            if now - self._down_since < self.failover_after_s:
                return False
            old = self.parents[self._index]
            self._index = (self._index + 1) % len(self.parents)
            log.warning("[%s] parent %s %s for %.1f s; moving to %s", self.device_id,
                        old.label, "has no aggregator" if reachable else "unreachable",
                        now - self._down_since, self.parents[self._index].label)
            agent.abort()  # as a crash: its will says offline there, nothing else is sent
            self._agent = None
            self._attach(old)
            return True

    def _rebalance(self, agent: Agent, now: float) -> bool:
        """The parent is at capacity: move to the next candidate that has not turned this
        device away lately (True), or stay (False)."""
        self._asked_to_move = False
        old = self.parents[self._index]
        self._turned_away[old.fleet] = now
        for step in range(1, len(self.parents)):
            index = (self._index + step) % len(self.parents)
            since = self._turned_away.get(self.parents[index].fleet)
            if since is None or now - since >= self.rebalance_after_s:
                break
        else:
            log.warning("[%s] every candidate parent is at capacity; staying at %s (not "
                        "selected there) and trying again in %.0f s", self.device_id,
                        old.label, self.rebalance_after_s)
            return False
        self._index = index
        log.info("[%s] parent %s is at capacity; moving to %s", self.device_id, old.label,
                 self.parents[index].label)
        agent.stop()  # its broker is there: it says offline and lets go cleanly
        self._agent = None
        self._attach(old)
        return True

    # -- attaching ----------------------------------------------------------------------

    def _attach(self, old: ParentLink | None) -> None:
        parent = self.parents[self._index]
        parked = self._park_other(parent)
        restored = self._restore(parent)
        atomic_write(self.state_dir / ATTACHED_FILE,
                     json.dumps({"fleet": parent.fleet, "broker": parent.broker}).encode())
        transport = self._transport(parent, self.device_id)
        channel = Channel(transport=transport, fleet=parent.fleet)
        self._generation += 1
        self._parent_offline = self._asked_to_move = False
        channel.subscribe(channel.topics.broadcast(AGGREGATOR_PRESENCE),
                          self._on_parent_presence(self._generation))
        channel.subscribe(channel.topics.down(self.device_id, "control"),
                          self._on_parent_control(self._generation))
        agent = Agent(device_id=self.device_id, channel=channel,
                      state_dir=self.state_dir, owns_transport=True, **self._options)
        self._agent = agent
        self._down_since = None
        self.moves.append(Move(at=time.time(), from_parent=None if old is None else old.label,
                               to_parent=parent.label, parked=parked, restored=restored))
        if self._on_attach is not None:
            self._on_attach(agent, parent)
        try:
            agent.start(connect_timeout=self._connect_timeout_s)
        except BrokerUnavailable as exc:  # keeps retrying; the watch moves on if it stays down
            log.warning("[%s] parent %s not reachable yet: %s", self.device_id, parent.label,
                        exc)

    def _on_parent_presence(self, generation: int) -> Callable[[str, Message], None]:
        def on(topic: str, message: Message) -> None:
            if message.kind != Kind.PRESENCE:
                return
            try:
                body = message.json()
            except WireError:
                return
            status = body.get("status") if isinstance(body, dict) else None
            # No lock here: this runs on the transport's thread, which stopping an agent
            # (under the lock) may wait for. Plain assignments, checked by ``check``.
            if generation == self._generation and status in ("online", "offline"):
                self._parent_offline = status == "offline"
                if status == "offline":
                    log.info("[%s] its parent says its aggregator is offline", self.device_id)
        return on

    def _on_parent_control(self, generation: int) -> Callable[[str, Message], None]:
        def on(topic: str, message: Message) -> None:
            if message.kind != Kind.CONTROL:
                return
            try:
                want = Request.from_message(message).want
            except WireError:
                return
            if want == "move" and len(self.parents) > 1 and generation == self._generation:
                self._asked_to_move = True  # (no lock: see _on_parent_presence)
        return on

    def _attached_fleet(self) -> str | None:
        try:
            return str(json.loads((self.state_dir / ATTACHED_FILE).read_bytes())["fleet"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _park_other(self, parent: ParentLink) -> bool:
        """Park the state folder's committed, unacknowledged update of another parent."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        owner = self._attached_fleet()
        if owner is None or owner == parent.fleet:
            return False
        state = AgentState(directory=self.state_dir)  # rolls a half-done commit forward
        record, submission = state.record, state.submission
        if record is None or record.status != TaskStatus.ENCODED or submission is None:
            return False
        where = self.state_dir / PARKED_DIR / owner
        where.mkdir(parents=True, exist_ok=True)
        # The residual this update left is the device's already: the parked copy
        # carries none, so restoring it never rolls the device's residual back.
        raw = replace(submission, residual=None).to_bytes()
        atomic_write(where / SUBMISSION_FILE, raw)
        atomic_write(where / TASK_FILE,
                     replace(record, submission_sha256=_sha256(raw)).to_bytes())
        (self.state_dir / TASK_FILE).unlink(missing_ok=True)
        log.info("[%s] parked the unacknowledged update of round %d for fleet %s",
                 self.device_id, record.task.round, owner)
        return True

    def _restore(self, parent: ParentLink) -> bool:
        """Bring back this parent's parked update, unless another committed one waits."""
        where = self.state_dir / PARKED_DIR / parent.fleet
        if not (where / TASK_FILE).exists():
            return False
        current = AgentState(directory=self.state_dir).record
        if current is not None and current.status == TaskStatus.ENCODED:
            return False  # already this parent's (a crash after restoring)
        try:
            record = TaskRecord.from_bytes((where / TASK_FILE).read_bytes())
            raw = (where / SUBMISSION_FILE).read_bytes()
            Submission.from_bytes(raw)
        except (OSError, ValueError) as exc:
            log.error("[%s] parked update for %s unreadable (%s); dropping it",
                      self.device_id, parent.fleet, exc)
            shutil.rmtree(where, ignore_errors=True)
            return False
        atomic_write(self.state_dir / SUBMISSION_FILE, raw)
        atomic_write(self.state_dir / TASK_FILE, record.to_bytes())  # the commit point
        shutil.rmtree(where, ignore_errors=True)
        log.info("[%s] restored the parked update of round %d for fleet %s", self.device_id,
                 record.task.round, parent.fleet)
        return True
