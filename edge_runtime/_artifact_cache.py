"""Caches a device keeps between rounds: training artifacts (on disk) and global models.

``ArtifactCache`` is content-addressed by the artifacts' ``content_hash``. Nothing
unverified is ever visible under a hash: a bundle is checked in memory (every file's
sha256 against the manifest, the manifest's content hash against the one the task
named), written to a temporary folder, fsynced, and renamed into place in one
``os.replace``. Many agents in one process (the fleet simulator) may share one cache
folder; two installing the same hash at once both succeed and one copy wins.

``ModelCache`` holds the last few global models, named by the hash of their weights
(never by version number alone), so a delta on the downlink can be applied and the
broadcast model is decoded once per process, not once per simulated agent: agents
*offer* the raw body (cheap, on the network thread) and the first one that needs the
weights decodes them (on its worker thread) and checks them against their hash.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from broker_bridge import (
    BodyKind,
    CodecError,
    Layout,
    ModelMeta,
    ModelVersion,
    WireError,
    decode_model,
    fsync_dir,
    is_sha256_hex,
    read_header,
    weights_hash,
)
from edge_runtime._errors import ArtifactError
from edge_runtime._manifest import MANIFEST_NAME, check_manifest, device_files

log = logging.getLogger(__name__)

def _check_hash(value: str) -> str:
    if not is_sha256_hex(value):
        raise ArtifactError(f"artifacts hash {value!r} is not a sha256 hex digest")
    return value


def verify_bundle(files: Mapping[str, bytes], expected_hash: str | None) -> dict[str, Any]:
    """Check artifact files against their manifest (and the task's hash); return the manifest."""
    raw = files.get(MANIFEST_NAME)
    if raw is None:
        raise ArtifactError(f"artifact bundle has no {MANIFEST_NAME}")
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"malformed {MANIFEST_NAME} in artifact bundle: {exc}") from exc
    manifest = check_manifest(parsed, where=f"{MANIFEST_NAME} in artifact bundle")
    declared = manifest["content_hash"]
    if expected_hash is not None and declared != expected_hash:
        raise ArtifactError(
            f"artifacts have content hash {str(declared)[:16]}..., "
            f"the task expects {expected_hash[:16]}..."
        )
    listed = manifest["files"]
    for name in device_files(manifest):
        data = files.get(name)
        if data is None:
            raise ArtifactError(f"artifact bundle lacks {name}")
        if hashlib.sha256(data).hexdigest() != listed[name]:
            raise ArtifactError(f"{name} in artifact bundle is corrupt (sha256 mismatch)")
    return dict(manifest)


class ArtifactCache:
    """Verified training artifacts on disk, one folder per content hash."""

    def __init__(self, *, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def path(self, artifacts_hash: str) -> Path | None:
        """The folder of ``artifacts_hash`` when it is cached (complete by construction)."""
        folder = self.root / _check_hash(artifacts_hash)
        return folder if (folder / MANIFEST_NAME).is_file() else None

    def hashes(self) -> list[str]:
        """Cached hashes, most recently installed first."""
        try:
            entries = [p for p in self.root.iterdir() if (p / MANIFEST_NAME).is_file()]
        except OSError:
            return []
        entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.name for p in entries if is_sha256_hex(p.name)]  # a hello carries them

    def install(self, files: Mapping[str, bytes], *, expected_hash: str) -> Path:
        """Verify ``files`` (an unpacked bundle) and move them into the cache."""
        _check_hash(expected_hash)
        manifest = verify_bundle(files, expected_hash)
        final = self.root / expected_hash
        if (final / MANIFEST_NAME).is_file():
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{expected_hash[:12]}-", dir=self.root))
        try:
            for name in (*device_files(manifest), MANIFEST_NAME):
                with open(tmp / name, "wb") as fh:
                    fh.write(files[name])
                    fh.flush()
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            with self._lock:
                try:
                    os.replace(tmp, final)
                except OSError:
                    if not (final / MANIFEST_NAME).is_file():
                        raise
                    # Another agent installed the same hash first: same bytes, keep theirs.
            fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final


class ModelCache:
    """The last ``keep`` global models, named by content; shared by agents in a process.

    A model is found by its ``model_hash`` (sha256 of its float32 weights), never by
    its version number alone: an aggregator started afresh numbers from 0 again, and a
    version 4 of another run (or another model) must never stand in for this one's.
    Raw bodies are kept until a layout is known (an agent may hear a broadcast before
    it has the artifacts); decoded weights are checked against the hash, then cached
    per layout. A delta body's base is looked up within its own run.
    """

    def __init__(self, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep
        self._lock = threading.Lock()
        self._decode_lock = threading.RLock()  # one decode at a time: the others reuse it
        self._entries: collections.OrderedDict[str, tuple[ModelMeta, bytes]] = (
            collections.OrderedDict())
        self._decoded: dict[tuple[str, bytes], ModelVersion] = {}

    def offer(self, meta: ModelMeta, body: bytes) -> bool:
        """Remember a model body; False when this model was already known (no work done)."""
        with self._lock:
            if meta.model_hash in self._entries:
                return False
            self._entries[meta.model_hash] = (meta, body)
            self._evict()
            return True

    def put(self, weights: np.ndarray, layout: Layout, *, version: int = 0,
            run: str = "local") -> str:
        """Add decoded weights directly (tests, or a simulator that holds the model);
        returns their hash."""
        vec = np.asarray(weights, dtype=np.float32)
        model_hash = weights_hash(vec)
        meta = ModelMeta(run=run, model_version=version, model_hash=model_hash)
        with self._lock:
            self._entries[model_hash] = (meta, b"")
            self._decoded[(model_hash, layout.fingerprint)] = ModelVersion(version=version,
                                                                           weights=vec)
            self._evict()
        return model_hash

    def _evict(self) -> None:
        while len(self._entries) > self.keep:
            old, _ = self._entries.popitem(last=False)
            for key in [k for k in self._decoded if k[0] == old]:
                del self._decoded[key]

    def versions(self) -> list[int]:
        """Version numbers of the models held (informative: the hashes identify them)."""
        with self._lock:
            return sorted({meta.model_version for meta, _ in self._entries.values()})

    def hashes(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def has(self, model_hash: str) -> bool:
        with self._lock:
            return model_hash in self._entries

    def get(self, model_hash: str, layout: Layout, *, _depth: int = 0) -> ModelVersion | None:
        """The weights whose hash is ``model_hash``, for ``layout``; None when not held.

        A body that does not decode for this layout (another model, a corrupt body), or
        decodes to other weights than its hash says, raises ``CodecError``.
        """
        key = (model_hash, layout.fingerprint)
        with self._lock:
            cached = self._decoded.get(key)
            if model_hash in self._entries:
                self._entries.move_to_end(model_hash)
        if cached is not None:
            return cached
        with self._decode_lock:
            return self._decode(model_hash, layout, _depth)

    def _decode(self, model_hash: str, layout: Layout, depth: int) -> ModelVersion | None:
        key = (model_hash, layout.fingerprint)
        with self._lock:
            cached = self._decoded.get(key)
            entry = self._entries.get(model_hash)
        if cached is not None:
            return cached
        if entry is None or not entry[1]:
            return None
        meta, body = entry
        try:
            header = read_header(body)
        except WireError as exc:
            raise CodecError(f"model version {meta.model_version} does not decode: {exc}") from exc
        base = None
        if header.kind == BodyKind.MODEL_DELTA:
            if (header.base_version is None or depth > self.keep
                    or header.base_version == meta.model_version):
                raise CodecError(f"model version {meta.model_version}: delta chain too long")
            base_hash = self._find(meta.run, int(header.base_version))
            base = None if base_hash is None else self.get(base_hash, layout, _depth=depth + 1)
            if base is None:
                return None
        weights = decode_model(body, layout, base=base)
        if weights_hash(weights) != model_hash:
            with self._lock:
                self._entries.pop(model_hash, None)
            raise CodecError(f"model version {meta.model_version} of run {meta.run} decodes to "
                             "other weights than its hash names; dropped")
        model = ModelVersion(version=meta.model_version, weights=weights)
        with self._lock:
            if model_hash in self._entries:
                self._decoded[key] = model
        return model

    def _find(self, run: str, version: int) -> str | None:
        with self._lock:
            for model_hash, (meta, _) in self._entries.items():
                if meta.run == run and meta.model_version == version:
                    return model_hash
        return None
