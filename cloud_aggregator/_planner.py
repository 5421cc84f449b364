"""The work planner: what each device is asked to do, and how long it should take.

``WorkPlanner`` predicts a device's task with the cost model (its profile from the
hello, the model's size, the compression the fleet's accepted updates really achieve)
corrected by what the selection policy learned of that device, sizes ``max_steps`` so
that a slow device is asked for the steps that fit the deadline rather than dropped
(``adaptive_local_work``), and writes the task: model by hash, per-task nonce (see
``_startup.task_nonce``), seed, codec, learning settings and the wall-clock budget.
It remembers the ``max_steps`` each task carried, which bounds the weight of the
update that answers it.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math

from broker_bridge import TaskSpec
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._registry import DeviceInfo, FleetRegistry
from cloud_aggregator._selection import SelectionPolicy, local_steps_for
from cloud_aggregator._startup import task_nonce
from device_profiles import ConfigError, CorrectionEstimator, CostBreakdown, Task, predict

log = logging.getLogger(__name__)

ADAPTIVE_HEADROOM = 0.9
"""Adaptive local work aims at this share of the deadline: a prediction is a typical
time, and work that ends just past the deadline is wasted."""
TASK_MEMORY = 50_000
"""(task round, device) -> max_steps of tasks sent, kept to bound each update's weight."""


class WorkPlanner:
    """Cost predictions, adaptive local work and task specs (see the module doc)."""

    def __init__(self, *, config: AggregatorConfig, registry: FleetRegistry,
                 policy: SelectionPolicy, model_size: int, secret: bytes, run_id: str,
                 artifacts_hash: str, num_classes: int | None) -> None:
        self.config = config
        self._registry = registry
        self._policy = policy
        self._size = model_size
        self._secret = secret
        self._run_id = run_id
        self._artifacts_hash = artifacts_hash
        self._num_classes = num_classes
        self._dense_bytes = 4 * model_size
        self.body_bytes_sum = 0
        self.body_count = 0
        self._task_steps: collections.OrderedDict[tuple[int, str], int | None] = (
            collections.OrderedDict())

    # -- what updates really cost on the wire

    @property
    def compression_ratio(self) -> float:
        """Dense float32 bytes over the mean body size of the updates accepted so far
        (1.0 before the first): what the uplink codec really saves, which a codec spec
        alone cannot say (top-k with zstd depends on the values)."""
        if self.body_count == 0 or self.body_bytes_sum <= 0:
            return 1.0
        return self._dense_bytes * self.body_count / self.body_bytes_sum

    def observe_body(self, nbytes: int) -> None:
        self.body_bytes_sum += nbytes
        self.body_count += 1

    # -- predictions

    def cost(self, info: DeviceInfo) -> CostBreakdown | None:
        """Cost-model prediction of the configured task for ``info``; None when unknown."""
        if info.profile is None:
            return None
        cfg = self.config
        ratio = self.compression_ratio
        try:
            if cfg.is_reference_model:
                task = Task.for_model(cfg.model, n_samples=info.num_samples,
                                      epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                                      max_steps=cfg.max_steps, compression_ratio=ratio)
            else:
                n = self._size
                task = Task(model_bytes=4 * n, update_bytes=math.ceil(4 * n / ratio),
                            dense_update_bytes=4 * n, n_samples=info.num_samples,
                            epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                            train_flops_per_sample=6.0 * n, max_steps=cfg.max_steps)
            return predict(info.profile, task)
        except (ConfigError, ValueError, ZeroDivisionError):
            return None

    def adapted_steps(self, device: str, cost: CostBreakdown) -> int | None:
        """Local steps that fit in the deadline (at least 1), or None when all of them do.

        Uses the policy's learned correction for ``device``, so one that keeps running
        late is given less work next time.
        """
        cfg = self.config
        if not cfg.adaptive_local_work or cost.steps == 0:
            return None
        corrections = getattr(self._policy, "corrections", None)
        factor = (corrections.factor(device) if isinstance(corrections, CorrectionEstimator)
                  else 1.0)
        try:
            fits = local_steps_for(cost, cfg.deadline_s * ADAPTIVE_HEADROOM, factor=factor)
        except ConfigError:  # a zero step time: nothing to adapt
            return None
        return None if fits >= cost.steps else max(fits, 1)

    def duration(self, info: DeviceInfo) -> float | None:
        """Predicted seconds of the task ``info`` would be sent; None when unknown.

        With adaptive local work that is the reduced task, so a slow device is not
        judged (or corrected) by work it will not be asked to do.
        """
        cost = self.cost(info)
        if cost is None:
            return None
        steps = self.adapted_steps(info.device_id, cost)
        if steps is None:
            return cost.total_s
        return cost.fixed_s + steps * cost.step_s

    def max_steps(self, device: str) -> int | None:
        """``max_steps`` of ``device``'s next task: the configured cap, or fewer steps
        when its profile says the whole task would miss the deadline."""
        info = self._registry.get(device)
        cost = self.cost(info) if info is not None else None
        steps = self.adapted_steps(device, cost) if cost is not None else None
        return self.config.max_steps if steps is None else steps

    def task_deadline_s(self) -> float:
        """The ``deadline_s`` a task carries: the device's wall-clock budget.

        A sync round on the virtual clock judges the emulated deadline itself and stops
        waiting after ``safety_timeout_s`` wall seconds: a device given the emulated
        deadline as its wall budget would withdraw, or give up on a slow artifact
        download, long before that.
        """
        cfg = self.config
        if cfg.clock == "virtual" and cfg.mode == "sync":
            return cfg.safety_timeout_s
        return cfg.deadline_s

    # -- tasks

    def nonce(self, task_round: int, device: str) -> str:
        return task_nonce(self._secret, fleet=self.config.fleet, task_round=task_round,
                          device=device)

    def sent_steps(self, task_round: int, device: str) -> int | None:
        """``max_steps`` of the task sent to ``device`` (the configured cap if unknown)."""
        return self._task_steps.get((task_round, device), self.config.max_steps)

    def task(self, device: str, *, task_round: int, model_version: int,
             model_hash: str, codec: str) -> TaskSpec:
        """The task ``device`` is sent for ``task_round``, remembered for its answer."""
        cfg = self.config
        seed = task_seed(cfg.seed, task_round, device)
        key = (task_round, device)
        # A task sent again (a restarted device, a roll call) is the same task: the same
        # nonce and seed, and the work first asked for.
        again = key in self._task_steps
        steps = self._task_steps[key] if again else self.max_steps(device)
        if steps != cfg.max_steps and not again:
            log.info("device %s: %d local steps in round %d (the whole task would miss "
                     "the %.3g s deadline)", device, steps, task_round, cfg.deadline_s)
        self._task_steps[key] = steps
        while len(self._task_steps) > TASK_MEMORY:
            self._task_steps.popitem(last=False)
        return TaskSpec(round=task_round, model_version=model_version,
                        artifacts_hash=self._artifacts_hash, model_hash=model_hash,
                        nonce=self.nonce(task_round, device), run=self._run_id, codec=codec,
                        epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                        max_steps=steps, deadline_s=self.task_deadline_s(), seed=seed,
                        evaluate=cfg.federated_eval, num_classes=self._num_classes)


def task_seed(seed: int, task_round: int, device: str) -> int:
    """The seed of ``device``'s task in ``task_round``: a function of the run's seed, the
    task and the device (a hash: a seeded generator per task cost 50 µs)."""
    digest = hashlib.blake2b(f"{seed}:{task_round}:{device}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1)
