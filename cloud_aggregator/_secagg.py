"""The aggregator's side of one secure-aggregation round: it learns only the sum.

``SecAggRound`` collects each step's messages (``on_advertise``, ``on_shares``,
``on_masked``, ``on_reveal``) and closes each phase when its deadline passes
(``close_advertising`` -> each device's ``Keys``; ``close_sharing`` -> each device's
``Deliver``; ``close_upload`` -> each uploader's ``Unmask``; ``finish`` -> the sum).
It keeps the masked vectors only; the one thing it can compute is the sum of the
uploaded vectors with every mask removed:

    sum = sum_{u uploaded} y_u - sum_u PRG(b_u)
          - sum_{w shared, not uploaded} sum_{u in N(w), uploaded} sign(u, w) PRG(s_uw)

with each self-mask seed b_u rebuilt from its neighbours' shares (and checked against
u's commitment) and each drop-out's mask key rebuilt the same way (checked against its
public key). A round that cannot get there (too few uploads, too few shares, shares that
do not check) raises ``SecAggAbandoned``; it never returns a sum it could not check.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from broker_bridge._secagg import (
    RandomInt,
    Words,
    commitment,
    degree,
    neighbours,
    pair_key,
    prg,
    public_bytes,
    recover,
    rejected,
    share_from_bytes,
    threshold,
)
from broker_bridge._secagg_msg import (
    Advertise,
    Deliver,
    Keys,
    Masked,
    Neighbour,
    Reveal,
    Sealed,
    Setup,
    ShareKind,
    Shares,
    Unmask,
    _Body,
)
from broker_bridge._skellam import SkellamParams
from cloud_aggregator._errors import SecAggAbandoned


@dataclass
class ServerCost:
    prg_words: int = 0
    key_exchanges: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0


@dataclass
class _Member:
    advertise: Advertise
    index: int = 0
    peers: list[int] = field(default_factory=list)
    shares: Shares | None = None
    masked: Masked | None = None
    unmask: Unmask | None = None
    reveal: Reveal | None = None


class SecAggRound:
    """One secure round, on the aggregator (see the module doc)."""

    def __init__(self, *, fleet: str, round_index: int, clip: float, scale: float,
                 fraction: float, size: int, max_devices: int, dropout: float = 1 / 3,
                 failure_bits: int = 20, randbytes: Callable[[int], bytes] = os.urandom,
                 randbelow: RandomInt = secrets.randbelow,
                 dp: SkellamParams | None = None) -> None:
        self.fleet = fleet
        self.setup = Setup(round=round_index, session=randbytes(16), clip=clip, scale=scale,
                           fraction=fraction, max_devices=max_devices, size=size,
                           subset_seed=randbytes(32), dp=dp)
        self._graph_seed = randbytes(32)
        self._randbelow = randbelow
        self._dropout, self._failure_bits = dropout, failure_bits
        self.members: dict[str, _Member] = {}
        self.by_index: dict[int, str] = {}
        self.phase = "advertise"
        self.degree = self.threshold = 0
        self.cost = ServerCost()

    # ------------------------------------------------------------ intake

    def _intake(self, device: str, body: _Body, phase: str) -> _Member | None:
        if (body.round, body.session) != (self.setup.round, self.setup.session):
            raise rejected("wrong_round", f"{device}: round {body.round} of another "
                                          f"session (this is round {self.setup.round})")
        if self.phase != phase:
            raise rejected("unexpected", f"{device}: {type(body).__name__} while the "
                                         f"round is at {self.phase}")
        self.cost.messages_up += 1
        self.cost.bytes_up += len(body.to_bytes())
        return self.members.get(device)

    def on_advertise(self, device: str, body: Advertise) -> None:
        member = self._intake(device, body, "advertise")
        if member is not None:
            if member.advertise != body:
                raise rejected("replayed", f"{device}: other keys for the same round")
            return
        self.members[device] = _Member(advertise=body)

    def on_shares(self, device: str, body: Shares) -> None:
        member = self._member(device, body, "share")
        if member.shares is not None:
            if member.shares != body:
                raise rejected("replayed", f"{device}: other shares for the same round")
            return
        if sorted(s.peer for s in body.sealed) != member.peers:
            raise rejected("malformed", f"{device}: shares are not one per neighbour")
        member.shares = body

    def on_masked(self, device: str, body: Masked) -> None:
        member = self._member(device, body, "upload")
        if member.shares is None:
            raise rejected("unexpected", f"{device}: masked vector without shares")
        if member.masked is not None:
            if member.masked != body:
                raise rejected("replayed", f"{device}: another masked vector")
            return
        if len(body.words) != self.words:
            raise rejected("malformed", f"{device}: {len(body.words)} words, "
                                        f"the round has {self.words}")
        member.masked = body

    def on_reveal(self, device: str, body: Reveal) -> None:
        member = self._member(device, body, "unmask")
        if member.unmask is None:
            raise rejected("unexpected", f"{device}: shares revealed unasked")
        if member.reveal is not None:
            if member.reveal != body:
                raise rejected("replayed", f"{device}: other revealed shares")
            return
        asked = {p: ShareKind.SELF_MASK_SEED for p in member.unmask.survivors}
        asked.update({p: ShareKind.MASK_KEY for p in member.unmask.dropped})
        got = {r.peer: r.kind for r in body.revealed}
        if got != asked:
            raise rejected("malformed", f"{device}: revealed shares are not those asked")
        for r in body.revealed:
            share_from_bytes(r.share)
        member.reveal = body

    def _member(self, device: str, body: _Body, phase: str) -> _Member:
        member = self._intake(device, body, phase)
        if member is None or not member.index:
            raise rejected("unexpected", f"{device} is not in this secure round")
        return member

    @property
    def words(self) -> int:
        from broker_bridge._secagg import shared_subset

        return len(shared_subset(self.setup.subset_seed, self.setup.size, self.setup.fraction))

    # ------------------------------------------------------------ phases

    def _down(self, body: _Body) -> None:
        self.cost.messages_down += 1
        self.cost.bytes_down += len(body.to_bytes())

    def close_advertising(self) -> dict[str, Keys]:
        """Number the devices that advertised (by device id), build the graph, and say to
        each its index and neighbours' keys."""
        self.phase = "share"
        n = len(self.members)
        if n < 3:
            self._abandon(f"{n} devices advertised keys; a secure round needs 3")
        if n > self.setup.max_devices:
            self._abandon(f"{n} devices advertised, more than the {self.setup.max_devices} "
                          f"the fixed point allows")
        for i, device in enumerate(sorted(self.members), start=1):
            self.members[device].index = i
            self.by_index[i] = device
        self.degree = degree(n, dropout=self._dropout, failure_bits=self._failure_bits)
        self.threshold = threshold(self.degree)
        out = {}
        for device, member in self.members.items():
            member.peers = neighbours(member.index, n, self.degree, self._graph_seed)
            entries = []
            for p in member.peers:
                adv = self.members[self.by_index[p]].advertise
                entries.append(Neighbour(index=p, share_public=adv.share_public,
                                         mask_public=adv.mask_public))
            out[device] = Keys(round=self.setup.round, session=self.setup.session,
                               index=member.index, devices=n, degree=self.degree,
                               threshold=self.threshold, graph_seed=self._graph_seed,
                               neighbours=tuple(entries))
            self._down(out[device])
        return out

    def _sharers(self) -> dict[int, _Member]:
        return {m.index: m for m in self.members.values() if m.shares is not None}

    def close_sharing(self) -> dict[str, Deliver]:
        """Pass each sharer the shares its sharing neighbours sealed for it."""
        self.phase = "upload"
        sharers = self._sharers()
        out = {}
        for index, member in sharers.items():
            sealed = []
            for p in member.peers:
                other = sharers.get(p)
                if other is not None and other.shares is not None:
                    sealed.append(Sealed(peer=p, ciphertext=next(
                        s.ciphertext for s in other.shares.sealed if s.peer == index)))
            if len(sealed) < self.threshold:
                self._abandon(f"device {index} has {len(sealed)} sharing neighbours, "
                              f"{self.threshold} needed")
            out[self.by_index[index]] = Deliver(round=self.setup.round,
                                                session=self.setup.session,
                                                sealed=tuple(sealed))
            self._down(out[self.by_index[index]])
        if len(out) < 3:
            self._abandon(f"{len(out)} devices shared their seeds; a secure round needs 3")
        return out

    def close_upload(self) -> dict[str, Unmask]:
        """Ask each uploader for the shares that remove the masks: its uploading
        neighbours' seeds, its silent neighbours' mask keys."""
        self.phase = "unmask"
        sharers = self._sharers()
        uploaded = {i for i, m in sharers.items() if m.masked is not None}
        if len(uploaded) < max(3, self.threshold):
            self._abandon(f"{len(uploaded)} masked vectors arrived, "
                          f"{max(3, self.threshold)} needed")
        out = {}
        for index in sorted(uploaded):
            member = sharers[index]
            held = [p for p in member.peers if p in sharers]
            member.unmask = Unmask(round=self.setup.round, session=self.setup.session,
                                   survivors=tuple(p for p in held if p in uploaded),
                                   dropped=tuple(p for p in held if p not in uploaded))
            out[self.by_index[index]] = member.unmask
            self._down(member.unmask)
        return out

    def finish(self) -> tuple[Words, list[str]]:
        """The unmasked sum (u32 words, mod 2^32) and the devices whose updates it
        holds; ``SecAggAbandoned`` when the shares do not allow it."""
        self.phase = "done"
        sharers = self._sharers()
        uploaded = {i: m for i, m in sharers.items() if m.masked is not None}
        words = self.words
        # shares by owner: owner index -> x (the revealer's index) -> share
        seed_shares: dict[int, dict[int, int]] = {}
        key_shares: dict[int, dict[int, int]] = {}
        for member in uploaded.values():
            if member.reveal is None:
                continue
            for r in member.reveal.revealed:
                into = seed_shares if r.kind == ShareKind.SELF_MASK_SEED else key_shares
                into.setdefault(r.peer, {})[member.index] = share_from_bytes(r.share)
        total = np.zeros(words, dtype=np.uint32)
        for index, member in uploaded.items():
            assert member.masked is not None
            total += member.masked.words
            adv = member.advertise

            def seed_ok(seed: bytes, adv: Advertise = adv) -> bool:
                return commitment(seed, fleet=self.fleet, round_index=self.setup.round,
                                  session=self.setup.session) == adv.seed_commitment

            seed = self._recover(seed_shares.get(index, {}), seed_ok, f"device {index}'s seed")
            total -= prg(seed, words)
            self.cost.prg_words += words
        for index, member in sharers.items():
            if index in uploaded:
                continue
            adv = member.advertise

            def key_ok(secret: bytes, adv: Advertise = adv) -> bool:
                return public_bytes(secret) == adv.mask_public

            secret = self._recover(key_shares.get(index, {}), key_ok,
                                   f"device {index}'s mask key")
            for peer in member.peers:
                if peer not in uploaded:
                    continue
                mask = prg(pair_key(secret, uploaded[peer].advertise.mask_public,
                                    fleet=self.fleet, round_index=self.setup.round,
                                    session=self.setup.session, a=index, b=peer), words)
                self.cost.key_exchanges += 1
                self.cost.prg_words += words
                # peer added +mask towards a higher index, -mask towards a lower one
                if index > peer:
                    total -= mask
                else:
                    total += mask
        return total, sorted(self.by_index[i] for i in uploaded)

    def _recover(self, shares: dict[int, int], check: Callable[[bytes], bool],
                 what: str) -> bytes:
        if len(shares) < self.threshold:
            self._abandon(f"{len(shares)} shares of {what}, {self.threshold} needed")
        try:
            return recover(shares, self.threshold, check, randbelow=self._randbelow)
        except Exception as exc:
            raise SecAggAbandoned(f"secure round {self.setup.round} abandoned: {what} "
                                  f"does not reconstruct ({exc})") from exc

    def _abandon(self, why: str) -> None:
        self.phase = "abandoned"
        raise SecAggAbandoned(f"secure round {self.setup.round} abandoned: {why}")
