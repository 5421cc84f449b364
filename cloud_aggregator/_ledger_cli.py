"""``fleetlearn ledger verify|show|key``: the training ledger of a state dir (the checks
are ``_ledger_verify``'s; ``show_entry`` prints one entry)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud_aggregator._store import Store


def register_ledger(sub: Any) -> None:
    p = sub.add_parser(
        "ledger", help="verify or show the aggregator's training ledger",
        description="Every round (or FedBuff release) is an entry of an append-only, "
        "hash-chained ledger committed in a Merkle tree whose heads the aggregator signs "
        "(README: Verifiable training ledger).")
    actions = p.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify", help="check signatures, the chain, tree heads, and re-derive every model",
        description="Checks every entry of STATE_DIR's ledger from the entries, the kept "
        "update bodies and the initial model; exits 1 naming the first entry that fails.")
    verify.add_argument("state_dir", metavar="STATE_DIR")
    verify.add_argument("--public-key", metavar="HEX", default=None,
                        help="the aggregator's Ed25519 public key (64 hex digits) to check "
                        "the tree heads against (default: the key file in STATE_DIR)")
    verify.add_argument("--enrolment", metavar="FILE", default=None,
                        help="the aggregator's enrolment file: every device signature must "
                        "be by the device's enrolled key (default: signatures are checked "
                        "under the keys the updates carry)")
    verify.add_argument("--initial-model", metavar="FILE", default=None,
                        help="the initial model (.npy; default: STATE_DIR's version 0)")
    verify.set_defaults(handler=_verify)
    show = actions.add_parser("show", help="print an entry readably")
    show.add_argument("state_dir", metavar="STATE_DIR")
    show.add_argument("--round", type=int, default=None, metavar="N",
                      help="the entry of round (or FedBuff release) N (default: the last)")
    show.add_argument("--fleet", default=None, help="the fleet (default: the only one)")
    show.set_defaults(handler=_show)
    key = actions.add_parser("key", help="print the aggregator's public key (hex)")
    key.add_argument("state_dir", metavar="STATE_DIR")
    key.set_defaults(handler=_key)


def _verify(args: argparse.Namespace) -> int:
    from cloud_aggregator._errors import LedgerError
    from cloud_aggregator._ledger_verify import verify_ledger

    public_key = None
    if args.public_key is not None:
        try:
            public_key = bytes.fromhex(args.public_key)
        except ValueError as exc:
            raise LedgerError(f"--public-key is not hex: {exc}") from exc
        if len(public_key) != 32:
            raise LedgerError("--public-key must be 32 bytes (64 hex digits)")
    reports = verify_ledger(args.state_dir, public_key=public_key,
                            initial_model=args.initial_model, enrolment=args.enrolment)
    if not reports:
        print(f"{args.state_dir}: no ledger entries")
        return 1
    bad = 0
    for r in reports:
        if r.ok:
            print(f"fleet {r.fleet}: {r.entries} entries verified, {r.models_rederived} models "
                  f"re-derived byte for byte, {r.device_signatures_checked}/"
                  f"{r.device_signatures} device signatures verified"
                  + (f", {r.device_keys_enrolled} by enrolled keys" if args.enrolment else ""))
        else:
            bad += 1
            print(f"fleet {r.fleet}: entry {r.first_bad} FAILS: {r.problem} "
                  f"({r.verified} entries before it verified)")
        for note in r.notes:
            print(f"  note: {note}")
    return 1 if bad else 0


def _show(args: argparse.Namespace) -> int:
    from cloud_aggregator._errors import LedgerError
    from cloud_aggregator._store import Store

    db = Path(args.state_dir) / "aggregator.sqlite"
    if not db.is_file():
        raise LedgerError(f"{args.state_dir} holds no aggregator store (aggregator.sqlite)")
    with Store(db, read_only=True) as store:  # an aggregator may be running on it
        fleets = store.ledger_fleets()
        fleet = args.fleet
        if fleet is None:
            if len(fleets) != 1:
                raise LedgerError(f"name the fleet with --fleet (the ledger has {fleets})")
            fleet = fleets[0]
        print(show_entry(store, fleet, round_index=args.round))
    return 0


def _key(args: argparse.Namespace) -> int:
    from cloud_aggregator._ledger import read_public_key

    sys.stdout.write(read_public_key(Path(args.state_dir)).hex() + "\n")
    return 0


def show_entry(store: Store, fleet: str, *, round_index: int | None = None) -> str:
    """A ledger entry, readably (the last one, or the one of ``round_index``)."""
    from cloud_aggregator._errors import LedgerError

    entries = store.ledger_entries(fleet)
    if round_index is not None:
        entries = [e for e in entries if e.round == round_index]
    if not entries:
        raise LedgerError(f"no ledger entry for fleet {fleet!r}"
                          + (f" round {round_index}" if round_index is not None else ""))
    e = entries[-1]
    header = json.loads(e.header)
    details = json.loads(e.details)
    lines = [
        f"fleet {fleet}  entry {e.index}  round {e.round}  outcome {header['outcome']}  "
        f"model version {header['model_version']}",
        f"  previous entry  {header['prev_entry']}",
        f"  entry hash      {e.leaf.hex()}",
        f"  previous model  {header['prev_model']}",
        f"  model           {header['model']}",
        f"  rule            {json.dumps(header['rule'], sort_keys=True)}",
        f"  tree head       size {e.tree_size}  root {e.root.hex()}  at {e.timestamp_ms} ms",
        f"  signature       {e.signature.hex()}",
        f"  selected        {', '.join(details['selected']) or '-'}",
        f"  accepted ({header['accepted_count']}, in accumulation order):",
    ]
    for line in e.accepted:
        r = json.loads(line)
        signed = "signed" if r.get("signature") else "unsigned"
        lines.append(f"    {r['position']:>3} {r['device']:<20} round {r['round']} attempt "
                     f"{r['attempt']}  weight {r['weight']:.6g}  scale {r['scale']:.4g}  cut "
                     f"{r['cut']:.4g}  norm {r['norm']:.6g}  {signed}  {r['digest']}")
    lines.append(f"  rejected ({len(details['rejected']) + details['rejected_more']}):")
    for r in details["rejected"]:
        lines.append(f"    {r['device']:<20} round {r['round']} attempt {r['attempt']}  "
                     f"{r['reason']}")
    if details.get("contributions") is not None:
        lines.append(f"  contributions   {json.dumps(details['contributions'])}")
    return "\n".join(lines)
