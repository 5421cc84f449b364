"""``fleetlearn simulate`` and ``fleetlearn config show``: owned by the composition root
(the first runs both sides; the second reads every command's settings)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    from fleetlearn import _trial_data

    _trial_data.register(sub)
    from fleetlearn import _devices_cli

    _devices_cli.register(sub)
    from fleetlearn._sim_config import SIMULATE

    p = sub.add_parser(
        "simulate",
        help="simulate a fleet end to end: broker, aggregator and real device agents",
        description=(
            "Trains a real model across a simulated fleet of real device agents (ONNX "
            "Runtime training, one MQTT session each) on a broker this command starts, "
            "then prints the result and writes a JSON report and PNG plots. Settings come "
            "from flags, then FLEETLEARN_SIMULATE_* environment variables, then the "
            "[simulate] table of --config FILE, then defaults."
        ),
        epilog=SIMULATE.epilog(),
    )
    SIMULATE.add_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--print-device-ids", action="store_true",
                   help="print the simulated devices' ids, one a line, and exit (to create "
                        "their broker users: fleetlearn broker config --fleet sim "
                        "--devices-file FILE)")
    g.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=_simulate)
    _register_config(sub)


def _simulate(args: argparse.Namespace) -> int:
    from edge_runtime._fleet import device_ids
    from fleetlearn._sim_config import SIMULATE, SimConfig

    cfg: SimConfig = SIMULATE.from_args(args).build(SimConfig)
    if args.print_device_ids:
        print("\n".join(device_ids(cfg.devices)))
        return 0
    from fleetlearn._simulate import run_simulation

    result = run_simulation(cfg, quiet=args.quiet)
    if args.json:
        print(json.dumps(result.report, sort_keys=True))
    return 0 if result.report["final_accuracy"] is not None else 1


# --------------------------------------------------------------------------- config show


def _sections() -> dict[str, Any]:
    from cloud_aggregator._config import AGGREGATOR
    from edge_runtime._config import AGENT
    from fleetlearn._sim_config import SIMULATE

    return {s.name: s for s in (AGGREGATOR, AGENT, SIMULATE)}


def _register_config(sub: Any) -> None:
    from device_profiles import CONFIG_ENV

    p = sub.add_parser(
        "config", help="show the effective configuration and where each value came from",
        description="Every command reads its settings from flags, then FLEETLEARN_* "
        f"environment variables, then one TOML file (--config FILE or ${CONFIG_ENV}: "
        "[aggregator], [agent] and [simulate] tables), then defaults.")
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show", help="print each section's settings, values and sources",
        description="Prints the effective configuration of each section (or of SECTION, "
        "with that command's flags) and where each value came from: default, the file, "
        "an environment variable or a flag. Secrets are never printed. --format toml "
        "prints a configuration file that gives the same values.")
    _show_options(show, suppress=False)
    sections = show.add_subparsers(dest="section", metavar="SECTION")
    for name, section in _sections().items():
        one = sections.add_parser(name, help=f"{section.title}'s settings, with its flags",
                                  epilog=section.epilog())
        _show_options(one, suppress=True)
        section.add_flags(one, config=False)
    show.set_defaults(handler=_show)


def _show_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    from device_profiles._settings_cli import add_config_flag

    add_config_flag(parser, suppress=suppress)
    parser.add_argument("--format", choices=("text", "toml"),
                        default=argparse.SUPPRESS if suppress else "text",
                        help="text: values and their sources; toml: a file giving the same "
                        "values (secrets left out)")


def _show(args: argparse.Namespace) -> int:
    import sys

    from device_profiles import ConfigError, show_config

    chosen = _sections()
    if args.section is not None:
        chosen = {args.section: chosen[args.section]}
    resolved = []
    problems = []
    for name, section in chosen.items():
        res = section.from_args(args) if args.section == name else section.resolve(
            config_file=args.config_file)
        resolved.append(res)
        for cls in section.classes:
            if res.missing(cls):
                continue
            try:
                res.build(cls)
            except ConfigError as exc:
                problems.append(f"[{name}] {exc}")
    print(show_config(resolved, format=args.format), end="")
    for problem in problems:
        print(f"fleetlearn: error: {problem}", file=sys.stderr)
    return 2 if problems else 0
