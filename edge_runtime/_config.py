"""The agent's configuration, parsed once into a frozen ``AgentConfig``.

Sources, strongest first: command-line flags, environment (``FLEETLEARN_*``), a TOML
file (``--config`` / ``FLEETLEARN_CONFIG``), defaults. Every value is checked here,
and a bad one is a ``ConfigError`` naming the setting and where it came from, so the
rest of the agent never sees a string key or an unchecked value.

TOML layout (every key optional; flags and environment override)::

    broker = "mqtts://broker.example:8883"
    device_id = "pi-042"
    fleet = "default"
    data = "/data/local.npz"            # or "module:function", or a [data] table
    state_dir = "/var/lib/fleetlearn"
    profile = "pi4"                     # catalogue name or a profile .toml
    threads = 1
    password_file = "/etc/fleetlearn/password"
    holdout_fraction = 0.1

    [tls]
    ca = "ca.pem"
    cert = "device.pem"
    key = "device.key"

    [eligibility]
    require_charging = true
    min_battery_percent = 30
    min_free_memory_mb = 200
    allow_metered = false
    require_idle = false
    metered = false                     # what the network is, when the OS cannot tell

    [protocol]
    ack_timeout_s = 30
    request_timeout_s = 60
    deadline_margin_s = 0.2
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker_bridge import BrokerUrl, TlsConfig, check_id, read_password_file
from device_profiles import ConfigError
from edge_runtime._agent import AgentSettings
from edge_runtime._data import DataSource
from edge_runtime._eligibility import EligibilityRules

ENV_PREFIX = "FLEETLEARN_"
CONFIG_ENV = "FLEETLEARN_CONFIG"

# Setting name -> type tag. Flags, environment (FLEETLEARN_<NAME upper>) and TOML
# (flat keys, or the [tls]/[eligibility]/[protocol] tables) all use these names.
_SETTINGS: dict[str, str] = {
    "broker": "str",
    "device_id": "str",
    "fleet": "str",
    "data": "data",
    "holdout_fraction": "float",
    "password": "str",
    "password_file": "path",
    "tls_ca": "path",
    "tls_cert": "path",
    "tls_key": "path",
    "state_dir": "path",
    "artifacts_dir": "path",
    "profile": "str",
    "threads": "int",
    "require_charging": "bool",
    "min_battery_percent": "float",
    "min_free_memory_mb": "float",
    "allow_metered": "bool",
    "require_idle": "bool",
    "metered": "bool",
    "ack_timeout_s": "float",
    "request_timeout_s": "float",
    "deadline_margin_s": "float",
    "emulate": "bool",
    "time_scale": "float",
}
_TABLES = {"tls": "tls_", "eligibility": "", "protocol": ""}


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


def _default_state_dir(device_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fleetlearn" / device_id


def parse_data(value: Any, *, where: str) -> DataSource:
    """``path.npz`` | ``path.csv`` | ``module:function`` | a TOML table of DataSource fields."""
    if isinstance(value, DataSource):
        return value
    if isinstance(value, Mapping):
        fields = dict(value)
        try:
            return DataSource(**fields)
        except TypeError as exc:
            raise ConfigError(f"{where}: bad [data] table: {exc}") from exc
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: data must be a file path or module:function")
    lower = value.lower()
    if lower.endswith(".npz"):
        return DataSource(kind="npz", location=value)
    if lower.endswith(".csv"):
        return DataSource(kind="csv", location=value)
    module, sep, func = value.partition(":")
    if sep and module and func and "/" not in value and not Path(value).exists():
        return DataSource(kind="callable", location=value)
    raise ConfigError(
        f"{where}: data {value!r} is neither a .npz or .csv file nor module:function"
    )


def _convert(name: str, raw: Any, where: str) -> Any:
    kind = _SETTINGS[name]
    try:
        if kind == "str":
            if not isinstance(raw, str):
                raise TypeError("expected a string")
            return raw
        if kind == "path":
            if not isinstance(raw, str | os.PathLike):
                raise TypeError("expected a path")
            return Path(raw).expanduser()
        if kind == "int":
            if isinstance(raw, bool) or not isinstance(raw, int | str):
                raise TypeError("expected an integer")
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise TypeError("expected a number")
            return float(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind == "data":
            return parse_data(raw, where=where)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name} = {raw!r}: {exc}") from exc
    raise AssertionError(kind)


def _from_file(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    out: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        if key in _TABLES and isinstance(value, dict):
            for sub, subvalue in value.items():
                name = _TABLES[key] + sub
                if name not in _SETTINGS:
                    raise ConfigError(f"{path}: unknown setting [{key}] {sub}")
                out[name] = (subvalue, f"{path} [{key}]")
        elif key in _SETTINGS:
            out[key] = (value, str(path))
        else:
            raise ConfigError(f"{path}: unknown setting {key!r}")
    return out


def load_config(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> AgentConfig:
    """Merge flags > environment > file > defaults and check everything once."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = dict(os.environ if env is None else env)
    file_path = config_file or env.get(CONFIG_ENV)
    merged: dict[str, tuple[Any, str]] = {}
    if file_path:
        merged.update(_from_file(Path(file_path)))
    for name in _SETTINGS:
        value = env.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            merged[name] = (value, f"${ENV_PREFIX}{name.upper()}")
    for name, value in flags.items():
        if name not in _SETTINGS:
            raise ConfigError(f"unknown setting {name!r}")
        merged[name] = (value, f"--{name.replace('_', '-')}")
    values = {name: _convert(name, raw, where) for name, (raw, where) in merged.items()}

    for required in ("broker", "device_id", "data"):
        if required not in values:
            flag = required.replace("_", "-")
            raise ConfigError(
                f"no {required} given: use --{flag}, ${ENV_PREFIX}{required.upper()} "
                "or the config file"
            )
    device_id = check_id(values["device_id"], what="device id")
    fleet = check_id(values.get("fleet", "default"), what="fleet id")
    BrokerUrl.parse(values["broker"])  # ConfigError with the reason
    password = values.get("password")
    if password is None and "password_file" in values:
        # a bare password, or the credentials.toml of `fleetlearn broker config`
        password = read_password_file(values["password_file"], user=device_id)
    tls = None
    if any(k in values for k in ("tls_ca", "tls_cert", "tls_key")):
        if ("tls_cert" in values) != ("tls_key" in values):
            raise ConfigError("--tls-cert and --tls-key go together")
        for k in ("tls_ca", "tls_cert", "tls_key"):
            if k in values and not values[k].is_file():
                raise ConfigError(f"{k.replace('_', '-')} file not found: {values[k]}")
        tls = TlsConfig(
            ca_certs=str(values["tls_ca"]) if "tls_ca" in values else None,
            certfile=str(values["tls_cert"]) if "tls_cert" in values else None,
            keyfile=str(values["tls_key"]) if "tls_key" in values else None,
        )
    threads = values.get("threads", 1)
    if threads < 1:
        raise ConfigError("threads must be >= 1")
    holdout = values.get("holdout_fraction", 0.0)
    if not 0.0 <= holdout < 1.0:
        raise ConfigError("holdout_fraction must be within [0, 1)")
    rules = EligibilityRules(
        require_charging=values.get("require_charging", False),
        min_battery_percent=values.get("min_battery_percent"),
        min_free_memory_mb=values.get("min_free_memory_mb"),
        allow_metered=values.get("allow_metered", True),
        require_idle=values.get("require_idle", False),
    )
    protocol = {k: values[k] for k in ("ack_timeout_s", "request_timeout_s",
                                       "deadline_margin_s") if k in values}
    settings = AgentSettings(**protocol)
    time_scale = values.get("time_scale")
    if time_scale is not None and time_scale < 0:
        raise ConfigError("time_scale must be >= 0")
    return AgentConfig(
        broker=values["broker"],
        device_id=device_id,
        fleet=fleet,
        data=values["data"],
        holdout_fraction=holdout,
        password=password,
        tls=tls,
        state_dir=values.get("state_dir") or _default_state_dir(device_id),
        artifacts_dir=values.get("artifacts_dir"),
        profile=values.get("profile"),
        threads=threads,
        rules=rules,
        metered=values.get("metered"),
        settings=settings,
        emulate=values.get("emulate", False),
        time_scale=time_scale,
    )
