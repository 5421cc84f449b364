"""How updates become model versions: the ``Strategy`` interface and what it may use.

The runtime (``_runtime.Aggregator``) owns the wire, the lock, the store, the ingest
pipeline and the journal; a strategy decides *when* devices get tasks and *when* the
aggregate becomes a new model. ``SyncRounds`` (``_sync``) and ``FedBuff``
(``_fedbuff``) implement it over one shared aggregate (``_aggregate.RoundAggregate``),
so clipping, robust rules and the screens apply to both.

The life of an update, and where a strategy takes part:

1. ``admit(device, message)``: cheap checks on the envelope (is a round open, was the
   device selected, is this a duplicate, was this attempt judged before); returns the
   task it answers (``Admit``) or an answer for the device (``Reply``).
2. The ingest pipeline decodes, validates, screens and weighs it.
3. ``check(item)``: checks that need the decoded update (deadline, buffer room,
   staleness discount into ``item.scale``); ``refused(device, task_round, answer)``
   hears of every refusal of a judged attempt (``answer.final``: nothing more from the
   device counts for that task; else a corrected attempt may).
4. The journal makes it durable (``stream`` and ``journal_meta`` say where and what);
5. ``accepted(item)``: add it to the aggregate; after each journal batch ``flushed()``
   may release a model (a batch is never split across two models).

Around that: ``tick`` opens and closes rounds (or dispatches tasks), ``resume``
rebuilds the open round or buffer from the journal after a restart, ``state`` /
``load_state`` persist what the strategy learned with each checkpoint, and
``on_task_ack`` / ``on_offline`` / ``on_hello`` / ``on_error`` follow the devices.

Strategies use the runtime only through ``StrategyContext``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from broker_bridge import Ack, AckCode, ErrorReport, Hello, Layout, Message
from cloud_aggregator._aggregate import RoundAggregate
from cloud_aggregator._answers import Answer, AttemptLedger, after_round
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._contribution import summary
from cloud_aggregator._errors import AggregatorError
from cloud_aggregator._events import Event
from cloud_aggregator._ingest import Rejection, UpdateItem
from cloud_aggregator._metrics import Counters, RoundMetrics
from cloud_aggregator._rounds import Clock
from cloud_aggregator._screen import NormScreen, WeightBound
from cloud_aggregator._store import Store, StoredUpdate

if TYPE_CHECKING:
    from cloud_aggregator._planner import WorkPlanner
    from cloud_aggregator._privacy import CentralDP
    from cloud_aggregator._recorder import RoundRecorder
    from cloud_aggregator._registry import FleetRegistry
    from cloud_aggregator._selection import SelectionPolicy

F32 = npt.NDArray[np.float32]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admit:
    """The update answers ``task_round`` of this device: run the pipeline."""

    task_round: int


@dataclass(frozen=True)
class Reply:
    """Answer the device now and stop. ``judged``: the answer refuses this very attempt
    (docs/PROTOCOL.md section 5.1): the runtime remembers it, so the same attempt gets it
    again, and tells the strategy (``refused``)."""

    answer: Answer
    judged: bool = False


class ModelState:
    """The global model: parameters, version, the server optimizer."""

    def __init__(self, *, params: F32, optimizer: Any) -> None:
        self.params = params
        self.version = 0
        self.optimizer = optimizer
        self.emulated_total_s = 0.0

    def stepped(self, delta: F32) -> F32:
        """The parameters one server-optimizer step with ``delta`` would give (not yet
        applied); ``AggregatorError`` when they are not finite."""
        new = self.optimizer.step(self.params, delta)
        if not np.isfinite(new).all():
            raise AggregatorError("the new global model is not finite")
        return np.asarray(new, dtype=np.float32)


@dataclass(kw_only=True)
class StrategyContext:
    """What the runtime lends a strategy."""

    config: AggregatorConfig
    clock: Clock
    store: Store
    registry: FleetRegistry
    policy: SelectionPolicy
    planner: WorkPlanner
    recorder: RoundRecorder
    counters: Counters
    layout: Layout
    model: ModelState
    screen: NormScreen
    weights: WeightBound
    send_task: Callable[[str, int, int], bool]
    """``send_task(device, task_round, model_version)``: False when no task could go."""
    cancel: Callable[[str, int, str], None]
    """``cancel(device, round, reason)``."""
    release: Callable[..., None]
    """``release(params=..., metrics=..., close_round=..., drop_stream=..., aggregate=...,
    selected=...)``: apply ``params`` (None: abandon ``close_round``) and checkpoint,
    broadcast, record; a release from the journal stream ``drop_stream`` is checkpointed
    at most every ``checkpoint_every_s`` and re-derived from the journal after a crash
    (the strategy's ``resume`` must release each full stream again); ``aggregate`` (and
    the round's ``selected`` devices) make the training ledger's entry; see
    ``Releases.release`` (``_releases``)."""
    emit: Callable[[Event], None]
    note: Callable[..., None]
    """``note(device, level, msg, *args)``: a log line rate-limited per device."""
    fail: Callable[[str], None]
    """Give up the run, saying why (e.g. too many rounds abandoned in a row)."""
    ledger: AttemptLedger
    """The refused attempts of recent rounds and tasks (``_answers``)."""
    queued: Callable[[], int]
    """Updates admitted but still waiting for their journal commit: ``accepted`` will
    add each of them, so a bounded aggregate must keep room for them (``check``)."""
    commit: Callable[[], None]
    """Commit the waiting updates now (``accepted`` hears of each): a round about to end
    takes what it admitted first."""
    send_secagg: Callable[[str, Any], None] | None = None
    """``send_secagg(device, body)``: a secure-aggregation body to the device's
    ``down/secagg`` (docs/PROTOCOL.md section 11)."""
    finish: Callable[[str], None] = lambda reason: None
    """End the run cleanly, saying why (e.g. the privacy budget is spent)."""
    privacy: CentralDP | None = None
    """Central differential privacy (``_privacy``), when configured: its aggregate
    replaces the plain one, and a strategy that supports it (``supports_privacy``)
    charges each released round to it."""

    def after_round(self, task_round: int, device: str, attempt: int, *,
                    unknown: str = AckCode.STALE_ROUND, why: str = "") -> Answer:
        """The answer to an update of a round or task that is not open, or whose device
        already counts (``_answers.after_round``)."""
        return after_round(self.store, self.ledger, fleet=self.config.fleet,
                           task_round=task_round, device=device, attempt=attempt,
                           unknown=unknown, why=why)

    def outcome(self, device: str, *, completed: bool, duration_s: float | None = None,
                loss: float | None = None, num_samples: int | None = None) -> None:
        """A device's task ended (its update counted, or it missed): its history records
        it, then the selection policy learns from it."""
        self.registry.record_outcome(device, completed=completed, duration_s=duration_s,
                                     loss=loss, num_samples=num_samples)
        self.policy.feedback(device, duration_s=duration_s, completed=completed, loss=loss,
                             num_samples=num_samples)

    def new_aggregate(self, capacity: int) -> RoundAggregate:
        if self.privacy is not None:
            return self.privacy.new_aggregate(self.layout.size)
        return RoundAggregate(size=self.layout.size, robust=self.config.robust_config(),
                              capacity=capacity, max_bytes=self.config.robust_max_bytes,
                              keep_exact=self.config.contribution_marginal)

    def contributions(self, aggregate: RoundAggregate, round_index: int,
                      delta: F32) -> dict[str, Any]:
        """``RoundMetrics`` fields for what each device contributed to ``aggregate``
        (its result ``delta``): the records, with marginals when configured and an
        evaluator is at hand, and the round's mean and lowest cosine."""
        if self.privacy is not None:
            return {}  # per-device figures would be released without noise
        marginals = None
        evaluator = self.recorder.evaluator
        if self.config.contribution_marginal and evaluator is not None:
            try:
                marginals = aggregate.log.marginals(
                    aggregate=delta, params=self.model.params,
                    accuracy=lambda p: evaluator.evaluate(p).accuracy)
            except AggregatorError as exc:
                log.error("round %d: marginal contributions not measured: %s", round_index,
                          exc)
        records = aggregate.records(round_index, marginals=marginals)
        stats = summary(records)
        return {"contributions": records, "alignment_mean": stats["mean"],
                "alignment_min": stats["min"]}

    def journal(self, stream: int) -> Iterator[StoredUpdate]:
        """The journaled updates of ``stream``, in acceptance order (for ``resume``)."""
        return self.store.round_updates(self.config.fleet, stream)

    def rng(self, index: int) -> np.random.Generator:
        """The selection's generator: from the seed, or from the OS CSPRNG under DP (a
        sample anyone could recompute from the seed would amplify nothing)."""
        if self.privacy is not None:
            from broker_bridge._skellam import noise_rng

            return noise_rng()
        return np.random.default_rng([self.config.seed, index])


class Strategy(Protocol):
    """How the fleet's updates become model versions (see the module doc)."""

    name: str

    def bind(self, ctx: StrategyContext) -> None: ...

    def load_state(self, state: Mapping[str, Any]) -> None: ...

    def state(self) -> dict[str, Any]: ...

    def resume(self) -> None: ...

    def tick(self, now: float) -> bool: ...

    def admit(self, device: str, message: Message) -> Admit | Reply: ...

    def check(self, item: UpdateItem) -> Rejection | None: ...

    def refused(self, device: str, task_round: int, answer: Answer) -> None: ...

    def stream(self, item: UpdateItem) -> int: ...

    def journal_meta(self, item: UpdateItem) -> dict[str, Any]: ...

    def accepted(self, item: UpdateItem) -> None: ...

    def on_task_ack(self, device: str, ack: Ack) -> None: ...

    def on_offline(self, device: str) -> None: ...

    def on_hello(self, device: str, hello: Hello, *, back: bool) -> None: ...

    def on_error(self, device: str, report: ErrorReport) -> None: ...

    def flushed(self) -> None: ...

    def status(self) -> str: ...

    @property
    def defers_bootstrap(self) -> bool: ...


class StrategyBase:
    """What every strategy starts from: the context it is bound to (``ctx``)."""

    name = "strategy"
    defers_bootstrap = False
    supports_privacy = False
    """True when the strategy charges its releases to ``ctx.privacy`` (``SyncRounds``)."""

    def __init__(self) -> None:
        self._ctx: StrategyContext | None = None

    @property
    def ctx(self) -> StrategyContext:
        if self._ctx is None:
            raise AggregatorError(f"strategy {self.name} is not bound to an aggregator")
        return self._ctx

    def bind(self, ctx: StrategyContext) -> None:
        self._ctx = ctx


def record_round(ctx: StrategyContext, metrics: RoundMetrics) -> RoundMetrics:
    """``metrics`` completed with the recorder's running figures."""
    return ctx.recorder.complete(metrics, emulated_total_s=ctx.model.emulated_total_s)
