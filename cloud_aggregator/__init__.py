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
- ``_config``: ``AggregatorConfig`` (frozen, parsed once), ``load_config`` (flags >
  environment > TOML > defaults), ``AGGREGATOR`` (the ``[aggregator]`` settings section);
  ``_connect``: ``AggregatorConnection`` (the broker settings of ``fleetlearn aggregator``).
- ``_registry``: ``FleetRegistry``, ``DeviceInfo`` (presence, hello, participation history).
- ``_rounds``: ``SyncRound``, ``AsyncScheduler``, ``RoundSpec``, ``WallClock``/``ManualClock``.
- ``_runtime``: ``Aggregator`` (the runtime on a ``Channel``: wires the parts below).
- ``_strategy``: ``Strategy`` (interface), ``StrategyContext``, ``Admit``/``Reply``,
  ``ModelState``; ``_sync``: ``SyncRounds``; ``_fedbuff``: ``FedBuff``.
- ``_ingest``: ``IngestPipeline``, ``IngestStage``, ``UpdateItem``, ``Rejection``, the
  default stages, ``Journal`` (group commit); ``_aggregate``: ``RoundAggregate``,
  ``Contribution``.
- ``_planner``: ``WorkPlanner`` (cost model, adaptive local work, tasks);
  ``_recorder``: ``RoundRecorder`` (metrics, evaluation); ``_events``: the event types.
- ``_startup``: ``prepare_artifacts``, ``ModelArtifacts``, the run record and the checks
  a start makes (model identity, orphaned checkpoints, eval data).
- ``_screen``: ``NormScreen``, ``WeightBound`` (the default defences against one device).
- ``_serving``: ``ModelServer`` (models named by run and hash, artifacts, request limits).
- ``_status``: the status lines that say what the aggregator waits for.
- ``_evaluate``: ``ServerEvaluator``, ``federated_eval``, ``load_eval_data``.
- ``_metrics``: ``RoundMetrics``, ``MetricsLog`` (JSON lines), ``Counters``, ``MetricsServer``.
"""

from cloud_aggregator._aggregate import Contribution, RoundAggregate
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
from cloud_aggregator._events import (
    DeviceOffline,
    DeviceOnline,
    Event,
    ModelReleased,
    RoundEnded,
    RoundOpened,
    Status,
    UpdateAccepted,
    UpdateRefused,
)
from cloud_aggregator._fedbuff import FedBuff
from cloud_aggregator._ingest import IngestPipeline, IngestStage, Rejection, UpdateItem
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
from cloud_aggregator._runtime import Aggregator
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
from cloud_aggregator._strategy import Admit, ModelState, Reply, Strategy, StrategyContext
from cloud_aggregator._sync import SyncRounds

__all__ = [
    "AccumulatorSnapshot",
    "Admit",
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
    "Contribution",
    "Counters",
    "DeadlinePolicy",
    "DeviceInfo",
    "DeviceOffline",
    "DeviceOnline",
    "DeviceRecord",
    "EvalResult",
    "Event",
    "FedBuff",
    "FedBuffBuffer",
    "FleetRegistry",
    "IngestPipeline",
    "IngestStage",
    "ManualClock",
    "Metric",
    "MetricsLog",
    "MetricsServer",
    "ModelArtifacts",
    "ModelBuildError",
    "ModelReleased",
    "ModelState",
    "NormScreen",
    "OortPolicy",
    "POLICIES",
    "REFERENCE_MODELS",
    "RandomPolicy",
    "Reason",
    "Rejection",
    "Reply",
    "RobustBuffer",
    "RobustConfig",
    "RoundAggregate",
    "RoundEnded",
    "RoundMetrics",
    "RoundOpened",
    "RoundOutcome",
    "RoundRecord",
    "RoundSpec",
    "SERVER_OPTIMIZERS",
    "SchemaTooNew",
    "SelectionPolicy",
    "ServerEvaluator",
    "ServerOptimizer",
    "StalenessPolicy",
    "Status",
    "Store",
    "StoreError",
    "StoredUpdate",
    "Strategy",
    "StrategyContext",
    "StreamingAccumulator",
    "SyncRound",
    "SyncRounds",
    "TieredPolicy",
    "UpdateAccepted",
    "UpdateItem",
    "UpdateKey",
    "UpdateRefused",
    "UpdateRejected",
    "UpdateRules",
    "Verdict",
    "WallClock",
    "WeightBound",
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

# The [aggregator] settings section (issue 13, one configuration system).
from cloud_aggregator._config import AGGREGATOR
from cloud_aggregator._connect import AggregatorConnection

__all__ += ["AGGREGATOR", "AggregatorConnection"]
