"""fleetlearn's public Python API: ``import fleetlearn``.

Everything a program that embeds fleetlearn needs is a name here; the packages'
private modules are not an API. The names load their package on first use, so
``from fleetlearn import Agent`` on a device never imports the cloud side (and needs
no ``onnx``), and ``import fleetlearn`` alone costs nothing.

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
        "SyncRounds",
        "FedBuff", "Admit", "Reply", "Answer", "ModelState", "RoundAggregate",
        "Contribution", "IngestPipeline", "IngestStage", "UpdateItem", "Rejection",
        "SelectionPolicy", "BasePolicy", "Candidate", "DeviceHistory", "FleetHistory",
        "RoundMetrics",
        "Event", "DeviceOnline", "DeviceOffline", "UpdateAccepted", "UpdateRefused",
        "RoundOpened", "RoundEnded", "ModelReleased", "Status",
        "build_artifacts", "build_reference_model",
        "AggregatorError", "ModelBuildError", "UpdateRejected", "StoreError", "SchemaTooNew",
        "CheckpointCorrupt", "PrivacyBudgetExhausted",
    ),
    "edge_runtime": (
        "Agent", "AgentSettings", "AgentConfig", "Trainer", "TrainResult", "open_trainer",
        "AgentError", "TrainingBackendMissing", "ArtifactError", "DataError",
        "ModelVersionError", "StateError", "DiskFull", "HookError", "IllegalTransition",
        "AgentHooks", "LocalTraining", "train_locally",
    ),
    "fleetlearn._simulate": ("simulate", "SimConfig", "SimResult"),
    "broker_bridge": (
        "Channel", "MqttTransport", "MemoryBroker", "MemoryTransport",
        "WireError", "EnvelopeError", "ChunkError", "CodecError", "ProtocolError",
        "BundleError", "TransportError", "BrokerUnavailable", "BrokerRefused",
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
    "AgentSettings",
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
    "DataError",
    "DeviceOffline",
    "DeviceOnline",
    "DeviceProfile",
    "DeviceHistory",
    "DiskFull",
    "EnvelopeError",
    "Event",
    "FedBuff",
    "FleetHistory",
    "FleetlearnError",
    "HookError",
    "IllegalTransition",
    "AgentHooks",
    "LocalTraining",
    "train_locally",
    "IngestPipeline",
    "IngestStage",
    "MemoryBroker",
    "MemoryTransport",
    "ModelBuildError",
    "ModelReleased",
    "ModelState",
    "ModelVersionError",
    "MqttTransport",
    "ProfileError",
    "ProtocolError",
    "Rejection",
    "Reply",
    "RoundAggregate",
    "RoundEnded",
    "RoundMetrics",
    "RoundOpened",
    "SchemaTooNew",
    "SelectionPolicy",
    "SimConfig",
    "SimResult",
    "StateError",
    "Status",
    "StoreError",
    "Strategy",
    "StrategyBase",
    "StrategyContext",
    "SyncRounds",
    "TrainResult",
    "Trainer",
    "TrainingBackendMissing",
    "TransportError",
    "UpdateAccepted",
    "UpdateItem",
    "UpdateRefused",
    "UpdateRejected",
    "PrivacyBudgetExhausted",
    "WireError",
    "build_artifacts",
    "build_reference_model",
    "get_profile",
    "open_trainer",
    "simulate",
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
        EnvelopeError,
        MemoryBroker,
        MemoryTransport,
        MqttTransport,
        ProtocolError,
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
        DeviceHistory,
        DeviceOffline,
        DeviceOnline,
        Event,
        FedBuff,
        FleetHistory,
        IngestPipeline,
        IngestStage,
        ModelBuildError,
        ModelReleased,
        ModelState,
        PrivacyBudgetExhausted,
        Rejection,
        Reply,
        RoundAggregate,
        RoundEnded,
        RoundMetrics,
        RoundOpened,
        SchemaTooNew,
        SelectionPolicy,
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
        DiskFull,
        HookError,
        IllegalTransition,
        LocalTraining,
        ModelVersionError,
        StateError,
        Trainer,
        TrainingBackendMissing,
        TrainResult,
        open_trainer,
        train_locally,
    )
    from fleetlearn._simulate import SimConfig, SimResult, simulate
