"""The ingest pipeline: what every update goes through before it may move the model.

An ``UpdateItem`` enters with its envelope and leaves either rejected (a ``Rejection``:
a reason code the device is told, see docs/PROTOCOL.md) or ready to journal and add.
The pipeline is a list of stages, each one job:

    verify      the update is signed by its device's key over its own statement
                (``_identity``; refusals there are copies: the device's round is untouched)
    unpack      body -> metadata + codec body; the task's nonce must be echoed
    decode      codec body -> nonzero indices and values (no dense vector for top-k)
    validate    sample count, finite values, size, the absolute norm cap (optional)
    screen      norm relative to recent accepted updates (bootstrap: deferred)
    weight      the weight the update counts with, bounded by its task and the fleet
    reputation  a device below the reputation floor weighs its reputation times that

Stages are objects with a ``name`` and ``process(item) -> Rejection | None``; a stage
may fill in the item (``meta``, ``indices``/``values``, ``norm``, ``weight``,
``deferred``). Later stages slot in by name (``IngestPipeline.insert``): a signature
check after ``unpack``, secure-aggregation unmasking in place of ``decode``, without
touching the runtime. (``verify`` is the first: nothing of an update whose device is not
proven is parsed, let alone decoded.) Strategy-specific gates (is the round open, is the device
selected, is it too stale) run before the pipeline; clipping and the combining rule
are the aggregate's (``_aggregate``).

``Journal`` (``_journal``) makes accepted updates durable in groups.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from broker_bridge import CodecError, Layout, Message, UpdateMeta, WireError
from broker_bridge import decode_update_sparse as _decode_sparse
from broker_bridge._protocol import unpack_update_view
from cloud_aggregator._aggregate import Contribution
from cloud_aggregator._aggregation import Reason, UpdateRules, l2_norm
from cloud_aggregator._contribution import weight_factor
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._ledger import UpdateSource
from cloud_aggregator._screen import NormScreen, WeightBound, task_samples_cap

log = logging.getLogger(__name__)


@dataclass(eq=False, kw_only=True)
class UpdateItem:
    """One update on its way through the pipeline (filled in stage by stage)."""

    device: str
    message: Message
    task_round: int
    """The task it answers: a sync round's index, or a FedBuff task's sequence number."""
    max_steps: int | None = None
    """The ``max_steps`` its task carried (bounds the weight)."""
    meta: UpdateMeta | None = None
    codec_body: bytes | memoryview = b""
    """The codec body (a view of the message's body: not a copy)."""
    indices: npt.NDArray[np.integer] | None = field(default=None, repr=False)
    values: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    norm: float = math.nan
    weight: float = 0.0
    scale: float = 1.0
    """The strategy's factor (FedBuff's staleness discount)."""
    deferred: bool = False
    """No norm history yet (sync): journaled now, judged when the round closes."""
    notes: list[tuple[str, str]] = field(default_factory=list)
    """(counter, text) the stages want counted and logged, e.g. a bounded weight."""
    signature: bytes | None = None
    """The device's Ed25519 signature of the update (set by the ``verify`` stage)."""
    body_sha256: bytes | None = None
    """SHA-256 of the update body the signature covers (set by the ``verify`` stage)."""

    def source(self) -> UpdateSource:
        """The update as the training ledger names it."""
        return UpdateSource(
            device=self.device, round=self.message.round, attempt=self.message.attempt,
            digest=hashlib.sha256(self.message.body).hexdigest(),
            signature=self.signature.hex() if self.signature is not None else None,
            body_sha256=self.body_sha256.hex() if self.body_sha256 is not None else None,
            model_version=self.message.model_version, codec=self.message.codec)

    def contribution(self) -> Contribution:
        assert self.values is not None
        return Contribution(indices=self.indices, values=self.values, weight=self.weight,
                            norm=self.norm, scale=self.scale, device=self.device,
                            source=self.source())

    @property
    def body_bytes(self) -> int:
        return len(self.codec_body)


@dataclass(frozen=True)
class Rejection:
    """Why an update is refused: a reason code for the device and a human detail."""

    reason: str
    detail: str = ""
    copy: bool = False
    """The update answers no task of this device (a replay or a forgery): refusing it
    must not resolve the device's own task, whose answer may still come."""


class IngestStage(Protocol):
    """One step of the pipeline."""

    name: str

    def process(self, item: UpdateItem) -> Rejection | None: ...


class IngestPipeline:
    """Runs the stages in order; the first rejection ends the item's way."""

    def __init__(self, stages: Sequence[IngestStage]) -> None:
        self._stages = list(stages)
        names = self.names
        if len(set(names)) != len(names):
            raise AggregatorError(f"two ingest stages share a name: {names}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._stages]

    def insert(self, stage: IngestStage, *, before: str | None = None,
               after: str | None = None, replace: str | None = None) -> None:
        """Put ``stage`` before, after or in place of the stage named so."""
        anchor = next(n for n in (before, after, replace) if n is not None)
        try:
            at = self.names.index(anchor)
        except ValueError as exc:
            raise AggregatorError(f"no ingest stage named {anchor!r}; have {self.names}") from exc
        if replace is not None:
            self._stages[at] = stage
        else:
            self._stages.insert(at if before is not None else at + 1, stage)
        if len(set(self.names)) != len(self.names):
            raise AggregatorError(f"two ingest stages share a name: {self.names}")

    def run_stage(self, name: str, item: UpdateItem) -> Rejection | None:
        """Run the one stage named ``name`` on ``item`` (None: it passed, or there is no
        such stage). The desk runs ``verify`` alone before a refusal that the strategy's
        gate would remember, so only an update proven to be the device's settles anything
        of its round."""
        for stage in self._stages:
            if stage.name == name:
                return stage.process(item)
        return None

    def run(self, item: UpdateItem) -> Rejection | None:
        for stage in self._stages:
            rejection = stage.process(item)
            if rejection is not None:
                return rejection
        return None


# -- the default stages -----------------------------------------------------------------


@dataclass
class Unpack:
    """Split the body into metadata and codec body; the task's nonce must be echoed."""

    nonce_of: Callable[[int, str], str]
    name: str = "unpack"

    def process(self, item: UpdateItem) -> Rejection | None:
        try:
            item.meta, item.codec_body = unpack_update_view(item.message.body)
        except WireError as exc:
            return Rejection("bad_body", str(exc))
        if item.meta.nonce != self.nonce_of(item.task_round, item.device):
            return Rejection("wrong_nonce",
                             f"the update does not answer this device's task {item.task_round}",
                             copy=True)
        return None


@dataclass
class Decode:
    """Decode the codec body into nonzero coordinates (dense codecs: all of them)."""

    layout: Layout
    name: str = "decode"

    def process(self, item: UpdateItem) -> Rejection | None:
        try:
            indices, values = _decode_sparse(item.codec_body, self.layout)
        except CodecError as exc:
            return Rejection("codec", str(exc))
        item.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        item.values = np.asarray(values, dtype=np.float32)
        return None


@dataclass
class Validate:
    """Sample count, finite values and the optional absolute norm cap."""

    rules: UpdateRules
    name: str = "validate"

    def process(self, item: UpdateItem) -> Rejection | None:
        assert item.meta is not None and item.values is not None
        if not item.meta.num_samples > 0:
            return Rejection(str(Reason.BAD_WEIGHT), f"num_samples {item.meta.num_samples}")
        values = item.values
        if item.indices is None and values.size != self.rules.size:
            return Rejection(str(Reason.WRONG_SIZE),
                             f"expected {self.rules.size} values, got {values.size}")
        if not bool(np.isfinite(values).all()):
            return Rejection(str(Reason.NON_FINITE), "update holds NaN or Inf")
        item.norm = l2_norm(values)
        cap = self.rules.max_norm
        if cap is not None and item.norm > cap:
            return Rejection(str(Reason.NORM_ABOVE_CAP), f"norm {item.norm:.4g} > {cap}")
        return None


@dataclass
class Screen:
    """The norm screen (relative to recent accepted updates; see ``_screen``).

    With no history yet, a sync round defers the update (judged at close); a FedBuff
    buffer, which has no round to wait for, refuses one longer than the model itself.
    """

    screen: NormScreen
    defers: bool
    model_norm: Callable[[], float]
    name: str = "screen"

    def process(self, item: UpdateItem) -> Rejection | None:
        judgement = self.screen.judge(item.norm)
        if judgement.bootstrap and self.defers:
            item.deferred = True
        elif judgement.bootstrap:
            model_norm = self.model_norm()
            if model_norm > 0 and item.norm > model_norm:
                judgement = type(judgement)(
                    ok=False, detail=(f"norm {item.norm:.4g} > the global model's own norm "
                                      f"{model_norm:.4g} (no update history yet)"))
        self.screen.observe(item.device, item.norm, refused=not judgement.ok)
        if judgement.ok:
            return None
        reason = (Reason.NORM_ABOVE_MEDIAN if judgement.threshold is not None
                  else Reason.NORM_ABOVE_MODEL)
        return Rejection(str(reason), judgement.detail)


@dataclass
class BoundWeight:
    """The weight the update counts with: what it claims, cut to what its task allowed
    (epochs x the data size the device announced, max_steps x batch) and to a multiple
    of the fleet's recent median."""

    weights: WeightBound
    epochs: int
    batch_size: int
    announced: Callable[[str], int | None]
    name: str = "weight"

    def process(self, item: UpdateItem) -> Rejection | None:
        assert item.meta is not None
        cap = task_samples_cap(epochs=self.epochs, batch_size=self.batch_size,
                               max_steps=item.max_steps, announced=self.announced(item.device))
        item.weight, why = self.weights.bound(item.meta.num_samples, task_cap=cap)
        if why:
            item.notes.append(("bounded:weight", f"weight bounded to {item.weight:.4g} ({why})"))
        return None


@dataclass
class ReputationWeight:
    """A device whose reputation (``DeviceHistory.reputation``) is below ``floor``
    counts with that reputation times its weight (``_contribution.weight_factor``);
    at or above it, unchanged. ``floor`` None: the stage does nothing."""

    reputation: Callable[[str], float]
    floor: float | None
    name: str = "reputation"

    def process(self, item: UpdateItem) -> Rejection | None:
        if self.floor is None:
            return None
        score = self.reputation(item.device)
        factor = weight_factor(score, self.floor)
        if factor < 1.0:
            item.weight *= factor
            item.notes.append(("bounded:reputation",
                               f"weight x {factor:.3g} (reputation {score:.3g} below "
                               f"{self.floor})"))
        return None
