"""The cloud aggregator: registry, selection, rounds, aggregation, persistence.

Where things live:

- ``_errors``: ``AggregatorError``, ``ModelBuildError``, ``UpdateRejected``.
- ``_models``: ``build_reference_model``, ``REFERENCE_MODELS`` (mlp, cnn, mlp-xl; onnx.helper).
- ``_artifacts``: ``build_artifacts``, ``ArtifactInfo``, ``read_manifest``, ``initial_parameters``.
- ``_selection``: ``Candidate``, ``SelectionPolicy``, the policies, ``make_policy``.
- ``_aggregation``: ``StreamingAccumulator``, ``validate_update``, ``fedavg``, ``FedBuffBuffer``.
- ``_server_opt``: ``make_server_optimizer`` (fedavg, fedavgm, fedadagrad, fedadam, fedyogi).
- ``_robust``: ``RobustBuffer``/``RobustConfig``, clipping, median, trimmed mean, (multi-)Krum.
- ``_store``: ``Store`` (SQLite: rounds, devices, update keys, checkpoints), ``StoreError``.
- ``_config``: ``AggregatorConfig`` (frozen, parsed once), ``load_config`` (TOML + flags).
- ``_registry``: ``FleetRegistry``, ``DeviceInfo`` (presence, hello, participation history).
- ``_rounds``: ``SyncRound``, ``AsyncScheduler``, ``RoundSpec``, ``WallClock``/``ManualClock``.
- ``_service``: ``Aggregator`` (the service on a ``Channel``).
- ``_startup``: ``prepare_artifacts``, ``ModelArtifacts``, the run record and the checks
  a start makes (model identity, orphaned checkpoints, eval data).
- ``_screen``: ``NormScreen``, ``WeightBound`` (the default defences against one device).
- ``_serving``: ``ModelServer`` (models named by run and hash, artifacts, request limits).
- ``_status``: the status lines that say what the aggregator waits for.
- ``_evaluate``: ``ServerEvaluator``, ``federated_eval``, ``load_eval_data``.
- ``_metrics``: ``RoundMetrics``, ``MetricsLog`` (JSON lines), ``Counters``, ``MetricsServer``.
"""

from cloud_aggregator._aggregation import (
    AccumulatorSnapshot,
    AsyncOutcome,
    FedBuffBuffer,
    Reason,
    StalenessPolicy,
    StreamingAccumulator,
    UpdateRules,
    Verdict,
    check_staleness,
    fedavg,
    fedbuff_aggregate,
    staleness_discount,
    validate_update,
)
from cloud_aggregator._artifacts import (
    ArtifactInfo,
    build_artifacts,
    initial_parameters,
    read_manifest,
)
from cloud_aggregator._config import AggregatorConfig, load_config
from cloud_aggregator._errors import AggregatorError, ModelBuildError, UpdateRejected
from cloud_aggregator._evaluate import EvalResult, ServerEvaluator, federated_eval, load_eval_data
from cloud_aggregator._metrics import Counters, MetricsLog, MetricsServer, RoundMetrics
from cloud_aggregator._models import REFERENCE_MODELS, build_reference_model
from cloud_aggregator._registry import DeviceInfo, FleetRegistry
from cloud_aggregator._robust import (
    RobustBuffer,
    RobustConfig,
    clip_by_norm,
    coordinate_median,
    krum,
    multi_krum,
    robust_aggregate,
    robust_memory_bytes,
    trimmed_mean,
)
from cloud_aggregator._rounds import (
    AsyncScheduler,
    Clock,
    ManualClock,
    RoundOutcome,
    RoundSpec,
    SyncRound,
    WallClock,
)
from cloud_aggregator._screen import NormScreen, WeightBound
from cloud_aggregator._selection import (
    POLICIES,
    Candidate,
    DeadlinePolicy,
    OortPolicy,
    RandomPolicy,
    SelectionPolicy,
    TieredPolicy,
    local_steps,
    local_steps_for,
    make_policy,
)
from cloud_aggregator._server_opt import SERVER_OPTIMIZERS, ServerOptimizer, make_server_optimizer
from cloud_aggregator._service import Aggregator
from cloud_aggregator._startup import ModelArtifacts, prepare_artifacts
from cloud_aggregator._store import (
    CheckpointCorrupt,
    CheckpointRecord,
    DeviceRecord,
    Metric,
    RoundRecord,
    SchemaTooNew,
    Store,
    StoredUpdate,
    StoreError,
    UpdateKey,
)

__all__ = [
    "POLICIES",
    "REFERENCE_MODELS",
    "SERVER_OPTIMIZERS",
    "AccumulatorSnapshot",
    "Aggregator",
    "AggregatorConfig",
    "AggregatorError",
    "ArtifactInfo",
    "AsyncOutcome",
    "AsyncScheduler",
    "Candidate",
    "CheckpointCorrupt",
    "CheckpointRecord",
    "Clock",
    "Counters",
    "DeadlinePolicy",
    "DeviceInfo",
    "DeviceRecord",
    "EvalResult",
    "FedBuffBuffer",
    "FleetRegistry",
    "ManualClock",
    "Metric",
    "MetricsLog",
    "MetricsServer",
    "ModelArtifacts",
    "NormScreen",
    "ModelBuildError",
    "OortPolicy",
    "RandomPolicy",
    "Reason",
    "RobustBuffer",
    "RobustConfig",
    "RoundMetrics",
    "RoundOutcome",
    "RoundRecord",
    "RoundSpec",
    "SchemaTooNew",
    "SelectionPolicy",
    "ServerEvaluator",
    "ServerOptimizer",
    "StalenessPolicy",
    "Store",
    "StoreError",
    "StoredUpdate",
    "StreamingAccumulator",
    "SyncRound",
    "TieredPolicy",
    "UpdateKey",
    "UpdateRejected",
    "UpdateRules",
    "WeightBound",
    "Verdict",
    "WallClock",
    "build_artifacts",
    "build_reference_model",
    "check_staleness",
    "clip_by_norm",
    "coordinate_median",
    "fedavg",
    "fedbuff_aggregate",
    "federated_eval",
    "initial_parameters",
    "krum",
    "load_config",
    "load_eval_data",
    "local_steps",
    "local_steps_for",
    "make_policy",
    "make_server_optimizer",
    "multi_krum",
    "prepare_artifacts",
    "read_manifest",
    "robust_aggregate",
    "robust_memory_bytes",
    "staleness_discount",
    "trimmed_mean",
    "validate_update",
]
