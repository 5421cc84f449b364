"""The device agent: eligibility, tasks, ONNX Runtime training, updates, local state.

Where things live:

- ``_errors``: ``AgentError``, ``TrainingBackendMissing``, ``ArtifactError``, ``DataError``.
- ``_ort``: ``load_training_api`` (ORT's on-device training API without torch).
- ``_trainer``: ``OrtTrainer``, ``TrainResult``, ``EvalResult``.
- ``_data``: ``DataSource``, ``load_data``, ``load_npz``, ``load_csv``, ``load_callable``,
  ``validate_for_model``.
- ``_datasets``: ``Mnist1D``, ``load_mnist1d``, ``partition_iid``, ``partition_dirichlet``,
  ``partition_shards``.
"""

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
from edge_runtime._errors import AgentError, ArtifactError, DataError, TrainingBackendMissing
from edge_runtime._ort import load_training_api
from edge_runtime._trainer import EvalResult, OrtTrainer, TrainResult

__all__ = [
    "AgentError",
    "ArtifactError",
    "DataError",
    "DataSource",
    "EvalResult",
    "Mnist1D",
    "OrtTrainer",
    "TrainResult",
    "TrainingBackendMissing",
    "load_callable",
    "load_csv",
    "load_data",
    "load_mnist1d",
    "load_npz",
    "load_training_api",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "validate_for_model",
]
