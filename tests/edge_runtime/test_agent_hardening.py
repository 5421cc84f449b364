"""The agent's half of issue 12: labels outside the model's classes, a truncated .npz,
the task nonce echoed, and status lines that say what the agent waits for; and a change
of eligibility announced (found while splitting the agent, issue 13)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from agent_rig import Rig, idle, make_data
from waiting import wait_for

from broker_bridge import unpack_update_body
from edge_runtime import (
    AgentSettings,
    DataError,
    DeviceStatus,
    EligibilityRules,
    LocalData,
    Phase,
)
from edge_runtime._data import load_npz


def test_labels_outside_the_models_classes_are_a_data_error(rig: Rig) -> None:
    data = make_data()
    y = data.y.copy()
    y[3] = 11  # the model has 10 classes
    agent = rig.agent(data=LocalData(x=data.x, y=y))
    rig.agg.send_task("dev-1", rig.agg.task(num_classes=10))
    assert wait_for(lambda: rig.agg.errors and idle(agent))
    (err,) = rig.agg.errors
    assert err.code == "data" and "[0, 11]" in err.message and "10" in err.message
    assert not rig.agg.updates  # it trained and was accepted before
    # restarted on the same data, it says so at once, before any task
    agent.stop()
    again = rig.agent(data=LocalData(x=data.x, y=y))
    assert again.data_problem() == "class labels range over [0, 11]; the model has 10 classes"
    assert rig.agent("dev-2", data=data).data_problem() is None


def test_the_update_echoes_its_tasks_nonce(rig: Rig) -> None:
    agent = rig.agent()
    rig.agg.send_task("dev-1", rig.agg.task(round_=4, nonce="a-task-nonce-4"))
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    meta, _ = unpack_update_body(rig.agg.updates[0].body)
    assert meta.nonce == "a-task-nonce-4"


def test_a_truncated_npz_is_a_data_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((10, 40), np.float32), y=np.zeros(10, np.int64))
    for cut in (10, 300, len(buf.getvalue()) - 40):
        path = tmp_path / f"cut{cut}.npz"
        path.write_bytes(buf.getvalue()[:cut])
        with pytest.raises(DataError, match=r"not a readable \.npz"):  # was BadZipFile
            load_npz(path)


def test_status_lines_say_what_the_agent_waits_for(rig: Rig) -> None:
    said: list[str] = []
    rig.agg.resend_tasks = False
    agent = rig.agent(settings=AgentSettings(status_interval_s=1.0, request_timeout_s=30.0),
                      on_status=said.append)
    later = iter(range(10, 1000, 10))  # each poll past the status interval of the last

    def poll() -> None:
        agent.poll(time.monotonic() + next(later))

    poll()
    assert "waiting for a task from the aggregator of fleet 'unit'" in said[-1]
    assert "--fleet unit" in said[-1]
    # the aggregator does not answer the model request: the line says so
    rig.agg.models.pop(0)
    rig.agg.send_task("dev-1", rig.agg.task(round_=2, model_hash="e" * 64))
    assert wait_for(lambda: "waiting for global model" in agent.status_line())
    assert agent.phase == Phase.FETCHING
    poll()
    assert said[-1].startswith("round 2: waiting for global model version 0 (eeeeeeeeeeee...)")
    rig.agg.cancel("dev-1", 2)
    assert wait_for(lambda: idle(agent))
    assert agent.phase == Phase.IDLE
    agent.channel.transport.close()
    poll()
    assert said[-1].startswith("waiting for the broker")


def test_a_change_of_eligibility_is_announced_with_a_new_hello(rig: Rig) -> None:
    # Before: poll() recorded the new eligibility before comparing it with the old one,
    # so a device that started charging (or stopped) never said so until it reconnected.
    charging = [True]
    agent = rig.agent(rules=EligibilityRules(require_charging=True),
                      status_probe=lambda: DeviceStatus(charging=charging[0]),
                      settings=AgentSettings(eligibility_interval_s=1.0))
    assert [h.eligibility_info().eligible for h in rig.agg.hellos] == [True]
    agent.poll(time.monotonic() + 10)
    assert len(rig.agg.hellos) == 1  # nothing changed: nothing said
    charging[0] = False
    agent.poll(time.monotonic() + 20)
    assert [h.eligibility_info().eligible for h in rig.agg.hellos] == [True, False]
    assert "not charging" in rig.agg.hellos[-1].eligibility_info().reasons[0]
    charging[0] = True
    agent.poll(time.monotonic() + 30)
    assert [h.eligibility_info().eligible for h in rig.agg.hellos] == [True, False, True]
