"""``fleetlearn ledger verify|show|key``: the training ledger of a state dir."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


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
    from cloud_aggregator._ledger_verify import show_entry
    from cloud_aggregator._store import Store

    db = Path(args.state_dir) / "aggregator.sqlite"
    if not db.is_file():
        raise LedgerError(f"{args.state_dir} holds no aggregator store (aggregator.sqlite)")
    with Store(db) as store:
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
