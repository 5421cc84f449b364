"""The device's side of the training ledger: checking the inclusion proofs it is sent.

After each round (or FedBuff release) that counted this device's update, the aggregator
sends an ``InclusionProof`` on the device's ``down/proof`` topic. ``LedgerCheck`` checks
it (``broker_bridge.check_inclusion``: the record names this device, its round and the
SHA-256 of the update body this agent sent, when it still knows it; the record is in the
entry, the entry in the tree; the tree head is signed by the aggregator's key), logs one
line and calls the ``on_inclusion`` hook with the ``InclusionOutcome``.

The aggregator's public key comes from the configuration (``[agent.ledger] public_key``,
``fleetlearn ledger key STATE_DIR`` prints it) and is pinned: the agent never learns it
from the wire. Without it a proof can only be ``unpinned``: the hashes hold, but whoever
can publish on the device's topics could have made them. The agent does not trust the
first key it sees instead: that would pin whatever an attacker on the broker sent first.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

from broker_bridge import InclusionOutcome, InclusionProof, Message, check_inclusion
from edge_runtime._hooks import AgentHooks, notify

REMEMBERED = 64
"""Digests of the last sent updates kept to match proofs (one per round)."""


class LedgerCheck:
    """Checks inclusion proofs against the pinned key (see the module doc)."""

    def __init__(self, *, fleet: str, device_id: str, public_key: str | None,
                 hooks: AgentHooks, log: logging.LoggerAdapter[logging.Logger]) -> None:
        self._fleet = fleet
        self._device = device_id
        self._key = bytes.fromhex(public_key) if public_key else None
        self._hooks = hooks
        self._log = log
        self._sent: OrderedDict[int, str] = OrderedDict()
        self.outcomes: list[InclusionOutcome] = []
        """The last outcomes (at most ``REMEMBERED``), newest last."""

    def sent(self, message: Message) -> None:
        """An update went out: remember the SHA-256 of its body for its round."""
        self._sent[message.round] = hashlib.sha256(message.body).hexdigest()
        self._sent.move_to_end(message.round)
        while len(self._sent) > REMEMBERED:
            self._sent.popitem(last=False)

    def on_proof(self, proof: InclusionProof) -> InclusionOutcome:
        outcome = check_inclusion(proof, fleet=self._fleet, device=self._device,
                                  public_key=self._key, digest=self._sent.get(proof.round))
        if outcome.status == "verified":
            self._log.info("round %d: update included in training ledger entry %d (tree of "
                           "%d), signed tree head verified", proof.round, proof.index,
                           proof.size)
        elif outcome.status == "unpinned":
            self._log.info("round %d: update included in training ledger entry %d; tree head "
                           "NOT authenticated (no ledger public key configured)", proof.round,
                           proof.index)
        else:
            self._log.warning("round %d: inclusion proof FAILED: %s", proof.round,
                              outcome.detail)
        self.outcomes.append(outcome)
        del self.outcomes[:-REMEMBERED]
        notify(self._hooks.on_inclusion, outcome, self._log)
        return outcome
