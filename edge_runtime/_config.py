"""The agent's configuration: the ``[agent]`` section, parsed once into a frozen ``AgentConfig``.

``AgentOptions`` holds every setting as the user writes it, one field each (the
mechanism is ``device_profiles.Section``): a flag, ``FLEETLEARN_AGENT_<NAME>`` (and the
older ``FLEETLEARN_<NAME>``, which deployed agents use), and a key of the ``[agent]``
table. Flags > environment > file (``--config`` / ``FLEETLEARN_CONFIG``) > defaults.
``AgentOptions.config()`` turns them into the ``AgentConfig`` the agent runs with
(eligibility rules, protocol timings, TLS, the password read from its file). Every value
is checked here, alone and against the others, and a bad one is a ``ConfigError``
naming the setting and where it came from, so the rest of the agent never sees a string
key or an unchecked value.

TOML layout (every key optional but broker, device_id and data; an older file with these
keys at the top level, without ``[agent]``, still loads)::

    [agent]
    broker = "mqtts://broker.example:8883"
    device_id = "pi-042"
    fleet = "default"
    data = "/data/local.npz"            # or "module:function", or an [agent.data] table
    state_dir = "/var/lib/fleetlearn"
    profile = "pi4"                     # catalogue name or a profile .toml
    threads = 1
    password_file = "/etc/fleetlearn/password"
    holdout_fraction = 0.1

    [agent.tls]
    ca = "ca.pem"
    cert = "device.pem"
    key = "device.key"

    [agent.eligibility]
    require_charging = true
    min_battery_percent = 30
    min_free_memory_mb = 200
    allow_metered = false
    require_idle = false
    metered = false                     # what the network is, when the OS cannot tell

    [agent.ledger]
    public_key = "3b6a27bc..."          # the aggregator's (fleetlearn ledger key STATE_DIR)

    [agent.protocol]
    ack_timeout_s = 30
    request_timeout_s = 60
    deadline_margin_s = 0.2
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_bridge import BrokerUrl, TlsConfig, check_id, read_password_file
from device_profiles import ConfigError, Section, setting
from edge_runtime._agent import AgentSettings
from edge_runtime._data import DataSource
from edge_runtime._eligibility import EligibilityRules

ENV_PREFIX = "FLEETLEARN_"

_RULES = EligibilityRules()
_PROTOCOL = AgentSettings()
_BROKER = "broker connection"
_DATA = "data and training"
_ELIGIBILITY = "eligibility: when the device takes on training work"
_TIMING = "protocol timings (seconds)"
_LEDGER = "training ledger"


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything ``fleetlearn agent`` needs, checked."""

    broker: str
    device_id: str
    fleet: str = "default"
    data: DataSource
    holdout_fraction: float = 0.0
    password: str | None = None
    tls: TlsConfig | None = None
    state_dir: Path
    artifacts_dir: Path | None = None
    profile: str | None = None
    threads: int = 1
    rules: EligibilityRules = field(default_factory=EligibilityRules)
    metered: bool | None = None
    settings: AgentSettings = field(default_factory=AgentSettings)
    emulate: bool = False
    time_scale: float | None = None

    def __repr__(self) -> str:  # never print the password
        return f"AgentConfig(device_id={self.device_id!r}, broker={self.broker!r}, ...)"


def parse_data(value: Any) -> DataSource:
    """``path.npz`` | ``path.csv`` | ``module:function`` | a TOML table of DataSource fields."""
    if isinstance(value, DataSource):
        return value
    if isinstance(value, Mapping):
        try:
            return DataSource(**dict(value))
        except TypeError as exc:
            raise ValueError(f"bad [data] table: {exc}") from exc
    if not isinstance(value, str) or not value:
        raise ValueError("data must be a file path or module:function")
    lower = value.lower()
    if lower.endswith(".npz"):
        return DataSource(kind="npz", location=value)
    if lower.endswith(".csv"):
        return DataSource(kind="csv", location=value)
    module, sep, func = value.partition(":")
    if sep and module and func and "/" not in value and not Path(value).exists():
        return DataSource(kind="callable", location=value)
    raise ValueError(f"{value!r} is neither a .npz or .csv file nor module:function")


def show_data(source: DataSource) -> Any:
    """``data`` as written in a file: the location alone when nothing else differs."""
    defaults = DataSource(kind=source.kind, location=source.location)
    if source == defaults and parse_data(source.location).kind == source.kind:
        return source.location
    return {k: v for k, v in dataclasses.asdict(source).items()
            if k in ("kind", "location") or v != getattr(defaults, k)}


def _default_state_dir(device_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fleetlearn" / device_id


@dataclass(frozen=True, kw_only=True)
class AgentOptions:
    """The ``[agent]`` section: every setting of ``fleetlearn agent``, checked."""

    broker: str = setting(help="mqtt://host:port or mqtts://host:port", metavar="URL",
                          example="mqtts://broker.example:8883", group=_BROKER)
    device_id: str = setting(help="this device's id (and its MQTT user name)",
                             example="pi-042", group=_BROKER)
    fleet: str = setting("default", help="fleet id", example="plant-7", group=_BROKER)
    password: str | None = setting(
        None, secret=True, alternative_to="password_file", example="s3cret",
        help="MQTT password (a flag is visible in ps: prefer password_file or "
        "$FLEETLEARN_PASSWORD)", group=_BROKER)
    password_file: Path | None = setting(
        None, help="file with the MQTT password alone, or the credentials.toml of "
        "`fleetlearn broker config` (its entry for DEVICE_ID)", example="password",
        group=_BROKER)
    tls_ca: Path | None = setting(None, table="tls", key="ca", example="ca.pem",
                                  help="CA bundle (PEM) to verify the broker", group=_BROKER)
    tls_cert: Path | None = setting(None, table="tls", key="cert", example="device.pem",
                                    help="client certificate (PEM)", group=_BROKER)
    tls_key: Path | None = setting(None, table="tls", key="key", example="device.key",
                                   help="client private key (PEM)", group=_BROKER)

    data: DataSource = setting(
        parse=parse_data, show=show_data, metavar="SOURCE", example="local.csv",
        help="local data: file.npz (arrays named x: features, y: integer labels), file.csv "
        "(label in the last column), module:function returning (x, y), or an [agent.data] "
        "table of DataSource fields", group=_DATA)
    holdout_fraction: float = setting(
        0.0, flag="--holdout", example=0.1, group=_DATA,
        help="fraction of local data held out for federated evaluation")
    state_dir: Path | None = setting(
        None, example="state", group=_DATA,
        help="where crash-safe state is kept (default: $XDG_STATE_HOME/fleetlearn/DEVICE_ID)")
    artifacts_dir: Path | None = setting(
        None, example="artifacts", group=_DATA,
        help="artifact cache (default: STATE_DIR/artifacts)")
    profile: str | None = setting(
        None, example="pi4", group=_DATA,
        help="device profile: catalogue name or profile .toml (default: measure this machine)")
    threads: int = setting(1, help="ONNX Runtime intra-op threads", group=_DATA)
    emulate: bool = setting(False, group=_DATA,
                            help="report the profile's emulated duration with each update")
    time_scale: float | None = setting(
        None, example=0.5, group=_DATA,
        help="with emulate: also wait emulated time x this before uploading")

    require_charging: bool = setting(_RULES.require_charging, table="eligibility",
                                     help="train only while charging", group=_ELIGIBILITY)
    min_battery_percent: float | None = setting(
        _RULES.min_battery_percent, table="eligibility", example=30.0, group=_ELIGIBILITY,
        help="train only above this battery level")
    min_free_memory_mb: float | None = setting(
        _RULES.min_free_memory_mb, table="eligibility", example=200.0, group=_ELIGIBILITY,
        help="train only with this much free memory")
    allow_metered: bool = setting(_RULES.allow_metered, table="eligibility",
                                  help="train on a metered network", group=_ELIGIBILITY)
    require_idle: bool = setting(_RULES.require_idle, table="eligibility",
                                 help="train only while the machine is idle",
                                 group=_ELIGIBILITY)
    idle_load_per_core: float = setting(
        _RULES.idle_load_per_core, table="eligibility", example=0.5, group=_ELIGIBILITY,
        help="the machine counts as idle below this 1-minute load average per core")
    metered: bool | None = setting(
        None, table="eligibility", example=True, group=_ELIGIBILITY,
        help="whether the network is metered, when the OS cannot tell (default: unknown)")

    ack_timeout_s: float = setting(
        _PROTOCOL.ack_timeout_s, table="protocol", group=_TIMING,
        help="re-send an unacknowledged update (same bytes, same attempt) after this long")
    max_resends: int = setting(_PROTOCOL.max_resends, table="protocol", group=_TIMING,
                               help="re-sends of one unacknowledged update at most")
    request_timeout_s: float = setting(
        _PROTOCOL.request_timeout_s, table="protocol", group=_TIMING,
        help="how long to wait for requested artifacts or a model (never past the deadline)")
    deadline_margin_s: float = setting(
        _PROTOCOL.deadline_margin_s, table="protocol", group=_TIMING,
        help="budget kept back from a task's deadline for encoding and sending")
    poll_interval_s: float = setting(_PROTOCOL.poll_interval_s, table="protocol",
                                     group=_TIMING, help="how often the agent's loop wakes")
    eligibility_interval_s: float = setting(
        _PROTOCOL.eligibility_interval_s, table="protocol", group=_TIMING,
        help="how often eligibility is checked again")
    status_interval_s: float | None = setting(
        _PROTOCOL.status_interval_s, table="protocol", group=_TIMING,
        help="say what the agent waits for this often while it waits (none: never)")

    ledger_public_key: str | None = setting(
        None, table="ledger", key="public_key", example="3b6a27bc" + "0" * 56,
        group=_LEDGER,
        help="the aggregator's Ed25519 public key (64 hex digits; `fleetlearn ledger key "
        "STATE_DIR` prints it): inclusion proofs are checked against it (none: proofs are "
        "checked but the tree head is not authenticated)")

    def __repr__(self) -> str:  # never print the password
        return f"AgentOptions(device_id={self.device_id!r}, broker={self.broker!r}, ...)"

    def __post_init__(self) -> None:
        check_id(self.device_id, what="device id")
        check_id(self.fleet, what="fleet id")
        BrokerUrl.parse(self.broker)  # ConfigError with the reason
        if self.threads < 1:
            raise ConfigError("threads must be >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError("holdout_fraction must be within [0, 1)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{name} file not found: {value}")
        if self.time_scale is not None:
            if self.time_scale < 0:
                raise ConfigError("time_scale must be >= 0")
            if not self.emulate:
                raise ConfigError("time_scale scales the emulated time: it needs emulate = "
                                  "true, else it would be ignored")
        if self.metered is True and not self.allow_metered:
            raise ConfigError("metered = true says the network is metered and allow_metered "
                              "= false forbids training on one: this device would never "
                              "train")
        self.rules()
        self.protocol()

    # A field added to EligibilityRules or AgentSettings keeps its default until it is a
    # setting here too (tests/fleetlearn/test_config.py fails until then).

    def rules(self) -> EligibilityRules:
        return EligibilityRules(**{f.name: getattr(self, f.name)
                                   for f in dataclasses.fields(EligibilityRules)
                                   if hasattr(self, f.name)})

    def protocol(self) -> AgentSettings:
        return AgentSettings(**{f.name: getattr(self, f.name)
                                for f in dataclasses.fields(AgentSettings)
                                if hasattr(self, f.name)})

    def config(self) -> AgentConfig:
        """The ``AgentConfig`` the agent runs with (reads the password file)."""
        password = self.password
        if password is None and self.password_file is not None:
            # a bare password, or the credentials.toml of `fleetlearn broker config`
            password = read_password_file(self.password_file, user=self.device_id)
        tls = None
        if self.tls_ca or self.tls_cert:
            tls = TlsConfig(
                ca_certs=None if self.tls_ca is None else str(self.tls_ca),
                certfile=None if self.tls_cert is None else str(self.tls_cert),
                keyfile=None if self.tls_key is None else str(self.tls_key))
        return AgentConfig(
            broker=self.broker, device_id=self.device_id, fleet=self.fleet, data=self.data,
            holdout_fraction=self.holdout_fraction, password=password, tls=tls,
            state_dir=self.state_dir or _default_state_dir(self.device_id),
            artifacts_dir=self.artifacts_dir, profile=self.profile, threads=self.threads,
            rules=self.rules(), metered=self.metered,
            settings=self.protocol(),
            emulate=self.emulate, time_scale=self.time_scale,
        )


AGENT = Section("agent", AgentOptions, legacy_env_prefix=ENV_PREFIX, title="fleetlearn agent")
"""The ``[agent]`` section (every field of ``AgentOptions``)."""


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Merge flags > environment > file > defaults and check everything once."""
    env = os.environ if env is None else env
    resolved = AGENT.resolve(flags=flags, env=env, config_file=config_file,
                             flag_names=flag_names)
    options: AgentOptions = resolved.build(AgentOptions)
    try:
        return options.config()
    except ConfigError as exc:
        raise resolved.explain(exc) from exc
