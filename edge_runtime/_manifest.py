"""Training-artifact manifests (``artifacts.json``) as a device reads and checks them.

Two formats exist:

- ``fleetlearn-artifacts/2`` (``backend = "portable"``, what ``fleetlearn artifacts
  build`` writes by default): a training graph and an eval graph made of standard ONNX
  operators that any ONNX Runtime build runs, the initial exchanged parameters
  (``parameters.f32``) and, when some are frozen, the frozen ones (``frozen.f32``),
  both raw little-endian float32 in the manifest's order. ``files`` lists every file.
- ``fleetlearn-artifacts/1`` (the onnxruntime-training backend): ORT's four training
  artifact files, which only an onnxruntime-training build loads.

``files`` maps each device file to its SHA-256; ``content_hash`` is the SHA-256 of the
``"<name> <sha256>\\n"`` lines in name order, and is what a task names as its
``artifacts_hash``. ``check_manifest`` verifies the structure and the hash over the
list; each file's bytes are checked against the list by whoever reads them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker_bridge import content_hash, file_sha256
from edge_runtime._errors import ArtifactError

MANIFEST_NAME = "artifacts.json"
FORMAT_ORT_TRAINING = "fleetlearn-artifacts/1"
FORMAT_PORTABLE = "fleetlearn-artifacts/2"
FORMATS = (FORMAT_ORT_TRAINING, FORMAT_PORTABLE)
ORT_TRAINING_FILES = (
    "training_model.onnx",
    "eval_model.onnx",
    "optimizer_model.onnx",
    "checkpoint",
)
PORTABLE_REQUIRED = ("train.onnx", "eval.onnx", "parameters.f32")
MAX_FILES = 15
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def backend_of(manifest: Mapping[str, Any]) -> str:
    """``portable`` or ``ort-training``."""
    return "portable" if manifest.get("format") == FORMAT_PORTABLE else "ort-training"


def device_files(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The files a device needs besides the manifest, as the manifest lists them."""
    return tuple(sorted(manifest["files"]))


def check_manifest(manifest: Any, *, where: str = MANIFEST_NAME) -> dict[str, Any]:
    """Check a parsed manifest's structure and content hash; return it as a dict."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: not a JSON object")
    fmt = manifest.get("format")
    if fmt not in FORMATS:
        raise ArtifactError(
            f"{where}: unknown manifest format {fmt!r} (this agent reads {', '.join(FORMATS)}); "
            "upgrade fleetlearn on the device or rebuild the artifacts"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES:
        raise ArtifactError(f"{where}: 'files' must map 1-{MAX_FILES} file names to hashes")
    for name, digest in files.items():
        if not isinstance(name, str) or not _NAME.match(name) or name == MANIFEST_NAME:
            raise ArtifactError(f"{where}: file name {name!r} is not a plain file name")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ArtifactError(f"{where}: {name} has no sha256 hex digest")
    required = PORTABLE_REQUIRED if fmt == FORMAT_PORTABLE else ORT_TRAINING_FILES
    missing = [name for name in required if name not in files]
    if missing:
        raise ArtifactError(f"{where} does not list {', '.join(missing)}")
    if manifest.get("content_hash") != content_hash(files):
        raise ArtifactError(f"{where}: content hash does not match its file list")
    return dict(manifest)


def read_manifest_file(directory: Path) -> dict[str, Any] | None:
    """The checked manifest of an artifacts folder, or None when it has none."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc!r}") from exc
    return check_manifest(data, where=str(path))


def verify_files(
    directory: Path, manifest: Mapping[str, Any] | None, expected_hash: str | None
) -> None:
    """Check every listed file's SHA-256 (and the content hash a task pinned)."""
    if manifest is None:
        if expected_hash is not None:
            raise ArtifactError(
                f"no {MANIFEST_NAME} in {directory}: cannot verify content hash {expected_hash}"
            )
        return
    if expected_hash is not None and manifest["content_hash"] != expected_hash:
        raise ArtifactError(
            f"artifacts in {directory} have content hash {manifest['content_hash']}, "
            f"the task expects {expected_hash}"
        )
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"training artifacts missing in {directory}: {name}")
        actual = file_sha256(path)
        if actual != digest:
            raise ArtifactError(
                f"{path} is corrupt: sha256 {actual[:16]}..., {MANIFEST_NAME} says {digest[:16]}..."
            )
