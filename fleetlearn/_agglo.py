"""Agglomerative training (FedAgg's first form): a model per tier, knowledge moved by
distillation on a public bridge set.

Each tier trains its own architecture (``TierModels``: e.g. devices ``mlp``, edges
``cnn``, the cloud ``cnn-wide``). On each link the child's architecture is what crosses
the wire: devices and their edge exchange ``mlp`` parameters, an edge and the cloud
``cnn`` parameters, with the ordinary protocol. Knowledge crosses tiers by distillation
on *bridge samples*: inputs every tier holds, here a public MNIST-1D draw generated
locally with its own seed (``bridge_inputs``); they carry no labels and nothing derived
from any device's data, so they reveal nothing about it.

- child -> parent: an aggregator FedAvg's its children's models, computes their soft
  labels (logits) on the bridge samples and trains its larger model to match them
  (temperature-scaled KL, ``cross_entropy:weight=0+distillation`` in the portable
  training compiler), starting from its parent's model (an edge) or from its own last
  model (the cloud);
- parent -> child: before its children train, an aggregator distils its larger model's
  soft labels into the child-sized model it sends down (the parent does it once, on
  the public bridge set: the children's compute and upload stay those of plain FedAvg).

``TierModel`` is one architecture: logits of any of its parameter vectors (ONNX Runtime
inference) and distillation into it (real ONNX Runtime training of the compiled graph).
``AgglomerativeRounds`` is the cloud's strategy (``_agglo_cloud``); the edges' part is
``EdgeAggregator(tier=TierLink(...))``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from cloud_aggregator import REFERENCE_MODELS, build_artifacts, build_reference_model
from device_profiles import ConfigError
from edge_runtime import PortableTrainer, load_mnist1d
from fleetlearn._pairs import named_pairs

TIERS: tuple[str, ...] = ("device", "edge", "cloud")
BRIDGE_SEED = 16_001
"""The bridge set's generator seed: distinct from the devices' data (MNIST-1D seed 42)."""
BRIDGE_SAMPLES = 2_000


def check_tier_model(name: str, *, what: str) -> None:
    """``ConfigError`` unless ``name`` is a reference model a tier can train."""
    if name not in REFERENCE_MODELS:
        raise ConfigError(f"{what}:{name!r} is not a reference model; known: "
                          f"{', '.join(REFERENCE_MODELS)}")


@dataclass(frozen=True, kw_only=True)
class TierModels:
    """The reference model each tier trains."""

    device: str = "mlp"
    edge: str = "mlp"
    cloud: str = "mlp"

    def __post_init__(self) -> None:
        for f in fields(self):
            check_tier_model(getattr(self, f.name), what=f"tier model {f.name}")

    @property
    def uniform(self) -> bool:
        """One model everywhere: plain hierarchical FedAvg, no distillation."""
        return self.device == self.edge == self.cloud

    def text(self) -> str:
        return f"device:{self.device},edge:{self.edge},cloud:{self.cloud}"

    @classmethod
    def parse(cls, text: str, *, default: str = "mlp") -> TierModels:
        """``device:mlp,edge:cnn,cloud:cnn-wide``; a tier left out trains the tier below's
        model (the device tier: ``default``)."""
        given = named_pairs(text, what="tier models", names=TIERS, form="TIER:MODEL",
                            example="device:mlp,edge:cnn,cloud:cnn-wide")
        device = given.get("device", default)
        edge = given.get("edge", device)
        return cls(device=device, edge=edge, cloud=given.get("cloud", edge))


@dataclass(frozen=True, kw_only=True)
class DistillSettings:
    """How an aggregator distils into its model on the bridge set."""

    temperature: float = 2.0
    epochs: int = 3
    lr: float = 0.05
    batch_size: int = 64
    feedback_epochs: int = 0
    """Epochs of parent -> child distillation (0: the parent sends its children's
    aggregate unchanged; measured on MNIST-1D, feedback at both tiers costs the cloud
    model 7 points, see the README)."""
    ensemble: bool = True
    """Child -> parent: the teacher is the ensemble of the children's models (their
    logits' weighted mean, ``_agglo_rounds``); False: the model of their FedAvg."""

    @classmethod
    def parse(cls, text: str) -> DistillSettings:
        """``temperature:2,epochs:3,lr:0.05,batch_size:64,feedback_epochs:0``; a name
        left out keeps its default."""
        given = named_pairs(text, what="distill", names=tuple(_DISTILL_NUMBERS), form="NAME:VALUE",
                            example="temperature:2,epochs:3")
        values: dict[str, Any] = {}
        for name, value in given.items():
            kind = _DISTILL_NUMBERS[name]
            try:
                values[name] = kind(value)
            except ValueError as exc:
                raise ConfigError(f"distill: {name} must be {kind.__name__}, got "
                                  f"{value!r}") from exc
        return cls(**values)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}")
        if self.epochs < 1 or self.feedback_epochs < 0 or self.batch_size < 1:
            raise ConfigError("distillation epochs must be >= 1, feedback epochs >= 0, "
                              "batch size >= 1")
        if not self.lr > 0:
            raise ConfigError(f"distillation lr must be > 0, got {self.lr}")


_DISTILL_NUMBERS: dict[str, type] = {"temperature": float, "epochs": int, "lr": float,
                                     "batch_size": int, "feedback_epochs": int}


def bridge_inputs(*, samples: int = BRIDGE_SAMPLES, seed: int = BRIDGE_SEED,
                  cache_dir: str | Path | None = None) -> np.ndarray:
    """The public bridge set: ``samples`` MNIST-1D inputs (no labels) from ``seed``."""
    if samples < 1:
        raise ConfigError(f"bridge samples must be >= 1, got {samples}")
    data = load_mnist1d(cache_dir=cache_dir, num_samples=max(samples, 10), seed=seed)
    x = np.concatenate([data.x_train, data.x_test])[:samples]
    return np.ascontiguousarray(x, np.float32)


@dataclass(frozen=True)
class Distilled:
    params: np.ndarray
    kl_before: float
    kl_after: float


class TierModel:
    """One architecture: its logits and distillation into it (see the module doc).

    ``directory`` holds its distillation artifacts (built there at the first use).
    Thread-safe: calls are serialised."""

    def __init__(self, model: str, directory: str | Path, *,
                 settings: DistillSettings | None = None, seed: int = 0) -> None:
        self.name = model
        self.settings = settings or DistillSettings()
        self.seed = seed
        directory = Path(directory)
        proto = build_reference_model(model, seed)
        loss = f"cross_entropy:weight=0+distillation:temperature={self.settings.temperature}"
        made = directory / "distill.json"
        if not (directory / "artifacts.json").exists():
            build_artifacts(proto, directory, loss=loss, optimizer="sgd:momentum=0.9")
            made.write_text(json.dumps({"model": model, "seed": seed, "loss": loss}))
        recorded = json.loads(made.read_text()) if made.exists() else None
        if recorded != {"model": model, "seed": seed, "loss": loss}:
            raise ConfigError(f"{directory} holds other artifacts than {model}'s for {loss} "
                              f"({recorded}): use another folder")
        self._trainer = PortableTrainer(artifacts_dir=directory)
        self.shapes = self._trainer.parameter_shapes()
        self.initial = self._trainer.get_parameters()
        self.size = int(self.initial.size)
        self._session, self._output = _inference(proto, [n for n, _ in self.shapes])
        self._lock = threading.Lock()
        self.seconds = 0.0
        """Wall seconds spent computing logits and distilling, in total."""
        self.samples_distilled = 0
        """Samples distillation trained on (epochs counted), in total."""

    def _feeds(self, params: np.ndarray) -> dict[str, np.ndarray]:
        flat = np.asarray(params, np.float32).reshape(-1)
        if flat.size != self.size:
            raise ValueError(f"{self.name} has {self.size} parameters, got {flat.size}")
        feeds, pos = {}, 0
        for name, shape in self.shapes:
            n = int(np.prod(shape))
            feeds[name] = flat[pos:pos + n].reshape(shape)
            pos += n
        return feeds

    def logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        with self._lock:
            began = time.monotonic()
            feeds: dict[str, Any] = self._feeds(params)
            out = []
            for first in range(0, len(x), 1024):
                feeds["input"] = np.ascontiguousarray(x[first:first + 1024], np.float32)
                out.append(self._session.run([self._output], feeds)[0])
            self.seconds += time.monotonic() - began
            return np.concatenate(out).astype(np.float32)

    def accuracy(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.logits(params, x).argmax(axis=1) == y))

    def kl(self, params: np.ndarray, teacher_logits: np.ndarray, x: np.ndarray) -> float:
        """The distillation loss of ``params`` against ``teacher_logits`` (mean over x)."""
        return kl_divergence(teacher_logits, self.logits(params, x), self.settings.temperature)

    def distil(self, student: np.ndarray, teacher_logits: np.ndarray, x: np.ndarray, *,
               epochs: int | None = None, seed: int = 0) -> Distilled:
        """Train ``student`` (this model's parameters) towards ``teacher_logits`` on the
        bridge inputs ``x`` with ONNX Runtime; returns the new parameters."""
        s = self.settings
        before = self.kl(student, teacher_logits, x)
        with self._lock:
            began = time.monotonic()
            self._trainer.set_parameters(np.asarray(student, np.float32))
            self._trainer.set_learning_rate(s.lr)
            result = self._trainer.train(x, np.zeros(len(x), np.int64),
                                         epochs=epochs or s.epochs, batch_size=s.batch_size,
                                         seed=seed, soft_targets=teacher_logits)
            params = self._trainer.get_parameters()
            self.seconds += time.monotonic() - began
            self.samples_distilled += result.samples_seen
        return Distilled(params=params, kl_before=before,
                         kl_after=self.kl(params, teacher_logits, x))


@dataclass(frozen=True, kw_only=True)
class TierLink:
    """An edge's part in agglomerative training: its own model (what it exchanges with
    its parent), its children's model and the bridge inputs."""

    own: TierModel
    child: TierModel
    bridge: np.ndarray


def kl_divergence(teacher: np.ndarray, student: np.ndarray, temperature: float) -> float:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, mean over rows (the graph's loss)."""
    t = _log_softmax(np.asarray(teacher, np.float64) / temperature)
    s = _log_softmax(np.asarray(student, np.float64) / temperature)
    return float(np.mean(np.sum(np.exp(t) * (t - s), axis=1)) * temperature**2)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _inference(proto: Any, params: list[str]) -> tuple[Any, str]:
    """An inference session of ``proto`` whose parameters are inputs (fed per call)."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    graph = proto.graph
    wanted = set(params)
    kept = [i for i in graph.initializer if i.name not in wanted]
    moved = [i for i in graph.initializer if i.name in wanted]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for init in moved:
        array = numpy_helper.to_array(init)
        graph.input.append(helper.make_tensor_value_info(
            init.name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session, graph.output[0].name
