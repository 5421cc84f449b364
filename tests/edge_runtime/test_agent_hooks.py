"""The agent's extension points: typed hooks, a replaceable training callable, its phases.

Most cases run over MemoryTransport with the aggregator stand-in of test_agent.py; the
end-to-end case runs a real aggregator and real agents over Mosquitto.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from agent_rig import Rig, expected_delta, idle, make_data
from keys import enrol_agent
from waiting import wait_for

from broker_bridge import (
    Channel,
    Hello,
    MosquittoProcess,
    TaskSpec,
    decode_update,
    unpack_update_body,
)
from cloud_aggregator._artifacts import initial_parameters
from device_profiles import FleetlearnError
from edge_runtime import (
    Agent,
    AgentError,
    AgentHooks,
    AgentSettings,
    DeviceStatus,
    IllegalTransition,
    LocalData,
    LocalResult,
    Phase,
    Submission,
    TaskStatus,
    Trainer,
    TrainingBudget,
    UpdateDraft,
    make_agent_transport,
    train_locally,
)
from edge_runtime._phase import PhaseMachine, legal


def test_hooks_run_in_the_documented_order(rig: Rig) -> None:
    events: list[tuple[str, Phase]] = []
    holder: list[Agent] = []

    def note(name: str) -> None:
        events.append((name, holder[0].phase if holder else Phase.IDLE))

    def on_task(task: TaskSpec) -> str | None:
        note("on_task")
        return None

    def training(task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer,
                 budget: TrainingBudget) -> LocalResult:
        note("training")
        return train_locally(task, params, data, trainer, budget)

    def transform_update(draft: UpdateDraft) -> UpdateDraft:
        note("transform_update")
        return draft

    def transform_hello(hello: Hello) -> Hello:
        note("transform_hello")
        return hello

    hooks = AgentHooks(
        on_task=on_task, transform_update=transform_update, transform_hello=transform_hello,
        on_commit_step=lambda step: note(f"on_commit_step:{step}"),
        on_committed=lambda _s: note("on_committed"), on_sent=lambda _s: note("on_sent"))
    rig.agg.ack_updates = False
    agent = rig.agent(hooks=hooks, training=training,
                      settings=AgentSettings(ack_timeout_s=0.2, request_timeout_s=5.0))
    holder.append(agent)
    rig.agg.send_task("dev-1", rig.agg.task(round_=1))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    agent.poll(time.monotonic() + 5)  # no ack: the update is sent again, the same bytes
    assert len(rig.agg.updates) == 2
    assert events == [
        ("transform_hello", Phase.IDLE),  # the hello after connecting
        ("on_task", Phase.IDLE),
        ("training", Phase.TRAINING),
        ("transform_update", Phase.ENCODING),
        ("on_commit_step:submission_written", Phase.ENCODING),
        ("on_commit_step:record_committed", Phase.ENCODING),
        ("on_committed", Phase.ENCODING),
        ("on_sent", Phase.AWAITING_ACK),
        ("on_sent", Phase.AWAITING_ACK),  # the re-send
    ]
    assert agent.phase == Phase.AWAITING_ACK
    rig.agg.ack_updates = True
    agent.poll(time.monotonic() + 10)  # sent a third time, and acknowledged
    assert events[-1][0] == "on_sent" and len(events) == 10
    assert agent.phase == Phase.IDLE  # the outbox is empty
    assert agent.state.record is not None and agent.state.record.status == TaskStatus.ACKED


def test_a_declining_on_task_hook_sends_a_declined_task_ack(rig: Rig) -> None:
    answers: list[str | None] = ["battery saver is on", None]
    asked: list[int] = []

    def on_task(task: TaskSpec) -> str | None:
        asked.append(task.round)
        return answers.pop(0)

    agent = rig.agent(hooks=AgentHooks(on_task=on_task))
    rig.agg.send_task("dev-1", rig.agg.task(round_=1))
    assert wait_for(lambda: rig.agg.task_acks)
    (ack,) = rig.agg.task_acks
    assert (ack.round, ack.status, ack.reason) == (1, "declined", "battery saver is on")
    time.sleep(0.1)
    assert rig.agg.requests == [] and rig.agg.updates == []  # nothing fetched, nothing trained
    assert agent.state.record is None and agent.phase == Phase.IDLE
    assert agent.stats.declined == 1 and agent.stats.tasks == 0
    # The next task is taken; a copy of it is answered by the protocol, not the hook.
    task = rig.agg.task(round_=2)
    rig.agg.send_task("dev-1", task)
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    rig.agg.send_task("dev-1", task)
    assert wait_for(lambda: len(rig.agg.task_acks) == 3)
    assert [a.status for a in rig.agg.task_acks] == ["declined", "accepted", "accepted"]
    assert asked == [1, 2]


def test_an_on_task_hook_that_fails_declines(rig: Rig) -> None:
    def on_task(task: TaskSpec) -> str | None:
        raise RuntimeError("sensor offline")

    agent = rig.agent(hooks=AgentHooks(on_task=on_task))
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: rig.agg.task_acks)
    assert rig.agg.task_acks[0].status == "declined"
    assert rig.agg.task_acks[0].reason == "hook failed: RuntimeError"
    assert agent.stats.tasks == 0


def test_a_transform_hook_changes_what_the_aggregator_receives(rig: Rig) -> None:
    data = make_data()
    seen: list[np.ndarray] = []

    def flip(draft: UpdateDraft) -> UpdateDraft:
        seen.append(draft.delta.copy())
        return replace(draft, delta=-2.0 * draft.delta,
                       meta=replace(draft.meta, num_samples=draft.meta.num_samples * 10))

    agent = rig.agent(data=data, hooks=AgentHooks(transform_update=flip))
    task = rig.agg.task(round_=1)
    rig.agg.send_task("dev-1", task)
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    want = expected_delta(rig.artifacts_dir, rig.agg.models[0], data.x, data.y, task)
    np.testing.assert_array_equal(seen[0], want)  # the hook saw the true update
    meta, body = unpack_update_body(rig.agg.updates[0].body)
    np.testing.assert_array_equal(decode_update(body, rig.agg.layout), -2.0 * want)
    assert meta.num_samples == 10 * data.num_samples and meta.nonce == task.nonce


def test_a_transform_that_changes_the_update_length_fails_the_task(rig: Rig) -> None:
    agent = rig.agent(hooks=AgentHooks(
        transform_update=lambda d: replace(d, delta=d.delta[:10])))
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: rig.agg.errors and idle(agent))
    (err,) = rig.agg.errors
    assert err.code == "internal" and "HookError" in err.message and "shape (10,)" in err.message
    assert rig.agg.updates == []
    assert agent.state.record is not None and agent.state.record.status == TaskStatus.FAILED


def test_a_custom_training_callable_replaces_local_training(rig: Rig) -> None:
    calls: list[tuple[int, float]] = []

    def nudge(task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer,
              budget: TrainingBudget) -> LocalResult:
        calls.append((params.size, budget.seconds))
        return LocalResult(parameters=params + np.float32(0.5), samples=7, steps=1, loss=0.25)

    agent = rig.agent(training=nudge)
    rig.agg.send_task("dev-1", rig.agg.task(deadline_s=30.0))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    meta, body = unpack_update_body(rig.agg.updates[0].body)
    np.testing.assert_allclose(decode_update(body, rig.agg.layout), 0.5, atol=1e-6)
    assert (meta.num_samples, meta.steps, meta.train_loss) == (7, 1, 0.25)
    ((size, seconds),) = calls
    assert size == rig.agg.layout.size and 0 < seconds <= 30.0


def test_a_training_callable_with_the_wrong_result_fails_the_task(rig: Rig) -> None:
    def broken(task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer,
               budget: TrainingBudget) -> LocalResult:
        return LocalResult(parameters=params[:-1], samples=5, steps=1, loss=0.0)

    agent = rig.agent(training=broken)
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: rig.agg.errors and idle(agent))
    assert "HookError" in rig.agg.errors[0].message and rig.agg.updates == []


def test_a_training_callable_that_trains_nothing_withdraws(rig: Rig) -> None:
    def nothing(task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer,
                budget: TrainingBudget) -> LocalResult:
        return LocalResult(parameters=params, samples=0, steps=0, loss=float("nan"))

    agent = rig.agent(training=nothing)
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: len(rig.agg.task_acks) == 2 and idle(agent))
    assert [(a.status, a.reason) for a in rig.agg.task_acks] == [
        ("accepted", ""), ("declined", "deadline")]
    assert rig.agg.updates == [] and agent.stats.withdrawn == 1


def test_abort_from_a_hook_is_a_power_cut(rig: Rig) -> None:
    holder: list[Agent] = []
    committed: list[Submission] = []

    def cut(draft: UpdateDraft) -> UpdateDraft:
        holder[0].abort()
        return draft

    agent = rig.agent(hooks=AgentHooks(transform_update=cut, on_committed=committed.append),
                      owns_transport=True)
    holder.append(agent)
    rig.agg.send_task("dev-1", rig.agg.task(round_=3))
    assert wait_for(lambda: agent.phase == Phase.STOPPED)
    agent.stop()  # waits for the job to end; says nothing (the connection is gone)
    assert rig.agg.updates == [] and rig.agg.errors == [] and committed == []
    assert rig.agg.presence[-1] == ("dev-1", "offline")  # the will, not a goodbye
    record = agent.state.record
    assert record is not None and record.status == TaskStatus.TRAINING  # nothing written
    assert agent.stats.cancelled == 0
    # Rebooted from the same state folder, the device says what it was working on.
    rig.agents.remove(agent)
    rig.agent()
    assert rig.agg.hellos[-1].busy_round == 3


def test_a_failing_notification_hook_does_not_stop_the_update(rig: Rig) -> None:
    def broken(_value: object) -> None:
        raise RuntimeError("metrics backend down")

    agent = rig.agent(hooks=AgentHooks(on_commit_step=broken, on_committed=broken,
                                       on_sent=broken))
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    assert rig.agg.errors == [] and agent.phase == Phase.IDLE
    assert agent.state.record is not None and agent.state.record.status == TaskStatus.ACKED
    assert (rig.tmp / "dev-1" / "submission.bin").exists()


# -- the state machine ----------------------------------------------------------------


def test_the_state_machine_refuses_illegal_moves_with_a_typed_error() -> None:
    for current in Phase:
        for target in Phase:
            machine = PhaseMachine(current)
            if current == target:
                assert machine.move(target) == current  # staying is not a move
            elif legal(current, target):
                machine.move(target)
                assert machine.phase == target
            else:
                with pytest.raises(IllegalTransition) as info:
                    machine.move(target)
                assert machine.phase == current  # refused: nothing changed
                assert (info.value.current, info.value.target) == (current, target)
                assert isinstance(info.value, AgentError | FleetlearnError)
    assert not any(legal(Phase.STOPPED, p) for p in Phase if p != Phase.STOPPED)
    assert not legal(Phase.IDLE, Phase.TRAINING) and not legal(Phase.TRAINING, Phase.FETCHING)
    with pytest.raises(IllegalTransition, match="from idle to encoding"):
        PhaseMachine().move(Phase.ENCODING)
    # A move that races with another one (an ack after a new task was taken) is skipped.
    machine = PhaseMachine(Phase.FETCHING)
    assert machine.move(Phase.IDLE, expect=frozenset({Phase.AWAITING_ACK})) == Phase.FETCHING
    assert machine.phase == Phase.FETCHING


def test_a_restarted_agent_with_an_unacknowledged_update_awaits_its_ack(rig: Rig) -> None:
    rig.agg.ack_updates = False
    agent = rig.agent()
    rig.agg.send_task("dev-1", rig.agg.task(round_=2))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    assert agent.phase == Phase.AWAITING_ACK
    agent.stop()
    assert agent.phase == Phase.STOPPED
    rig.agg.ack_updates = True
    again = rig.agent()  # re-sends on connect, is acknowledged
    assert wait_for(lambda: again.phase == Phase.IDLE)
    assert len(rig.agg.updates) == 2 and rig.agg.updates[0].body == rig.agg.updates[1].body


# -- end to end: a real aggregator over Mosquitto ---------------------------------------


def test_a_transform_hook_changes_what_a_real_aggregator_applies_over_mosquitto(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path
) -> None:
    from mqtt_rig import aggregator

    fleet = "hooks"
    data = {f"dev-{i}": make_data(n=64, seed=i) for i in range(2)}
    seen: dict[str, np.ndarray] = {}
    lock = threading.Lock()

    def tamper(device: str, scale: float) -> AgentHooks:
        def transform(draft: UpdateDraft) -> UpdateDraft:
            with lock:
                seen[device] = draft.delta.copy()
            return replace(draft, delta=scale * draft.delta)

        return AgentHooks(transform_update=transform)

    scales = {"dev-0": 1.0, "dev-1": -3.0}  # dev-1 sends its update flipped and tripled
    agents = []
    for device, local in data.items():
        t = make_agent_transport(mosquitto.url, fleet=fleet, device_id=device,
                                 backoff_min_s=0.1, backoff_max_s=1.0)
        agent = Agent(device_id=device, channel=Channel(transport=t, fleet=fleet), data=local,
                      state_dir=tmp_path / device, status_probe=lambda: DeviceStatus(),
                      settings=AgentSettings(request_timeout_s=10.0), owns_transport=True,
                      hooks=tamper(device, scales[device]))
        enrol_agent(agent)
        agent.start()
        agents.append(agent)
    agg = aggregator(mosquitto.url, fleet, tmp_path / "agg", artifacts, rounds=1,
                     norm_median_multiple=None)
    try:
        agg.start()
        runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 90}, daemon=True)
        runner.start()
        runner.join(95)
        assert agg.model_version == 1, [m.to_json() for m in agg.history]
        start = initial_parameters(artifacts)
        applied = []
        for agent in agents:
            record = agent.state.record
            assert record is not None
            local = data[agent.device_id]
            want = expected_delta(artifacts, start, local.x, local.y, record.task)
            np.testing.assert_array_equal(seen[agent.device_id], want)
            applied.append(scales[agent.device_id] * want)
        # FedAvg (server lr 1) of two equally weighted updates: what the hooks sent.
        np.testing.assert_allclose(agg.params, start + np.mean(applied, axis=0), atol=2e-5)
        honest = start + np.mean([seen["dev-0"], seen["dev-1"]], axis=0)
        assert np.abs(agg.params - honest).max() > 1e-3
    finally:
        for agent in agents:
            agent.stop()
        agg.close()
        agg.channel.transport.close()

