"""Emulating a device profile: report (and optionally take) the time a slower device would."""

from __future__ import annotations

from dataclasses import dataclass

from broker_bridge import TaskSpec
from device_profiles import ConfigError, CostBreakdown, DeviceProfile, predict
from device_profiles import Task as CostTask


@dataclass(frozen=True, kw_only=True)
class Emulation:
    """Make a fast machine report (and optionally take) the time a slower device would.

    ``emulated_s`` is the cost model's download + train + encode + upload for this
    device's profile; it goes in ``UpdateMeta.emulated_s``. With ``time_scale`` set,
    the agent also waits ``emulated_s * time_scale - actual`` before uploading, so a
    simulated fleet's arrival order follows the profiles in real time. A subclass may
    override ``emulated_s`` (the simulator's slow devices do).
    """

    profile: DeviceProfile
    model: str | None = None
    """A reference model name (``mlp``, ``cnn``...) for exact FLOPs; else 6 x parameters."""
    time_scale: float | None = None

    def __post_init__(self) -> None:
        if self.time_scale is not None and not self.time_scale >= 0:
            raise ConfigError("time_scale must be >= 0")

    def emulated_s(
        self, *, task: TaskSpec, num_parameters: int, samples: int, steps: int, update_bytes: int
    ) -> float:
        return self.breakdown(task=task, num_parameters=num_parameters, samples=samples,
                              steps=steps, update_bytes=update_bytes).total_s

    def breakdown(
        self, *, task: TaskSpec, num_parameters: int, samples: int, steps: int, update_bytes: int
    ) -> CostBreakdown:
        """The cost model's phases (download, train, encode, upload) of this task."""
        flops = None if self.model is not None else 6.0 * num_parameters
        cost = CostTask(
            model_bytes=4 * num_parameters,
            update_bytes=update_bytes,
            dense_update_bytes=4 * num_parameters,
            n_samples=max(samples, 1),
            batch_size=task.batch_size,
            train_flops_per_sample=flops,
            model=self.model,
            max_steps=max(steps, 1),
        )
        return predict(self.profile, cost)

    def wait_s(self, emulated_s: float, actual_s: float) -> float:
        if self.time_scale is None:
            return 0.0
        return max(0.0, emulated_s * self.time_scale - actual_s)
