"""Errors of the aggregator (see ``device_profiles._errors`` for the whole tree).

    AggregatorError
    ├── ModelBuildError   an ONNX model that cannot be turned into training artifacts
    ├── UpdateRejected    an update that broke a rule (layout, NaN, norm, staleness)
    ├── SecAggAbandoned   a secure round that cannot produce a checked sum
    ├── LedgerError       the training ledger cannot be written or read as asked
    │   └── LedgerMismatch    ``ledger verify`` found an entry that does not hold
    ├── PrivacyBudgetExhausted  the next round would spend more than dp_epsilon
    └── StoreError        the database cannot be opened or used as asked
        ├── SchemaTooNew      written by a newer fleetlearn (never downgraded in place)
        ├── CheckpointCorrupt a checkpoint file missing, truncated or not its sha256
        └── StateDirInUse     another aggregator holds the state dir
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


class SecAggAbandoned(AggregatorError):
    """A secure round that cannot produce a checked sum (too few devices uploaded or
    answered, or their shares do not reconstruct); nothing of it may be applied."""


class LedgerError(AggregatorError):
    """The training ledger (its key, entries or kept bodies) cannot be used as asked."""


class LedgerMismatch(LedgerError):
    """An entry of the training ledger does not verify; ``index`` names it."""

    def __init__(self, message: str, *, index: int, fleet: str = "") -> None:
        super().__init__(message)
        self.index = index
        self.fleet = fleet


class PrivacyBudgetExhausted(AggregatorError):
    """The next private round would take the spent epsilon past the configured budget."""


class StoreError(AggregatorError):
    """The aggregator's database cannot be opened or used as asked."""


class SchemaTooNew(StoreError):
    """The database was written by a newer fleetlearn; upgrade rather than downgrade it."""


class CheckpointCorrupt(StoreError):
    """A recorded checkpoint file is missing, truncated or does not match its sha256."""


class StateDirInUse(StoreError):
    """Another aggregator holds the state dir (``_ownership``): two would corrupt it."""
