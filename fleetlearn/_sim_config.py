"""``fleetlearn simulate``'s settings: the ``[simulate]`` section, parsed once into ``SimConfig``.

Every field is a setting (``device_profiles.Section``): a flag, an environment variable
``FLEETLEARN_SIMULATE_<NAME>`` and a key of the ``[simulate]`` table. The failures go
in ``[simulate.faults]`` (``FaultSpec``). ``[simulate.aggregator]`` (also
``FLEETLEARN_SIMULATE_AGGREGATOR_<NAME>`` and ``--aggregator NAME=VALUE``) sets any
``AggregatorConfig`` setting for the simulation's aggregator but those the simulation
sets itself (``SIM_OWNED``: its fleet, model, rounds, clock...).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from cloud_aggregator import AggregatorConfig
from device_profiles import DEFAULT_MIX, ConfigError, Meta, Section, group, overrides, setting
from edge_runtime._fleet import FaultSpec
from fleetlearn._tier_emulation import DEFAULT_EDGE_PROFILE, edge_profile, parse_links

DEFAULT_CODEC = "ef+topk:0.1+q8+zstd:3"
"""The default compressed uplink codec of simulations (see bench/simulate.py)."""
SIM_OWNED = ("fleet", "model", "rounds", "mode", "clock", "devices_per_round", "deadline_s",
             "selection", "codec", "seed", "state_dir", "eval_data", "progress",
             "secure_aggregation")
"""Aggregator settings a simulation derives from its own (``SimConfig.aggregator_config``)."""

_FLEET = "fleet"
_TRAINING = "training"
_FAILURES = "failures"
_INFRA = "time and infrastructure"
_TIERS = "edge tiers"


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Everything one simulation needs, checked (the ``[simulate]`` section)."""

    devices: int = setting(100, help="virtual devices", group=_FLEET)
    per_round: int = setting(10, help="devices per round (target)", group=_FLEET)
    profile_mix: str = setting(
        DEFAULT_MIX, help="catalogue mix, e.g. 'pi4:0.5,phone-mid:0.5' (default: a mixed "
        "fleet)", example="pi4:0.5,phone-mid:0.5", group=_FLEET)
    partition: str = setting("dirichlet:0.5", help="data split: iid, dirichlet:ALPHA or "
                             "shards:N", example="iid", group=_FLEET)
    num_samples: int = setting(
        10_000, flag="--samples", group=_FLEET,
        help="MNIST-1D samples to generate (80% train over the devices, 20% held out)")
    availability: bool = setting(
        True, group=_FLEET, help="follow the profiles' availability patterns (off: all "
        "devices always on)")
    start_hour: float = setting(23.5, help="emulated local time at start, for availability "
                                "patterns", group=_FLEET)

    model: str = setting("cnn", help="mlp, cnn or mlp-xl", example="mlp", group=_TRAINING)
    rounds: int = setting(100, help="rounds (model versions) at most", group=_TRAINING)
    target_accuracy: float | None = setting(
        None, help="stop once test accuracy reaches this fraction, e.g. 0.8", example=0.8,
        group=_TRAINING)
    codec: str = setting(DEFAULT_CODEC, help="uplink codec spec (with secure_aggregation "
                         "the default becomes fp32, the only codec it takes)", example="fp32",
                         group=_TRAINING)
    secure_aggregation: bool = setting(
        False, help="sync rounds whose aggregator learns only each round's sum (README: "
        "Secure aggregation; tune it with --aggregator secure_clip=..., secure_fraction=...)",
        group=_TRAINING)
    selection: str = setting("random", help="device selection: random, deadline, tiered or "
                             "oort", example="oort", group=_TRAINING)
    mode: str = setting("sync", choices=("sync", "async"), group=_TRAINING,
                        help="sync rounds, or async (FedBuff: 2 x per_round devices busy, "
                        "a buffer of per_round updates)")
    deadline_s: float = setting(120.0, help="round deadline in emulated seconds",
                                group=_TRAINING)
    seed: int = setting(0, help="seed of the fleet, the data split and the faults",
                        group=_TRAINING)
    aggregator: dict[str, Any] = overrides(
        AggregatorConfig, exclude=SIM_OWNED, group=_TRAINING,
        shortcuts=("local_epochs", "backend", "server_opt", "max_selected", "robust",
                   "clip_norm", "dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_clipping"),
        help="any other setting of the simulation's aggregator (see fleetlearn aggregator "
        "--help), e.g. --aggregator trim_fraction=0.25")

    faults: FaultSpec = group(FaultSpec, table="faults", group=_FAILURES, fields={
        "crash_fraction": "probability a device crashes on a task, before uploading",
        "restart_after_rounds": "rounds until a crashed device reboots",
        "slow_fraction": "share of devices slower than their profile",
        "slow_factor": "how many times slower those devices are",
        "byzantine_fraction": "share of devices that attack, as byzantine_kind says (flip, "
                              "norm or samples)",
        "byzantine_scale": "flip: the scale of the flipped update; norm: its L2 norm",
        "byzantine_kind": Meta(
            help="flip: -scale x the true update; norm: an update of L2 norm SCALE; "
            "samples: the true update claiming byzantine_samples samples",
            choices=("flip", "norm", "samples")),
        "byzantine_samples": "byzantine_kind = samples: the sample count the attackers claim",
    })

    topology: str | None = setting(
        None, group=_TIERS, example="cloud:1,edge:3,device:30",
        help="simulate a tree instead of a flat fleet: cloud:1,edge:E,device:N (N devices "
        "split evenly over E edges, one Mosquitto per edge site and one for the cloud; "
        "real clock; the fleet's size is N, --devices is not used)")
    edge_rounds_per_task: int = setting(
        1, example=2, group=_TIERS, help="topology: child rounds an edge runs for each task "
        "of the cloud")
    tier_models: str | None = setting(
        None, example="device:mlp,edge:cnn,cloud:cnn-wide", group=_TIERS,
        help="topology: a model per tier (agglomerative: knowledge crosses tiers by "
        "distillation on a public bridge set); the device tier must be --model")
    edge_crash_fraction: float = setting(
        0.0, example=0.34, group=_TIERS,
        help="topology: share of edge sites that fail (edge and broker killed) halfway "
        "through the run; their devices move to the other edges (one edge always stays)")
    edge_profile: str = setting(
        DEFAULT_EDGE_PROFILE, example="x86-server", group=_TIERS,
        help="topology: the catalogue profile the edges run on (a gateway or server "
        "class): its transfer and encode time adds to its children's rounds")
    link_bandwidth: str | None = setting(
        None, example="device-edge:1mbit,edge-cloud:100mbit", group=_TIERS,
        help="topology: bandwidth of each link both ways, in kbit, mbit or gbit (a link "
        "left out keeps its profiles' own uplink and downlink)")

    clock: str = setting("virtual", choices=("virtual", "real"), group=_INFRA,
                         help="virtual: account emulated durations; real: sleep them "
                         "(scaled)")
    time_scale: float = setting(0.01, help="real clock: wall seconds per emulated second",
                                group=_INFRA)
    broker: str | None = setting(None, help="external broker URL (default: start one for "
                                 "this run)", example="mqtt://127.0.0.1:1883", group=_INFRA)
    broker_kind: str = setting(
        "mosquitto", choices=("mosquitto", "embedded"), group=_INFRA,
        help="local broker to start (mosquitto falls back to embedded if missing)")
    credentials: Path | None = setting(
        None, example="creds.toml", group=_INFRA,
        help="credentials.toml from `fleetlearn broker config` (external broker): fleet "
        "'sim', users 'aggregator' and the ids --print-device-ids lists")
    workers: int = setting(2, help="training threads", group=_INFRA)
    network_loops: int = setting(2, help="threads driving the devices' MQTT sockets",
                                 group=_INFRA)
    out_dir: Path = setting(Path("runs/latest"), flag="--out", example="runs/study",
                            help="directory for report.json, plots and state", group=_INFRA)
    max_wall_s: float = setting(3600.0, help="stop after this many wall-clock seconds",
                                group=_INFRA)

    def __post_init__(self) -> None:
        for name in ("out_dir", "credentials"):  # simulate(out_dir="runs/x") from Python
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.per_round < 1 or self.per_round > self.devices:
            raise ConfigError(f"per_round must be within 1..{self.devices} (the fleet size, "
                              "devices)")
        if self.rounds < 1:
            raise ConfigError("rounds must be >= 1")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError("target_accuracy is a fraction in (0, 1], e.g. 0.8")
        if self.clock not in ("virtual", "real"):
            raise ConfigError("clock must be virtual or real")
        if self.mode not in ("sync", "async"):
            raise ConfigError("mode must be sync or async")
        if self.num_samples * 0.8 < 8 * self.devices:
            raise ConfigError(f"num_samples ({self.num_samples}) are too few for {self.devices}"
                              f" devices: use --samples {10 * self.devices} or more")
        if self.workers < 1 or self.network_loops < 1:
            raise ConfigError("workers and network_loops must be >= 1")
        if not self.max_wall_s > 0 or self.time_scale < 0:
            raise ConfigError("max_wall_s must be positive and time_scale >= 0")
        owned = sorted(set(self.aggregator) & set(SIM_OWNED))
        if owned:
            raise ConfigError(f"aggregator.{owned[0]}: the simulation sets {owned[0]} itself "
                              f"(use the simulate setting {owned[0]})")
        self.aggregator_config()  # the aggregator's own checks, now rather than at start
        if self.topology is not None:
            self.tiers()
            self._tree_takes_it_all()
        if self.tier_models is not None:
            from fleetlearn._agglo import TierModels

            if self.topology is None:
                raise ConfigError("tier_models needs a topology (a tree has tiers)")
            if TierModels.parse(self.tier_models, default=self.model).device != self.model:
                raise ConfigError(f"tier_models {self.tier_models!r}: the device tier must "
                                  f"train the simulation's model {self.model!r}")
        edge_profile(self.edge_profile)
        parse_links(self.link_bandwidth)
        if self.topology is None and (self.link_bandwidth is not None
                                      or self.edge_profile != DEFAULT_EDGE_PROFILE):
            raise ConfigError("edge_profile and link_bandwidth need a topology (a tree has "
                              "edges and links)")
        if self.edge_rounds_per_task < 1 or not 0 <= self.edge_crash_fraction < 1:
            raise ConfigError("edge_rounds_per_task must be >= 1 and edge_crash_fraction "
                              "within [0, 1)")

    def _tree_takes_it_all(self) -> None:
        """A tree simulation honours fewer settings than a flat one: refuse one it would
        ignore rather than run something else than what was asked."""
        ignored = [name for name in TREE_IGNORES
                   if getattr(self, name) != _DEFAULTS[name]]
        if ignored:
            raise ConfigError(
                f"{ignored[0]}: a tree simulation (topology) does not take it; it takes "
                "the model, codec, rounds, seed, Dirichlet split, samples, clock, deadline, "
                "profile mix, the tier settings and the aggregator's " +
                ", ".join(TREE_AGGREGATOR))
        from fleetlearn._tree import check_tree_faults

        check_tree_faults(self.faults)
        extra = sorted(set(self.aggregator) - set(TREE_AGGREGATOR))
        if extra:
            raise ConfigError(f"aggregator.{extra[0]}: a tree simulation's aggregators take "
                              f"only {', '.join(TREE_AGGREGATOR)} from --aggregator (the "
                              "edges aggregate with FedAvg, the cloud with server_opt)")

    def tiers(self) -> tuple[int, int]:
        """``topology`` as (edges, devices), checked."""
        counts: dict[str, int] = {}
        for part in (self.topology or "").split(","):
            name, _, number = part.strip().partition(":")
            if name not in ("cloud", "edge", "device") or not number.isdigit() \
                    or name in counts:
                raise ConfigError(f"topology {self.topology!r}: write cloud:1,edge:E,device:N")
            counts[name] = int(number)
        edges, devices = counts.get("edge", 0), counts.get("device", 0)
        if counts.get("cloud", 1) != 1 or edges < 1 or devices < edges \
                or devices % edges:
            raise ConfigError(f"topology {self.topology!r}: one cloud, at least one edge, "
                              "and a number of devices that the edges divide evenly")
        if not self.partition.startswith("dirichlet:"):
            raise ConfigError("topology: only dirichlet:ALPHA partitions are supported")
        return edges, devices

    def aggregator_config(self) -> AggregatorConfig:
        fields: dict[str, Any] = dict(
            fleet="sim", model=self.model, rounds=self.rounds, mode=self.mode,
            clock=self.clock, devices_per_round=self.per_round, deadline_s=self.deadline_s,
            selection=self.selection, seed=self.seed,
            codec="fp32" if self.secure_aggregation and self.codec == DEFAULT_CODEC
            else self.codec, secure_aggregation=self.secure_aggregation,
            state_dir=self.out_dir / "aggregator", eval_data=self.out_dir / "test.npz",
            store_synchronous="NORMAL", progress=False,
            safety_timeout_s=max(60.0, self.deadline_s * (self.time_scale if
                                                          self.clock == "real" else 1.0) * 4),
        )
        if self.mode == "async":
            fields["concurrency"] = self.per_round * 2
            fields["buffer_size"] = self.per_round
        dp_on = any(self.aggregator.get(k) is not None
                    for k in ("dp_epsilon", "dp_noise_multiplier"))
        if dp_on and self.aggregator.get("dp_population") is None:
            # The simulated fleet is the population a random selection samples from.
            fields["dp_population"] = self.devices
        fields.update(self.aggregator)
        try:
            return AggregatorConfig(**fields)
        except TypeError as exc:
            raise ConfigError(f"bad aggregator setting: {exc}") from exc


TREE_IGNORES = ("per_round", "selection", "mode", "secure_aggregation", "broker",
                "broker_kind", "credentials", "workers", "network_loops", "time_scale")
"""Settings of a flat simulation a tree does not take (``_tree_takes_it_all``)."""
TREE_AGGREGATOR = ("local_epochs", "batch_size", "lr", "server_opt")
"""The aggregator settings a tree simulation takes from ``--aggregator``."""
_DEFAULTS: dict[str, Any] = {
    f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
    for f in fields(SimConfig) if f.name in TREE_IGNORES}

SIMULATE = Section("simulate", SimConfig, title="fleetlearn simulate")
"""The ``[simulate]`` section (every field of ``SimConfig``, its faults and overrides)."""
