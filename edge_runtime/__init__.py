"""The device agent: eligibility, tasks, ONNX Runtime training, updates, local state.

Where things live:

- ``_errors``: ``AgentError``, ``TrainingBackendMissing``, ``ArtifactError``, ``DataError``,
  ``ModelVersionError``, ``HookError``, ``IllegalTransition``.
- ``_ort``: ``import_onnxruntime``, ``load_training_api`` (ORT's training API without torch).
- ``_training``: ``Trainer`` (the backend protocol), ``open_trainer``, ``TrainResult``,
  ``EvalResult``, ``batch_schedule``.
- ``_portable``: ``PortableTrainer`` (compiled standard-op graphs on plain onnxruntime);
  ``_portable_manifest`` checks its manifest against its graphs at load.
- ``_ort_training``: ``OrtTrainingTrainer`` (the onnxruntime-training backend).
- ``_manifest``: reading and checking ``artifacts.json`` (both formats).
- ``_data``: ``LocalData``, ``DataSource``, ``load_data``, ``load_npz``, ``load_csv``,
  ``load_callable``, ``validate_for_model``.
- ``_datasets``: ``Mnist1D``, ``load_mnist1d``, ``partition_iid``, ``partition_dirichlet``,
  ``partition_shards``.
- ``_agent``: ``Agent`` (the protocol state machine wiring the parts below).
- ``_phase``: ``Phase`` (the agent's states and their legal moves).
- ``_hooks``: ``AgentHooks``, ``UpdateDraft`` (the hooks' order and contract).
- ``_identity``: ``DeviceKey``, ``DeviceKeyError``, ``state_key_path`` (the device's
  Ed25519 key in its state folder; every update is signed with it).
- ``_local_training``: ``LocalTraining`` (the replaceable training callable's type),
  ``TrainingBudget``, ``LocalResult``, ``train_locally`` (the default).
- ``_inbox`` (receiving, task dedupe), ``_fetch`` (artifacts and models), ``_outbox``
  (durable commit, re-sends until acked), ``_work`` (one task's steps): internal.
- ``_presence``: presence, hello and eligibility; ``make_agent_transport``.
- ``_failover``: ``FailoverAgent``, ``ParentLink`` (candidate parents; moving to another
  when the parent vanishes, with the residual kept and an unacknowledged update parked).
- ``_ledger_check``: ``LedgerCheck`` (the training ledger's inclusion proofs, checked
  against the pinned aggregator key; outcomes to ``AgentHooks.on_inclusion``).
- ``_trainer_pool``: ``TrainerPool``, ``TrainerProvider``.
- ``_emulation``: ``Emulation``.
- ``_settings``: ``AgentSettings``, ``AgentStats``.
- ``_state``: ``AgentState``, ``TaskStatus``, ``TaskRecord``, ``Submission``, ``CommitStep``,
  ``StateError``, ``DiskFull`` (crash-safe state; the commit order is in its docstring).
- ``_fleet``, ``_faults``: the simulator's fleet and the faults it injects through hooks.
- ``_artifact_cache``: ``ArtifactCache`` (verified, content-addressed), ``ModelCache``.
- ``_eligibility``: ``DeviceStatus``, ``EligibilityRules``, ``SystemProbe``, ``check_eligibility``.
- ``_config``: ``AgentConfig``, ``load_config`` (flags > environment > TOML > defaults),
  ``AgentOptions`` and ``AGENT`` (the ``[agent]`` settings section).
"""

from edge_runtime._agent import Agent
from edge_runtime._artifact_cache import ArtifactCache, ModelCache
from edge_runtime._config import AgentConfig, load_config
from edge_runtime._data import (
    DataSource,
    LocalData,
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
from edge_runtime._emulation import Emulation
from edge_runtime._errors import (
    AgentError,
    ArtifactError,
    DataError,
    HookError,
    IllegalTransition,
    ModelVersionError,
    TrainingBackendMissing,
)
from edge_runtime._failover import FailoverAgent, ParentLink
from edge_runtime._hooks import AgentHooks, UpdateDraft
from edge_runtime._identity import KEY_FILE, DeviceKey, DeviceKeyError, state_key_path
from edge_runtime._local_training import LocalResult, LocalTraining, TrainingBudget, train_locally
from edge_runtime._ort import load_training_api
from edge_runtime._ort_training import OrtTrainingTrainer
from edge_runtime._phase import Phase
from edge_runtime._portable import PortableTrainer
from edge_runtime._presence import make_agent_transport
from edge_runtime._settings import AgentSettings, AgentStats
from edge_runtime._state import (
    AgentState,
    CommitStep,
    DiskFull,
    StateError,
    StateInUse,
    Submission,
    TaskRecord,
    TaskStatus,
)
from edge_runtime._trainer_pool import TrainerPool, TrainerProvider
from edge_runtime._training import EvalResult, Trainer, TrainResult, open_trainer

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "AgentHooks",
    "AgentSettings",
    "AgentState",
    "AgentStats",
    "ArtifactCache",
    "ArtifactError",
    "CommitStep",
    "DataError",
    "DataSource",
    "DeviceKey",
    "DeviceKeyError",
    "DeviceStatus",
    "DiskFull",
    "EligibilityRules",
    "Emulation",
    "EvalResult",
    "FailoverAgent",
    "HookError",
    "IllegalTransition",
    "KEY_FILE",
    "LocalData",
    "LocalResult",
    "LocalTraining",
    "Mnist1D",
    "ModelCache",
    "ModelVersionError",
    "OrtTrainingTrainer",
    "ParentLink",
    "Phase",
    "PortableTrainer",
    "StateError",
    "StateInUse",
    "Submission",
    "SystemProbe",
    "TaskRecord",
    "TaskStatus",
    "TrainResult",
    "Trainer",
    "TrainerPool",
    "TrainerProvider",
    "TrainingBackendMissing",
    "TrainingBudget",
    "UpdateDraft",
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
    "state_key_path",
    "train_locally",
    "validate_for_model",
]

# The [agent] settings section (issue 13, one configuration system).
from edge_runtime._config import AGENT, AgentOptions

__all__ += ["AGENT", "AgentOptions"]
