"""Artifact bundles: the training artifacts of one model, as one message body.

A bundle is a zip archive (deflate) of flat file names. Unpacking untrusted bytes is
bounded: the number of entries, each name (no paths), the declared size of each file
and of all files together are checked before anything is decompressed, and each file
is read through a size-capped stream (a zip that lies about its sizes still stops).
Integrity against the manifest's hashes is the receiver's job (``edge_runtime``); the
two hashes both sides compute live here so they cannot drift apart: each file's
SHA-256, and the ``content_hash`` over them (SHA-256 of ``"<name> <sha256>\n"`` lines in
name order), which a task names as ``artifacts_hash``.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

from broker_bridge._errors import WireError

MAX_BUNDLE_FILES = 16
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class BundleError(WireError):
    """An artifact bundle that is not a well-formed, bounded archive."""


def pack_bundle(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for name in sorted(files):
            if not _NAME.match(name):
                raise BundleError(f"bundle file name {name!r} is not a flat, simple name")
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, files[name])
    return buf.getvalue()


def unpack_bundle(body: bytes, *, max_total_bytes: int = MAX_BUNDLE_BYTES) -> dict[str, bytes]:
    try:
        z = zipfile.ZipFile(io.BytesIO(body))
        infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BundleError(f"artifact bundle is not a valid archive: {exc}") from exc
    if len(infos) > MAX_BUNDLE_FILES:
        raise BundleError(f"artifact bundle has {len(infos)} files (limit {MAX_BUNDLE_FILES})")
    declared = 0
    for info in infos:
        if not _NAME.match(info.filename):
            raise BundleError(f"artifact bundle entry {info.filename!r} is not a flat name")
        declared += info.file_size
    if declared > max_total_bytes:
        raise BundleError(f"artifact bundle declares {declared} bytes (limit {max_total_bytes})")
    out: dict[str, bytes] = {}
    try:
        for info in infos:
            with z.open(info) as f:
                data = f.read(info.file_size + 1)
            if len(data) != info.file_size:
                raise BundleError(f"bundle entry {info.filename!r} is not the size it declares")
            out[info.filename] = data
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise BundleError(f"artifact bundle is corrupt: {exc}") from exc
    return out


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(files: Mapping[str, str]) -> str:
    """The artifacts' combined hash from each file's SHA-256 (see the module doc)."""
    text = "".join(f"{name} {files[name]}\n" for name in sorted(files))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
