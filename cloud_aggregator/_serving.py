"""Serving the global model and the training artifacts, named by content, within limits.

Every model message carries ``ModelMeta`` (run id, version, the sha256 of the weights
it decodes to): ``ModelServer`` encodes a version once, decodes its own body to learn
the hash a device will compute, and keeps the last few versions. Tasks name the model
by that hash (``hash_of``), so a device can never train from another run's weights.

Requests (``up/request``) are answered within per-device token buckets: artifact
bundles (megabytes) a few times a minute, model versions a few more; past that the
request is dropped and counted (``requests_limited``), and the log says so a few
lines a minute per device at most.

Whether versions are broadcast is decided once, from the size of the first version as
sent (``model_push``'s default depends on it). When they are not (a device fetches one
for every task), the version a device's last task names is ``expect``ed: its first
request for that version is served outside the budget, and the version is kept until
the device has fetched it or has another task, within ``pin_window`` versions of the
newest (a FedBuff task older than ``max_staleness`` versions is refused anyway): at
most ``KEEP_VERSIONS + pin_window + 1`` versions are held. A version's model message
(its body and that body's CRC-32) is made once, for every copy sent.
"""

from __future__ import annotations

import collections
import logging
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from broker_bridge import (
    CodecSpec,
    KeyedRateLimit,
    Kind,
    Layout,
    LogLimiter,
    Message,
    ModelMeta,
    Request,
    Topics,
    decode_model,
    encode_model,
    model_message,
    pack_bundle,
    printable,
    weights_hash,
)
from cloud_aggregator._artifacts import MANIFEST_NAME, read_manifest
from cloud_aggregator._metrics import Counters
from cloud_aggregator._store import Store, StoreError

log = logging.getLogger(__name__)

ARTIFACT_REQUESTS_PER_MINUTE = 4.0
ARTIFACT_REQUEST_BURST = 3
MODEL_REQUESTS_PER_MINUTE = 20.0
MODEL_REQUEST_BURST = 10
KEEP_VERSIONS = 4
MAX_PIN_WINDOW = 32
"""Versions kept for devices expected to fetch them, behind the newest, at most (FedBuff
without a staleness limit)."""

Send = Callable[[str, Message], None]


class ModelServer:
    """Encodes, names and serves model versions and the artifact bundle of one run."""

    def __init__(
        self, *, fleet: str, run_id: str, layout: Layout, codec: CodecSpec, store: Store,
        topics: Topics, send: Send, counters: Counters, artifacts_dir: Path,
        artifacts_hash: str, broadcasts: Callable[[int], bool] = lambda _size: True,
        pin_window: int = 0,
    ) -> None:
        self.fleet = fleet
        self.run_id = run_id
        self._layout = layout
        self._codec = codec
        self._store = store
        self._topics = topics
        self._send = send
        self._counters = counters
        self._artifacts_dir = artifacts_dir
        self._artifacts_hash = artifacts_hash
        self._bundle: bytes | None = None
        self._versions: collections.OrderedDict[int, tuple[ModelMeta, Message]] = (
            collections.OrderedDict())
        """Version -> its meta and its model message (the body and that body's CRC-32
        made once, for every copy sent)."""
        self._artifact_limit = KeyedRateLimit(per_minute=ARTIFACT_REQUESTS_PER_MINUTE,
                                              burst=ARTIFACT_REQUEST_BURST)
        self._model_limit = KeyedRateLimit(per_minute=MODEL_REQUESTS_PER_MINUTE,
                                           burst=MODEL_REQUEST_BURST)
        self._log = LogLimiter()
        self._decide = broadcasts
        self._broadcasts: bool | None = None
        self._pin_window = pin_window
        self._expected: dict[str, int] = {}
        """Device -> the model version its last task named, until it fetched it."""
        self._pins: collections.Counter[int] = collections.Counter()
        """How many devices expect each version (``_expected``'s values, counted)."""

    # -- models

    def entry(self, version: int, params: np.ndarray | None = None
              ) -> tuple[ModelMeta, Message]:
        """(meta, model message) of ``version``; from ``params`` or its checkpoint.

        Raises StoreError when the version is neither given nor checkpointed.
        """
        cached = self._versions.get(version)
        if cached is not None:
            self._versions.move_to_end(version)
            return cached
        if params is None:
            _, params = self._store.load_checkpoint(self.fleet, model_version=version)
        body = encode_model(params, self._layout, self._codec)
        meta = ModelMeta(run=self.run_id, model_version=version,
                         model_hash=weights_hash(decode_model(body, self._layout)))
        message = model_message(fleet=self.fleet, meta=meta, codec=str(self._codec),
                                codec_body=body)
        message = replace(message, body_crc32=zlib.crc32(message.body))
        self._versions[version] = (meta, message)
        self._evict()
        return meta, message

    def _evict(self) -> None:
        """Drop the least recently used versions past ``KEEP_VERSIONS`` that no device
        is expected to fetch (see the module doc)."""
        if len(self._versions) <= KEEP_VERSIONS:
            return
        newest = max(self._versions)
        for version in list(self._versions):
            if len(self._versions) <= KEEP_VERSIONS:
                return
            if version != newest and (version < newest - self._pin_window
                                      or not self._pins[version]):
                del self._versions[version]

    def broadcasts(self, version: int, params: np.ndarray) -> bool:
        """Whether model versions are broadcast (decided at the first call, from the
        size of ``version`` as sent)."""
        if self._broadcasts is None:
            self._broadcasts = self._decide(len(self.message(version, params).body))
        return self._broadcasts

    def expect(self, device: str, version: int) -> None:
        """``device`` was sent a task naming ``version`` (see the module doc)."""
        if self._broadcasts is not False:  # broadcast (or not decided: nothing sent yet)
            return
        self._unexpect(device)
        self._expected[device] = version
        self._pins[version] += 1

    def _unexpect(self, device: str) -> int | None:
        version = self._expected.pop(device, None)
        if version is not None:
            self._pins[version] -= 1
            if not self._pins[version]:
                del self._pins[version]
        return version

    def hash_of(self, version: int, params: np.ndarray | None = None) -> str:
        return self.entry(version, params)[0].model_hash

    def message(self, version: int, params: np.ndarray | None = None) -> Message:
        return self.entry(version, params)[1]

    def broadcast(self, version: int, params: np.ndarray) -> None:
        """Publish ``version`` on ``broadcast/model``, if versions are broadcast."""
        if self.broadcasts(version, params):
            self._send(self._topics.broadcast("model"), self.message(version, params))

    # -- requests

    def serve(self, device: str, request: Request, *, current_version: int,
              params: np.ndarray) -> None:
        """Answer one device request, within that device's request budget."""
        if request.want == "artifacts":
            if (request.artifacts_hash is not None
                    and request.artifacts_hash != self._artifacts_hash):
                self._note(device, "asked for unknown artifacts %s",
                           printable(request.artifacts_hash, 64))
                return
            if not self._artifact_limit.allow(device):
                self._limited(device, "artifacts")
                return
            self._send(self._topics.down(device, "artifacts"),
                       Message(kind=Kind.ARTIFACTS, fleet=self.fleet, codec="zip",
                               body=self.bundle(), model_version=current_version))
        elif request.want == "model":
            version = current_version if request.model_version is None else request.model_version
            if self._expected.get(device) == version:
                self._unexpect(device)  # its task's model: once, outside the budget
            elif not self._model_limit.allow(device):
                self._limited(device, "model")
                return
            try:
                meta, _ = self.entry(version, params if version == current_version else None)
            except StoreError as exc:
                self._note(device, "asked for model version %s: %s", version, exc)
                return
            if request.model_hash is not None and request.model_hash != meta.model_hash:
                self._note(device, "asked for model %s..., which this run (%s) does not have",
                           printable(request.model_hash, 16), self.run_id)
                return
            self._send(self._topics.down(device, "model"), self.message(version))
        else:
            self._note(device, "unknown request %r", printable(request.want, 32))

    def bundle(self) -> bytes:
        if self._bundle is None:
            names = read_manifest(self._artifacts_dir).device_files
            files = {name: (self._artifacts_dir / name).read_bytes()
                     for name in (*names, MANIFEST_NAME)}
            self._bundle = pack_bundle(files)
        return self._bundle

    def _limited(self, device: str, what: str) -> None:
        self._counters.update(f"requests_limited:{what}")
        self._note(device, "%s requests past the limit; dropped", what)

    def _note(self, device: str, msg: str, *args: object) -> None:
        self._log.log(log, logging.WARNING, device, "device %s " + msg, device, *args)
