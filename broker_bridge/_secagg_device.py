"""A device's side of one secure-aggregation round (docs/PROTOCOL.md section 11).

``SecAggDevice`` is a small state machine over the messages of ``_secagg_msg``: it is
made from the round's ``Setup``, answers ``advertise()``, ``on_keys`` (-> ``Shares``),
``on_deliver``, ``masked(levels)`` (-> ``Masked``) and ``on_unmask`` (-> ``Reveal``), in
that order. Whatever arrives out of order, for another round or session, or differs
from what was already answered is refused with ``SecAggRejected``; a device that refuses
a step simply stops taking part, which the aggregator handles as a drop-out. It never
reveals both seeds of one neighbour, and answers one unmask request per round.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from broker_bridge._secagg import (
    SHARE_BYTES,
    FixedPoint,
    RandomInt,
    Words,
    commitment,
    neighbours,
    pair_key,
    prg,
    private_key,
    public_bytes,
    rejected,
    share_from_bytes,
    share_key,
    share_secret,
    share_to_bytes,
    threshold,
)
from broker_bridge._secagg_msg import (
    Advertise,
    Deliver,
    Keys,
    Masked,
    Neighbour,
    Reveal,
    Revealed,
    Sealed,
    Setup,
    ShareKind,
    Shares,
    Unmask,
    _Body,
)

NONCE = bytes(12)
"""Each share-encryption key seals one message, so the nonce is constant."""


@dataclass
class DeviceCost:
    """What one device spent in a round: counted, not timed."""

    prg_words: int = 0
    key_exchanges: int = 0
    field_mults: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0


class SecAggDevice:
    """One device in one secure round (see the module doc)."""

    def __init__(self, *, fleet: str, setup: Setup,
                 randbytes: Callable[[int], bytes] = os.urandom,
                 randbelow: RandomInt = secrets.randbelow) -> None:
        self.fleet = fleet
        self.setup = setup
        self.fixed = FixedPoint(clip=setup.clip, scale=setup.scale,
                                max_devices=setup.max_devices)
        self._randbelow = randbelow
        self._share_secret = private_key(randbytes(32))
        self._mask_bytes = randbytes(32)
        self._mask_secret = private_key(self._mask_bytes)
        self._seed = randbytes(32)
        self.cost = DeviceCost(messages_down=1, bytes_down=len(setup.to_bytes()))
        self.keys: Keys | None = None
        self._peers: dict[int, Neighbour] = {}
        self._held: dict[int, tuple[int, int]] = {}  # peer -> (seed share, key share)
        self._masked: Masked | None = None
        self._unmask: Unmask | None = None
        self._reveal: Reveal | None = None
        self._advertise = Advertise(
            round=setup.round, session=setup.session,
            share_public=public_bytes(self._share_secret),
            mask_public=public_bytes(self._mask_secret),
            seed_commitment=commitment(self._seed, fleet=fleet, round_index=setup.round,
                                       session=setup.session))

    def _check(self, body: _Body) -> None:
        if (body.round, body.session) != (self.setup.round, self.setup.session):
            raise rejected("wrong_round", f"round {body.round} of another session, "
                                          f"this is round {self.setup.round}")
        self.cost.messages_down += 1
        self.cost.bytes_down += len(body.to_bytes())

    def _up(self, body: _Body) -> None:
        self.cost.messages_up += 1
        self.cost.bytes_up += len(body.to_bytes())

    def advertise(self) -> Advertise:
        """The keys and commitment (the same message each time it is asked)."""
        if self.cost.messages_up == 0:
            self._up(self._advertise)
        return self._advertise

    def on_keys(self, keys: Keys) -> Shares:
        """Check the neighbourhood, share both seeds with it, encrypted per neighbour."""
        self._check(keys)
        if self.keys is not None:
            raise rejected("replayed", "the round's keys were already given")
        expected = neighbours(keys.index, keys.devices, keys.degree, keys.graph_seed)
        if [n.index for n in keys.neighbours] != expected:
            raise rejected("malformed", "the neighbours are not the round graph's")
        if keys.threshold != threshold(keys.degree):
            raise rejected("malformed", f"threshold {keys.threshold} for degree "
                                        f"{keys.degree} (must be more than half)")
        self.keys = keys
        self._peers = {n.index: n for n in keys.neighbours}
        xs = list(self._peers)
        t = keys.threshold
        seed_shares = share_secret(self._seed, xs, t, self._randbelow)
        key_shares = share_secret(self._mask_bytes, xs, t, self._randbelow)
        self.cost.field_mults += 2 * len(xs) * t
        sealed = []
        for peer in xs:
            key = share_key(self._share_secret, self._peers[peer].share_public,
                            fleet=self.fleet, round_index=keys.round, session=keys.session,
                            sender=keys.index, receiver=peer)
            self.cost.key_exchanges += 1
            plain = share_to_bytes(seed_shares[peer]) + share_to_bytes(key_shares[peer])
            sealed.append(Sealed(peer=peer,
                                 ciphertext=ChaCha20Poly1305(key).encrypt(NONCE, plain, None)))
        out = Shares(round=keys.round, session=keys.session, sealed=tuple(sealed))
        self._up(out)
        return out

    def on_deliver(self, deliver: Deliver) -> None:
        """Open the shares the neighbours sent; one that does not open ends the round for
        this device (masking with a neighbour whose shares are missing could not be
        undone if it dropped)."""
        self._check(deliver)
        if self.keys is None or self._held:
            raise rejected("unexpected" if self.keys is None else "replayed",
                           "shares delivered before keys, or twice")
        held = {}
        for item in deliver.sealed:
            peer = self._peers.get(item.peer)
            if peer is None:
                raise rejected("malformed", f"shares from {item.peer}, not a neighbour")
            key = share_key(self._share_secret, peer.share_public, fleet=self.fleet,
                            round_index=deliver.round, session=deliver.session,
                            sender=peer.index, receiver=self.keys.index)
            self.cost.key_exchanges += 1
            try:
                plain = ChaCha20Poly1305(key).decrypt(NONCE, item.ciphertext, None)
            except InvalidTag:
                raise rejected("bad_share", f"shares from {item.peer} do not open") from None
            held[item.peer] = (share_from_bytes(plain[:SHARE_BYTES]),
                               share_from_bytes(plain[SHARE_BYTES:]))
        self._held = held

    def masked(self, levels: Words) -> Masked:
        """``levels`` (fixed-point words of the round's coordinates) plus the self mask and
        a pairwise mask per neighbour whose shares arrived: + towards a higher index,
        - towards a lower one, all mod 2^32."""
        if self.keys is None or self._masked is not None:
            raise rejected("unexpected", "masked before the shares, or twice")
        words = len(levels)
        total = levels.astype(np.uint32) + prg(self._seed, words)
        self.cost.prg_words += words
        for peer in sorted(self._held):
            seed = pair_key(self._mask_secret, self._peers[peer].mask_public,
                            fleet=self.fleet, round_index=self.keys.round,
                            session=self.keys.session, a=self.keys.index, b=peer)
            self.cost.key_exchanges += 1
            self.cost.prg_words += words
            if peer > self.keys.index:
                total += prg(seed, words)
            else:
                total -= prg(seed, words)
        self._masked = Masked(round=self.keys.round, session=self.keys.session, words=total)
        self._up(self._masked)
        return self._masked

    def on_unmask(self, request: Unmask) -> Reveal:
        """The seed shares of survivors and the key shares of drop-outs, once per round:
        the lists must split exactly the neighbours whose shares this device holds."""
        self._check(request)
        if self._masked is None:
            raise rejected("unexpected", "unmask request before this device's upload")
        if self._unmask is not None:
            if request == self._unmask and self._reveal is not None:
                return self._reveal
            raise rejected("replayed", "a different unmask request for the same round")
        if set(request.survivors) | set(request.dropped) != set(self._held):
            raise rejected("malformed", "the unmask lists are not this device's neighbours")
        out = [Revealed(peer=p, kind=ShareKind.SELF_MASK_SEED,
                        share=share_to_bytes(self._held[p][0])) for p in request.survivors]
        out += [Revealed(peer=p, kind=ShareKind.MASK_KEY,
                         share=share_to_bytes(self._held[p][1])) for p in request.dropped]
        self._unmask = request
        self._reveal = Reveal(round=request.round, session=request.session,
                              revealed=tuple(sorted(out, key=lambda r: r.peer)))
        self._up(self._reveal)
        return self._reveal
