"""The edge tier: an aggregator to its children and a device to its parent.

An ``EdgeAggregator`` is two existing parts joined by one training callable:

- child side: a plain ``Aggregator`` (schedule, deadlines, screens, robust rules,
  SQLite persistence and resume) on the site's own broker and fleet, with the
  ``EdgeRounds`` strategy, which opens rounds only for the parent's current job;
- parent side: a ``FailoverAgent`` (an ``Agent`` that moves to another candidate
  parent when its parent vanishes) on the parent's broker, whose *training* is running
  the child rounds.

When the parent's task (model version v) reaches the edge, the training callable adopts
v as the edge's next model version (``Aggregator.adopt``, checkpointed with the job),
lets ``rounds_per_task`` child rounds close, and returns the edge's model: the agent
sends (edge model - v) as a normal update weighted by the samples its children's
counted updates carried. Everything else the agent does as for any device: it fetches
the parent's artifacts and model, encodes (error feedback included), commits before
sending, re-sends until acknowledged. The wire is the same both ways, so a tree of any
depth is configuration: an edge's parent may be the cloud or another edge.

Crash and restart: the job is part of the edge's checkpoint and the agent's task record
is in its own state folder; the parent re-sends a task that a restarted device
announces as busy, the callable finds the same job and continues it from the rounds
the edge's store holds, never adopting v a second time.

The edge's hello announces the samples of its children (the sum of what their hellos
announced), refreshed while it runs: the parent bounds an update's weight by it.

Agglomerative training (``tier=TierLink(...)``, see ``_agglo``): the parent's model is
the edge's own architecture and its children train a smaller one. The edge then adopts
not v but its children's last aggregate distilled towards v's soft labels on the bridge
inputs (parent -> child), and answers with v distilled towards the soft labels of its
children's models of the job's last round (their ensemble, or their aggregate; child ->
parent), minus v. Both distillations are
deterministic (seeded by the task); a restart loses the children's models of a round
that closed before it, and the edge then distils from their aggregate instead.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge import Channel, Hello, MqttTransport, TaskSpec
from cloud_aggregator import Aggregator, AggregatorConfig, EdgeRounds, ParentJob
from device_profiles import ConfigError
from edge_runtime import (
    AgentHooks,
    DeviceKey,
    DeviceStatus,
    Emulation,
    FailoverAgent,
    LocalData,
    LocalResult,
    ParentLink,
    Trainer,
    TrainingBudget,
)
from edge_runtime._failover import TransportFactory
from fleetlearn._agglo import TierLink
from fleetlearn._agglo_rounds import AggloEdgeRounds, ensemble_logits

log = logging.getLogger(__name__)

EDGE_ROUNDS_CAP = 2**31 - 1
"""An edge produces model versions for as long as it runs: two per parent task."""
ANNOUNCE_EVERY_S = 2.0
WAIT_STEP_S = 0.05


class EdgeAggregator:
    """One edge of a tier (see the module doc).

    ``config`` is the child side's aggregator configuration (its ``fleet`` is the site's
    fleet; ``rounds`` is ignored: an edge runs while its parent gives it tasks);
    ``broker`` is the site's broker; ``device_id`` is the edge's id at its parents,
    ``parents`` its candidate parents (the first is tried first). ``broker`` may be a
    transport (credentials, TLS); ``parent_transport`` builds the parent side's. ``key``
    signs the edge's updates to its parents (default: the key in its device state folder,
    made at the first start, as an agent's); the parents must have it enrolled, and the
    edge must have its children's keys (``enrolment=`` or ``config.enrolment``)."""

    def __init__(self, *, config: AggregatorConfig, broker: str | MqttTransport,
                 device_id: str, parents: Sequence[ParentLink], state_dir: str | Path,
                 rounds_per_task: int = 1, failover_after_s: float = 5.0,
                 artifacts_dir: str | Path | None = None, client_id: str = "aggregator",
                 parent_transport: TransportFactory | None = None,
                 key: DeviceKey | None = None, tier: TierLink | None = None,
                 emulation: Callable[[EdgeAggregator], Emulation] | None = None,
                 **aggregator_parts: Any) -> None:
        if rounds_per_task < 1:
            raise ConfigError(f"rounds_per_task must be >= 1, got {rounds_per_task}")
        self.state_dir = Path(state_dir)
        self.rounds_per_task = rounds_per_task
        self.tier = tier
        if tier is not None and tier.child.name != config.model:
            raise ConfigError(f"the edge's children train {config.model!r}; its tier link "
                              f"distils into {tier.child.name!r}")
        self.strategy = EdgeRounds() if tier is None else AggloEdgeRounds()
        config = dataclasses.replace(config, rounds=EDGE_ROUNDS_CAP,
                                     state_dir=self.state_dir / "aggregator")
        transport = broker if isinstance(broker, MqttTransport) else MqttTransport(
            url=broker, client_id=client_id, clean_session=False, backoff_min_s=0.1,
            backoff_max_s=1.0)
        self.aggregator = Aggregator(
            config=config, channel=Channel(transport=transport, fleet=config.fleet),
            artifacts_dir=artifacts_dir, strategy=self.strategy, **aggregator_parts)
        self.device = FailoverAgent(
            device_id=device_id, parents=parents, state_dir=self.state_dir / "device",
            failover_after_s=failover_after_s, transport=parent_transport,
            data=LocalData(x=np.zeros((0, 1), np.float32), y=np.zeros(0, np.int64)),
            training=self.train, hooks=AgentHooks(transform_hello=self._hello),
            status_probe=DeviceStatus, **_key_option(key), **_emulation_option(self, emulation))
        self._thread: threading.Thread | None = None
        self._watch: threading.Thread | None = None
        self._stop = threading.Event()
        self._announced = -1

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the child side (resuming from its store), then attach to a parent."""
        self.aggregator.start()
        self._thread = threading.Thread(target=self.aggregator.run, daemon=True,
                                        name=f"edge-{self.aggregator.fleet}")
        self._thread.start()
        self.device.start()
        self._watch = threading.Thread(target=self._refresh, daemon=True,
                                       name=f"edge-hello-{self.aggregator.fleet}")
        self._watch.start()

    def stop(self) -> None:
        """Stop both sides cleanly (pending updates are committed)."""
        self._stop.set()
        self.device.stop()
        self.aggregator.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.aggregator.close()
        self.aggregator.channel.transport.close()

    def abort(self) -> None:
        """Stop as a crash would: connections dropped without a word (the last wills
        fire), nothing more written; what the stores hold is what a restart finds."""
        self._stop.set()
        self.device.abort()
        self.aggregator.abort()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the parent side's training -----------------------------------------------------

    def train(self, task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer,
              budget: TrainingBudget) -> LocalResult:
        """Run child rounds from the parent's model ``params`` (see the module doc)."""
        del data, trainer  # the edge trains through its children
        end = time.monotonic() + budget.seconds
        agg, strategy = self.aggregator, self.strategy
        key = f"{task.run}:{task.round}:{task.nonce}"

        def over() -> bool:
            return budget.should_stop() or time.monotonic() >= end

        with agg.condition:
            job = strategy.job
            if job is not None and job.key != key and not job.finished:
                # The parent moved on: the old job opens no more rounds.
                strategy.job = dataclasses.replace(job, rounds=job.rounds_done)
        if job is None or job.key != key:
            while not self._adopt(key, params):
                if over():
                    return _nothing(params)
                time.sleep(WAIT_STEP_S)
            log.info("edge %s: parent task round %d adopted as model version %d",
                     agg.fleet, task.round, agg.model_version)
        else:
            log.info("edge %s: resuming parent task round %d (%d of %d rounds done)",
                     agg.fleet, task.round, job.rounds_done, job.rounds)
        while not over():
            with agg.condition:
                job = strategy.job
                if job is None or job.key != key:
                    return _nothing(params)
                if job.finished:
                    break
                agg.condition.wait(WAIT_STEP_S)
        with agg.condition:
            job = strategy.job
            if job is None or job.key != key or job.rounds_done == 0:
                return _nothing(params)
            trained = agg.params.copy()
            children = list(getattr(strategy, "children", []))
        if self.tier is not None:
            tier = self.tier
            if tier.own.settings.ensemble and children:
                teacher = ensemble_logits(tier.child.logits, children, tier.bridge)
            else:  # no ensemble, or the last round's models were lost in a restart
                teacher = tier.child.logits(trained, tier.bridge)
            trained = tier.own.distil(params, teacher, tier.bridge,
                                      seed=task.round).params.astype(np.float32)
        with agg.condition:
            return LocalResult(
                parameters=trained, samples=job.samples, steps=job.rounds_done,
                loss=job.train_loss if job.train_loss is not None else math.nan,
                stopped_early=not job.finished)

    def _adopt(self, key: str, params: np.ndarray) -> bool:
        agg, strategy = self.aggregator, self.strategy
        with agg.condition:
            if agg.current_round is not None or agg.journal.pending:
                return False  # the old job's round is still open: wait for its end

            def begin() -> None:
                strategy.job = ParentJob(key=key, base_version=agg.model_version,
                                         rounds=self.rounds_per_task)

            if self.tier is not None:
                params = self._taught_children(params)
            agg.adopt(params, before_save=begin)
            return True

    def _taught_children(self, parent: np.ndarray) -> np.ndarray:
        """Parent -> child: the children's last aggregate, taught by the parent's model
        on the bridge inputs (``feedback_epochs``; 0: the aggregate unchanged). Runs
        under the aggregator's lock, while no round is open."""
        assert self.tier is not None
        tier, agg = self.tier, self.aggregator
        epochs = tier.own.settings.feedback_epochs
        if epochs == 0:
            return agg.params.copy()
        teacher = tier.own.logits(parent, tier.bridge)
        return tier.child.distil(agg.params, teacher, tier.bridge, epochs=epochs,
                                 seed=agg.model_version + 1).params

    def job_emulated_s(self) -> float:
        """The emulated seconds of the current job's child rounds (their
        ``RoundMetrics.emulated_s``: on the virtual clock, the slowest counted child or
        the whole deadline), the abandoned ones included: what an edge's emulation
        (``_tier_emulation.EdgeEmulation``) adds its own time to."""
        agg = self.aggregator
        with agg.condition:
            job = self.strategy.job
            if job is None:
                return 0.0
            # A closed round's model_version is the version it made, an abandoned one's
            # the version it trained from: the job's rounds train from base..last.
            first, last = job.base_version, job.base_version + job.rounds_done
            return sum(m.emulated_s for m in agg.history
                       if (first < m.model_version <= last if m.outcome == "closed"
                           else first <= m.model_version <= last))

    # -- what the edge says about itself -----------------------------------------------

    def children_samples(self) -> int:
        """The samples the edge's online children announced."""
        return sum(max(0, d.num_samples or 0) for d in self.aggregator.registry.online())

    def _hello(self, hello: Hello) -> Hello:
        return dataclasses.replace(hello, num_samples=self.children_samples())

    def _refresh(self) -> None:
        while not self._stop.wait(ANNOUNCE_EVERY_S):
            try:
                samples = self.children_samples()
                agent = self.device.agent
                if agent is not None and samples != self._announced:
                    agent.announce()
                    self._announced = samples
            except Exception:
                log.exception("edge %s: announcing the children's samples failed",
                              self.aggregator.fleet)



def _emulation_option(edge: EdgeAggregator,
                      make: Callable[[EdgeAggregator], Emulation] | None) -> dict[str, Any]:
    return {} if make is None else {"emulation": make(edge)}


def _key_option(key: DeviceKey | None) -> dict[str, Any]:
    return {} if key is None else {"key": key}


def _nothing(params: np.ndarray) -> LocalResult:
    """No round closed for this task: the agent withdraws it (samples 0)."""
    return LocalResult(parameters=params, samples=0, steps=0, loss=math.nan,
                       stopped_early=True)
