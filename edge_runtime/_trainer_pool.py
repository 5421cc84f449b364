"""Lending training sessions: ``TrainerProvider`` (what an agent needs) and ``TrainerPool``.

One device agent needs one session; a simulator with a thousand agents on one machine
needs as many as it trains at once (its executor's workers), not one per agent.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from device_profiles import ConfigError
from edge_runtime._training import Trainer, open_trainer


class TrainerProvider(Protocol):
    """Hands out a ``Trainer`` for some artifacts, exclusively, for one task."""

    def lease(
        self, artifacts_dir: Path, artifacts_hash: str
    ) -> contextlib.AbstractContextManager[Trainer]: ...


class TrainerPool:
    """A few ONNX Runtime sessions per artifacts hash, shared by every agent that uses it.

    A lease sets nothing: the agent's training loads the global weights and the learning
    rate itself. (The portable backend resets optimizer state when the global weights
    are loaded; with the onnxruntime-training backend AdamW's moments would carry from
    one lease to the next.)
    """

    def __init__(
        self, *, sessions_per_model: int = 1, intra_op_threads: int = 1, max_models: int = 2
    ) -> None:
        if sessions_per_model < 1 or max_models < 1 or intra_op_threads < 0:
            raise ConfigError("sessions_per_model and max_models must be >= 1")
        self.sessions_per_model = sessions_per_model
        self.intra_op_threads = intra_op_threads
        self.max_models = max_models
        self._cond = threading.Condition()
        self._idle: dict[str, list[Trainer]] = {}
        self._created: dict[str, int] = {}
        self._used: dict[str, float] = {}

    def sessions(self) -> dict[str, int]:
        """How many sessions are open, by artifacts hash (leased or idle)."""
        with self._cond:
            return dict(self._created)

    @contextlib.contextmanager
    def lease(self, artifacts_dir: Path, artifacts_hash: str) -> Iterator[Trainer]:
        trainer = self._take(artifacts_dir, artifacts_hash)
        try:
            yield trainer
        finally:
            with self._cond:
                self._idle.setdefault(artifacts_hash, []).append(trainer)
                self._cond.notify_all()

    def _take(self, artifacts_dir: Path, artifacts_hash: str) -> Trainer:
        with self._cond:
            while True:
                self._used[artifacts_hash] = time.monotonic()
                idle = self._idle.setdefault(artifacts_hash, [])
                if idle:
                    return idle.pop()
                if self._created.get(artifacts_hash, 0) < self.sessions_per_model:
                    self._created[artifacts_hash] = self._created.get(artifacts_hash, 0) + 1
                    break
                self._cond.wait()
            self._evict(keep=artifacts_hash)
        try:
            return open_trainer(
                artifacts_dir,
                intra_op_threads=self.intra_op_threads,
                inter_op_threads=1,
                expected_hash=artifacts_hash,
            )
        except BaseException:
            with self._cond:
                self._created[artifacts_hash] -= 1
                self._cond.notify_all()
            raise

    def _evict(self, *, keep: str) -> None:
        """Drop idle sessions of the least recently used models beyond ``max_models``."""
        models = sorted(self._created, key=lambda h: self._used.get(h, 0.0), reverse=True)
        for old in models[self.max_models :]:
            if old == keep:
                continue
            dropped = self._idle.pop(old, [])
            self._created[old] -= len(dropped)
            if self._created[old] <= 0:
                del self._created[old]
