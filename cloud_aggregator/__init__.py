"""The cloud aggregator: registry, selection, rounds, aggregation, persistence.

Where things live:

- ``_errors``: ``AggregatorError``, ``ModelBuildError``, ``UpdateRejected``.
"""

from cloud_aggregator._errors import AggregatorError, ModelBuildError, UpdateRejected

__all__ = ["AggregatorError", "ModelBuildError", "UpdateRejected"]
