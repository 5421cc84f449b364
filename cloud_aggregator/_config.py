"""The aggregator's configuration: parsed once (TOML file, then flags) into a frozen object.

Defaults are chosen by ``bench/defaults.py`` on the reference task (MNIST-1D, 100
devices, Dirichlet(0.5), 10 per round): see ``AggregatorConfig`` for the numbers.
Every value is checked here; a bad one raises ``ConfigError`` naming the setting,
before any round starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from broker_bridge import CodecSpec, WireError, check_id
from cloud_aggregator._robust import RobustConfig
from cloud_aggregator._selection import POLICIES
from cloud_aggregator._server_opt import SERVER_OPTIMIZERS, make_server_optimizer
from device_profiles import ConfigError

Mode = Literal["sync", "async"]
ClockKind = Literal["real", "virtual"]
RobustMethod = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]
StalenessKind = Literal["constant", "sqrt", "polynomial"]


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """Everything the aggregator does differently from one deployment to another.

    Training defaults (``bench/defaults.py``): 5 local epochs of SGD at lr 0.05 and
    server momentum (FedAvgM, lr 1.0, momentum 0.9) reach the accuracy targets in far
    fewer rounds than plain FedAvg (1 epoch, no momentum) on the reference task.
    """

    fleet: str = "default"
    model: str = "cnn"
    """A reference model name (mlp, cnn, mlp-xl) or a path to your ``.onnx`` model."""
    backend: Literal["portable", "ort-training"] = "portable"
    """Training artifacts devices run: ``portable`` (standard ONNX ops, any onnxruntime)
    or ``ort-training`` (needs the onnxruntime-training wheel on every device)."""
    rounds: int = 150
    """Model versions to produce (closed rounds in sync mode, aggregations in async)."""
    mode: Mode = "sync"
    clock: ClockKind = "real"
    """``virtual``: deadlines are judged in the emulated seconds devices report."""

    # -- sync rounds
    devices_per_round: int = 10
    over_selection: float = 1.3
    min_devices: int | None = None
    """Eligible online devices needed before a round starts (default: devices_per_round)."""
    quorum: int | None = None
    """Counted updates a round needs to be applied (default: half of devices_per_round)."""
    deadline_s: float = 60.0
    safety_timeout_s: float = 600.0
    """Virtual clock: wall-clock seconds after which a round stops waiting for devices."""
    replace_declined: bool = True
    max_abandoned: int = 20
    """Consecutive abandoned rounds after which the aggregator gives up."""
    selection: str = "random"
    max_selected: int | None = None
    """``selection = "deadline"`` (FedCS) only: select up to this many of the devices
    predicted to finish within ``deadline_s`` (FedCS takes as many as will finish).
    Default: the same count as every other policy, ``selected_per_round``."""

    # -- async (FedBuff)
    concurrency: int = 20
    buffer_size: int = 10
    staleness: StalenessKind = "sqrt"
    max_staleness: int | None = 20

    # -- local training (sent in each task)
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    max_steps: int | None = None
    adaptive_local_work: bool = True
    """A device whose profile predicts it would miss ``deadline_s`` is asked for fewer
    local steps (at least one) instead of being dropped; it reports the samples it
    really trained on, which weight its update. Devices without a profile are not
    adapted."""
    codec: str = "fp32"
    """Uplink update codec the devices are asked to use."""
    downlink_codec: str = "fp32"
    """Codec of the broadcast global model: fp32, or fp16 to halve the download."""
    federated_eval: bool = False

    # -- server side
    server_opt: str = "fedavgm"
    server_lr: float | None = None
    server_momentum: float | None = None
    robust: RobustMethod = "mean"
    clip_norm: float | None = None
    trim_fraction: float = 0.1
    byzantine: int = 0
    max_update_norm: float | None = None
    """An absolute L2 cap (off by default: a model that broke would trip it for every
    honest update; the relative screen below adapts instead)."""
    norm_median_multiple: float | None = 4.0
    """Refuse an update whose norm exceeds this multiple of the median norm of recently
    accepted ones (``_screen.NormScreen``); None turns the screen off."""
    max_weight_multiple: float | None = 4.0
    """An update weighs the samples it claims, cut to what its task allowed and to this
    multiple of the median weight of recent updates (``_screen.WeightBound``); None
    keeps only the task's bound."""
    robust_max_bytes: int = 1 << 30

    # -- persistence, evaluation, metrics
    state_dir: Path | None = None
    eval_data: Path | None = None
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    """Address the metrics endpoint listens on: loopback unless you open it on purpose
    (``0.0.0.0`` serves every interface; the endpoint has no authentication)."""
    store_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    seed: int = 0
    progress: bool = True

    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Unused keys are refused; this stays empty (kept for forward-compatible tooling)."""

    def __post_init__(self) -> None:
        check_id(self.fleet, what="fleet id")
        _positive_int("rounds", self.rounds)
        _positive_int("devices_per_round", self.devices_per_round)
        _choice("mode", self.mode, ("sync", "async"))
        _choice("backend", self.backend, ("portable", "ort-training"))
        _choice("clock", self.clock, ("real", "virtual"))
        if not (self.over_selection >= 1.0 and math.isfinite(self.over_selection)):
            raise ConfigError(f"over_selection must be >= 1, got {self.over_selection}")
        for name in ("min_devices", "quorum", "max_steps", "metrics_port", "max_selected"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.quorum is not None and not 1 <= self.quorum <= self.selected_per_round:
            raise ConfigError(
                f"quorum must be in 1..{self.selected_per_round} (devices selected per round)"
            )
        if self.max_selected is not None and self.max_selected < self.selected_per_round:
            raise ConfigError(
                f"max_selected ({self.max_selected}) is below the devices selected per round "
                f"({self.selected_per_round})"
            )
        for name in ("deadline_s", "safety_timeout_s", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("max_abandoned", "concurrency", "buffer_size", "local_epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError("max_staleness must be >= 0")
        _choice("staleness", self.staleness, ("constant", "sqrt", "polynomial"))
        _choice("selection", self.selection, tuple(POLICIES))
        _choice("server_opt", self.server_opt, SERVER_OPTIMIZERS)
        _choice("store_synchronous", self.store_synchronous, ("FULL", "NORMAL"))
        for name in ("codec", "downlink_codec"):
            try:
                spec = CodecSpec.parse(getattr(self, name))
            except (WireError, ConfigError, ValueError) as exc:
                raise ConfigError(f"{name}: {exc}") from exc
            if name == "downlink_codec" and spec.error_feedback:
                raise ConfigError("downlink_codec cannot use error feedback (ef)")
        self.make_server_optimizer()  # raises ConfigError on bad options
        self.robust_config()
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ConfigError(f"max_update_norm must be positive, got {self.max_update_norm}")
        if self.norm_median_multiple is not None and not self.norm_median_multiple > 1:
            raise ConfigError(
                f"norm_median_multiple must be above 1, got {self.norm_median_multiple}")
        if self.max_weight_multiple is not None and not self.max_weight_multiple >= 1:
            raise ConfigError(
                f"max_weight_multiple must be at least 1, got {self.max_weight_multiple}")
        if self.mode == "sync" and self.effective_min_devices < self.effective_quorum:
            raise ConfigError(
                f"min_devices ({self.effective_min_devices}) is below the quorum "
                f"({self.effective_quorum}): such rounds could only be abandoned"
            )
        if not isinstance(self.metrics_bind, str) or not self.metrics_bind:
            raise ConfigError(f"metrics_bind must be an address, got {self.metrics_bind!r}")
        if self.extra:
            raise ConfigError(f"unknown settings: {', '.join(sorted(self.extra))}")

    # -- derived values

    @property
    def selected_per_round(self) -> int:
        """Devices asked to train in a sync round: the target times over-selection."""
        return math.ceil(self.devices_per_round * self.over_selection - 1e-9)

    @property
    def effective_quorum(self) -> int:
        return self.quorum if self.quorum is not None else max(1, self.devices_per_round // 2)

    @property
    def effective_min_devices(self) -> int:
        return self.min_devices if self.min_devices is not None else self.devices_per_round

    @property
    def is_reference_model(self) -> bool:
        return not self.model.endswith(".onnx")

    def server_options(self) -> dict[str, float]:
        opts: dict[str, float] = {}
        if self.server_lr is not None:
            opts["lr"] = self.server_lr
        if self.server_momentum is not None:
            if self.server_opt != "fedavgm":
                raise ConfigError("server_momentum applies to server_opt = fedavgm only")
            opts["momentum"] = self.server_momentum
        return opts

    def make_server_optimizer(self) -> Any:
        return make_server_optimizer(self.server_opt, **self.server_options())

    def robust_config(self) -> RobustConfig:
        return RobustConfig(
            method=self.robust, trim_fraction=self.trim_fraction, byzantine=self.byzantine,
            clip_norm=self.clip_norm,
        )


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(AggregatorConfig) if f.name != "extra"}
_HINTS = typing.get_type_hints(AggregatorConfig)


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or flag value into the field's type (paths, ints that are floats...)."""
    hint = _HINTS[name]
    args = set(typing.get_args(hint)) or {hint}
    if value is None:
        return None
    if Path in args or hint is Path:
        return Path(os.path.expanduser(str(value)))
    if float in args and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if bool in args and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def load_config(
    path: str | os.PathLike[str] | None = None, **overrides: Any
) -> AggregatorConfig:
    """Settings from a TOML file (top level or an ``[aggregator]`` table), then
    ``overrides`` (flags; ``None`` means not given). Unknown keys raise ConfigError."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        table = data.get("aggregator", data)
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [aggregator] must be a table")
        values.update({k.replace("-", "_"): v for k, v in table.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown aggregator settings: {', '.join(unknown)}")
    kwargs = {k: _coerce(k, v) for k, v in values.items()}
    try:
        return AggregatorConfig(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad aggregator settings: {exc}") from exc
