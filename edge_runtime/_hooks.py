"""Typed hooks: what a library user (or the simulator) may plug into an agent's work.

Pass an ``AgentHooks`` to ``Agent(hooks=...)``; every field is optional. For one task
the hooks run in this order (each only if set):

1. ``on_task(task)``, on the network thread, for a task the agent is about to take: after
   the protocol's own checks (well-formed, codec supported, not a copy of a task it
   already answered, not stale, not busy, eligible) and before the task is acknowledged.
   Return ``None`` to take it, or a reason (a non-empty string) to decline it: the agent
   sends a ``declined`` task ack with that reason and trains nothing. Copies of a task
   already taken are answered by the protocol (docs/PROTOCOL.md section 9) without it.
2. The local training callable (``Agent(training=...)``, default ``train_locally``), on
   the executor, once the artifacts and the global model are in hand.
3. ``transform_update(draft)``, on the executor, after training and before encoding:
   ``draft.delta`` is the trained minus the global parameters (flat float32) and
   ``draft.meta`` what the update will say about itself. Return the draft to send (for
   instance ``dataclasses.replace(draft, delta=...)``). Not called when nothing was trained.
4. ``on_commit_step(step)``, on the executor, inside the durable commit (``_state``'s
   order): ``CommitStep.SUBMISSION_WRITTEN`` (the update body is on disk, the task record
   not yet committed) and ``CommitStep.RECORD_COMMITTED`` (the commit point passed, the
   error-feedback residual not yet rolled forward). For crash tests and tracing.
5. ``on_committed(submission)``: the update is durably in the outbox; it will be sent,
   and re-sent after a restart, byte for byte, until acknowledged.
6. ``on_sent(submission)``: after each hand-over of the update to the transport: the
   first send and every re-send (no ack in time, a reconnect, the task sent again).

The agent's phase (``Agent.phase``) meanwhile: ``on_task`` in ``IDLE`` or ``AWAITING_ACK``,
the training callable in ``TRAINING``, steps 3 to 5 in ``ENCODING``, ``on_sent`` in
``AWAITING_ACK`` (or already ``IDLE`` when the ack overtook it).

``on_inclusion(outcome)`` runs on the network thread when the aggregator's inclusion
proof for one of this device's updates arrives and has been checked (``_ledger_check``):
``outcome.status`` is ``verified``, ``unpinned`` (no aggregator key configured) or
``failed`` (``outcome.detail`` says why). A notification hook.

``transform_hello(hello)`` runs whenever the agent builds its hello (each connect, a
roll call, an eligibility change) and returns the hello to send.

What a hook may change: ``on_task`` only decides; ``transform_update`` may change the
update's values and everything in its metadata (the aggregator judges what it claims),
not its length (a delta of another shape is a ``HookError`` and the task fails);
``draft.task`` is for reading (a changed one is ignored); ``emulated_s`` is set after
the transform, from the samples and steps the returned metadata claims, when the agent
emulates a profile. ``transform_hello`` may change any
field. The notification hooks (``on_commit_step``, ``on_committed``, ``on_sent``,
``on_inclusion``) change
nothing: their return value is ignored.

Errors: an exception from ``on_task`` declines the task (reason ``hook failed``); from
``transform_update``, fails the task like any other error (reported to the aggregator as
``internal``); from ``transform_hello`` (or a return value that is not a ``Hello``: a
``HookError``, logged), sends the hello untransformed; from a
notification hook, is logged and ignored (the update is committed either way). A hook
that must end the device's work, as a power cut would (the simulator's crashes), calls
``Agent.abort()`` and returns: the agent then writes and sends nothing more, except
that a commit already under way (``on_commit_step``) completes, so the state folder is
never left half-committed by a hook (a real power cut there is what the crash-safe
commit order is for; tests/crash_agent.py SIGKILLs the process at those steps). Hooks run
on the agent's threads: keep them short, and never wait in them for the agent itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from broker_bridge import Hello, InclusionOutcome, TaskSpec, UpdateMeta
from edge_runtime._state import CommitStep, Submission

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, eq=False)
class UpdateDraft:
    """An update before encoding: what ``AgentHooks.transform_update`` sees and returns."""

    task: TaskSpec
    delta: np.ndarray
    """Trained minus global parameters, flat float32, in the layout's order."""
    meta: UpdateMeta


@dataclass(frozen=True, kw_only=True)
class AgentHooks:
    """Optional callables an ``Agent`` calls as it works (the module docstring gives the
    order and what each may change)."""

    on_task: Callable[[TaskSpec], str | None] | None = None
    transform_update: Callable[[UpdateDraft], UpdateDraft] | None = None
    on_commit_step: Callable[[CommitStep], None] | None = None
    on_committed: Callable[[Submission], None] | None = None
    on_sent: Callable[[Submission], None] | None = None
    transform_hello: Callable[[Hello], Hello] | None = None
    on_inclusion: Callable[[InclusionOutcome], None] | None = None


def notify(hook: Callable[[T], None] | None, value: T,
           log: logging.LoggerAdapter[logging.Logger]) -> None:
    """Call a notification hook; an exception from it is logged and ignored."""
    if hook is None:
        return
    try:
        hook(value)
    except Exception:
        log.exception("hook %s failed (ignored)", getattr(hook, "__name__", hook))


def ask_on_task(hooks: AgentHooks, task: TaskSpec,
                log: logging.LoggerAdapter[logging.Logger]) -> str | None:
    """The ``on_task`` hook's answer: None (take it) or why to decline it."""
    hook = hooks.on_task
    if hook is None:
        return None
    try:
        reason = hook(task)
    except Exception as exc:
        log.exception("on_task hook failed; declining round %d", task.round)
        return f"hook failed: {type(exc).__name__}"
    if reason is not None and (not isinstance(reason, str) or not reason):
        log.error("on_task hook returned %r (not None or a reason); declining", reason)
        return "hook failed: no reason given"
    return reason
