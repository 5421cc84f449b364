"""Losses of the training graph: a table of composable terms, written as standard ops.

A loss is a weighted sum of per-sample terms (``LOSS_TERMS``) averaged over the batch
with optional sample weights (``sum(w * l) / sum(w)``), plus an optional FedProx term
``mu/2 * ||params - global||^2`` against the weights the round started from. Each term
is a small graph fragment; its gradient comes from the same operator rules as the
model's, so a new loss is a new entry here, never a new trainer.

Terms read one per-sample target each: ``labels`` (int64 class indices), ``targets``
(float, shaped like the model's output) or ``soft_targets`` (a teacher's logits,
shaped like the output, for distillation). The first term is the primary one: the
device's ``y`` is its target, and it decides the accuracy metric.

``LossSpec.parse`` reads the command-line form: terms joined by ``+``, options after a
colon, e.g. ``cross_entropy:label_smoothing=0.1+distillation:weight=0.5,temperature=2``
and ``prox:mu=0.01`` for the proximal term.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph._builder import GraphBuilder

LABELS, TARGETS, SOFT_TARGETS = "labels", "targets", "soft_targets"


def _per_sample(b: GraphBuilder, value: str, rank: int) -> str:
    """Mean over every axis but the batch axis (a [B] vector)."""
    if rank <= 1:
        return value
    return b.reduce("ReduceMean", value, list(range(1, rank)), keepdims=False)


@dataclass(frozen=True, kw_only=True)
class CrossEntropy:
    """Softmax cross-entropy over the last axis against class labels."""

    name: ClassVar[str] = "cross_entropy"
    target: ClassVar[str] = LABELS
    weight: float = 1.0
    label_smoothing: float = 0.0

    def check(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ModelBuildError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def build(self, b: GraphBuilder, logits: str, target: str, rank: int, classes: int) -> str:
        logp = b.op("LogSoftmax", logits, axis=-1)
        off, on = (
            self.label_smoothing / classes,
            1.0 - self.label_smoothing + self.label_smoothing / classes,
        )
        onehot = b.op("OneHot", target, b.const(classes, "int64"), b.const([off, on]), axis=-1)
        per_position = b.op(
            "Neg", b.reduce("ReduceSum", b.op("Mul", onehot, logp), [-1], keepdims=False)
        )
        return _per_sample(b, per_position, rank - 1)

    def correct(self, b: GraphBuilder, logits: str, target: str, rank: int) -> str:
        predicted = b.op("ArgMax", logits, axis=-1, keepdims=0)
        hits = b.to_float(b.op("Equal", predicted, target))
        return b.op("ReduceSum", _per_sample(b, hits, rank - 1), keepdims=0)


@dataclass(frozen=True, kw_only=True)
class MeanSquaredError:
    """Mean squared error against float targets shaped like the output."""

    name: ClassVar[str] = "mse"
    target: ClassVar[str] = TARGETS
    weight: float = 1.0

    def check(self) -> None:
        pass

    def build(self, b: GraphBuilder, logits: str, target: str, rank: int, classes: int) -> str:
        diff = b.op("Sub", logits, target)
        return _per_sample(b, b.op("Mul", diff, diff), rank)

    correct = None


@dataclass(frozen=True, kw_only=True)
class BinaryCrossEntropy:
    """Sigmoid cross-entropy on logits against targets in [0, 1] (multi-label)."""

    name: ClassVar[str] = "bce"
    target: ClassVar[str] = TARGETS
    weight: float = 1.0

    def check(self) -> None:
        pass

    def build(self, b: GraphBuilder, logits: str, target: str, rank: int, classes: int) -> str:
        # max(z, 0) - z t + log(1 + exp(-|z|)): stable for large |z|.
        relu = b.op("Relu", logits)
        soft = b.op(
            "Log", b.op("Add", b.scalar(1.0), b.op("Exp", b.op("Neg", b.op("Abs", logits))))
        )
        loss = b.op("Add", b.op("Sub", relu, b.op("Mul", logits, target)), soft)
        return _per_sample(b, loss, rank)

    def correct(self, b: GraphBuilder, logits: str, target: str, rank: int) -> str:
        predicted = b.op("Greater", logits, b.scalar(0.0))
        truth = b.op("Greater", target, b.scalar(0.5))
        hits = b.to_float(b.op("Equal", predicted, truth))
        return b.op("ReduceSum", _per_sample(b, hits, rank), keepdims=0)


@dataclass(frozen=True, kw_only=True)
class Distillation:
    """Distillation: ``T^2 * KL(softmax(t/T) || softmax(z/T))`` against teacher logits ``t``."""

    name: ClassVar[str] = "distillation"
    target: ClassVar[str] = SOFT_TARGETS
    weight: float = 1.0
    temperature: float = 1.0

    def check(self) -> None:
        if not self.temperature > 0:
            raise ModelBuildError(f"distillation temperature must be > 0, got {self.temperature}")

    def build(self, b: GraphBuilder, logits: str, target: str, rank: int, classes: int) -> str:
        inv_t = b.scalar(1.0 / self.temperature)
        student = b.op("LogSoftmax", b.op("Mul", logits, inv_t), axis=-1)
        teacher_log = b.op("LogSoftmax", b.op("Mul", target, inv_t), axis=-1)
        teacher = b.op("Exp", teacher_log)
        kl = b.reduce(
            "ReduceSum",
            b.op("Mul", teacher, b.op("Sub", teacher_log, student)),
            [-1],
            keepdims=False,
        )
        scaled = b.op("Mul", kl, b.scalar(self.temperature**2))
        return _per_sample(b, scaled, rank - 1)

    correct = None


LossTerm = CrossEntropy | MeanSquaredError | BinaryCrossEntropy | Distillation

LOSS_TERMS: dict[str, type[LossTerm]] = {
    t.name: t for t in (CrossEntropy, MeanSquaredError, BinaryCrossEntropy, Distillation)
}
"""Term name -> class. A new loss is one more entry."""


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """A composite loss: weighted per-sample terms plus an optional proximal term."""

    terms: tuple[LossTerm, ...] = field(default_factory=lambda: (CrossEntropy(),))
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        if not self.terms:
            raise ModelBuildError("a loss needs at least one term")
        if self.terms[0].target == SOFT_TARGETS:
            raise ModelBuildError(
                "the first loss term must read labels or targets, not soft targets"
            )
        kinds = {t.target for t in self.terms} - {SOFT_TARGETS}
        if len(kinds) > 1:
            raise ModelBuildError("loss terms mix class labels and float targets")
        if not self.prox_mu >= 0:
            raise ModelBuildError(f"prox mu must be >= 0, got {self.prox_mu}")
        for term in self.terms:
            if not term.weight >= 0:
                raise ModelBuildError(f"{term.name}: weight must be >= 0")
            term.check()

    @property
    def primary(self) -> LossTerm:
        return self.terms[0]

    @property
    def label_key(self) -> str:
        """What the device's ``y`` is: ``labels`` or ``targets``."""
        return self.primary.target

    @property
    def needs_soft_targets(self) -> bool:
        return any(t.target == SOFT_TARGETS for t in self.terms)

    @property
    def metric(self) -> str | None:
        """``accuracy`` when the primary term counts correct predictions."""
        return "accuracy" if self.primary.correct is not None else None

    def summary(self) -> str:
        """The primary term's name (``cross_entropy``, ``mse``...)."""
        return self.primary.name

    def to_json(self) -> dict[str, Any]:
        return {
            "terms": [{"name": t.name, **asdict(t)} for t in self.terms],
            "prox_mu": self.prox_mu,
            "metric": self.metric,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LossSpec:
        try:
            terms = []
            for item in data["terms"]:
                options = {k: v for k, v in item.items() if k != "name"}
                terms.append(_make_term(str(item["name"]), options))
            return cls(terms=tuple(terms), prox_mu=float(data.get("prox_mu", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelBuildError):
                raise
            raise ModelBuildError(f"malformed loss specification {data!r}: {exc}") from exc

    @classmethod
    def parse(cls, text: str) -> LossSpec:
        """Parse ``name[:k=v,...]`` terms joined by ``+``; ``prox:mu=X`` adds FedProx."""
        terms: list[LossTerm] = []
        mu = 0.0
        for part in text.split("+"):
            name, _, rest = part.strip().partition(":")
            options: dict[str, Any] = {}
            for pair in filter(None, (p.strip() for p in rest.split(","))):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ModelBuildError(f"loss option {pair!r} in {text!r} is not key=value")
                try:
                    options[key.strip()] = float(value)
                except ValueError as exc:
                    raise ModelBuildError(f"loss option {pair!r}: not a number") from exc
            if name == "prox":
                if set(options) - {"mu"}:
                    raise ModelBuildError(f"prox takes only mu, got {sorted(options)}")
                mu = float(options.get("mu", 0.01))
            else:
                terms.append(_make_term(name, options))
        return cls(terms=tuple(terms) or (CrossEntropy(),), prox_mu=mu)


def _make_term(name: str, options: Mapping[str, Any]) -> LossTerm:
    cls = LOSS_TERMS.get(name)
    if cls is None:
        raise ModelBuildError(
            f"unknown loss {name!r}; choose from {', '.join(sorted(LOSS_TERMS))} (and prox)"
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ModelBuildError(
            f"{name}: unknown option(s) {', '.join(unknown)}; known: {sorted(known)}"
        )
    return cls(**{k: float(v) for k, v in options.items()})


@dataclass(frozen=True)
class LossOutputs:
    """Names of the loss graph's results."""

    loss: str
    """Scalar: the batch's weighted mean loss (plus the proximal term)."""
    correct: str
    """Scalar float: correct predictions in the batch (0 without a metric)."""
    count: str
    """Scalar float: samples in the batch."""


def build_loss(
    b: GraphBuilder,
    spec: LossSpec,
    *,
    logits: str,
    output_rank: int,
    classes: int,
    targets: Mapping[str, str],
    sample_weight: str | None,
    prox: Sequence[tuple[str, str]] = (),
    primary_only: bool = False,
) -> LossOutputs:
    """Emit the loss of ``spec`` on ``logits``; ``targets`` maps target kinds to inputs."""
    total: str | None = None
    for term in spec.terms[:1] if primary_only else spec.terms:
        if term.weight == 0 and not primary_only:
            continue
        per = term.build(b, logits, targets[term.target], output_rank, classes)
        # The eval graph reports a primary term of weight 0 (a loss that trains by
        # distillation alone) unweighted: its loss and accuracy still mean something.
        if term.weight not in (0.0, 1.0):
            per = b.op("Mul", per, b.scalar(term.weight))
        total = per if total is None else b.op("Add", total, per)
    if total is None:
        raise ModelBuildError("every loss term has weight 0")
    count = b.to_float(b.op("Squeeze", b.op("Shape", total), b.ints([0])))
    if sample_weight is None:
        loss = b.reduce("ReduceMean", total, None, keepdims=False)
    else:
        weighted = b.op("ReduceSum", b.op("Mul", total, sample_weight), keepdims=0)
        norm = b.op("Max", b.op("ReduceSum", sample_weight, keepdims=0), b.scalar(1e-12))
        loss = b.op("Div", weighted, norm)
    if spec.prox_mu > 0 and not primary_only:
        for param, anchor in prox:
            diff = b.op("Sub", param, anchor)
            penalty = b.op(
                "Mul",
                b.op("ReduceSum", b.op("Mul", diff, diff), keepdims=0),
                b.scalar(spec.prox_mu / 2),
            )
            loss = b.op("Add", loss, penalty)
    primary = spec.primary
    if primary.correct is not None:
        correct = primary.correct(b, logits, targets[primary.target], output_rank)
    else:
        correct = b.scalar(0.0)
    return LossOutputs(loss=loss, correct=correct, count=count)
