"""``fleetlearn ledger verify``: check a state dir's training ledger from scratch.

It needs the ledger's entries, the update bodies they cite (both in the store) and the
initial model (the version-0 checkpoint file, or ``initial_model``; for a store older
than its ledger, the checkpoint its first entry started from); it trusts nothing
else the store holds (not the checkpoints table's hashes, not the leaf, root or size
columns). For every fleet, entry by entry, it checks:

1. the header is canonical JSON naming this fleet and index, and ``prev_entry`` is the
   previous entry's leaf hash (the hash chain);
2. the accepted records hash to ``accepted_root`` and the details to ``details_sha256``;
3. the tree head after the entry (RFC 6962 root of the leaves so far, the size, the
   timestamp) is signed by the aggregator's key (``public_key``, else the key file in the
   state dir, which then proves only that the dir is self-consistent);
4. every device signature present: it is the one in the kept body's signature block and
   verifies over the update's statement (fleet, device, round, model version, attempt,
   codec, body hash) under the key in that block; with ``enrolment`` (the aggregator's
   enrolment file, or an ``Enrolment``) that key must be the device's enrolled one
   (``device_signature(device, body, signature)`` replaces the check, for a scheme of
   one's own);
5. each cited body is kept and hashes to its digest, decodes with the recorded layout,
   and has the recorded norm;
6. ``prev_model`` is the model re-derived so far (the initial model's SHA-256 first),
   and ``model`` is what the recorded rule gives: a fresh ``RoundAggregate`` of the
   recorded robust rule adds the bodies in the recorded order with the recorded weight,
   scale and cut, and a server optimizer rebuilt from the recorded name and
   hyper-parameters (its state carried from entry to entry, as the aggregator's is)
   steps the model; the SHA-256 of the result, saved as the checkpoint saves it, must
   match, and so must any checkpoint file of that version.

The first entry that fails ends that fleet's check: ``LedgerReport.first_bad`` names it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from broker_bridge import (
    CodecError,
    CompactTree,
    Enrolment,
    Layout,
    SignatureError,
    SignedBody,
    WireError,
    decode_update_sparse,
    ed25519_verify,
    key_text,
    leaf_hash,
    root_hash,
    statement,
    tree_head_bytes,
    unpack_update_body,
    verify_signature,
)
from cloud_aggregator._aggregate import Contribution, RoundAggregate
from cloud_aggregator._aggregation import l2_norm
from cloud_aggregator._errors import AggregatorError, LedgerError, LedgerMismatch
from cloud_aggregator._ledger import (
    ZERO_HASH,
    AppendedEntry,
    canonical,
    model_sha256,
    read_public_key,
    recorded_only,
)
from cloud_aggregator._robust import RobustConfig, robust_memory_bytes
from cloud_aggregator._server_opt import make_server_optimizer
from cloud_aggregator._store import Store

F32 = npt.NDArray[np.float32]
DeviceSignatureCheck = Callable[[str, bytes, bytes], bool]


@dataclass(kw_only=True)
class LedgerReport:
    """What ``verify_ledger`` found for one fleet."""

    fleet: str
    entries: int = 0
    verified: int = 0
    models_rederived: int = 0
    device_signatures: int = 0
    device_signatures_checked: int = 0
    secure_taken: int = 0
    """Secure or differentially private rounds' models taken as recorded (checked against
    their checkpoint file, not re-derived: the unmasking, or the noise, is not recorded)."""
    combined_taken: int = 0
    """Rounds of a strategy that combines models its own way (``rule.combine``: an edge
    tier, an agglomerative cloud, a strategy of the user's), taken as recorded like
    secure ones: the combination is not a recorded rule."""
    device_keys_enrolled: int = 0
    """Signatures whose key is the device's enrolled one (with an enrolment given)."""
    first_bad: int | None = None
    problem: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def check(self) -> None:
        """Raise ``LedgerMismatch`` naming the first entry that failed, if any."""
        if self.first_bad is not None:
            raise LedgerMismatch(f"fleet {self.fleet!r}: ledger entry {self.first_bad}: "
                                 f"{self.problem}", index=self.first_bad, fleet=self.fleet)


def _load_vector(data: bytes, what: str) -> F32:
    try:
        params = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise LedgerError(f"{what} is not a saved vector") from exc
    if params.ndim != 1 or params.dtype != np.float32:
        raise LedgerError(f"{what} is not a flat float32 vector")
    return params


class _Bad(Exception):
    """One entry does not hold (internal: becomes the report's problem)."""


def _json(data: bytes, what: str) -> Any:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _Bad(f"the {what} is not JSON") from exc
    if canonical(value) != data:
        raise _Bad(f"the {what} is not in canonical form")
    return value


class _Replayer:
    """Re-derives the model entry by entry (the optimizer's state carried along)."""

    def __init__(self, params: F32) -> None:
        self.params = params
        self.sha = model_sha256(params)
        self._opt: Any = None
        self._opt_rule: Any = None

    def take_recorded(self, store: Store, report: LedgerReport, version: int,
                      sha: str, *, combined: bool = False) -> None:
        """A secure or private round's model, taken from its checkpoint file: its sum came
        from the devices' reveals, or carries noise, which the ledger does not hold (nor
        the optimizer state after)."""
        record = store.checkpoint(report.fleet, model_version=version)
        if record is None or not record.path.is_file():
            raise _Bad(f"a secure or private round: no checkpoint file of version {version} "
                       "to go on from")
        data = record.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise _Bad(f"the checkpoint file {record.path.name} is not the recorded model")
        self.params = _load_vector(data, record.path.name)
        self.sha = sha
        self._opt = None  # its state after a secure round is not re-derivable
        self._opt_rule = "unknown"
        if combined:
            report.combined_taken += 1
        else:
            report.secure_taken += 1

    def step(self, rule: dict[str, Any], layout: Layout, adds: list[Contribution]) -> None:
        robust = RobustConfig(**rule["robust"])
        opt_rule = dict(rule["optimizer"])
        name = str(opt_rule.pop("name"))
        if name.startswith("custom:"):
            raise _Bad(f"the server optimizer {name} is not re-derivable")
        if self._opt_rule == "unknown" and name != "fedavg":
            raise _Bad(f"the {name} server optimizer's state after a secure or private round "
                       "is not recorded: not re-derivable")
        if self._opt is None or self._opt_rule != rule["optimizer"]:
            # Restarted with other hyper-parameters: the aggregator carried the state of
            # an optimizer of the same name over (``ServerOptimizer.load_bytes``).
            before = self._opt
            self._opt = make_server_optimizer(name, **opt_rule)
            if before is not None and before.name == self._opt.name:
                self._opt.load_state_dict(before.state_dict())
            self._opt_rule = rule["optimizer"]
        n = max(1, len(adds))
        agg = RoundAggregate(size=layout.size, robust=robust, capacity=n,
                             max_bytes=robust_memory_bytes(size=layout.size, max_updates=n,
                                                           krum=True))
        try:
            for c in adds:
                agg.add(c)
            delta = agg.result()
            new = np.asarray(self._opt.step(self.params, delta), dtype=np.float32)
        except AggregatorError as exc:
            raise _Bad(f"the recorded rule does not apply to the recorded updates: {exc}") \
                from exc
        if not np.isfinite(new).all():
            raise _Bad("the re-derived model is not finite")
        self.params = new
        self.sha = model_sha256(new)


def _contribution(record: dict[str, Any], body: bytes, layout: Layout) -> Contribution:
    try:
        _, codec_body = unpack_update_body(body)
        indices, values = decode_update_sparse(codec_body, layout)
    except (WireError, CodecError) as exc:
        raise _Bad(f"the body of {record.get('device')!r}'s update does not decode: {exc}") \
            from exc
    idx = None if indices is None else np.asarray(indices, dtype=np.int64)
    vals = np.asarray(values, dtype=np.float32)
    cut = float(record["cut"])
    norm = l2_norm(vals)
    if cut < 1.0:  # as a bootstrapping round cut it before adding
        vals = vals * np.float32(cut)
        norm = norm * cut
    if not math.isclose(norm, float(record["norm"]), rel_tol=0.0, abs_tol=0.0):
        raise _Bad(f"{record.get('device')!r}'s update has norm {norm!r}, the entry says "
                   f"{record['norm']!r}")
    return Contribution(indices=idx, values=vals, weight=float(record["weight"]),
                        norm=float(record["norm"]), scale=float(record["scale"]))


def _check_signature(record: dict[str, Any], body: bytes, report: LedgerReport, *,
                     device_signature: DeviceSignatureCheck | None,
                     enrolment: Enrolment | None) -> None:
    """A recorded device signature: it is the one in the kept body's signature block, it
    verifies over the update's statement (docs/PROTOCOL.md section 5.2) under the key in
    that block, and, with ``enrolment``, that key is the device's enrolled one."""
    device = str(record["device"])
    signature = bytes.fromhex(str(record["signature"]))
    if device_signature is not None:  # a scheme of the caller's
        if not device_signature(device, body, signature):
            raise _Bad(f"{device!r}'s signature does not verify")
        report.device_signatures_checked += 1
        return
    try:
        signed = SignedBody.from_bytes(body)
    except SignatureError as exc:
        raise _Bad(f"{device!r}'s kept body has a broken signature block: {exc}") from exc
    if signed is None or signed.signature != signature:
        raise _Bad(f"{device!r}'s kept body does not carry the recorded signature")
    if signed.body_sha256.hex() != record.get("body_sha256"):
        raise _Bad(f"{device!r}'s signed update body is not the recorded one")
    if record.get("model_version") is None or record.get("codec") is None:
        raise _Bad(f"{device!r}'s record lacks the model version or codec it signed")
    try:
        signed_statement = statement(
            fleet=report.fleet, device=device, round=int(record["round"]),
            model_version=int(record["model_version"]), attempt=int(record["attempt"]),
            codec=str(record["codec"]), body_sha256=signed.body_sha256)
    except SignatureError as exc:
        raise _Bad(f"{device!r}'s record does not make a statement: {exc}") from exc
    if not verify_signature(signed.public_key, signature, signed_statement):
        raise _Bad(f"{device!r}'s signature does not verify over its update")
    report.device_signatures_checked += 1
    if enrolment is not None:
        if enrolment.key_of(device) != signed.public_key:
            raise _Bad(f"{device!r}'s update is signed by {key_text(signed.public_key)}, "
                       "not by its enrolled key")
        report.device_keys_enrolled += 1


def _verify_entry(store: Store, entry: AppendedEntry, *, index: int, prev_leaf: str,
                  leaves: CompactTree, public_key: bytes, replay: _Replayer,
                  device_signature: DeviceSignatureCheck | None,
                  enrolment: Enrolment | None, report: LedgerReport) -> bytes:
    header = _json(entry.header, "header")
    if not isinstance(header, dict):
        raise _Bad("the header is not an object")
    if header.get("fleet") != report.fleet or header.get("index") != index:
        raise _Bad(f"the header names fleet {header.get('fleet')!r} entry "
                   f"{header.get('index')!r}")
    if header.get("prev_entry") != prev_leaf:
        raise _Bad("prev_entry is not the previous entry's hash (the chain is broken)")
    leaf = leaf_hash(entry.header)
    leaves.append(leaf)
    records = [_json(line, f"accepted record {j}") for j, line in enumerate(entry.accepted)]
    if root_hash([leaf_hash(line) for line in entry.accepted]).hex() != header.get(
            "accepted_root") or len(records) != header.get("accepted_count"):
        raise _Bad("the accepted updates do not hash to accepted_root")
    if hashlib.sha256(entry.details).hexdigest() != header.get("details_sha256"):
        raise _Bad("the details do not hash to details_sha256")
    details = _json(entry.details, "details")
    root = leaves.root()
    head = tree_head_bytes(fleet=report.fleet, size=leaves.size,
                           timestamp_ms=entry.timestamp_ms, root=root)
    if not ed25519_verify(public_key, entry.signature, head):
        raise _Bad("the signed tree head does not verify with the aggregator's key")
    layout = Layout(tensors=tuple((str(n), tuple(s)) for n, s in details["layout"]))
    secure = bool(header["rule"].get("secure_aggregation"))
    adds: list[Contribution] = []
    for j, record in enumerate(records):
        if record.get("position") != j:
            raise _Bad(f"accepted record {j} is out of order")
        body = store.ledger_body(str(record["digest"]))
        if body is None:
            raise _Bad(f"the body of {record['device']!r}'s update ({record['digest']}) "
                       "is not kept")
        if hashlib.sha256(body).hexdigest() != record["digest"]:
            raise _Bad(f"the kept body of {record['device']!r}'s update does not match "
                       "its digest")
        if record.get("signature") is not None:
            report.device_signatures += 1
            _check_signature(record, body, report, device_signature=device_signature,
                             enrolment=enrolment)
        if not secure:  # a masked upload says nothing checkable on its own
            adds.append(_contribution(record, body, layout))
    if header.get("prev_model") != replay.sha:
        raise _Bad("prev_model is not the model re-derived so far (or the initial model)")
    private = header["rule"].get("differential_privacy") is not None
    combined = header["rule"].get("combine") is not None
    if header.get("outcome") in ("closed", "aggregated") and recorded_only(header["rule"]):
        replay.take_recorded(store, report, int(header["model_version"]), str(header["model"]),
                             combined=combined and not (secure or private))
    elif header.get("outcome") in ("closed", "aggregated"):
        replay.step(header["rule"], layout, adds)
        report.models_rederived += 1
    if header.get("model") != replay.sha:
        raise _Bad("the model the recorded rule gives is not the recorded model")
    record_ck = store.checkpoint(report.fleet, model_version=int(header["model_version"]))
    if (record_ck is not None and record_ck.path.is_file()
            and hashlib.sha256(record_ck.path.read_bytes()).hexdigest() != header["model"]):
        raise _Bad(f"the checkpoint file {record_ck.path.name} is not the recorded model")
    return leaf


def _start_version(entry: AppendedEntry) -> int:
    """The model version the first entry started from (0 unless the store is older than
    its ledger); a header that does not say is checked (and refused) later."""
    try:
        header = json.loads(entry.header)
        version = int(header["model_version"])
        applied = header["outcome"] in ("closed", "aggregated")
    except (ValueError, KeyError, TypeError, RecursionError):
        return 0
    return max(0, version - 1 if applied else version)


def verify_ledger(state_dir: str | Path, *, public_key: bytes | None = None,
                  initial_model: str | Path | None = None,
                  device_signature: DeviceSignatureCheck | None = None,
                  enrolment: Enrolment | str | Path | None = None,
                  ) -> list[LedgerReport]:
    """Verify every fleet's ledger in ``state_dir`` (see the module doc); one report each."""
    state = Path(state_dir)
    db = state / "aggregator.sqlite"
    if not db.is_file():
        raise LedgerError(f"{state} holds no aggregator store (aggregator.sqlite)")
    if enrolment is not None and not isinstance(enrolment, Enrolment):
        enrolment = Enrolment.load(enrolment, check_mode=False)
    own_key = public_key is None
    key = read_public_key(state) if public_key is None else public_key
    reports: list[LedgerReport] = []
    with Store(db, read_only=True) as store:  # an aggregator may be running on it
        for fleet in store.ledger_fleets():
            report = LedgerReport(fleet=fleet)
            if own_key:
                report.notes.append("tree heads checked against the key file in the state "
                                    "dir (pass the public key to check against a pinned one)")
            reports.append(report)
            entries = store.ledger_entries(fleet)
            if initial_model is not None:
                data = Path(initial_model).read_bytes()
            else:
                start = _start_version(entries[0]) if entries else 0
                if start:
                    report.notes.append(
                        f"the ledger starts at model version {start} (a store from before "
                        "the ledger): models are re-derived from that checkpoint, with a "
                        "fresh server optimizer state")
                ck = store.checkpoint(fleet, model_version=start)
                if ck is None or not ck.path.is_file():
                    raise LedgerError(f"no initial model (version {start}) for fleet {fleet!r}")
                data = ck.path.read_bytes()
            replay = _Replayer(_load_vector(data, "the initial model"))
            report.entries = len(entries)
            leaves = CompactTree()
            prev = ZERO_HASH
            for i, entry in enumerate(entries):
                try:
                    if entry.index != i:
                        raise _Bad(f"entry {i} is missing (next is {entry.index})")
                    prev = _verify_entry(store, entry, index=i, prev_leaf=prev, leaves=leaves,
                                         public_key=key, replay=replay,
                                         device_signature=device_signature,
                                         enrolment=enrolment, report=report).hex()
                except (_Bad, KeyError, TypeError, ValueError, LedgerError) as exc:
                    report.first_bad, report.problem = i, str(exc) or type(exc).__name__
                    break
                report.verified += 1
            if report.secure_taken:
                report.notes.append(
                    f"{report.secure_taken} secure or private rounds: their models are checked "
                    "against their checkpoint files, not re-derived (the unmasking, or the "
                    "noise, is not recorded)")
            if report.combined_taken:
                report.notes.append(
                    f"{report.combined_taken} rounds of a strategy that combines models its "
                    "own way: their models are checked against their checkpoint files, not "
                    "re-derived (the combination is not a recorded rule)")
            if report.device_signatures and enrolment is None and device_signature is None:
                report.notes.append(
                    f"{report.device_signatures_checked} device signatures verified under the "
                    "keys the updates carry; not checked against enrolled keys (give the "
                    "enrolment file)")
    return reports
