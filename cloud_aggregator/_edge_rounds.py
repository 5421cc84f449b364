"""Rounds on demand: the strategy of an edge aggregator in a tier.

An edge aggregator is an aggregator to its children and a device to its parent. It
trains only when its parent gave it a task: ``EdgeRounds`` is ``SyncRounds`` that opens
a round only while a ``ParentJob`` (the parent's task, adopted as the edge's model by
``Aggregator.adopt``) still wants rounds. Each closed round counts toward the job, with
the samples its children's counted updates carried; the job is part of the strategy's
state, so it is saved with every checkpoint (the adoption's and each round's) and a
restarted edge resumes the same job at the same round: a parent task re-sent after the
restart continues it, never starts it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from cloud_aggregator._rounds import RoundOutcome
from cloud_aggregator._sync import F32, SyncRounds


@dataclass(frozen=True, kw_only=True)
class ParentJob:
    """One parent task as the edge works it."""

    key: str
    """Which parent task: its run, round and nonce (a re-sent copy has the same key)."""
    base_version: int
    """The edge's model version that holds the parent's model."""
    rounds: int
    """Closed rounds the job wants."""
    rounds_done: int = 0
    samples: int = 0
    """Samples of the children's counted updates, summed over the job's rounds."""
    train_loss: float | None = None
    """The last round's mean training loss, if known."""

    @property
    def finished(self) -> bool:
        return self.rounds_done >= self.rounds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParentJob:
        loss = data.get("train_loss")
        return cls(key=str(data["key"]), base_version=int(data["base_version"]),
                   rounds=int(data["rounds"]), rounds_done=int(data["rounds_done"]),
                   samples=int(data["samples"]),
                   train_loss=None if loss is None else float(loss))


class EdgeRounds(SyncRounds):
    """Synchronous rounds, opened only for the parent's job (see the module doc)."""

    name = "edge"

    def __init__(self) -> None:
        super().__init__()
        self.job: ParentJob | None = None
        self._closing = False

    def tick(self, now: float) -> bool:
        if self.current is None and (self.job is None or self.job.finished):
            return False
        return super().tick(now)

    def combine(self, params: F32, delta: F32) -> F32:
        new = super().combine(params, delta)
        self._closing = True  # the round closes: _results counts it toward the job
        return new

    def _results(self, outcome: RoundOutcome) -> list[dict[str, Any]]:
        results = super()._results(outcome)
        closing, self._closing = self._closing, False
        if closing and self.job is not None:
            samples = sum(int(r.get("num_samples") or 0) for r in results if r["completed"])
            losses = [float(r["loss"]) for r in results
                      if r["completed"] and r.get("loss") is not None]
            self.job = replace(
                self.job, rounds_done=self.job.rounds_done + 1,
                samples=self.job.samples + samples,
                train_loss=sum(losses) / len(losses) if losses else self.job.train_loss)
        return results

    def state(self) -> dict[str, Any]:
        out = super().state()
        out["parent_job"] = None if self.job is None else self.job.to_dict()
        return out

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        job = state.get("parent_job")
        self.job = None if job is None else ParentJob.from_dict(job)

    def status(self) -> str:
        if self.current is None and (self.job is None or self.job.finished):
            return "edge: waiting for a task from the parent"
        return super().status()
