"""A device agent that SIGKILLs itself at one named point of its work
(tests/edge_runtime/test_agent_mqtt.py).

The production agent has no crash switch: this script reads its settings as
``fleetlearn agent`` does (``load_config``: flags, then ``FLEETLEARN_*`` environment;
run it with the repository on ``PYTHONPATH``) and builds an ``Agent`` with the public
constructor, the crash installed through the public extension points, ``AgentHooks``
and the local training callable. It is not ``run_agent``'s agent: all local samples
train (no held-out split), the profile is a catalogue one (default ``pi4``), the device
is always eligible, and training uses the default trainer pool::

    python tests/crash_agent.py --crash-at POINT --broker URL --device-id ID --fleet F \\
        --data FILE.npz --state-dir DIR --profile pi4

Points, in the order a task reaches them:

- ``after_receive``: the task is recorded (and its artifacts and model fetched), nothing
  trained (the training callable's first line);
- ``during_training``: at the second mini-batch (the training budget's ``should_stop``);
- ``before_commit``: ``submission.bin`` written, ``task.json`` not yet ``encoded``
  (``on_commit_step(SUBMISSION_WRITTEN)``);
- ``after_commit``: committed, ``residual.ef`` not yet rolled forward
  (``on_commit_step(RECORD_COMMITTED)``);
- ``after_persist``: everything persisted, nothing sent (``on_committed``);
- ``after_send``: sent (and flushed to the broker), not acknowledged (``on_sent``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import replace

import numpy as np

from broker_bridge import Channel, TaskSpec, Transport
from device_profiles import get_profile
from edge_runtime import (
    Agent,
    AgentHooks,
    CommitStep,
    DeviceStatus,
    LocalData,
    LocalResult,
    LocalTraining,
    Submission,
    Trainer,
    TrainingBudget,
    load_config,
    load_data,
    make_agent_transport,
    train_locally,
)

POINTS = ("after_receive", "during_training", "before_commit", "after_commit",
          "after_persist", "after_send")


def kill(point: str) -> None:
    logging.getLogger("crash_agent").warning("killing this process at %s", point)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def crash_at(point: str, transport: Transport) -> tuple[AgentHooks, LocalTraining]:
    """The hooks and training callable that kill the process at ``point``."""

    def training(task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer,
                 budget: TrainingBudget) -> LocalResult:
        if point == "after_receive":
            kill(point)
        if point == "during_training":
            calls = [0]

            def should_stop() -> bool:
                calls[0] += 1
                if calls[0] == 2:
                    kill(point)
                return budget.should_stop()

            budget = replace(budget, should_stop=should_stop)
        return train_locally(task, params, data, trainer, budget)

    def on_commit_step(step: CommitStep) -> None:
        if (point, step) in (("before_commit", CommitStep.SUBMISSION_WRITTEN),
                             ("after_commit", CommitStep.RECORD_COMMITTED)):
            kill(point)

    def on_committed(_submission: Submission) -> None:
        if point == "after_persist":
            kill(point)

    def on_sent(_submission: Submission) -> None:
        if point == "after_send":
            transport.flush(timeout=5.0)  # make sure it left
            kill(point)

    return AgentHooks(on_commit_step=on_commit_step, on_committed=on_committed,
                      on_sent=on_sent), training


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--crash-at", required=True, choices=POINTS)
    for flag in ("broker", "device-id", "fleet", "data", "state-dir", "profile"):
        parser.add_argument(f"--{flag}", dest=flag.replace("-", "_"))
    args = parser.parse_args()
    flags = {k: v for k, v in vars(args).items() if k != "crash_at"}
    config = load_config(flags=flags)
    x, y = load_data(config.data)
    transport = make_agent_transport(config.broker, fleet=config.fleet,
                                     device_id=config.device_id, password=config.password)
    hooks, training = crash_at(args.crash_at, transport)
    agent = Agent(
        device_id=config.device_id, channel=Channel(transport=transport, fleet=config.fleet),
        data=LocalData(x=x, y=y), state_dir=config.state_dir,
        profile=get_profile(config.profile or "pi4"), status_probe=lambda: DeviceStatus(),
        settings=config.settings, owns_transport=True, hooks=hooks, training=training,
    )
    agent.start()
    threading.Event().wait(120)  # the crash ends this process long before
    agent.stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())
