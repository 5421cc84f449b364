"""Server optimizers: how the averaged update moves the global model.

Following Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), the server
treats the averaged update ``delta`` (client weights minus global weights) as a
negative pseudo-gradient and applies an optimizer step to the global weights:

- ``fedavg``:     x += lr * delta
- ``fedavgm``:    v = momentum * v + delta;  x += lr * v
- ``fedadagrad``: v = v + delta^2
- ``fedadam``:    v = beta2 * v + (1 - beta2) * delta^2
- ``fedyogi``:    v = v - (1 - beta2) * delta^2 * sign(v - delta^2)
- adaptive ones:  m = beta1 * m + (1 - beta1) * delta;  x += lr * m / (sqrt(v) + tau)

The adaptive ones start from m = 0, v = tau^2 and use no bias correction, as in the
paper (Algorithm 2; defaults beta1 = 0.9, beta2 = 0.99, tau = 1e-3). The step maths
are pure functions; ``ServerOptimizer`` only holds the state between rounds so that it
can be checkpointed exactly (``state_dict`` / ``to_bytes``).
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cloud_aggregator._errors import AggregatorError
from device_profiles._errors import ConfigError

F32 = npt.NDArray[np.float32]
AdaptiveKind = Literal["adagrad", "adam", "yogi"]


# --------------------------------------------------------------------------- pure steps


def fedavg_step(params: F32, delta: F32, *, lr: float) -> F32:
    """x + lr * delta."""
    return (params + np.float32(lr) * delta).astype(np.float32, copy=False)


def fedavgm_step(
    params: F32, delta: F32, velocity: F32, *, lr: float, momentum: float
) -> tuple[F32, F32]:
    """Server momentum: v = momentum * v + delta; x + lr * v. Returns (params, velocity)."""
    new_v = (np.float32(momentum) * velocity + delta).astype(np.float32, copy=False)
    return (params + np.float32(lr) * new_v).astype(np.float32, copy=False), new_v


def adaptive_step(
    params: F32,
    delta: F32,
    m: F32,
    v: F32,
    *,
    kind: AdaptiveKind,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[F32, F32, F32]:
    """One FedAdagrad / FedAdam / FedYogi step. Returns (params, m, v)."""
    b1, b2 = np.float32(beta1), np.float32(beta2)
    new_m = (b1 * m + (np.float32(1) - b1) * delta).astype(np.float32)
    sq = delta * delta
    if kind == "adagrad":
        new_v = v + sq
    elif kind == "adam":
        new_v = b2 * v + (np.float32(1) - b2) * sq
    elif kind == "yogi":
        new_v = v - (np.float32(1) - b2) * sq * np.sign(v - sq)
    else:  # pragma: no cover - guarded by the config
        raise AggregatorError(f"unknown adaptive optimizer {kind!r}")
    new_v = new_v.astype(np.float32)
    step = np.float32(lr) * new_m / (np.sqrt(new_v) + np.float32(tau))
    return (params + step).astype(np.float32), new_m, new_v


# --------------------------------------------------------------------------- configs


def _check_lr(lr: float) -> None:
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"server lr must be positive and finite, got {lr}")


def _check_unit(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


@dataclass(frozen=True, kw_only=True)
class FedAvgConfig:
    lr: float = 1.0

    def __post_init__(self) -> None:
        _check_lr(self.lr)


@dataclass(frozen=True, kw_only=True)
class FedAvgMConfig:
    lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        _check_unit("momentum", self.momentum)


@dataclass(frozen=True, kw_only=True)
class AdaptiveConfig:
    """FedAdagrad / FedAdam / FedYogi. The paper tunes the server lr per task; 0.01 is a
    common starting point from its grid. ``tau`` bounds the adaptivity."""

    kind: AdaptiveKind
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("adagrad", "adam", "yogi"):
            raise ConfigError(f"unknown adaptive optimizer {self.kind!r}")
        _check_lr(self.lr)
        _check_unit("beta1", self.beta1)
        _check_unit("beta2", self.beta2)
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ConfigError(f"tau must be positive, got {self.tau}")


OptimizerConfig = FedAvgConfig | FedAvgMConfig | AdaptiveConfig


# --------------------------------------------------------------------------- stateful


class ServerOptimizer:
    """Holds a server optimizer's state between rounds and applies its pure step.

    State arrays are created on the first step (the model size is known then) and are
    float32, one or two vectors of the model's size.
    """

    def __init__(self, *, name: str, config: OptimizerConfig) -> None:
        self._name = name
        self._config = config
        self._state: dict[str, F32] = {}
        self._steps = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> OptimizerConfig:
        return self._config

    @property
    def steps(self) -> int:
        return self._steps

    def step(self, params: F32, delta: F32) -> F32:
        """Return the new global weights; ``params`` is not modified."""
        if params.shape != delta.shape or params.ndim != 1:
            raise AggregatorError(f"params {params.shape} and delta {delta.shape} differ")
        params = np.asarray(params, dtype=np.float32)
        delta = np.asarray(delta, dtype=np.float32)
        cfg = self._config
        if isinstance(cfg, FedAvgConfig):
            out = fedavg_step(params, delta, lr=cfg.lr)
        elif isinstance(cfg, FedAvgMConfig):
            velocity = self._state_or(params.size, "velocity", 0.0)
            out, self._state["velocity"] = fedavgm_step(
                params, delta, velocity, lr=cfg.lr, momentum=cfg.momentum
            )
        else:
            m = self._state_or(params.size, "m", 0.0)
            v = self._state_or(params.size, "v", cfg.tau * cfg.tau)
            out, self._state["m"], self._state["v"] = adaptive_step(
                params,
                delta,
                m,
                v,
                kind=cfg.kind,
                lr=cfg.lr,
                beta1=cfg.beta1,
                beta2=cfg.beta2,
                tau=cfg.tau,
            )
        self._steps += 1
        return out

    def _state_or(self, size: int, key: str, fill: float) -> F32:
        arr = self._state.get(key)
        if arr is None:
            return np.full(size, fill, dtype=np.float32)
        if arr.size != size:
            raise AggregatorError(f"optimizer state {key!r} has size {arr.size}, model {size}")
        return arr

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state arrays plus the step count (``"steps"``, int64 scalar)."""
        out: dict[str, np.ndarray] = {k: v.copy() for k, v in self._state.items()}
        out["steps"] = np.asarray(self._steps, dtype=np.int64)
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` returned (exactly: arrays are copied bit for bit)."""
        expected = {"fedavg": set(), "fedavgm": {"velocity"}}.get(self._name, {"m", "v"})
        keys = set(state) - {"steps"}
        if keys and keys != expected:
            raise AggregatorError(
                f"state for {self._name!r} must hold {sorted(expected)}, got {sorted(keys)}"
            )
        self._state = {k: np.array(state[k], dtype=np.float32) for k in keys}
        self._steps = int(state["steps"]) if "steps" in state else 0

    def to_bytes(self) -> bytes:
        """An ``.npz`` archive (no pickle) of the state, tagged with the optimizer name."""
        buf = io.BytesIO()
        arrays = self.state_dict()
        arrays["_name"] = np.frombuffer(self._name.encode(), dtype=np.uint8)
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def load_bytes(self, data: bytes) -> None:
        """Restore state written by ``to_bytes`` of an optimizer of the same name."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise AggregatorError("unreadable server optimizer state") from exc
        name = bytes(arrays.pop("_name", np.zeros(0, np.uint8))).decode(errors="replace")
        if name != self._name:
            raise AggregatorError(f"state is for optimizer {name!r}, not {self._name!r}")
        self.load_state_dict(arrays)


_NAMES: dict[str, tuple[Any, dict[str, Any]]] = {
    "fedavg": (FedAvgConfig, {}),
    "fedavgm": (FedAvgMConfig, {}),
    "fedadagrad": (AdaptiveConfig, {"kind": "adagrad"}),
    "fedadam": (AdaptiveConfig, {"kind": "adam"}),
    "fedyogi": (AdaptiveConfig, {"kind": "yogi"}),
}

SERVER_OPTIMIZERS: tuple[str, ...] = tuple(sorted(_NAMES))


def make_server_optimizer(name: str, **options: float) -> ServerOptimizer:
    """Build a server optimizer by name (``SERVER_OPTIMIZERS``); bad names or options
    raise ``ConfigError`` at start-up rather than at the first round."""
    key = name.strip().lower()
    if key not in _NAMES:
        raise ConfigError(
            f"unknown server optimizer {name!r}; choose one of {', '.join(SERVER_OPTIMIZERS)}"
        )
    cls, fixed = _NAMES[key]
    try:
        config = cls(**fixed, **options)
    except TypeError as exc:
        allowed = sorted({f.name for f in fields(cls)} - set(fixed))
        raise ConfigError(f"bad option for {key}: {exc}; allowed: {allowed}") from exc
    return ServerOptimizer(name=key, config=config)


def optimizer_options(opt: ServerOptimizer) -> dict[str, Any]:
    """The options that rebuild ``opt`` with ``make_server_optimizer`` (for logs, config)."""
    opts = asdict(opt.config)
    opts.pop("kind", None)
    return opts
