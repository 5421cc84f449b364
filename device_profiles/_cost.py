"""The cost model: how long will this device take for this task.

Pure functions over a :class:`DeviceProfile` and a :class:`Task`; the one stateful
piece, :class:`CorrectionEstimator`, learns per-device factors from observed
durations so that a device that keeps running late is predicted late.

The phases of a round, in order: download the global model (bytes / downlink plus
one latency), train ``epochs`` passes over ``n_samples`` in batches, encode the
update, upload it (bytes / uplink plus one latency). FLOP counts follow the usual
convention: forward FLOPs = 2 x MACs, a training step = 3 x forward (forward,
gradient with respect to activations, gradient with respect to weights).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from device_profiles._errors import ConfigError, ProfileError
from device_profiles._profile import DeviceProfile

TRAIN_FORWARD_RATIO = 3.0
FLOPS_PER_MAC = 2.0
BYTES_PER_PARAM = 4  # float32


# -- FLOP counting for the reference models ---------------------------------------------


def dense_macs(layers: Sequence[int]) -> int:
    """Multiply-accumulates of an MLP with layer widths ``layers`` (biases ignored)."""
    if len(layers) < 2 or any(w <= 0 for w in layers):
        raise ConfigError(f"an MLP needs at least two positive widths, got {list(layers)}")
    return sum(a * b for a, b in itertools.pairwise(layers))


def dense_params(layers: Sequence[int]) -> int:
    return dense_macs(layers) + sum(layers[1:])


def conv1d_out_len(length: int, *, kernel: int, stride: int, padding: int) -> int:
    out = (length + 2 * padding - kernel) // stride + 1
    if out <= 0:
        raise ConfigError(f"Conv1d leaves no output for length {length}")
    return out


@dataclass(frozen=True, kw_only=True)
class ReferenceModel:
    """A model of the reference task, with the counts the cost model needs."""

    name: str
    params: int
    forward_macs: int

    @property
    def forward_flops_per_sample(self) -> float:
        return FLOPS_PER_MAC * self.forward_macs

    @property
    def train_flops_per_sample(self) -> float:
        return TRAIN_FORWARD_RATIO * self.forward_flops_per_sample

    @property
    def dense_bytes(self) -> int:
        """Size of the weights (and of a dense float32 update)."""
        return self.params * BYTES_PER_PARAM


def _mlp(name: str, layers: Sequence[int]) -> ReferenceModel:
    return ReferenceModel(name=name, params=dense_params(layers), forward_macs=dense_macs(layers))


def _cnn(name: str, *, length: int = 40, channels: int = 25, classes: int = 10) -> ReferenceModel:
    """Three Conv1d (kernel 5, stride 2, padding 1) then Linear, as in the MNIST-1D paper."""
    macs = params = 0
    c_in, n = 1, length
    for _ in range(3):
        n = conv1d_out_len(n, kernel=5, stride=2, padding=1)
        macs += channels * c_in * 5 * n
        params += channels * c_in * 5 + channels
        c_in = channels
    macs += channels * n * classes
    params += channels * n * classes + classes
    return ReferenceModel(name=name, params=params, forward_macs=macs)


REFERENCE_MODELS: Mapping[str, ReferenceModel] = {
    m.name: m
    for m in (
        _mlp("mlp", (40, 128, 128, 10)),
        _cnn("cnn"),
        _cnn("cnn-wide", channels=64),
        _mlp("mlp-xl", (40, 1024, 1024, 10)),
    )
}


def reference_model(name: str) -> ReferenceModel:
    try:
        return REFERENCE_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(REFERENCE_MODELS))
        raise ConfigError(f"unknown reference model {name!r}; known: {known}") from None


def train_flops_per_sample(name: str) -> float:
    """Training FLOPs per sample of a reference model (3 x 2 x forward MACs)."""
    return reference_model(name).train_flops_per_sample


# -- tasks and predictions ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Task:
    """One round's work for one device.

    Give the compute either as ``train_flops_per_sample`` or as a measured
    ``step_time_s`` (seconds per optimizer step at ``batch_size``); a measured step
    time wins. ``model`` lets the cost model use a step time stored in the profile.
    ``encode_ops_per_byte`` prices the update codec (top-k, quantize, zstd) as CPU
    work per byte of the dense update.
    """

    model_bytes: int
    update_bytes: int
    n_samples: int
    epochs: int = 1
    batch_size: int = 32
    train_flops_per_sample: float | None = None
    step_time_s: float | None = None
    model: str | None = None
    dense_update_bytes: int | None = None
    encode_ops_per_byte: float = 20.0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("model_bytes", "update_bytes", "n_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"task.{name} must not be negative")
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ConfigError("task.epochs and task.batch_size must be positive")
        if self.train_flops_per_sample is None and self.step_time_s is None and self.model is None:
            raise ConfigError("task needs train_flops_per_sample, step_time_s or model")
        for name in ("train_flops_per_sample", "step_time_s", "encode_ops_per_byte"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"task.{name} must be a non-negative number")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError("task.max_steps must not be negative")

    @classmethod
    def for_model(
        cls,
        name: str,
        *,
        n_samples: int,
        epochs: int = 1,
        batch_size: int = 32,
        compression_ratio: float = 1.0,
        max_steps: int | None = None,
    ) -> Task:
        """A task on a reference model; ``compression_ratio`` = dense bytes / sent bytes."""
        if compression_ratio <= 0:
            raise ConfigError("compression_ratio must be positive")
        m = reference_model(name)
        return cls(
            model_bytes=m.dense_bytes,
            update_bytes=math.ceil(m.dense_bytes / compression_ratio),
            dense_update_bytes=m.dense_bytes,
            n_samples=n_samples,
            epochs=epochs,
            batch_size=batch_size,
            train_flops_per_sample=m.train_flops_per_sample,
            model=name,
            max_steps=max_steps,
        )

    @property
    def steps(self) -> int:
        """Optimizer steps: ``epochs * ceil(n_samples / batch_size)``, capped by max_steps."""
        full = self.epochs * math.ceil(self.n_samples / self.batch_size)
        return full if self.max_steps is None else min(full, self.max_steps)


@dataclass(frozen=True, kw_only=True)
class CostBreakdown:
    """Predicted seconds per phase; ``step_s`` is the time of one optimizer step."""

    download_s: float
    train_s: float
    encode_s: float
    upload_s: float
    steps: int
    step_s: float

    @property
    def total_s(self) -> float:
        return self.download_s + self.train_s + self.encode_s + self.upload_s

    @property
    def fixed_s(self) -> float:
        """Everything but training: what a deadline must leave room for."""
        return self.download_s + self.encode_s + self.upload_s

    def scaled(self, factor: float) -> CostBreakdown:
        """Every phase times ``factor`` (a learned per-device correction)."""
        return CostBreakdown(
            download_s=self.download_s * factor,
            train_s=self.train_s * factor,
            encode_s=self.encode_s * factor,
            upload_s=self.upload_s * factor,
            steps=self.steps,
            step_s=self.step_s * factor,
        )


def transfer_time_s(nbytes: int, *, mbps: float, latency_ms: float) -> float:
    """One transfer: a latency plus bytes over a link of ``mbps`` megabits per second."""
    if mbps <= 0:
        raise ProfileError("bandwidth must be positive")
    return latency_ms / 1000.0 + nbytes * 8.0 / (mbps * 1e6)


def step_time_s(profile: DeviceProfile, *, flops_per_sample: float, batch_size: int) -> float:
    """One optimizer step from the FLOP model: overhead + batch FLOPs / throughput."""
    return profile.step_overhead_ms / 1000.0 + batch_size * flops_per_sample / (
        profile.gflops * 1e9
    )


def _step_s(profile: DeviceProfile, task: Task) -> float:
    if task.step_time_s is not None:
        return task.step_time_s
    measured_ms = profile.step_ms(task.model) if task.model is not None else None
    if measured_ms is not None:
        # Scale the compute part of the measured step to this task's batch size. The
        # overhead is an estimate; a step measured faster than it bounds it, so that a
        # task at the measured batch size is predicted at exactly the measured time.
        overhead = min(profile.step_overhead_ms, measured_ms) / 1000.0
        compute = measured_ms / 1000.0 - overhead
        return overhead + compute * task.batch_size / profile.measured_batch_size
    flops = task.train_flops_per_sample
    if flops is None:
        if task.model is None:
            raise ConfigError("task has no compute description")
        flops = train_flops_per_sample(task.model)
    return step_time_s(profile, flops_per_sample=flops, batch_size=task.batch_size)


def predict(profile: DeviceProfile, task: Task) -> CostBreakdown:
    """Predicted time for ``profile`` to do ``task``, phase by phase."""
    step = _step_s(profile, task)
    dense = task.dense_update_bytes if task.dense_update_bytes is not None else task.update_bytes
    return CostBreakdown(
        download_s=transfer_time_s(
            task.model_bytes, mbps=profile.downlink_mbps, latency_ms=profile.latency_ms
        ),
        train_s=task.steps * step,
        encode_s=dense * task.encode_ops_per_byte / (profile.gflops * 1e9),
        upload_s=transfer_time_s(
            task.update_bytes, mbps=profile.uplink_mbps, latency_ms=profile.latency_ms
        ),
        steps=task.steps,
        step_s=step,
    )


def calibrate(
    profile: DeviceProfile, *, model: str, step_time_s: float, batch_size: int | None = None
) -> DeviceProfile:
    """A copy of ``profile`` that knows a measured step time for ``model``.

    Also refits ``gflops`` from the measurement (for models without their own
    measurement), keeping ``step_overhead_ms``. This is how a real ONNX Runtime
    step time measured on a device feeds the cost model.
    """
    if not math.isfinite(step_time_s) or step_time_s <= 0:
        raise ProfileError("a measured step time must be positive")
    batch = batch_size if batch_size is not None else profile.measured_batch_size
    if profile.measured_step_ms and batch != profile.measured_batch_size:
        raise ProfileError(
            f"{profile.name}: step times are stored at batch {profile.measured_batch_size}, "
            f"not {batch}"
        )
    steps = dict(profile.measured_step_ms)
    steps[model] = step_time_s * 1000.0
    new = replace(profile, measured_step_ms=tuple(steps.items()), measured_batch_size=batch)
    if model in REFERENCE_MODELS:
        compute = step_time_s - profile.step_overhead_ms / 1000.0
        if compute > 0:
            flops = batch * train_flops_per_sample(model)
            new = replace(new, gflops=flops / compute / 1e9)
    return new


# -- learning from observed durations -------------------------------------------------------


class CorrectionEstimator:
    """Per-device multiplicative correction of predicted durations, learned by EWMA.

    ``observe`` folds in measured/predicted; a missed deadline with no duration is a
    censored observation (the true time is at least the deadline) and pushes the
    factor up to at least deadline/predicted, times ``miss_penalty``. Factors start at
    ``initial`` and are clamped to ``[min_factor, max_factor]`` so one wild
    measurement cannot make a device unusable for ever.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        initial: float = 1.0,
        min_factor: float = 0.05,
        max_factor: float = 100.0,
        miss_penalty: float = 1.25,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ConfigError("alpha must be within (0, 1]")
        if not 0.0 < min_factor <= initial <= max_factor:
            raise ConfigError("need 0 < min_factor <= initial <= max_factor")
        if miss_penalty < 1.0:
            raise ConfigError("miss_penalty must be at least 1")
        self.alpha = alpha
        self.initial = initial
        self.min_factor = min_factor
        self.max_factor = max_factor
        self.miss_penalty = miss_penalty
        self._factors: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def factor(self, device_id: str) -> float:
        return self._factors.get(device_id, self.initial)

    def observations(self, device_id: str) -> int:
        return self._counts.get(device_id, 0)

    def corrected(self, device_id: str, predicted_s: float) -> float:
        return predicted_s * self.factor(device_id)

    def observe(
        self,
        device_id: str,
        predicted_s: float,
        measured_s: float | None,
        *,
        deadline_s: float | None = None,
    ) -> float:
        """Fold in one observation and return the new factor.

        ``measured_s=None`` means the device did not report (missed the deadline or
        dropped out); with a ``deadline_s`` that is a lower bound, without one it is
        ignored (a dropout says nothing about speed).
        """
        if not math.isfinite(predicted_s) or predicted_s <= 0:
            raise ConfigError("predicted duration must be positive")
        current = self.factor(device_id)
        if measured_s is None:
            if deadline_s is None:
                return current
            ratio = max(current, deadline_s / predicted_s) * self.miss_penalty
        else:
            if not math.isfinite(measured_s) or measured_s < 0:
                raise ConfigError("measured duration must be a non-negative number")
            ratio = measured_s / predicted_s
        updated = (1.0 - self.alpha) * current + self.alpha * ratio
        updated = min(max(updated, self.min_factor), self.max_factor)
        self._factors[device_id] = updated
        self._counts[device_id] = self._counts.get(device_id, 0) + 1
        return updated

    def to_dict(self) -> dict[str, float]:
        """The learned factors, for persistence across aggregator restarts."""
        return dict(self._factors)

    def counts(self) -> dict[str, int]:
        """Observations folded in per device (see :meth:`observations`)."""
        return dict(self._counts)

    def load(self, factors: Mapping[str, float], counts: Mapping[str, int] | None = None) -> None:
        """Restore :meth:`to_dict` (and :meth:`counts`); factors are clamped again."""
        for device_id, value in factors.items():
            self._factors[str(device_id)] = min(max(float(value), self.min_factor), self.max_factor)
        for device_id, n in (counts or {}).items():
            self._counts[str(device_id)] = max(0, int(n))
