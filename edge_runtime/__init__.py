"""The device agent: eligibility, tasks, ONNX Runtime training, updates, local state.

Where things live:

- ``_errors``: ``AgentError``, ``TrainingBackendMissing``, ``ArtifactError``, ``DataError``.
- ``_ort``: ``import_onnxruntime``, ``load_training_api`` (ORT's training API without torch).
- ``_training``: ``Trainer`` (the backend protocol), ``open_trainer``, ``TrainResult``,
  ``EvalResult``, ``batch_schedule``.
- ``_portable``: ``PortableTrainer`` (compiled standard-op graphs on plain onnxruntime).
- ``_ort_training``: ``OrtTrainingTrainer`` (the onnxruntime-training backend).
- ``_manifest``: reading and checking ``artifacts.json`` (both formats).
- ``_data``: ``DataSource``, ``load_data``, ``load_npz``, ``load_csv``, ``load_callable``,
  ``validate_for_model``.
- ``_datasets``: ``Mnist1D``, ``load_mnist1d``, ``partition_iid``, ``partition_dirichlet``,
  ``partition_shards``.
- ``_agent``: ``Agent``, ``AgentSettings``, ``AgentStats``, ``LocalData``, ``TrainerPool``,
  ``TrainerProvider``, ``Emulation``, ``ModelVersionError``, ``make_agent_transport``.
- ``_state``: ``AgentState``, ``TaskStatus``, ``TaskRecord``, ``Submission``, ``StateError``,
  ``DiskFull`` (crash-safe state; the commit order is in its docstring).
- ``_artifact_cache``: ``ArtifactCache`` (verified, content-addressed), ``ModelCache``.
- ``_eligibility``: ``DeviceStatus``, ``EligibilityRules``, ``SystemProbe``, ``check_eligibility``.
- ``_config``: ``AgentConfig``, ``load_config`` (flags > environment > TOML > defaults),
  ``AgentOptions`` and ``AGENT`` (the ``[agent]`` settings section).
"""

from edge_runtime._agent import (
    Agent,
    AgentSettings,
    AgentStats,
    Emulation,
    LocalData,
    ModelVersionError,
    TrainerPool,
    TrainerProvider,
    make_agent_transport,
)
from edge_runtime._artifact_cache import ArtifactCache, ModelCache
from edge_runtime._config import AgentConfig, load_config
from edge_runtime._data import (
    DataSource,
    load_callable,
    load_csv,
    load_data,
    load_npz,
    validate_for_model,
)
from edge_runtime._datasets import (
    Mnist1D,
    load_mnist1d,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from edge_runtime._eligibility import DeviceStatus, EligibilityRules, SystemProbe, check_eligibility
from edge_runtime._errors import AgentError, ArtifactError, DataError, TrainingBackendMissing
from edge_runtime._ort import load_training_api
from edge_runtime._ort_training import OrtTrainingTrainer
from edge_runtime._portable import PortableTrainer
from edge_runtime._state import (
    AgentState,
    DiskFull,
    StateError,
    Submission,
    TaskRecord,
    TaskStatus,
)
from edge_runtime._training import EvalResult, Trainer, TrainResult, open_trainer

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "AgentSettings",
    "AgentState",
    "AgentStats",
    "ArtifactCache",
    "ArtifactError",
    "DataError",
    "DataSource",
    "DeviceStatus",
    "DiskFull",
    "EligibilityRules",
    "Emulation",
    "EvalResult",
    "LocalData",
    "Mnist1D",
    "ModelCache",
    "ModelVersionError",
    "OrtTrainingTrainer",
    "PortableTrainer",
    "StateError",
    "Submission",
    "SystemProbe",
    "TaskRecord",
    "TaskStatus",
    "TrainResult",
    "Trainer",
    "TrainerPool",
    "TrainerProvider",
    "TrainingBackendMissing",
    "check_eligibility",
    "load_callable",
    "load_config",
    "load_csv",
    "load_data",
    "load_mnist1d",
    "load_npz",
    "load_training_api",
    "make_agent_transport",
    "open_trainer",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "validate_for_model",
]

# The [agent] settings section (issue 13, one configuration system).
from edge_runtime._config import AGENT, AgentOptions

__all__ += ["AGENT", "AgentOptions"]
