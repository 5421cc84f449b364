"""Local training as a replaceable callable: ``(task, global params, data, trainer, budget)
-> LocalResult``.

The agent fetches the task's artifacts and global model, leases a ``Trainer`` for them,
then calls its training callable (``Agent(training=...)``; ``train_locally`` by default)
on the executor. Whatever the callable does (a learning-rate schedule, a proximal term,
feature extraction before training, fewer steps on a hot device), the agent turns its
result into an update: ``result.parameters - global params``, weighted by
``result.samples``.

A callable must: return parameters of the model's length (``params.size``; else the task
fails with ``HookError``); report the samples it really trained on (0 means nothing was
trained: the agent withdraws the task instead of sending an empty update); stop soon after
``budget.should_stop()`` turns true or ``budget.seconds`` have passed since it was called
(whatever it does before training counts). It may raise ``DataError`` for data that
cannot train this model (reported as code ``data``). It runs while it holds the trainer,
which is lent to it alone for the call.

``train_locally`` checks the data against the manifest's input shape and label dtype
(int64 class indices, or float32 targets for regression and BCE). It has no teacher:
artifacts whose loss distils (``trainer.needs_soft_targets``) fail with ``ArtifactError``
there; a training callable that passes ``soft_targets`` to ``Trainer.train`` runs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic

import numpy as np

from broker_bridge import TaskSpec
from edge_runtime._data import LocalData, Task, label_range_problem, validate_for_model
from edge_runtime._errors import ArtifactError, DataError, HookError
from edge_runtime._training import Trainer


@dataclass(frozen=True, kw_only=True)
class TrainingBudget:
    """What a training callable may spend."""

    seconds: float
    """Time left for training: the task's deadline from receipt, less what fetching took
    and the agent's ``deadline_margin_s``. May be <= 0: then train nothing."""
    should_stop: Callable[[], bool]
    """True once the round is cancelled or the agent stops: return what was trained."""


@dataclass(frozen=True, kw_only=True, eq=False)
class LocalResult:
    """What local training produced."""

    parameters: np.ndarray
    """The trained parameters, flat, in the trainer's layout order."""
    samples: int
    """Samples trained on, counting repeats over epochs (the update's weight)."""
    steps: int
    loss: float
    """Mean training loss (NaN when nothing was trained)."""
    stopped_early: bool = False
    eval_loss: float | None = None
    """Federated evaluation of the *global* model on the held-out data (``task.evaluate``)."""
    eval_accuracy: float | None = None
    eval_samples: int = 0


LocalTraining = Callable[[TaskSpec, np.ndarray, LocalData, Trainer, TrainingBudget], LocalResult]
"""The type of ``Agent(training=...)``."""


def train_locally(
    task: TaskSpec, params: np.ndarray, data: LocalData, trainer: Trainer, budget: TrainingBudget
) -> LocalResult:
    """The default: check the data fits the model, evaluate the global model on the
    held-out split when the task asks, then train as the task says within what is left
    of the budget (the checks and the evaluation count against it)."""
    t0 = monotonic()
    check_data(trainer, task, data)
    trainer.set_parameters(params)
    eval_loss = eval_acc = None
    eval_samples = 0
    if task.evaluate and data.x_eval is not None and data.y_eval is not None:
        result_eval = trainer.evaluate(data.x_eval, data.y_eval)
        eval_loss, eval_acc = finite(result_eval.loss), finite(result_eval.accuracy)
        eval_samples = len(data.y_eval)
    left = budget.seconds - (monotonic() - t0)
    if left <= 0:
        return LocalResult(parameters=params, samples=0, steps=0, loss=math.nan,
                           stopped_early=True, eval_loss=eval_loss, eval_accuracy=eval_acc,
                           eval_samples=eval_samples)
    try:
        result = trainer.train(
            data.x, data.y, epochs=task.epochs, batch_size=task.batch_size, lr=task.lr,
            seed=task.seed, deadline_s=left, should_stop=budget.should_stop,
            max_steps=task.max_steps,
        )
    except (ValueError, RuntimeError) as exc:
        raise DataError(f"training failed on local data: {exc}") from exc
    return LocalResult(
        parameters=trainer.get_parameters(), samples=result.samples_seen, steps=result.steps,
        loss=result.mean_loss, stopped_early=result.stopped_early, eval_loss=eval_loss,
        eval_accuracy=eval_acc, eval_samples=eval_samples,
    )


def check_data(trainer: Trainer, task: TaskSpec, data: LocalData) -> None:
    """``DataError`` when the local samples cannot train this model (shapes, labels);
    ``ArtifactError`` when the model's loss needs what ``train_locally`` cannot give."""
    if trainer.needs_soft_targets:
        raise ArtifactError(
            "these artifacts' loss distils from a teacher's logits (soft_targets), which "
            "the default train_locally has no source for: run the agent with a training "
            "callable (Agent(training=...)) that passes soft_targets to Trainer.train")
    shape = trainer.input_shape
    if shape is not None:
        kind: Task = "regression" if trainer.label_dtype == "float32" else "classification"
        validate_for_model(data.x, data.y, shape, num_classes=task.num_classes, task=kind)
    elif len(data.y) == 0:
        raise DataError("no local samples")
    else:
        problem = labels_problem(data, task.num_classes)
        if problem is not None:
            raise DataError(problem)


def labels_problem(data: LocalData, num_classes: int | None) -> str | None:
    """Why integer labels cannot train a model of ``num_classes`` classes, if they cannot
    (nothing is said while the number of classes is unknown)."""
    return None if num_classes is None else label_range_problem(data.y, num_classes)


def checked_result(result: object, size: int) -> LocalResult:
    """The callable's result, refused (``HookError``) when the agent cannot use it."""
    if not isinstance(result, LocalResult):
        raise HookError(f"the training callable returned {type(result).__name__}, "
                        "not a LocalResult")
    params = np.asarray(result.parameters)
    if params.shape != (size,):
        raise HookError(f"the training callable returned parameters of shape {params.shape}; "
                        f"the model has {size}")
    if isinstance(result.samples, bool) or not isinstance(result.samples, int | np.integer) \
            or result.samples < 0 or result.steps < 0:
        raise HookError(f"the training callable returned samples={result.samples!r}, "
                        f"steps={result.steps!r}")
    return result


def finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
