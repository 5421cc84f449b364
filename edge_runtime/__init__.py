"""The device agent: eligibility, tasks, ONNX Runtime training, updates, local state.

Where things live:

- ``_errors``: ``AgentError``, ``TrainingBackendMissing``, ``ArtifactError``, ``DataError``.
"""

from edge_runtime._errors import AgentError, ArtifactError, DataError, TrainingBackendMissing

__all__ = ["AgentError", "ArtifactError", "DataError", "TrainingBackendMissing"]
