"""``fleetlearn devices``: device identity from the command line.

- ``fleetlearn devices key --device-id ID [--state-dir DIR]``, on the device: prints the
  device's public key (``ID ed25519:<hex>``), making the key in the agent's state folder
  first if the agent has not run yet (the same file the agent uses: the private key stays
  there).
- ``fleetlearn devices enroll DEVICE [KEY] --enrolment FILE``, by the operator: with KEY
  (``ed25519:<hex>``), enrols it for DEVICE (a device enrolled with another key is refused
  unless ``--replace``); ``--from FILE`` takes the lines ``devices key`` printed; without
  a key, prints DEVICE's enrolled key. The aggregator reads the file again when it changes.
- ``fleetlearn devices list --enrolment FILE``: every device and its key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "devices", help="device identity: print a device's public key, enrol keys",
        description="Every update is signed with its device's Ed25519 key; the aggregator "
        "accepts an update only when the key is enrolled for that device (docs/PROTOCOL.md "
        "section 5.2).")
    actions = p.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    key = actions.add_parser(
        "key", help="print this device's public key (making the key if there is none)",
        description="Run on the device. Prints 'DEVICE ed25519:<hex>' for the operator "
        "to enrol; the private key stays in the agent's state folder.")
    key.add_argument("--device-id", required=True)
    key.add_argument("--state-dir", type=Path, default=None,
                     help="the agent's state folder (default: the agent's default for "
                          "DEVICE_ID)")
    key.set_defaults(handler=_key)
    enroll = actions.add_parser(
        "enroll", help="enrol a device's public key in the enrolment file, or print it",
        description="With KEY (or --from), adds DEVICE's key to the enrolment file "
        "(written by fleetlearn broker config, or made here); without, prints the key "
        "enrolled for DEVICE.")
    enroll.add_argument("device", nargs="?", metavar="DEVICE")
    enroll.add_argument("key", nargs="?", metavar="KEY", help="ed25519:<64 hex>")
    enroll.add_argument("--enrolment", type=Path, required=True, metavar="FILE")
    enroll.add_argument("--from", dest="from_file", type=Path, metavar="FILE",
                        help="lines 'DEVICE ed25519:<hex>' (what fleetlearn devices key "
                             "prints); '-' reads them from standard input")
    enroll.add_argument("--fleet", default=None,
                        help="the fleet, when the file is made here (else the file's)")
    enroll.add_argument("--replace", action="store_true",
                        help="replace a key already enrolled (the device was re-keyed)")
    enroll.set_defaults(handler=_enroll)
    listing = actions.add_parser("list", help="print every device of the enrolment file")
    listing.add_argument("--enrolment", type=Path, required=True, metavar="FILE")
    listing.set_defaults(handler=_list)


def _key(args: argparse.Namespace) -> int:
    from broker_bridge import check_id
    from edge_runtime._config import _default_state_dir
    from edge_runtime._identity import DeviceKey, state_key_path

    device = check_id(args.device_id, what="device id")
    state = args.state_dir if args.state_dir is not None else _default_state_dir(device)
    key = DeviceKey.load_or_create(state_key_path(state))
    print(f"{device} {key.public_text}")
    return 0


def _pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    from broker_bridge import EnrolmentError

    pairs: list[tuple[str, str]] = []
    if args.from_file is not None:
        try:
            text = (sys.stdin.read() if str(args.from_file) == "-"
                    else args.from_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise EnrolmentError(f"cannot read {args.from_file}: {exc}") from exc
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) != 2:
                raise EnrolmentError(f"{args.from_file} line {number}: expected 'DEVICE "
                                     f"ed25519:<hex>', got {line.strip()!r}")
            pairs.append((words[0], words[1]))
    if args.key is not None:
        if args.device is None:
            raise EnrolmentError("a KEY needs its DEVICE")
        pairs.append((args.device, args.key))
    return pairs


def _enroll(args: argparse.Namespace) -> int:
    from broker_bridge import Enrolment, EnrolmentError, key_text, parse_key_text

    book = Enrolment.load_or_new(args.enrolment, fleet=args.fleet)
    pairs = _pairs(args)
    if not pairs:
        if args.device is None:
            raise EnrolmentError("name a DEVICE (and its KEY to enrol it), or --from FILE")
        if args.device not in book:
            print(f"{args.device}: not in {args.enrolment}", file=sys.stderr)
            return 1
        held = book.key_of(args.device)
        print(f"{args.device} {key_text(held) if held is not None else '(no key yet)'}")
        return 0 if held is not None else 1
    changed = []
    for device, text in pairs:
        try:
            raw = parse_key_text(text)
        except ValueError as exc:
            raise EnrolmentError(f"device {device!r}: {exc}") from exc
        if book.enrol(device, raw, replace=args.replace):
            changed.append(device)
    book.write(args.enrolment)
    for device, text in pairs:
        print(f"{'enrolled' if device in changed else 'already enrolled'}: {device} {text}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from broker_bridge import Enrolment, key_text

    book = Enrolment.load(args.enrolment, check_mode=False)
    for device in book:
        held = book.key_of(device)
        print(f"{device} {key_text(held) if held is not None else '(no key yet)'}")
    return 0
