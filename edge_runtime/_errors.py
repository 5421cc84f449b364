"""Errors of the device agent (see ``device_profiles._errors`` for the whole tree).

    AgentError
    ├── TrainingBackendMissing   no usable ONNX Runtime (or no training API for ort-training)
    ├── ArtifactError            training artifacts corrupt, mismatched or unverifiable
    └── DataError                local data does not fit the model's inputs
"""

from __future__ import annotations

from device_profiles._errors import FleetlearnError


class AgentError(FleetlearnError):
    """Base of the device agent's own errors."""


class TrainingBackendMissing(AgentError, ImportError):
    """ONNX Runtime (or, for the onnxruntime-training backend, its training API) is missing."""


class ArtifactError(AgentError, ValueError):
    """Training artifacts that are corrupt, incomplete or do not match the task."""


class DataError(AgentError, ValueError):
    """Local data whose shapes or dtypes do not fit the model's inputs."""
