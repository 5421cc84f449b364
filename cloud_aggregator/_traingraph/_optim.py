"""Optimizers written into the training graph: SGD (momentum, weight decay) and AdamW.

Each optimizer names the state it keeps per parameter (zeros at the start of a task)
and emits the update of one parameter from its gradient, the learning rate and the
step count ``t`` (1 on the first step). Formulas follow PyTorch's ``torch.optim``:

- SGD: ``g += wd*p``; with momentum ``m = mu*m + g`` (``g + mu*m`` with Nesterov);
  ``p -= lr*m``.
- AdamW (``mode="torch"``): ``p *= 1 - lr*wd``; ``m = b1*m + (1-b1)*g``;
  ``v = b2*v + (1-b2)*g^2``; ``p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)``.
  ``mode="hf"`` is the variant of ONNX Runtime's training AdamW (the transformers
  one): ``eps`` is added to ``sqrt(v)`` before bias correction and weight decay is
  applied after the step.

``OptimizerSpec.parse`` reads ``sgd``, ``sgd:momentum=0.9,weight_decay=5e-4,nesterov=1``
or ``adamw:weight_decay=0.01,eps=1e-8,mode=hf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from cloud_aggregator._errors import ModelBuildError
from cloud_aggregator._traingraph._builder import GraphBuilder


@dataclass(frozen=True, kw_only=True)
class SGD:
    """Stochastic gradient descent with optional momentum and weight decay."""

    kind: ClassVar[str] = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ModelBuildError(f"SGD momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ModelBuildError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.nesterov and self.momentum == 0:
            raise ModelBuildError("Nesterov momentum needs momentum > 0")

    def state(self) -> tuple[str, ...]:
        return ("momentum",) if self.momentum > 0 else ()

    def step(
        self, b: GraphBuilder, p: str, g: str, states: list[str], lr: str, t: str
    ) -> tuple[str, list[str]]:
        if self.weight_decay:
            g = b.op("Add", g, b.op("Mul", p, b.scalar(self.weight_decay)))
        new_states: list[str] = []
        if self.momentum > 0:
            m = b.op("Add", b.op("Mul", states[0], b.scalar(self.momentum)), g)
            new_states.append(m)
            g = b.op("Add", g, b.op("Mul", m, b.scalar(self.momentum))) if self.nesterov else m
        return b.op("Sub", p, b.op("Mul", g, lr)), new_states


@dataclass(frozen=True, kw_only=True)
class AdamW:
    """Adam with decoupled weight decay."""

    kind: ClassVar[str] = "adamw"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    bias_correction: bool = True
    mode: str = "torch"

    def __post_init__(self) -> None:
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ModelBuildError("AdamW betas must be in [0, 1)")
        if not self.eps > 0 or not self.weight_decay >= 0:
            raise ModelBuildError("AdamW needs eps > 0 and weight_decay >= 0")
        if self.mode not in ("torch", "hf"):
            raise ModelBuildError(f"AdamW mode must be 'torch' or 'hf', got {self.mode!r}")

    def state(self) -> tuple[str, ...]:
        return ("m", "v")

    def step(
        self, b: GraphBuilder, p: str, g: str, states: list[str], lr: str, t: str
    ) -> tuple[str, list[str]]:
        b1, b2 = self.beta1, self.beta2
        m = b.op("Add", b.op("Mul", states[0], b.scalar(b1)), b.op("Mul", g, b.scalar(1 - b1)))
        v = b.op(
            "Add",
            b.op("Mul", states[1], b.scalar(b2)),
            b.op("Mul", b.op("Mul", g, g), b.scalar(1 - b2)),
        )
        one = b.scalar(1.0)
        c1 = b.op("Sub", one, b.op("Pow", b.scalar(b1), t)) if self.bias_correction else one
        c2 = b.op("Sub", one, b.op("Pow", b.scalar(b2), t)) if self.bias_correction else one
        decay = b.op("Sub", one, b.op("Mul", lr, b.scalar(self.weight_decay)))
        if self.mode == "torch":
            if self.weight_decay:
                p = b.op("Mul", p, decay)
            denom = b.op("Add", b.op("Sqrt", b.op("Div", v, c2)), b.scalar(self.eps))
            new_p = b.op("Sub", p, b.op("Mul", lr, b.op("Div", b.op("Div", m, c1), denom)))
        else:
            size = b.op("Div", b.op("Mul", lr, b.op("Sqrt", c2)), c1)
            denom = b.op("Add", b.op("Sqrt", v), b.scalar(self.eps))
            new_p = b.op("Sub", p, b.op("Mul", size, b.op("Div", m, denom)))
            if self.weight_decay:
                new_p = b.op("Mul", new_p, decay)
        return new_p, [m, v]


OptimizerSpec = SGD | AdamW

OPTIMIZERS: dict[str, type[OptimizerSpec]] = {"sgd": SGD, "adamw": AdamW}
"""Optimizer name -> class. A new optimizer is one more entry."""


def optimizer_to_json(spec: OptimizerSpec) -> dict[str, Any]:
    return {"kind": spec.kind, **asdict(spec)}


def optimizer_from_json(data: Mapping[str, Any]) -> OptimizerSpec:
    options = {k: v for k, v in data.items() if k != "kind"}
    return _make(str(data.get("kind")), options)


def parse_optimizer(text: str) -> OptimizerSpec:
    """Parse ``name[:key=value,...]`` (see the module docstring)."""
    name, _, rest = text.strip().partition(":")
    options: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ModelBuildError(f"optimizer option {pair!r} in {text!r} is not key=value")
        options[key.strip()] = value.strip()
    return _make(name, options)


def _make(name: str, options: Mapping[str, Any]) -> OptimizerSpec:
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ModelBuildError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    kinds = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(options) - set(kinds))
    if unknown:
        raise ModelBuildError(
            f"{name}: unknown option(s) {', '.join(unknown)}; known: {sorted(kinds)}"
        )
    values: dict[str, Any] = {}
    for key, raw in options.items():
        kind = kinds[key]
        try:
            if kind in (bool, "bool"):
                values[key] = (
                    str(raw).lower() in ("1", "true", "yes") if isinstance(raw, str) else bool(raw)
                )
            elif kind in (str, "str"):
                values[key] = str(raw)
            else:
                values[key] = float(raw)
        except ValueError as exc:
            raise ModelBuildError(f"{name}: option {key}={raw!r} is not a number") from exc
    return cls(**values)
