"""The agent where its threads meet: an ack between a re-send's decision and the send, a
hello hook that fails on reconnect. Each interleaving is played step by step, in the
order the threads could take, over MemoryTransport with the aggregator stand-in."""

from __future__ import annotations

import logging
import time

import pytest
from agent_rig import Rig, idle
from waiting import wait_for

from broker_bridge import Ack, Hello
from edge_runtime import AgentHooks, AgentSettings, Phase, TaskStatus


def test_an_ack_between_the_resend_decision_and_the_send_ends_the_resends(rig: Rig) -> None:
    rig.agg.ack_updates = False
    agent = rig.agent(settings=AgentSettings(ack_timeout_s=0.2, request_timeout_s=5.0))
    rig.agg.send_task("dev-1", rig.agg.task(round_=3))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    assert agent.phase == Phase.AWAITING_ACK
    outbox = agent._outbox
    # The timer thread (Agent.poll) takes the update to re-send under the lock...
    resend, gave_up = outbox.due(time.monotonic() + 1.0)
    assert resend is not None and not gave_up
    # ...the network thread delivers the ack before the timer thread sends...
    agent._on_ack(Ack(round=3, attempt=0, what="update", status="accepted"))
    assert outbox.pending is None and agent.phase == Phase.IDLE
    record = agent.state.record
    assert record is not None and record.status == TaskStatus.ACKED
    # ...and then the timer thread sends what it took.
    outbox.send(resend)
    assert outbox.pending is None  # the acknowledged update is not held again
    assert len(rig.agg.updates) == 1  # nor sent again
    for later in (10.0, 100.0, 1000.0):
        agent.poll(time.monotonic() + later)
    assert len(rig.agg.updates) == 1 and agent.stats.resends == 0


def test_a_stale_resend_does_not_displace_a_newer_update(rig: Rig) -> None:
    rig.agg.ack_updates = False
    agent = rig.agent(settings=AgentSettings(ack_timeout_s=0.2, request_timeout_s=5.0))
    rig.agg.send_task("dev-1", rig.agg.task(round_=3))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    outbox = agent._outbox
    stale, _ = outbox.due(time.monotonic() + 1.0)  # the timer thread's decision
    assert stale is not None and stale.round == 3
    agent._on_ack(Ack(round=3, attempt=0, what="update", status="accepted"))
    rig.agg.send_task("dev-1", rig.agg.task(round_=4))  # a new update is committed
    assert wait_for(lambda: len(rig.agg.updates) == 2 and idle(agent))
    assert not outbox.send(stale)
    pending = outbox.pending
    assert pending is not None and pending.submission.round == 4
    assert [m.round for m in rig.agg.updates] == [3, 4]
    agent.poll(time.monotonic() + 1.0)  # round 4 is the one re-sent
    assert [m.round for m in rig.agg.updates] == [3, 4, 4]


# -- the hello, and what a reconnect sends ---------------------------------------------------


def test_a_hello_hook_returning_no_hello_sends_the_hello_as_it_is(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    def broken(_hello: Hello) -> Hello:
        return None  # type: ignore[return-value]

    with caplog.at_level(logging.ERROR):
        rig.agent(hooks=AgentHooks(transform_hello=broken))
    (hello,) = rig.agg.hellos
    assert hello.num_samples == 96
    assert any("HookError" in r.getMessage() and "transform_hello" in r.getMessage()
               for r in caplog.records)


def test_a_hello_hook_making_a_hello_too_large_to_send_sends_the_hello_as_it_is(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    def bloated(hello: Hello) -> Hello:  # a JSON body past the wire's MAX_JSON_BYTES
        return dataclasses.replace(hello, agent="x" * 100_000)

    with caplog.at_level(logging.ERROR):
        rig.agent(hooks=AgentHooks(transform_hello=bloated))
    (hello,) = rig.agg.hellos
    assert hello.num_samples == 96 and len(hello.agent) < 1000
    assert any("cannot be sent" in r.getMessage() for r in caplog.records)


def test_a_failed_greeting_on_reconnect_still_resends_the_pending_update(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.agg.ack_updates = False
    agent = rig.agent()
    rig.agg.send_task("dev-1", rig.agg.task(round_=5))
    assert wait_for(lambda: rig.agg.updates and idle(agent))

    def greet() -> None:
        raise RuntimeError("the broker went away again")

    monkeypatch.setattr(agent._presence, "greet", greet)
    agent._on_connected()  # what the transport calls after a reconnect
    assert [m.round for m in rig.agg.updates] == [5, 5]
    assert rig.agg.updates[0].body == rig.agg.updates[1].body



def test_a_cancel_between_the_resend_decision_and_the_send_ends_the_resends(rig: Rig) -> None:
    rig.agg.ack_updates = False
    agent = rig.agent(settings=AgentSettings(ack_timeout_s=0.2, request_timeout_s=5.0))
    rig.agg.send_task("dev-1", rig.agg.task(round_=7))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    outbox = agent._outbox
    resend, _ = outbox.due(time.monotonic() + 1.0)  # the timer thread's decision
    assert resend is not None
    rig.agg.cancel("dev-1", 7)  # the round closes: re-sending is pointless
    assert wait_for(lambda: outbox.pending is None and agent.phase == Phase.IDLE)
    assert not outbox.send(resend)
    assert outbox.pending is None and len(rig.agg.updates) == 1
    agent.poll(time.monotonic() + 100.0)
    assert len(rig.agg.updates) == 1 and agent.stats.resends == 0
