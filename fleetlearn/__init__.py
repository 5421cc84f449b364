"""fleetlearn's public Python API: ``import fleetlearn``.

Everything a program that embeds fleetlearn needs is a name here; the packages'
private modules are not an API. The names load their package on first use, so
``from fleetlearn import Agent`` on a device never imports the cloud side (and needs
no ``onnx``), and ``import fleetlearn`` alone costs nothing.

- Edge tiers: ``EdgeAggregator`` (an aggregator to its children, a device to its
  parent), ``FailoverAgent`` and ``ParentLink`` (candidate parents), ``EdgeRounds``;
  a model per tier (agglomerative): ``TierModels``, ``TierModel``, ``TierLink``
  (``EdgeAggregator(tier=...)``), ``DistillSettings``, ``bridge_inputs``, and the
  cloud's ``AgglomerativeRounds`` strategy.
- Running: ``Aggregator`` (``Aggregator.connect(config, broker=...)``, ``start``,
  ``run``, ``subscribe``), ``AggregatorConfig``; ``Agent``, ``AgentSettings``,
  ``AgentConfig``; ``simulate`` with ``SimConfig`` → ``SimResult``.
- Parts of your own: a ``Strategy`` (subclass ``SyncRounds`` or ``FedBuff``, or write
  one over ``StrategyContext``), a selection policy (subclass ``BasePolicy``, write
  ``choose``), an ingest stage (``IngestStage`` over ``UpdateItem``, inserted into
  ``Aggregator.pipeline``), a ``Trainer``.
- Events (``Aggregator.subscribe``): ``DeviceOnline``, ``DeviceOffline``,
  ``UpdateAccepted``, ``UpdateRefused``, ``RoundOpened``, ``RoundEnded``,
  ``ModelReleased``, ``Status``.
- Device identity: ``DeviceKey`` (a device's Ed25519 key), ``Enrolment`` (each device's
  public key, for the aggregator).
- Errors: ``FleetlearnError`` and its tree (``device_profiles._errors`` documents it).

The ``fleetlearn`` command lives in ``fleetlearn.cli``; each package registers its
own subcommands there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SOURCES: dict[str, tuple[str, ...]] = {
    "cloud_aggregator": (
        "Aggregator", "AggregatorConfig", "Strategy", "StrategyBase", "StrategyContext",
        "SyncRounds", "EdgeRounds", "ParentJob",
        "FedBuff", "Admit", "Reply", "Answer", "ModelState", "RoundAggregate",
        "Contribution", "IngestPipeline", "IngestStage", "UpdateItem", "Rejection",
        "SelectionPolicy", "BasePolicy", "Candidate", "DeviceHistory", "FleetHistory",
        "RoundMetrics", "ContributionRecord",
        "Event", "DeviceOnline", "DeviceOffline", "UpdateAccepted", "UpdateRefused",
        "RoundOpened", "RoundEnded", "ModelReleased", "Status",
        "build_artifacts", "build_reference_model",
        "AggregatorError", "ModelBuildError", "UpdateRejected", "SecAggAbandoned",
        "StoreError", "SchemaTooNew", "PrivacyBudgetExhausted",
        "CheckpointCorrupt", "StateDirInUse", "LedgerError", "LedgerMismatch",
        "verify_ledger",
    ),
    "edge_runtime": (
        "Agent", "AgentSettings", "AgentConfig", "Trainer", "TrainResult", "open_trainer",
        "AgentError", "TrainingBackendMissing", "ArtifactError", "DataError",
        "ModelVersionError", "StateError", "StateInUse", "DiskFull", "HookError",
        "IllegalTransition",
        "AgentHooks", "LocalTraining", "train_locally", "DeviceKey", "DeviceKeyError",
        "FailoverAgent", "ParentLink",
    ),
    "fleetlearn._edge": ("EdgeAggregator",),
    "fleetlearn._agglo": ("TierModels", "TierModel", "TierLink", "DistillSettings",
                          "bridge_inputs"),
    "fleetlearn._agglo_cloud": ("AgglomerativeRounds",),
    "fleetlearn._simulate": ("simulate", "SimConfig", "SimResult"),
    "broker_bridge": (
        "Channel", "MqttTransport", "MemoryBroker", "MemoryTransport",
        "WireError", "EnvelopeError", "ChunkError", "CodecError", "ProtocolError",
        "BundleError", "TransportError", "BrokerUnavailable", "BrokerRefused",
        "SignatureError", "Enrolment", "EnrolmentError", "SecAggRejected",
    ),
    "device_profiles": (
        "DeviceProfile", "get_profile", "FleetlearnError", "ConfigError", "ProfileError",
    ),
}
_WHERE = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [
    "Admit",
    "Agent",
    "AgentConfig",
    "AgentError",
    "AgentHooks",
    "AgentSettings",
    "AgglomerativeRounds",
    "Aggregator",
    "AggregatorConfig",
    "AggregatorError",
    "Answer",
    "ArtifactError",
    "BasePolicy",
    "BrokerRefused",
    "BrokerUnavailable",
    "BundleError",
    "Candidate",
    "Channel",
    "CheckpointCorrupt",
    "ChunkError",
    "CodecError",
    "ConfigError",
    "Contribution",
    "ContributionRecord",
    "DataError",
    "DeviceHistory",
    "DeviceKey",
    "DeviceKeyError",
    "DeviceOffline",
    "DeviceOnline",
    "DeviceProfile",
    "DiskFull",
    "DistillSettings",
    "EdgeAggregator",
    "EdgeRounds",
    "Enrolment",
    "EnrolmentError",
    "EnvelopeError",
    "Event",
    "FailoverAgent",
    "FedBuff",
    "FleetHistory",
    "FleetlearnError",
    "HookError",
    "IllegalTransition",
    "IngestPipeline",
    "IngestStage",
    "LedgerError",
    "LedgerMismatch",
    "LocalTraining",
    "MemoryBroker",
    "MemoryTransport",
    "ModelBuildError",
    "ModelReleased",
    "ModelState",
    "ModelVersionError",
    "MqttTransport",
    "ParentJob",
    "ParentLink",
    "PrivacyBudgetExhausted",
    "ProfileError",
    "ProtocolError",
    "Rejection",
    "Reply",
    "RoundAggregate",
    "RoundEnded",
    "RoundMetrics",
    "RoundOpened",
    "SchemaTooNew",
    "SecAggAbandoned",
    "SecAggRejected",
    "SelectionPolicy",
    "SignatureError",
    "SimConfig",
    "SimResult",
    "StateDirInUse",
    "StateError",
    "StateInUse",
    "Status",
    "StoreError",
    "Strategy",
    "StrategyBase",
    "StrategyContext",
    "SyncRounds",
    "TierLink",
    "TierModel",
    "TierModels",
    "TrainResult",
    "Trainer",
    "TrainingBackendMissing",
    "TransportError",
    "UpdateAccepted",
    "UpdateItem",
    "UpdateRefused",
    "UpdateRejected",
    "WireError",
    "bridge_inputs",
    "build_artifacts",
    "build_reference_model",
    "get_profile",
    "open_trainer",
    "simulate",
    "train_locally",
    "verify_ledger",
]
"""Every name of the API; ``_SOURCES`` says which package defines it (a test checks
that the two agree and that each name resolves)."""


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fleetlearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what a type checker and an IDE see
    from broker_bridge import (
        BrokerRefused,
        BrokerUnavailable,
        BundleError,
        Channel,
        ChunkError,
        CodecError,
        Enrolment,
        EnrolmentError,
        EnvelopeError,
        MemoryBroker,
        MemoryTransport,
        MqttTransport,
        ProtocolError,
        SecAggRejected,
        SignatureError,
        TransportError,
        WireError,
    )
    from cloud_aggregator import (
        Admit,
        Aggregator,
        AggregatorConfig,
        AggregatorError,
        Answer,
        BasePolicy,
        Candidate,
        CheckpointCorrupt,
        Contribution,
        ContributionRecord,
        DeviceHistory,
        DeviceOffline,
        DeviceOnline,
        EdgeRounds,
        Event,
        FedBuff,
        FleetHistory,
        IngestPipeline,
        IngestStage,
        LedgerError,
        LedgerMismatch,
        ModelBuildError,
        ModelReleased,
        ModelState,
        ParentJob,
        PrivacyBudgetExhausted,
        Rejection,
        Reply,
        RoundAggregate,
        RoundEnded,
        RoundMetrics,
        RoundOpened,
        SchemaTooNew,
        SecAggAbandoned,
        SelectionPolicy,
        StateDirInUse,
        Status,
        StoreError,
        Strategy,
        StrategyBase,
        StrategyContext,
        SyncRounds,
        UpdateAccepted,
        UpdateItem,
        UpdateRefused,
        UpdateRejected,
        build_artifacts,
        build_reference_model,
        verify_ledger,
    )
    from device_profiles import (
        ConfigError,
        DeviceProfile,
        FleetlearnError,
        ProfileError,
        get_profile,
    )
    from edge_runtime import (
        Agent,
        AgentConfig,
        AgentError,
        AgentHooks,
        AgentSettings,
        ArtifactError,
        DataError,
        DeviceKey,
        DeviceKeyError,
        DiskFull,
        FailoverAgent,
        HookError,
        IllegalTransition,
        LocalTraining,
        ModelVersionError,
        ParentLink,
        StateError,
        StateInUse,
        Trainer,
        TrainingBackendMissing,
        TrainResult,
        open_trainer,
        train_locally,
    )
    from fleetlearn._agglo import (
        DistillSettings,
        TierLink,
        TierModel,
        TierModels,
        bridge_inputs,
    )
    from fleetlearn._agglo_cloud import AgglomerativeRounds
    from fleetlearn._edge import EdgeAggregator
    from fleetlearn._simulate import SimConfig, SimResult, simulate
