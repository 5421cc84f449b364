"""Caches a device keeps between rounds: training artifacts (on disk) and global models.

``ArtifactCache`` is content-addressed by the artifacts' ``content_hash``. Nothing
unverified is ever visible under a hash: a bundle is checked in memory (every file's
sha256 against the manifest, the manifest's content hash against the one the task
named), written to a temporary folder, fsynced, and renamed into place in one
``os.replace``. Many agents in one process (the fleet simulator) may share one cache
folder; two installing the same hash at once both succeed and one copy wins.

``ModelCache`` holds the last few global model versions, so a delta on the downlink
can be applied and the broadcast model is decoded once per process, not once per
simulated agent: agents *offer* the raw body (cheap, on the network thread) and the
first one that needs the weights decodes them (on its worker thread).
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
    ModelVersion,
    WireError,
    decode_model,
    fsync_dir,
    read_header,
)
from edge_runtime._errors import ArtifactError
from edge_runtime._manifest import MANIFEST_NAME, check_manifest, device_files

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")


def _check_hash(value: str) -> str:
    if len(value) != 64 or not set(value) <= _HEX:
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
        return [p.name for p in entries if len(p.name) == 64]

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
    """The last ``keep`` global model versions of one fleet, shared by agents in a process.

    Raw bodies are kept until a layout is known (an agent may hear a broadcast before
    it has the artifacts); decoded weights are cached per (version, layout).
    """

    def __init__(self, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep
        self._lock = threading.Lock()
        self._decode_lock = threading.RLock()  # one decode at a time: the others reuse it
        self._bodies: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._decoded: dict[tuple[int, bytes], ModelVersion] = {}

    def offer(self, version: int, body: bytes) -> bool:
        """Remember a model body; False when this version was already known (no work done)."""
        with self._lock:
            if version in self._bodies:
                return False
            self._bodies[version] = body
            self._bodies = collections.OrderedDict(sorted(self._bodies.items()))
            while len(self._bodies) > self.keep:
                old, _ = self._bodies.popitem(last=False)
                for key in [k for k in self._decoded if k[0] == old]:
                    del self._decoded[key]
            return True

    def put(self, version: int, weights: np.ndarray, layout: Layout) -> None:
        """Add decoded weights directly (tests, or a simulator that holds the model)."""
        model = ModelVersion(version=version, weights=weights)
        with self._lock:
            self._decoded[(version, layout.fingerprint)] = model
            self._bodies.setdefault(version, b"")
            self._bodies = collections.OrderedDict(sorted(self._bodies.items()))
            while len(self._bodies) > self.keep:
                old, _ = self._bodies.popitem(last=False)
                for key in [k for k in self._decoded if k[0] == old]:
                    del self._decoded[key]

    def versions(self) -> list[int]:
        with self._lock:
            return list(self._bodies)

    def has(self, version: int) -> bool:
        with self._lock:
            return version in self._bodies

    def get(self, version: int, layout: Layout, *, _depth: int = 0) -> ModelVersion | None:
        """The weights of ``version`` for ``layout``; None when not held.

        A body that does not decode for this layout (another model, a corrupt body)
        raises ``CodecError``.
        """
        key = (version, layout.fingerprint)
        with self._lock:
            cached = self._decoded.get(key)
        if cached is not None:
            return cached
        with self._decode_lock:
            return self._decode(version, layout, _depth)

    def _decode(self, version: int, layout: Layout, depth: int) -> ModelVersion | None:
        key = (version, layout.fingerprint)
        with self._lock:
            cached = self._decoded.get(key)
            body = self._bodies.get(version)
        if cached is not None:
            return cached
        if not body:
            return None
        try:
            header = read_header(body)
        except WireError as exc:
            raise CodecError(f"model version {version} does not decode: {exc}") from exc
        base = None
        if header.kind == BodyKind.MODEL_DELTA:
            if header.base_version is None or depth > self.keep or header.base_version == version:
                raise CodecError(f"model version {version}: delta chain too long")
            base = self.get(int(header.base_version), layout, _depth=depth + 1)
            if base is None:
                return None
        weights = decode_model(body, layout, base=base)
        model = ModelVersion(version=version, weights=weights)
        with self._lock:
            if version in self._bodies:
                self._decoded[key] = model
        return model
