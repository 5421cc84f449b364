"""The cloud aggregator: registry, selection, rounds, aggregation, persistence.

The front door exports what a program that runs or extends the aggregator uses (the
same names ``fleetlearn`` re-exports, plus the built-in policies, clocks and model
building); everything else is private to the package, listed here by module.

Where things live:

- ``_errors``: ``AggregatorError``, ``ModelBuildError``, ``UpdateRejected``,
  ``SecAggAbandoned``, ``PrivacyBudgetExhausted``.
- ``_secagg``: ``SecAggRound`` (the aggregator's side of a secure-aggregation round:
  it learns only the sum).
- ``_privacy``: ``CentralDP`` (DP-FedAvg: clipping, fixed denominator, Gaussian noise,
  adaptive clipping, the RDP accountant; also distributed DP's), ``PrivacyPlan``,
  ``make_plan``; ``_skellam_dp``: distributed DP under secure aggregation (the Skellam
  plan: scale, norm bound, per-device variance; its RDP accountant).
- ``_models``: ``build_reference_model``, ``REFERENCE_MODELS`` (mlp, cnn, mlp-xl; onnx.helper).
- ``_artifacts``: ``build_artifacts``, ``ArtifactInfo``, ``read_manifest``, ``initial_parameters``.
- ``_selection``: ``Candidate``, ``SelectionPolicy``, the policies, ``make_policy``.
- ``_aggregation``: ``StreamingAccumulator``, ``validate_update``, ``fedavg``, ``FedBuffBuffer``.
- ``_server_opt``: ``make_server_optimizer`` (fedavg, fedavgm, fedadagrad, fedadam, fedyogi).
- ``_robust``: ``RobustBuffer``/``RobustConfig``, clipping, median, trimmed mean, (multi-)Krum.
- ``_store``: ``Store`` (SQLite: rounds, devices, update keys, checkpoints), ``StoreError``;
  ``_store_keys``: the keys devices were first seen with (trust on first use).
- ``_ledger``: the verifiable training ledger (entries, the aggregator's signing key);
  ``_store_ledger``: its tables; ``_ledger_writer``: what the runtime appends and
  publishes; ``_ledger_verify``: ``verify_ledger``, ``LedgerReport`` (``fleetlearn
  ledger verify``); ``_ledger_cli``: ``fleetlearn ledger verify|show|key``.
- ``_config``: ``AggregatorConfig`` (frozen, parsed once), ``load_config`` (flags >
  environment > TOML > defaults), ``AGGREGATOR`` (the ``[aggregator]`` settings section);
  ``_connect``: ``AggregatorConnection`` (the broker settings of ``fleetlearn aggregator``).
- ``_registry``: ``FleetRegistry``, ``DeviceInfo`` (presence, hello, participation history).
- ``_rounds``: ``SyncRound``, ``AsyncScheduler``, ``RoundSpec``, ``WallClock``/``ManualClock``.
- ``_runtime``: ``Aggregator`` (the runtime on a ``Channel``: wires the parts below);
  ``_desk``: ``DeviceDesk`` (what devices send, what they are told); ``_learned``: the
  state learned from the fleet, saved with each model; ``_answers``: the ack state
  machine's memory (``AttemptLedger``, ``Answer``).
- ``_strategy``: ``Strategy`` (interface), ``StrategyContext``, ``Admit``/``Reply``,
  ``ModelState``; ``_sync``: ``SyncRounds``; ``_fedbuff``: ``FedBuff``; ``_edge_rounds``:
  ``EdgeRounds``, ``ParentJob`` (an edge tier's rounds, opened for its parent's task).
- ``_ingest``: ``IngestPipeline``, ``IngestStage``, ``UpdateItem``, ``Rejection``, the
  default stages, ``Journal`` (group commit); ``_aggregate``: ``RoundAggregate``,
  ``Contribution``; ``_identity``: ``KeyBook`` (each device's key: the enrolment, then
  trust on first use) and ``VerifySignature``, the first ingest stage (``verify``);
  ``_contribution``: ``ContributionRecord`` (each device's weight share, consensus
  cosine and marginal in an aggregate), the sketches and the reputation score.
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
from cloud_aggregator._answers import Answer
from cloud_aggregator._artifacts import (
    ArtifactInfo,
    build_artifacts,
    initial_parameters,
    read_manifest,
)
from cloud_aggregator._config import AggregatorConfig, load_config
from cloud_aggregator._contribution import ContributionRecord
from cloud_aggregator._edge_rounds import EdgeRounds, ParentJob
from cloud_aggregator._errors import (
    AggregatorError,
    LedgerError,
    LedgerMismatch,
    ModelBuildError,
    PrivacyBudgetExhausted,
    SecAggAbandoned,
    StateDirInUse,
    UpdateRejected,
)
from cloud_aggregator._evaluate import ServerEvaluator
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
from cloud_aggregator._history import DeviceHistory, FleetHistory
from cloud_aggregator._ingest import IngestPipeline, IngestStage, Rejection, UpdateItem
from cloud_aggregator._ledger_verify import LedgerReport, verify_ledger
from cloud_aggregator._metrics import RoundMetrics
from cloud_aggregator._models import REFERENCE_MODELS, build_reference_model
from cloud_aggregator._privacy import CentralDP, PrivacyPlan
from cloud_aggregator._robust import RobustConfig
from cloud_aggregator._rounds import Clock, ManualClock, WallClock
from cloud_aggregator._runtime import Aggregator
from cloud_aggregator._selection import (
    POLICIES,
    BasePolicy,
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
from cloud_aggregator._store import CheckpointCorrupt, SchemaTooNew, Store, StoreError
from cloud_aggregator._strategy import (
    Admit,
    ModelState,
    Reply,
    Strategy,
    StrategyBase,
    StrategyContext,
)
from cloud_aggregator._sync import SyncRounds

__all__ = [
    # running
    "Aggregator",
    "AggregatorConfig",
    "load_config",
    "Clock",
    "ManualClock",
    "WallClock",
    "Store",
    # strategies and the ingest pipeline
    "Strategy",
    "StrategyContext",
    "StrategyBase",
    "SyncRounds",
    "EdgeRounds",
    "ParentJob",
    "FedBuff",
    "Admit",
    "Reply",
    "Answer",
    "ModelState",
    "RoundAggregate",
    "Contribution",
    "RobustConfig",
    "IngestPipeline",
    "IngestStage",
    "UpdateItem",
    "Rejection",
    "ServerOptimizer",
    "SERVER_OPTIMIZERS",
    "make_server_optimizer",
    "ServerEvaluator",
    # selection
    "SelectionPolicy",
    "BasePolicy",
    "Candidate",
    "ContributionRecord",
    "DeviceHistory",
    "FleetHistory",
    "RandomPolicy",
    "DeadlinePolicy",
    "TieredPolicy",
    "OortPolicy",
    "POLICIES",
    "make_policy",
    "local_steps",
    "local_steps_for",
    # differential privacy
    "CentralDP",
    "PrivacyPlan",
    # events and metrics
    "Event",
    "DeviceOnline",
    "DeviceOffline",
    "UpdateAccepted",
    "UpdateRefused",
    "RoundOpened",
    "RoundEnded",
    "ModelReleased",
    "Status",
    "RoundMetrics",
    # models and artifacts
    "REFERENCE_MODELS",
    "build_reference_model",
    "build_artifacts",
    "ArtifactInfo",
    "read_manifest",
    "initial_parameters",
    # errors
    "AggregatorError",
    "ModelBuildError",
    "UpdateRejected",
    "PrivacyBudgetExhausted",
    "StoreError",
    "SchemaTooNew",
    "SecAggAbandoned",
    "CheckpointCorrupt",
    "StateDirInUse",
    "LedgerError",
    "LedgerMismatch",
    # the training ledger
    "verify_ledger",
    "LedgerReport",
]

# The [aggregator] settings section (issue 13, one configuration system).
from cloud_aggregator._config import AGGREGATOR
from cloud_aggregator._connect import AggregatorConnection

__all__ += ["AGGREGATOR", "AggregatorConnection"]
