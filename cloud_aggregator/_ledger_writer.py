"""What the runtime appends to the training ledger at each release, and what it tells.

``LedgerWriter.pending`` builds the entry of a round (or FedBuff release) from the
aggregate's ``added`` list (the canonical accumulation order), the recorder's refusals,
the model hashes and the configured rule; the runtime hands it to the store, which
appends it, with the bodies it cites copied from the journal, in the transaction that
writes the checkpoint or closes the round. Once that
committed, ``publish`` puts the signed tree head, retained, on ``broadcast/ledger`` and
sends each device whose update the entry counts its ``InclusionProof`` on ``down/proof``
(docs/PROTOCOL.md). Publishing is best effort: the ledger in the store is the record; a
device that missed its proof can still be shown the entry by ``fleetlearn ledger show``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from broker_bridge import (
    Channel,
    InclusionProof,
    Layout,
    TreeHead,
    inclusion_path,
    inclusion_paths,
    leaf_hash,
)
from cloud_aggregator._aggregate import RoundAggregate
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._ledger import (
    AddedUpdate,
    AggregatorKey,
    AppendedEntry,
    ContributionsHook,
    PendingEntry,
)
from cloud_aggregator._recorder import RoundRecorder
from cloud_aggregator._server_opt import ServerOptimizer, optimizer_options
from cloud_aggregator._store import Store
from cloud_aggregator._sync import SyncRounds, stored_source

log = logging.getLogger(__name__)

LEDGER_TOPIC = "ledger"
PROOF_TOPIC = "proof"


def rule_of(config: AggregatorConfig, optimizer: Any, strategy: Any) -> dict[str, Any]:
    """The aggregation rule an entry records: enough to re-derive the model. A server
    optimizer or a ``combine`` of the user's is named, and not re-derivable."""
    if isinstance(optimizer, ServerOptimizer):
        opt: dict[str, Any] = {"name": optimizer.name, **optimizer_options(optimizer)}
    else:
        opt = {"name": f"custom:{type(optimizer).__name__}"}
    rule: dict[str, Any] = {"strategy": strategy.name, "robust": asdict(config.robust_config()),
                            "optimizer": opt}
    combine = getattr(type(strategy), "combine", None)
    if combine is not None and combine is not SyncRounds.combine:
        rule["combine"] = f"custom:{type(strategy).__name__}"
    if config.secure_aggregation:  # the sum comes from the devices' reveals: not recorded
        rule["secure_aggregation"] = True
    plan = config.privacy_plan()
    if plan is not None:  # the noise is not recorded (it would undo the privacy it gives)
        rule["differential_privacy"] = {"noise_multiplier": plan.noise_multiplier,
                                        "delta": config.dp_delta, "clipping": plan.clipping}
    return rule


class LedgerWriter:
    """Builds entries, then publishes heads and proofs (see the module doc)."""

    def __init__(self, *, config: AggregatorConfig, store: Store, key: AggregatorKey,
                 layout: Layout, channel: Channel, recorder: RoundRecorder) -> None:
        self._config = config
        self._store = store
        self.key = key
        self._layout = layout
        self._channel = channel
        self._recorder = recorder
        self.contributions: ContributionsHook | None = None
        """Per-device contribution records for each entry (see ``ContributionsHook``)."""

    def pending(self, *, round_index: int, outcome: str, model_version: int,
                prev_model: str, model: str, aggregate: RoundAggregate, stream: int,
                selected: Sequence[str] | None, optimizer: Any, strategy: Any,
                contribution_records: Sequence[Any] = ()) -> PendingEntry:
        """The entry of a release; ``contribution_records``: the round's
        ``ContributionRecord``s (the
        ``contributions`` hook, when set, gives them instead)."""
        fleet = self._config.fleet
        added = list(aggregate.added)
        if self._config.secure_aggregation and not added:
            # A secure round adds nothing to the aggregate (its sum is unmasked apart):
            # its masked uploads are listed as journaled, counting equally.
            added = [AddedUpdate(source=stored_source(s), weight=1.0, scale=1.0, cut=1.0,
                                 norm=0.0) for s in self._store.round_updates(fleet, stream)
                     if s.meta.get("secure")]
        refusals, more = self._recorder.refusals()
        records = [a.record(i) for i, a in enumerate(added)]
        contributions: list[Any] | None = [
            r.to_json() if hasattr(r, "to_json") else dict(r)
            for r in contribution_records] or None
        if self.contributions is not None:
            try:
                made = self.contributions(round_index, records)
                contributions = None if made is None else [
                    c.to_json() if hasattr(c, "to_json") else dict(c) for c in made]
            except Exception:
                log.exception("the ledger's contributions hook failed (entry without them)")
        details = {
            "selected": list(selected) if selected is not None
            else sorted({a.source.device for a in added}),
            "rejected": [r.to_json() for r in refusals], "rejected_more": more,
            "layout": [[name, list(shape)] for name, shape in self._layout.tensors],
            "contributions": contributions,
        }
        return PendingEntry(fleet=fleet, round=round_index, outcome=outcome,
                            model_version=model_version, prev_model=prev_model, model=model,
                            rule=rule_of(self._config, optimizer, strategy), accepted=added,
                            stream=stream, details=details, signer=self.key, at=time.time())

    def publish(self, entry: AppendedEntry) -> None:
        """The signed head, retained on ``broadcast/ledger``; each counted device's proof."""
        head = TreeHead(size=entry.tree_size, timestamp_ms=entry.timestamp_ms,
                        root=entry.root.hex(), signature=entry.signature.hex(),
                        key=self.key.public_hex)
        topics = self._channel.topics
        try:
            self._channel.send(topics.broadcast(LEDGER_TOPIC),
                               head.to_message(fleet=self._config.fleet), retain=True)
        except Exception as exc:  # a dead link is data here: the store has the entry
            log.warning("cannot publish the ledger's tree head: %s", exc)
        if not entry.accepted:
            return
        path = entry.path
        if path is None:  # read back from the store (not appended by this process)
            leaves = self._store.ledger_leaves(self._config.fleet)
            path = tuple(inclusion_path(entry.index, leaves[:entry.tree_size]))
        entry_path = [h.hex() for h in path]
        update_paths = inclusion_paths([leaf_hash(line) for line in entry.accepted])
        header = entry.header.decode("ascii")
        for j, line in enumerate(entry.accepted):
            record = json.loads(line)
            proof = InclusionProof(
                round=int(record["round"]), index=entry.index, entry=header,
                entry_path=entry_path, update=line.decode("ascii"), update_index=j,
                update_path=[h.hex() for h in update_paths[j]],
                size=entry.tree_size, timestamp_ms=entry.timestamp_ms, root=head.root,
                signature=head.signature)
            device = str(record["device"])
            try:
                self._channel.send(topics.down(device, PROOF_TOPIC), proof.to_message(
                    fleet=self._config.fleet, device=device, round=proof.round))
            except Exception as exc:
                log.warning("cannot send device %s its inclusion proof: %s", device, exc)
