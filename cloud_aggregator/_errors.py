"""Errors of the aggregator (see ``device_profiles._errors`` for the whole tree).

    AggregatorError
    ├── ModelBuildError   an ONNX model that cannot be turned into training artifacts
    ├── UpdateRejected    an update that broke a rule (layout, NaN, norm, staleness)
    ├── PrivacyBudgetExhausted  the next round would spend more than dp_epsilon
    └── StoreError        the database cannot be opened or used as asked
        ├── SchemaTooNew      written by a newer fleetlearn (never downgraded in place)
        └── CheckpointCorrupt a checkpoint file missing, truncated or not its sha256
"""

from __future__ import annotations

from device_profiles._errors import FleetlearnError


class AggregatorError(FleetlearnError):
    """Base of the aggregator's own errors."""


class ModelBuildError(AggregatorError, ValueError):
    """An ONNX model that cannot be turned into training artifacts."""


class UpdateRejected(AggregatorError, ValueError):
    """An update that is refused by rule; ``reason`` is a short machine-readable tag."""

    def __init__(self, message: str, *, reason: str, device_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.device_id = device_id


class PrivacyBudgetExhausted(AggregatorError):
    """The next private round would take the spent epsilon past the configured budget."""


class StoreError(AggregatorError):
    """The aggregator's database cannot be opened or used as asked."""


class SchemaTooNew(StoreError):
    """The database was written by a newer fleetlearn; upgrade rather than downgrade it."""


class CheckpointCorrupt(StoreError):
    """A recorded checkpoint file is missing, truncated or does not match its sha256."""
