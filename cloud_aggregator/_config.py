"""The aggregator's configuration: the ``[aggregator]`` section, parsed once into frozen objects.

``AGGREGATOR`` is the section: ``AggregatorConfig`` (what the aggregator does) and
``AggregatorConnection`` (how it reaches its broker, ``_connect``). Every field is a
setting with a flag, an environment variable ``FLEETLEARN_AGGREGATOR_<NAME>`` and a key
of the ``[aggregator]`` table (``device_profiles.Section``); flags > environment > file
> defaults. Defaults are chosen by ``bench/defaults.py`` on the reference task
(MNIST-1D, 100 devices, Dirichlet(0.5), 10 per round): see ``AggregatorConfig`` for the
numbers. Every value is checked here, alone and against the others; a bad one raises
``ConfigError`` naming the setting and its source, before any round starts.

Why this module is longer than 400 lines: every aggregator setting is declared here, one
field each with its help text, and checked here alone and against the others; the checks
of secure aggregation and differential privacy sit beside the fields they read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from broker_bridge import CodecSpec, WireError, check_id
from broker_bridge._secagg import FixedPoint, check_codec, secure_level_bound
from cloud_aggregator._connect import AggregatorConnection
from cloud_aggregator._privacy import PrivacyPlan, make_plan
from cloud_aggregator._robust import RobustConfig, krum_min_updates
from cloud_aggregator._selection import POLICIES
from cloud_aggregator._server_opt import SERVER_OPTIMIZERS, make_server_optimizer
from device_profiles import ConfigError, Section, internal, setting

Mode = Literal["sync", "async"]
ClockKind = Literal["real", "virtual"]
RobustMethod = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]
StalenessKind = Literal["constant", "sqrt", "polynomial"]


_FLEET = "fleet and model"
_SYNC = "sync rounds"
_ASYNC = "async rounds (FedBuff)"
_LOCAL = "local training (sent in each task)"
_SERVER = "server side: optimizer, robust aggregation, screens"
_STATE = "persistence, evaluation, metrics"
_IDENTITY = "device identity (signed updates)"
_SECURE = "secure aggregation (sync rounds)"
_PRIVACY = "differential privacy (sync rounds; see README, Differential privacy)"
ClipMode = Literal["fixed", "adaptive"]
ModelPush = Literal["broadcast", "on_request"]
ON_REQUEST_MAX_BYTES = 1 << 20
"""Async mode's default ``model_push``: devices fetch a model version this size or
smaller (its copies cost the aggregator little); a larger one is broadcast."""


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    """Everything the aggregator does differently from one deployment to another.

    Training defaults (``bench/defaults.py``): 5 local epochs of SGD at lr 0.05 and
    server momentum (FedAvgM, lr 1.0, momentum 0.9) reach the accuracy targets in far
    fewer rounds than plain FedAvg (1 epoch, no momentum) on the reference task.
    Each field is a setting of the ``[aggregator]`` section (``AGGREGATOR``): a flag,
    ``FLEETLEARN_AGGREGATOR_<NAME>`` and a key of the file.
    """

    fleet: str = setting("default", help="fleet id", example="plant-7", group=_FLEET)
    model: str = setting(
        "cnn", help="a reference model (mlp, cnn, mlp-xl) or a path to your .onnx model",
        example="mlp", group=_FLEET)
    backend: Literal["portable", "ort-training"] = setting(
        "portable", help="training artifacts devices run: portable (standard ONNX ops, any "
        "onnxruntime) or ort-training (needs the onnxruntime-training wheel on every device)",
        group=_FLEET)
    rounds: int = setting(
        150, help="model versions to produce (closed rounds in sync mode, aggregations in "
        "async)", group=_FLEET)
    mode: Mode = setting("sync", help="sync (rounds) or async (FedBuff)", group=_FLEET)
    clock: ClockKind = setting(
        "real", help="virtual: deadlines are judged in the emulated seconds devices report",
        group=_FLEET)
    max_children: int | None = setting(
        None, help="serve at most this many devices: a device greeting beyond it is told to "
        "move to another parent (edge tiers' load balancing; a device with one parent "
        "waits) and is not selected here; default: no limit", example=30, group=_FLEET)

    # -- sync rounds
    devices_per_round: int = setting(10, help="target updates per round", group=_SYNC)
    over_selection: float = setting(1.3, help="devices asked per target one", group=_SYNC)
    min_devices: int | None = setting(
        None, help="eligible online devices needed before a round starts (default: "
        "devices_per_round)", example=12, group=_SYNC)
    quorum: int | None = setting(
        None, help="counted updates a round needs to be applied (default: half of "
        "devices_per_round)", example=6, group=_SYNC)
    deadline_s: float = setting(60.0, help="round (and async task) deadline in seconds",
                                group=_SYNC)
    safety_timeout_s: float = setting(
        600.0, help="virtual clock: wall-clock seconds after which a round stops waiting "
        "for devices", group=_SYNC)
    replace_declined: bool = setting(
        True, help="ask another device when a selected one declines", group=_SYNC)
    max_abandoned: int = setting(
        20, help="consecutive abandoned rounds after which the aggregator gives up",
        group=_SYNC)
    selection: str = setting(
        "random", help="device selection policy: random, deadline (FedCS), tiered or oort",
        example="oort", group=_SYNC)
    max_selected: int | None = setting(
        None, help="selection = deadline (FedCS) only: select up to this many of the "
        "devices predicted to finish within deadline_s (default: the same count as every "
        "other policy, devices_per_round x over_selection)", example=20, group=_SYNC)

    # -- async (FedBuff)
    concurrency: int = setting(20, help="async: devices kept busy", group=_ASYNC)
    buffer_size: int = setting(10, help="async: updates per aggregation (K)", group=_ASYNC)
    staleness: StalenessKind = setting(
        "sqrt", help="async: how a stale update is discounted", group=_ASYNC)
    max_staleness: int | None = setting(
        20, help="async: refuse updates staler than this many versions (none: no limit)",
        group=_ASYNC)
    checkpoint_every_s: float = setting(
        1.0, help="async: write the model to disk at most this often (0: at every release, "
        "or as soon as the checkpoint being written is done); versions released in between "
        "are re-derived from the journal after a crash",
        group=_ASYNC)

    # -- local training (sent in each task)
    local_epochs: int = setting(5, help="local epochs per task", group=_LOCAL)
    batch_size: int = setting(32, help="local batch size", group=_LOCAL)
    lr: float = setting(0.05, help="device learning rate", group=_LOCAL)
    max_steps: int | None = setting(None, help="cap on local steps per task", example=50,
                                    group=_LOCAL)
    adaptive_local_work: bool = setting(
        True, help="a device whose profile predicts it would miss deadline_s is asked for "
        "fewer local steps (at least one) instead of being dropped; its update weighs the "
        "samples it really trained on", group=_LOCAL)
    codec: str = setting("fp32", help="uplink update codec, e.g. topk:0.01+q8+zstd",
                         example="topk:0.01+q8+zstd", group=_LOCAL)
    downlink_codec: str = setting(
        "fp32", help="codec of the broadcast global model: fp32, or fp16 to halve the "
        "download", example="fp16", group=_LOCAL)
    model_push: ModelPush | None = setting(
        None, help="how devices get each new model version: broadcast (published once on "
        "broadcast/model: every connected device downloads every version) or on_request "
        "(a device fetches the version its task names, once per task). Default: broadcast "
        "in sync rounds, where the selected devices need the new model at once; in async "
        "mode, where a release every buffer_size updates would send each device every "
        "version, on_request for a model of at most 1 MiB as sent, broadcast for a larger "
        "one (a copy per task then costs the aggregator more than the update it answers)",
        example="on_request", group=_LOCAL)
    federated_eval: bool = setting(
        False, help="devices also evaluate the model on their held-out data", group=_LOCAL)

    # -- server side
    server_opt: str = setting(
        "fedavgm", help="server optimizer: fedavg, fedavgm, fedadagrad, fedadam or fedyogi",
        example="fedadam", group=_SERVER)
    server_lr: float | None = setting(None, help="server learning rate (default: the "
                                      "optimizer's)", example=0.5, group=_SERVER)
    server_momentum: float | None = setting(
        None, help="server_opt = fedavgm only: its momentum (default 0.9)", example=0.5,
        group=_SERVER)
    robust: RobustMethod = setting(
        "mean", help="aggregation rule: mean, median, trimmed_mean, krum or multi_krum",
        group=_SERVER)
    clip_norm: float | None = setting(
        None, help="clip each update to this L2 norm (under secure aggregation with "
        "differential privacy the devices clip to it; default there 0.1)", example=1.0,
        group=_SERVER)
    trim_fraction: float = setting(0.1, help="robust = trimmed_mean: share trimmed at each "
                                   "end", group=_SERVER)
    byzantine: int = setting(
        0, help="robust = krum or multi_krum: Byzantine updates to tolerate (f; a round "
        "needs 2f + 3 updates)", group=_SERVER)
    max_update_norm: float | None = setting(
        None, help="an absolute L2 cap on updates (off by default: a model that broke would "
        "trip it for every honest update; the relative screen adapts instead)",
        example=100.0, group=_SERVER)
    norm_median_multiple: float | None = setting(
        4.0, help="refuse an update whose norm exceeds this multiple of the median norm of "
        "recently accepted ones (none: screen off)", group=_SERVER)
    max_weight_multiple: float | None = setting(
        4.0, help="an update weighs the samples it claims, cut to what its task allowed and "
        "to this multiple of the recent median weight (none: only the task's bound)",
        group=_SERVER)
    reputation_floor: float | None = setting(
        0.3, help="devices whose reputation (decayed consensus alignment of their updates "
        "and share refused by the screens, in [0, 1]) is below this are not selected while "
        "enough others are, and their updates weigh their reputation times their samples "
        "(none: reputation is recorded, never used)", example=0.5, group=_SERVER)
    contribution_marginal: bool = setting(
        False, help="measure each update's leave-one-out contribution to the accuracy on "
        "the server's evaluation set (eval_data; one evaluation per update per round; mean "
        "aggregation only)",
        group=_SERVER)
    robust_max_bytes: int = setting(
        1 << 30, help="memory the robust rules may hold a round's updates in (bytes)",
        group=_SERVER)

    # -- secure aggregation
    secure_aggregation: bool = setting(
        False, help="sync rounds learn only the sum of their updates (masked with "
        "pairwise and self masks, unmasked from Shamir shares; docs/PROTOCOL.md section "
        "11); needs codec = fp32 and robust = mean; with dp_epsilon or dp_noise_multiplier "
        "the devices add the noise (distributed DP)", group=_SECURE)
    secure_clip: float = setting(
        1.0, help="secure aggregation: every coordinate of an update is clipped to "
        "[-clip, clip] before fixed point (the most one device can move the sum; under "
        "differential privacy the L2 bound clip_norm applies instead)",
        group=_SECURE)
    secure_fraction: float = setting(
        1.0, help="secure aggregation: share of coordinates every device sends, chosen at "
        "random each round from a seed the round's devices share (scaled by 1/fraction)",
        example=0.1, group=_SECURE)
    secure_phase_s: float | None = setting(
        None, help="secure aggregation: how long each key, share and unmask step waits "
        "for devices (default: deadline_s / 6)", example=5.0, group=_SECURE)
    # -- differential privacy
    dp_epsilon: float | None = setting(
        None, help="device-level privacy budget: the noise is calibrated so that the planned "
        "rounds spend at most this epsilon, and training stops before a round would pass it "
        "(turns central DP on)", example=8.0, group=_PRIVACY)
    dp_delta: float = setting(1e-5, help="the delta of (epsilon, delta)-DP; below 1 / "
                              "dp_population", group=_PRIVACY)
    dp_noise_multiplier: float | None = setting(
        None, help="noise standard deviation / clipping bound (turns central DP on; with "
        "dp_epsilon too, the plan must fit the budget; alone, epsilon is reported)",
        example=1.0, group=_PRIVACY)
    dp_clipping: ClipMode | None = setting(
        None, help="fixed: clip to clip_norm; adaptive: move the bound towards the "
        "dp_target_quantile of update norms (Andrew et al. 2021), clip_norm is its start "
        "(default: adaptive; fixed under secure_aggregation, where devices clip)",
        example="fixed", group=_PRIVACY)
    dp_target_quantile: float = setting(
        0.5, help="adaptive clipping: share of updates the bound should leave unclipped",
        example=0.9, group=_PRIVACY)
    dp_clip_lr: float = setting(0.2, help="adaptive clipping: geometric step of the bound",
                                group=_PRIVACY)
    dp_clip_count_stddev: float | None = setting(
        None, help="adaptive clipping: noise on the count of unclipped updates (default: "
        "devices asked per round / 20, at least the noise multiplier)", example=1.0,
        group=_PRIVACY)
    dp_population: int | None = setting(
        None, help="devices selection = random samples from (every one of them online and "
        "eligible each round): rounds are charged as a sample of rate asked / candidates; "
        "unset: no amplification by sampling", example=1000, group=_PRIVACY)

    # -- persistence, evaluation, metrics
    state_dir: Path | None = setting(
        None, help="where the store, checkpoints and metrics live (default: a temporary "
        "folder, lost on exit)", example="agg", group=_STATE)
    eval_data: Path | None = setting(
        None, help="held-out .npz (arrays x: features, y: labels) for server-side "
        "evaluation", example="test.npz", group=_STATE)
    metrics_port: int | None = setting(None, help="serve Prometheus metrics on this port",
                                       example=9100, group=_STATE)
    metrics_bind: str = setting(
        "127.0.0.1", help="address the metrics endpoint listens on: loopback unless you "
        "open it on purpose (0.0.0.0: every interface; the endpoint has no authentication)",
        example="0.0.0.0", group=_STATE)
    keep_checkpoints: int = setting(
        5, help="checkpoint files kept: the newest N, beside the oldest (what ledger verify "
        "re-derives from) and those the ledger checks models against (secure, private or "
        "own-combine rounds); older ones are deleted (0: keep every one)", group=_STATE)
    store_synchronous: Literal["FULL", "NORMAL"] = setting(
        "FULL", help="SQLite synchronous mode of the store (NORMAL: faster, may lose the "
        "last commits on a power cut)", group=_STATE)
    seed: int = setting(0, help="selection and model seed", group=_STATE)
    progress: bool = setting(True, help="print a line per round", group=_STATE,
                             const_flags=(("--quiet", False),))

    # -- device identity (docs/PROTOCOL.md section 5.2)
    enrolment: Path | None = setting(
        None, help="the enrolment file: each device's Ed25519 public key (fleetlearn broker "
        "config writes it, fleetlearn devices enroll adds keys; read again when it "
        "changes). Every update must be signed by its device's key: a device with none is "
        "refused (unknown_device)", example="enrolment.toml", group=_IDENTITY)
    trust_on_first_use: bool = setting(
        False, help="trust a device that has no enrolled key with the key of its first "
        "verified update, recorded in the store for good (a later key is refused); off: "
        "only enrolled keys count", group=_IDENTITY)

    extra: Mapping[str, Any] = internal(default_factory=dict, repr=False)
    """Unused keys are refused; this stays empty (kept for forward-compatible tooling)."""

    def __post_init__(self) -> None:
        check_id(self.fleet, what="fleet id")
        _positive_int("rounds", self.rounds)
        _positive_int("devices_per_round", self.devices_per_round)
        if self.max_children is not None:
            _positive_int("max_children", self.max_children)
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
        if not (math.isfinite(self.checkpoint_every_s) and self.checkpoint_every_s >= 0):
            raise ConfigError("checkpoint_every_s must be a number >= 0 (0: checkpoint every "
                              f"release), got {self.checkpoint_every_s!r}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError("max_staleness must be >= 0")
        _choice("staleness", self.staleness, ("constant", "sqrt", "polynomial"))
        _choice("selection", self.selection, tuple(POLICIES))
        _choice("server_opt", self.server_opt, SERVER_OPTIMIZERS)
        _choice("store_synchronous", self.store_synchronous, ("FULL", "NORMAL"))
        if self.model_push is not None:
            _choice("model_push", self.model_push, ("broadcast", "on_request"))
        if self.keep_checkpoints < 0:
            raise ConfigError(f"keep_checkpoints must be >= 0 (0: keep every one), got "
                              f"{self.keep_checkpoints}")
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
        if self.reputation_floor is not None and not 0 < self.reputation_floor < 1:
            raise ConfigError(
                f"reputation_floor must be within (0, 1), got {self.reputation_floor}")
        if self.mode == "sync" and self.effective_min_devices < self.effective_quorum:
            raise ConfigError(
                f"min_devices ({self.effective_min_devices}) is below the quorum "
                f"({self.effective_quorum}): such rounds could only be abandoned"
            )
        self._check_combinations()
        self._check_privacy()
        if not isinstance(self.metrics_bind, str) or not self.metrics_bind:
            raise ConfigError(f"metrics_bind must be an address, got {self.metrics_bind!r}")
        if self.extra:
            raise ConfigError(f"unknown settings: {', '.join(sorted(self.extra))}")

    def _check_combinations(self) -> None:
        """Settings that contradict each other: each refusal says why."""
        if self.secure_aggregation:
            self._check_secure()
        if self.max_selected is not None and self.selection != "deadline":
            raise ConfigError(
                f"max_selected applies to selection = deadline (FedCS) only; with selection "
                f"= {self.selection} it would be ignored")
        if self.robust in ("krum", "multi_krum"):
            need = krum_min_updates(self.byzantine)
            why = f"{self.robust} with byzantine = {self.byzantine} needs {need} updates"
            if self.mode == "async" and self.buffer_size < need:
                raise ConfigError(
                    f"buffer_size ({self.buffer_size}) is below what {why}: no buffer could "
                    "be aggregated (raise buffer_size or lower byzantine)")
            if self.mode == "sync" and self.selected_per_round < need:
                raise ConfigError(
                    f"devices_per_round x over_selection ({self.selected_per_round} devices "
                    f"asked per round) is below the {need} updates {why.split(' needs ')[0]} "
                    "needs: no round could be aggregated")
            if self.mode == "sync" and self.quorum is not None and self.quorum < need:
                raise ConfigError(
                    f"quorum ({self.quorum}) is below what {why}: a round closing with its "
                    "quorum could not be aggregated (raise quorum or lower byzantine)")

    def _check_secure(self) -> None:
        """Secure aggregation: the aggregator never sees an update, so nothing that needs
        one may be asked of it."""
        if self.mode != "sync":
            raise ConfigError("secure_aggregation runs in sync rounds only (mode = sync)")
        check_codec(CodecSpec.parse(self.codec))
        clip = self.clip_norm is not None and not self.dp_enabled  # DP: the devices clip
        if self.robust != "mean" or clip or self.max_update_norm is not None:
            raise ConfigError(
                "secure_aggregation hides each update from the aggregator: robust rules, "
                "clip_norm (without differential privacy) and max_update_norm need to see "
                "them (use robust = mean; secure_clip bounds each coordinate instead)")
        if not (math.isfinite(self.secure_clip) and self.secure_clip > 0):
            raise ConfigError(f"secure_clip must be > 0, got {self.secure_clip}")
        if not 0 < self.secure_fraction <= 1:
            raise ConfigError(f"secure_fraction must be in (0, 1], got {self.secure_fraction}")
        if self.secure_phase_s is not None and not self.secure_phase_s > 0:
            raise ConfigError(f"secure_phase_s must be > 0, got {self.secure_phase_s}")
        if not self.dp_enabled:
            self.secure_fixed_point()  # the overflow check (DP: the plan's own)

    @property
    def secure_max_devices(self) -> int:
        """The most devices a secure round sums: twice those it selects (replacements
        for decliners join it)."""
        return max(3, 2 * self.selected_per_round)

    def secure_fixed_point(self) -> FixedPoint:
        """The fixed point of a secure round: the finest power-of-two scale at which
        twice the devices a round selects (replacements for decliners join it) sum
        clipped updates without overflow; refused when that leaves under 1,024 levels.
        Under differential privacy: the plan's scale, with room for the noise
        (``_skellam_dp``), values clipped to the L2 bound (so each coordinate too)."""
        devices = self.secure_max_devices
        plan = self.privacy_plan()
        if plan is not None and plan.skellam is not None:
            return FixedPoint(clip=plan.skellam.clip, scale=plan.skellam.scale,
                              max_devices=devices)
        bound = secure_level_bound(devices)
        if bound < 1 << 10:
            raise ConfigError(
                f"secure_aggregation: {devices} devices per round leave each fewer than 1,024 "
                f"fixed-point levels in a 32-bit sum; select fewer devices per round")
        scale = 2.0 ** math.floor(math.log2(bound / (self.secure_clip / self.secure_fraction)))
        return FixedPoint(clip=self.secure_clip / self.secure_fraction, scale=scale,
                          max_devices=devices)

    @property
    def secure_phase(self) -> float:
        return self.secure_phase_s if self.secure_phase_s is not None else self.deadline_s / 6
    def _check_privacy(self) -> None:
        """Central DP's settings, alone and with the rest: each refusal says why."""
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        for name in ("dp_epsilon", "dp_noise_multiplier", "dp_clip_count_stddev"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.dp_clipping is not None:
            _choice("dp_clipping", self.dp_clipping, ("fixed", "adaptive"))
        if not 0 < self.dp_target_quantile < 1:
            raise ConfigError("dp_target_quantile must be in (0, 1), got "
                              f"{self.dp_target_quantile}")
        if not (self.dp_clip_lr > 0 and math.isfinite(self.dp_clip_lr)):
            raise ConfigError(f"dp_clip_lr must be a positive number, got {self.dp_clip_lr}")
        if not self.dp_enabled:
            for name in ("dp_population", "dp_clip_count_stddev"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} has no effect without dp_epsilon or "
                                      "dp_noise_multiplier (differential privacy is off)")
            return
        why = "differential privacy"
        if self.mode == "async":
            raise ConfigError(
                f"{why} is implemented for sync rounds only: FedBuff's buffers mix updates "
                "of several model versions with staleness weights, and a device may count in "
                "several of them, so the per-round sensitivity the accountant charges does "
                "not hold (use mode = sync)")
        if self.robust != "mean":
            raise ConfigError(
                f"{why} cannot be combined with robust = {self.robust}: the noise is "
                "calibrated to the sum of clipped updates, where one device moves the result "
                f"by at most clip_norm; {self.robust} selects or ranks updates by the others' "
                "values, so one device can change the output by far more (use robust = mean; "
                "clipping already bounds every device's influence)")
        if self.selection in ("oort", "tiered"):
            raise ConfigError(
                f"{why} cannot be combined with selection = {self.selection}: it chooses "
                "devices by the training loss they report, which is not noised, so who "
                "trains would reveal what the noise hides (use random, or deadline)")
        if self.federated_eval:
            raise ConfigError(
                f"{why} cannot be combined with federated_eval: devices' evaluation results "
                "are recorded without noise")
        if self.dp_population is not None:
            if self.dp_population < self.selected_per_round:
                raise ConfigError(
                    f"dp_population ({self.dp_population}) is below the devices asked per "
                    f"round ({self.selected_per_round})")
            if self.dp_delta >= 1.0 / self.dp_population:
                raise ConfigError(
                    f"dp_delta ({self.dp_delta:g}) must be below 1 / dp_population "
                    f"({1.0 / self.dp_population:.3g}): a larger delta allows releasing one "
                    "device's data outright")
        self.privacy_plan()

    # -- derived values

    @property
    def dp_enabled(self) -> bool:
        """Central differential privacy is on (``dp_epsilon`` or ``dp_noise_multiplier``)."""
        return self.dp_epsilon is not None or self.dp_noise_multiplier is not None

    @property
    def screen_multiple(self) -> float | None:
        """The norm screen's multiple; off under DP, where clipping bounds every update
        and a refusal that depends on the other devices' norms would break the bound."""
        return None if self.dp_enabled else self.norm_median_multiple

    def privacy_plan(self) -> PrivacyPlan | None:
        """The DP plan (noise multiplier, sampling rate, clip) or None when DP is off."""
        if not self.dp_enabled:
            return None
        if self.secure_aggregation:  # distributed DP: the devices add Skellam noise
            return make_plan(
                epsilon=self.dp_epsilon, delta=self.dp_delta,
                noise_multiplier=self.dp_noise_multiplier, rounds=self.rounds,
                asked=self.selected_per_round, population=self.dp_population,
                selection=self.selection, clipping=self.dp_clipping or "fixed",
                clip_norm=self.clip_norm, target_quantile=self.dp_target_quantile,
                clip_lr=self.dp_clip_lr, count_stddev=self.dp_clip_count_stddev,
                distributed=(max(3, self.effective_quorum), self.secure_max_devices))
        return make_plan(
            epsilon=self.dp_epsilon, delta=self.dp_delta,
            noise_multiplier=self.dp_noise_multiplier, rounds=self.rounds,
            asked=self.selected_per_round, population=self.dp_population,
            selection=self.selection, clipping=self.dp_clipping or "adaptive",
            clip_norm=self.clip_norm,
            target_quantile=self.dp_target_quantile, clip_lr=self.dp_clip_lr,
            count_stddev=self.dp_clip_count_stddev)

    def broadcasts_model(self, model_bytes: int) -> bool:
        """Each model version is published on ``broadcast/model`` (``model_push``; its
        default depends on the mode and on ``model_bytes``, a version's size as sent)."""
        if self.model_push is not None:
            return self.model_push == "broadcast"
        return self.mode == "sync" or model_bytes > ON_REQUEST_MAX_BYTES

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


AGGREGATOR = Section("aggregator", AggregatorConnection, AggregatorConfig,
                     title="fleetlearn aggregator")
"""The ``[aggregator]`` section: every field of both classes is a setting."""


def load_config(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AggregatorConfig:
    """``AggregatorConfig`` from ``overrides`` (flags: setting name -> value, None: not
    given) > the environment (``env``, default ``os.environ``) > the TOML file ``path``
    (else ``$FLEETLEARN_CONFIG``: an ``[aggregator]`` table, or an older file with the
    settings at the top level) > defaults. Unknown keys raise ConfigError."""
    flags = {k: v for k, v in overrides.items() if v is not None}
    for name in flags:
        if AGGREGATOR.spec(name).owner is not AggregatorConfig:
            raise ConfigError(f"{name} is a broker setting, not one of AggregatorConfig")
    resolved = AGGREGATOR.resolve(flags=flags, env=env, config_file=path)
    config: AggregatorConfig = resolved.build(AggregatorConfig)
    return config
