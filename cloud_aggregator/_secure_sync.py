"""Secure sync rounds: ``SyncRounds`` whose aggregator learns only each round's sum.

A round opens as ``SyncRounds`` opens one (selection, tasks: their codec is ``secagg``),
and its devices also get the round's ``setup`` (docs/PROTOCOL.md section 11). Then, on
the round's clock, each step waits until every device it expects has answered or
``secure_phase`` seconds have passed: keys (``advertise`` -> ``keys``), shares
(``shares`` -> ``deliver``), the uploads (the masked vectors travel as ordinary updates:
acknowledged, journaled, counted by the round's rules; the journal only ever holds
masked vectors) and, when the round decides to close, the unmasking (``unmask`` ->
``reveal``). The sum, decoded from fixed point, divided by the devices it holds and
spread over the round's shared coordinates, is the round's delta for ``combine``. A
round whose sum cannot be checked is abandoned (``SecAggAbandoned``), as is an open
secure round found at a restart (its secrets lived in memory).

Updates count equally (an unweighted mean): a weight claimed by a device would scale
its update where no one can see it. Each coordinate is clipped to ``secure_clip``: the
most one device can move the sum.

With differential privacy (distributed DP, ``_skellam_dp``) the setup carries the DP
extension: each device clips its values to the L2 bound, rounds them within the norm
bound and adds its Skellam noise before masking, so the sum is already private; the
round is charged to the accountant (``ctx.privacy``) with the devices it summed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker_bridge import Message, printable
from broker_bridge._errors import SecAggRejected
from broker_bridge._secagg import shared_subset
from broker_bridge._secagg_msg import Advertise, Masked, Reveal, Shares, parse, read_secagg
from cloud_aggregator._aggregate import RoundAggregate
from cloud_aggregator._errors import SecAggAbandoned
from cloud_aggregator._ingest import Rejection, UpdateItem
from cloud_aggregator._privacy import PrivateAggregate, RoundRelease
from cloud_aggregator._rounds import Decision
from cloud_aggregator._secagg import SecAggRound
from cloud_aggregator._skellam_dp import DIM_BOUND
from cloud_aggregator._sync import SyncRounds, _report
from device_profiles import ConfigError

log = logging.getLogger(__name__)

CODEC = "secagg"
"""The task codec of a secure round: an agent that cannot run it declines the task."""


@dataclass
class SecureUpload:
    """The ingest stage in place of ``decode``: the body is a masked vector of the open
    secure round (its session, its length); nothing else can be checked."""

    strategy: SecureSyncRounds
    name: str = "secagg"

    def process(self, item: UpdateItem) -> Rejection | None:
        try:
            body = parse(bytes(item.codec_body))
        except SecAggRejected as exc:
            return Rejection("codec", str(exc))
        sa = self.strategy.secure
        if not isinstance(body, Masked):
            return Rejection("codec", "the update body is not a masked vector")
        if sa is None or (body.round, body.session) != (sa.setup.round, sa.setup.session):
            return Rejection("codec", "the masked vector is not of the open secure round")
        if len(body.words) != sa.words or sa.phase != "upload":
            return Rejection("codec", f"{len(body.words)} words in phase {sa.phase}")
        item.weight = 1.0
        return None


class SecureSyncRounds(SyncRounds):
    """Sync rounds with secure aggregation (see the module doc)."""

    name = "secure-sync"
    defers_bootstrap = False
    supports_privacy = True  # distributed DP: the devices noise, the sum is charged

    def __init__(self) -> None:
        super().__init__()
        self.secure: SecAggRound | None = None
        self._phase_at = 0.0
        self._closing: tuple[Decision, str] | None = None
        self._delta: np.ndarray | None = None

    # -- the round's secure part -------------------------------------------------------

    def _begin(self, index: int, selected: list[str], *, quorum: int, deadline_s: float,
               started_at: float, q: float | None = None) -> None:
        super()._begin(index, selected, quorum=quorum, deadline_s=deadline_s,
                       started_at=started_at, q=q)
        cfg = self.ctx.config
        fixed = cfg.secure_fixed_point()
        privacy = self.ctx.privacy
        skellam = privacy.plan.skellam if privacy is not None else None
        if skellam is not None:
            words = math.ceil(cfg.secure_fraction * self.ctx.layout.size)
            if words > DIM_BOUND:
                raise ConfigError(f"distributed DP bounds rounds of up to {DIM_BOUND} "
                                  f"coordinates; this one sends {words} (lower "
                                  "secure_fraction)")
        self.secure = SecAggRound(fleet=cfg.fleet, round_index=index, clip=fixed.clip,
                                  scale=fixed.scale, fraction=cfg.secure_fraction,
                                  size=self.ctx.layout.size, max_devices=fixed.max_devices,
                                  dp=skellam.params if skellam is not None else None)
        self._phase_at = self.ctx.clock.now()
        self._closing = None
        for device in selected:
            self._send(device, self.secure.setup)

    def _send(self, device: str, body: Any) -> None:
        send = self.ctx.send_secagg
        assert send is not None, "the runtime lends send_secagg to secure strategies"
        send(device, body)

    def _replace(self, rnd: Any) -> None:
        """A replacement for a decliner joins the secure round while keys are still
        being gathered (later, it could not be keyed: it declines for want of shares)."""
        before = set(rnd.selected)
        super()._replace(rnd)
        sa = self.secure
        for device in rnd.selected:
            if device not in before and sa is not None and sa.phase == "advertise":
                self._send(device, sa.setup)

    def resume(self) -> None:
        """An open secure round cannot go on after a restart (its secrets lived in this
        process, and its journal holds masked vectors only): it is abandoned."""
        ctx, cfg = self.ctx, self.ctx.config
        rounds = ctx.store.rounds(cfg.fleet)
        self.next_round = (rounds[-1].round + 1) if rounds else 1
        for rec in rounds:
            if rec.state == "open":
                log.warning("round %d was a secure round: its secrets are gone with the "
                            "process; abandoning it", rec.round)
                ctx.store.close_round(fleet=cfg.fleet, round_index=rec.round,
                                      state="abandoned")

    def on_secagg(self, device: str, message: Message) -> None:
        sa = self.secure
        if sa is None:
            return
        try:
            body = read_secagg(message)
            if isinstance(body, Advertise):
                sa.on_advertise(device, body)
            elif isinstance(body, Shares):
                sa.on_shares(device, body)
            elif isinstance(body, Reveal):
                sa.on_reveal(device, body)
            else:
                raise SecAggRejected("unexpected", f"a {type(body).__name__} from a device")
        except SecAggRejected as exc:
            self.ctx.counters.update(f"secagg:{exc.code}")
            self.ctx.note(device, logging.WARNING, "device %s: secure aggregation message "
                          "refused: %s", device, printable(exc, 200))
            return
        self._advance(self.ctx.clock.now())

    def status(self) -> str:
        line = super().status()
        sa = self.secure
        if sa is not None and self._open is not None and sa.phase in (
                "advertise", "share", "unmask"):
            what = {"advertise": "devices' public keys", "share": "devices' sealed shares",
                    "unmask": "survivors' revealed shares"}[sa.phase]
            line += f"; secure aggregation waits for the {what}"
        return line

    def _waiting(self) -> bool:
        """Does the current step still wait for a device it expects?"""
        sa = self.secure
        assert sa is not None and self._open is not None
        members = sa.members
        if sa.phase == "advertise":  # devices that declined or dropped are not awaited
            return any(d not in members for d in self._open.round.pending())
        if sa.phase == "share":
            return any(m.shares is None for m in members.values() if m.index)
        if sa.phase == "unmask":
            return any(m.unmask is not None and m.reveal is None for m in members.values())
        return False

    def _advance(self, now: float) -> bool:
        """Close the current step when nobody it expects is missing or its time is up."""
        sa = self.secure
        if sa is None or self._open is None or sa.phase in ("upload", "done", "abandoned"):
            return False
        if self._waiting() and now - self._phase_at < self.ctx.config.secure_phase:
            return False
        self._phase_at = now
        try:
            if sa.phase == "advertise":
                for device, keys in sa.close_advertising().items():
                    self._send(device, keys)
            elif sa.phase == "share":
                for device, deliver in sa.close_sharing().items():
                    self._send(device, deliver)
            elif sa.phase == "unmask":
                assert self._closing is not None
                self._end_secure(*self._closing)
        except SecAggAbandoned as exc:
            self._end_secure(Decision.ABANDON, str(exc))
        return True

    def tick(self, now: float) -> bool:
        if self._advance(now):
            return True
        if self.secure is not None and self.secure.phase == "unmask":
            return False
        return super().tick(now)

    def _end_round(self, decision: Decision, reason: str) -> None:
        """The round decided: unmask first (the unmask step closes it), or abandon."""
        sa = self.secure
        if decision is Decision.ABANDON or sa is None or sa.phase != "upload":
            # No sum can be checked before the uploads (or after a failed step).
            at = "" if sa is None or sa.phase == "upload" else f" (secure round at {sa.phase})"
            self._end_secure(Decision.ABANDON, reason + at)
            return
        try:
            for device, request in sa.close_upload().items():
                self._send(device, request)
        except SecAggAbandoned as exc:
            self._end_secure(Decision.ABANDON, str(exc))
            return
        self._closing = (decision, reason)
        self._phase_at = self.ctx.clock.now()

    def _end_secure(self, decision: Decision, reason: str) -> None:
        self._delta = None
        sa = self.secure
        if decision is Decision.CLOSE and sa is not None:
            try:
                total, counted = sa.finish()
                fixed = self.ctx.config.secure_fixed_point()
                mean = fixed.decode_sum(total, len(counted)) / len(counted)
                delta = np.zeros(self.ctx.layout.size, np.float32)
                delta[shared_subset(sa.setup.subset_seed, sa.setup.size,
                                    sa.setup.fraction)] = mean
                self._delta = delta
                self._released(delta, len(counted))
                self.ctx.counters.update("secagg:rounds_summed")
                log.info("round %d: secure sum of %d masked updates (%d devices keyed, "
                         "degree %d, threshold %d, %d coordinates)", sa.setup.round,
                         len(counted), len(sa.by_index), sa.degree, sa.threshold, len(mean))
            except SecAggAbandoned as exc:
                decision, reason = Decision.ABANDON, str(exc)
                self.ctx.counters.update("secagg:rounds_abandoned")
        self.secure = None
        self._closing = None
        super()._end_round(decision, reason)

    def _released(self, delta: np.ndarray, summed: int) -> None:
        """Under DP: what the round released, for ``_charge`` (its summed devices)."""
        if self.ctx.privacy is None or self._open is None:
            return
        agg = self._open.aggregate
        if isinstance(agg, PrivateAggregate):
            agg.release = RoundRelease(delta=delta, counted=summed, unclipped=0,
                                       noisy_unclipped_share=None,
                                       next_clip_norm=self.ctx.privacy.clip_norm)

    def _charge(self, agg: RoundAggregate, *, released: bool) -> dict[str, float | None]:
        """A private round whose sum was unmasked is charged even if it is not applied
        after all: the aggregator has seen the noisy sum."""
        unmasked = getattr(agg, "release", None) is not None
        return super()._charge(agg, released=released or unmasked)

    def _round_delta(self, agg: RoundAggregate) -> np.ndarray:
        assert self._delta is not None
        return self._delta

    # -- updates -----------------------------------------------------------------------

    def accepted(self, item: UpdateItem) -> None:
        op, sa = self._open, self.secure
        if op is None or op.round.spec.index != item.task_round or sa is None:
            return
        assert item.meta is not None
        body = parse(bytes(item.codec_body))
        assert isinstance(body, Masked)
        try:
            sa.on_masked(item.device, body)
        except SecAggRejected as exc:  # not in the round's sum: it does not count
            self.ctx.note(item.device, logging.WARNING, "device %s: masked vector not "
                          "summed: %s", item.device, printable(exc, 200))
            return
        op.round.count(item.device, _report(item.meta))

    def journal_meta(self, item: UpdateItem) -> dict[str, Any]:
        assert item.meta is not None
        return {"num_samples": item.meta.num_samples, "weight": 1.0, "secure": True,
                "model_version": item.message.model_version,
                "emulated_s": item.meta.emulated_s}
