"""Errors of the device agent (see ``device_profiles._errors`` for the whole tree).

    AgentError
    ├── TrainingBackendMissing   no usable ONNX Runtime (or no training API for ort-training)
    ├── ArtifactError            training artifacts corrupt, mismatched or unverifiable
    ├── DataError                local data does not fit the model's inputs
    ├── ModelVersionError        the task's global model is unknown or does not fit
    ├── HookError                a hook or the training callable returned something unusable
    ├── IllegalTransition        the agent's state machine refused a move (a bug, not input)
    └── StateError               the state folder cannot be read or written (``_state``)
        ├── DiskFull             no space left there
        ├── DeviceKeyError       the device's key file cannot be used (``_identity``)
        └── StateInUse           another agent holds the state folder
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


class ModelVersionError(AgentError):
    """The task's global model version is unknown, or does not fit the artifacts."""


class HookError(AgentError, ValueError):
    """A hook (``AgentHooks``) or the local training callable returned something the agent
    cannot use: parameters of the wrong size, an update of another shape, a wrong type."""


class IllegalTransition(AgentError, RuntimeError):
    """The agent's state machine was asked for a move it has no edge for (``_phase``)."""

    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"the agent cannot go from {current} to {target}")
        self.current = current
        self.target = target
