"""``fleetlearn edge``: an edge aggregator, its settings and its command.

The ``[edge]`` section holds every setting of ``fleetlearn aggregator`` (the child side:
the site's broker, its fleet, how its rounds run) plus ``EdgeOptions`` (the parent
side: the edge's id at its parents, the candidate parents, their credentials, how many
child rounds answer one parent task, when to fail over). Flags, ``FLEETLEARN_EDGE_*``
and the ``[edge]`` table of the configuration file derive from them as for every
command.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_profiles import ConfigError, setting
from device_profiles._settings_section import Section

if TYPE_CHECKING:
    from fleetlearn._agglo import DistillSettings, TierLink

_PARENT = "parent side (this edge as a device of its parents)"
_AGGLO = "a model per tier (agglomerative training)"


@dataclass(frozen=True, kw_only=True)
class EdgeOptions:
    """How an edge reaches its parents and answers their tasks."""

    device_id: str = setting(help="this edge's device id at its parents", metavar="ID",
                             example="edge-1", group=_PARENT)
    parents: str = setting(
        help="candidate parents, comma-separated FLEET@URL, tried in order (the cloud, "
        "or edges of the tier above)", metavar="FLEET@URL,...",
        example="cloud@mqtts://cloud.example:8883", group=_PARENT)
    parent_password: str | None = setting(
        None, secret=True, no_flag=True, alternative_to="parent_password_file",
        help="this edge's MQTT password at its parents", example="s3cret", group=_PARENT)
    parent_password_file: Path | None = setting(
        None, help="file with this edge's MQTT password at its parents (the password alone, "
        "or a credentials.toml with an entry for device_id)", example="edge-1.toml",
        group=_PARENT)
    parent_tls_ca: Path | None = setting(
        None, help="CA bundle (PEM) to verify the parents' brokers (mqtts://)",
        example="ca.pem", group=_PARENT)
    rounds_per_task: int = setting(1, help="child rounds that answer one parent task",
                                   example=2, group=_PARENT)
    failover_after_s: float = setting(
        5.0, help="move to the next candidate parent after its broker has been "
        "unreachable this long", example=10.0, group=_PARENT)

    tier_model: str | None = setting(
        None, example="cnn", group=_AGGLO,
        help="the model this edge keeps and exchanges with its parents (their --model); "
        "its children train --model, and it distils their ensemble into this one on a "
        "public bridge set (default: none, the edge sends its children's aggregate)")
    distill: str | None = setting(
        None, example="temperature:2,epochs:3", group=_AGGLO,
        help="tier_model: distillation NAME:VALUE pairs of temperature, epochs, lr, "
        "batch_size, feedback_epochs (defaults 2, 3, 0.05, 64, 0)")
    bridge_samples: int = setting(
        2_000, example=4000, group=_AGGLO,
        help="tier_model: MNIST-1D inputs the tiers distil on, generated here from their "
        "own seed (no labels, nothing of any device's data)")

    def __post_init__(self) -> None:
        self.links()  # parse once at start-up: a bad value stops here
        if self.tier_model is None and self.distill is not None:
            raise ConfigError("distill needs tier_model (there is nothing to distil into)")
        if self.tier_model is not None:
            from fleetlearn._agglo import check_tier_model

            check_tier_model(self.tier_model, what="tier_model")
            self.distill_settings()
        if self.bridge_samples < 1:
            raise ConfigError(f"bridge_samples must be >= 1, got {self.bridge_samples}")
        if self.rounds_per_task < 1:
            raise ConfigError(f"rounds_per_task must be >= 1, got {self.rounds_per_task}")
        if not self.failover_after_s > 0:
            raise ConfigError(f"failover_after_s must be > 0, got {self.failover_after_s}")

    def distill_settings(self) -> DistillSettings:
        """``distill`` as ``DistillSettings`` (its defaults when not given)."""
        from fleetlearn._agglo import DistillSettings

        return (DistillSettings() if self.distill is None
                else DistillSettings.parse(self.distill))

    def tier_link(self, *, child_model: str, state_dir: Path, seed: int) -> TierLink | None:
        """The ``TierLink`` of an edge whose children train ``child_model`` (None without
        ``tier_model``); the distillation artifacts are built under ``state_dir``."""
        if self.tier_model is None:
            return None
        if self.tier_model == child_model:
            raise ConfigError(f"tier_model {self.tier_model!r} is the children's --model: "
                              "leave it out (one model everywhere needs no distillation)")
        from fleetlearn._agglo import TierLink, TierModel, bridge_inputs

        settings = self.distill_settings()
        folder = state_dir / "distil"
        return TierLink(
            own=TierModel(self.tier_model, folder / self.tier_model, settings=settings,
                          seed=seed),
            child=TierModel(child_model, folder / child_model, settings=settings, seed=seed),
            bridge=bridge_inputs(samples=self.bridge_samples, cache_dir=folder))

    def links(self) -> list[Any]:
        """The candidate parents as ``ParentLink``s."""
        from edge_runtime import ParentLink

        links = []
        for item in (p.strip() for p in self.parents.split(",")):
            fleet, at, url = item.partition("@")
            if not at or not fleet or not url:
                raise ConfigError(f"parent {item!r}: write FLEET@URL, e.g. "
                                  "cloud@mqtts://cloud.example:8883")
            links.append(ParentLink(broker=url, fleet=fleet, name=f"{fleet}@{url}"))
        fleets = [link.fleet for link in links]
        if len(set(fleets)) != len(fleets):
            raise ConfigError("each candidate parent needs its own fleet name (fleets of "
                              "different sites must not collide)")
        return links


def _section() -> Section:
    from cloud_aggregator._config import AggregatorConfig
    from cloud_aggregator._connect import AggregatorConnection

    return Section("edge", AggregatorConnection, AggregatorConfig, EdgeOptions,
                   title="fleetlearn edge")


EDGE = _section()
"""The ``[edge]`` section: the aggregator's settings for the children, and ``EdgeOptions``."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "edge", help="run an edge aggregator: an aggregator to its children, a device to "
        "its parent",
        description="Runs an edge of a tier: rounds with its children on its own broker "
        "(--broker, --fleet), each parent task answered with one update (the children's "
        "aggregate minus the parent's model). Settings come from flags, then "
        "FLEETLEARN_EDGE_* environment variables, then the [edge] table of --config FILE, "
        "then defaults.",
        epilog=EDGE.epilog())
    EDGE.add_flags(p)
    p.set_defaults(handler=_edge)


def _edge(args: argparse.Namespace) -> int:
    from broker_bridge import TlsConfig, read_password_file
    from cloud_aggregator import AggregatorConfig
    from cloud_aggregator._connect import AggregatorConnection
    from edge_runtime import ParentLink, make_agent_transport
    from fleetlearn._edge import EdgeAggregator

    resolved = EDGE.from_args(args)
    config: AggregatorConfig = resolved.build(AggregatorConfig)
    connection: AggregatorConnection = resolved.build(AggregatorConnection)
    options: EdgeOptions = resolved.build(EdgeOptions)
    if config.state_dir is None:
        raise ConfigError("an edge needs a state dir (--state-dir): it resumes from it")
    password = options.parent_password
    if options.parent_password_file is not None:
        password = read_password_file(options.parent_password_file, user=options.device_id)
    tls = (TlsConfig(ca_certs=str(options.parent_tls_ca))
           if options.parent_tls_ca is not None else None)

    def parent_transport(parent: ParentLink, device_id: str) -> Any:
        return make_agent_transport(parent.broker, fleet=parent.fleet, device_id=device_id,
                                    password=password, tls=tls)

    edge = EdgeAggregator(
        config=config, broker=connection.settings().transport(), device_id=options.device_id,
        parents=options.links(), state_dir=Path(config.state_dir),
        rounds_per_task=options.rounds_per_task, failover_after_s=options.failover_after_s,
        parent_transport=parent_transport,
        tier=options.tier_link(child_model=config.model, state_dir=Path(config.state_dir),
                               seed=config.seed))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    edge.start()
    if config.progress:
        tiers = ("" if options.tier_model is None else
                 f", children train {config.model}, it keeps {options.tier_model}")
        print(f"edge {options.device_id}: children on fleet {config.fleet!r}, parents "
              f"{options.parents}{tiers}", flush=True)
    try:
        while not done.wait(1.0):
            if edge.aggregator.failure is not None:
                break
            time.sleep(0)
    finally:
        edge.stop()
    if edge.aggregator.failure is not None:
        print(f"fleetlearn: edge stopped: {edge.aggregator.failure}")
        return 1
    return 0
