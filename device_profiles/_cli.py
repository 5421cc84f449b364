"""Subcommands owned by this package (registered by ``fleetlearn.cli``).

``fleetlearn profile`` measures this machine and prints (or writes) its profile;
``fleetlearn profile --catalogue`` lists the bundled device classes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from device_profiles._catalogue import load_catalogue
from device_profiles._errors import ProfileError
from device_profiles._measure import measure_machine


def register(sub: Any) -> None:
    """Add ``profile`` to the ``fleetlearn`` parser."""
    parser = sub.add_parser(
        "profile",
        help="measure this machine (cores, memory, storage, FLOP/s) and write its profile",
        description="Measure this machine and print its device profile as TOML (or JSON).",
    )
    parser.add_argument("--out", type=Path, help="write the profile to this file (.toml or .json)")
    parser.add_argument(
        "--name", default="this-machine", help="profile name (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="batch size of step-time probes (default: 32)"
    )
    parser.add_argument(
        "--seconds", type=float, default=0.3, help="time spent on the GEMM measurement"
    )
    parser.add_argument(
        "--catalogue", action="store_true", help="list the bundled device profiles and exit"
    )
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.catalogue:
        print(_catalogue_table())
        return 0
    profile = measure_machine(name=args.name, batch_size=args.batch_size, gemm_seconds=args.seconds)
    as_json = args.json or (args.out is not None and args.out.suffix == ".json")
    text = profile.to_json() + "\n" if as_json else profile.to_toml()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot write {args.out}: {exc}") from exc
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _catalogue_table() -> str:
    rows = [("name", "cores", "mem MB", "GFLOP/s", "down/up Mbps", "power", "availability")]
    for p in load_catalogue().values():
        rows.append(
            (
                p.name,
                str(p.cores),
                str(p.memory_mb),
                f"{p.gflops:g}",
                f"{p.downlink_mbps:g}/{p.uplink_mbps:g}",
                p.power.value,
                p.availability.kind.value,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
