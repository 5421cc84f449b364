"""Fetching what a task names: its training artifacts and its global model.

Both are looked up in the (possibly shared) caches first; what is missing is requested
from the aggregator (docs/PROTOCOL.md section 4, ``request``) and waited for on the
executor, no longer than the agent's ``request_timeout_s`` nor the task's deadline. While
it waits, :attr:`Fetcher.waiting_for` says what for (the agent's status line shows it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from broker_bridge import (
    BundleError,
    Layout,
    ModelVersion,
    Request,
    TaskSpec,
    WireError,
    unpack_bundle,
)
from edge_runtime._artifact_cache import ArtifactCache, ModelCache
from edge_runtime._errors import ArtifactError, ModelVersionError
from edge_runtime._inbox import Inbox
from edge_runtime._state import state_error

SendRequest = Callable[[Request, TaskSpec], None]
T = TypeVar("T")


class Fetcher:
    """Gets a task's artifacts folder and global weights, from the caches or the aggregator."""

    def __init__(self, *, inbox: Inbox, artifacts: ArtifactCache, models: ModelCache,
                 request: SendRequest) -> None:
        self._inbox = inbox
        self.artifacts = artifacts
        self.models = models
        self._request = request
        self._lock = threading.Lock()
        self._waiting_for: str | None = None

    @property
    def waiting_for(self) -> str | None:
        """What the fetcher waits for right now, in words (None when it does not wait)."""
        with self._lock:
            return self._waiting_for

    def wait(self, ready: Callable[[], T | None], *, what: str, seconds: float,
             cancelled: Callable[[], bool]) -> T | None:
        """Wait for ``ready()`` (the inbox's ``wait``), saying ``what`` meanwhile
        (``waiting_for``: the agent's status line)."""
        with self._lock:
            self._waiting_for = what
        try:
            return self._inbox.wait(ready, seconds=seconds, cancelled=cancelled)
        finally:
            with self._lock:
                self._waiting_for = None

    def fetch_artifacts(self, task: TaskSpec, *, seconds: float,
                        cancelled: Callable[[], bool]) -> Path:
        """The verified artifacts folder the task names (``ArtifactError`` if none in time)."""
        wanted = task.artifacts_hash
        cached = self.artifacts.path(wanted)
        if cached is not None:
            return cached
        self._inbox.clear_bundles()
        self._request(Request(want="artifacts", artifacts_hash=wanted), task)

        def ready() -> Path | None:
            path = self.artifacts.path(wanted)  # another agent sharing the cache got it
            if path is not None:
                return path
            bundle = self._inbox.take_bundle()
            return None if bundle is None else self._install(bundle, wanted)

        got = self.wait(ready, what=f"training artifacts {wanted[:12]}... (requested from "
                                     "the aggregator)", seconds=seconds, cancelled=cancelled)
        if got is None:
            raise ArtifactError(f"no artifacts {wanted[:16]}... received in time")
        return got

    def _install(self, bundle: bytes, wanted: str) -> Path:
        try:
            files = unpack_bundle(bundle)
        except BundleError as exc:
            raise ArtifactError(f"artifact bundle for {wanted[:16]}... is unusable: {exc}") from exc
        try:
            return self.artifacts.install(files, expected_hash=wanted)
        except OSError as exc:
            raise state_error("cannot write artifacts", exc) from exc

    def fetch_model(self, task: TaskSpec, layout: Layout, *, seconds: float,
                    cancelled: Callable[[], bool]) -> ModelVersion:
        """The global weights the task names by hash (requested when not held)."""
        version, wanted = task.model_version, task.model_hash

        def ready() -> ModelVersion | None:
            try:
                return self.models.get(wanted, layout)
            except WireError as exc:
                raise ModelVersionError(
                    f"global model version {version} does not fit the task's artifacts: {exc}"
                ) from exc

        model = ready()
        if model is None:
            self._request(Request(want="model", model_version=version, model_hash=wanted,
                                  artifacts_hash=task.artifacts_hash,
                                  have_versions=self.models.versions()), task)
            model = self.wait(ready, what=f"global model version {version} ({wanted[:12]}...) "
                                           "from the aggregator", seconds=seconds,
                               cancelled=cancelled)
        if model is None:
            raise ModelVersionError(f"global model version {version} ({wanted[:12]}...) is "
                                    "unknown to this device and was not received in time")
        if model.weights.shape != (layout.size,):
            raise ModelVersionError(f"model version {version} has the wrong size")
        return model
