"""One configuration system: every setting of every section from every source.

The settings are read from the dataclasses (``Section.specs``), never listed here: a
field added to ``AggregatorConfig``, ``AggregatorConnection``, ``AgentOptions``,
``SimConfig`` or ``FaultSpec`` without help text, without a value the tests can give it,
or that a source cannot reach, fails ``test_every_setting_from_every_source``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_aggregator import AggregatorConfig
from cloud_aggregator._config import AGGREGATOR, load_config
from cloud_aggregator._connect import AggregatorConnection
from device_profiles import ConfigError, Resolved, Section
from device_profiles._settings import OTHER_ENV, REQUIRED, UNSET, Spec, registered_sections
from edge_runtime._agent import AgentSettings
from edge_runtime._config import AGENT, AgentOptions
from edge_runtime._config import load_config as load_agent_config
from edge_runtime._eligibility import EligibilityRules
from edge_runtime._fleet import FaultSpec
from fleetlearn._edge_cli import EDGE
from fleetlearn._sim_config import SIM_OWNED, SIMULATE, SimConfig
from fleetlearn.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
COMMAND = {"aggregator": "aggregator", "agent": "agent", "simulate": "simulate",
           "edge": "edge"}
SECTIONS: dict[str, Section] = {"aggregator": AGGREGATOR, "agent": AGENT, "simulate": SIMULATE,
                                "edge": EDGE}
BASE: dict[str, dict[str, Any]] = {
    "aggregator": {"broker": "mqtts://broker.example:8883"},
    "agent": {"broker": "mqtt://broker:1883", "device_id": "pi-1", "data": "d.npz"},
    "simulate": {},
    "edge": {"broker": "mqtts://site.example:8883", "device_id": "edge-1",
             "parents": "cloud@mqtts://cloud.example:8883"},
}
"""Required settings, given in the file unless the setting under test is one of them."""
COMPANIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("aggregator", "max_selected"): {"selection": "deadline"},
    ("aggregator", "tls_cert"): {"tls_key": "client.key"},
    ("aggregator", "tls_key"): {"tls_cert": "client.pem"},
    ("agent", "tls_cert"): {"tls_key": "device.key"},
    ("agent", "tls_key"): {"tls_cert": "device.pem"},
    ("agent", "time_scale"): {"emulate": True},
    ("simulate", "aggregator.max_selected"): {"selection": "deadline"},
    ("simulate", "tier_models"): {"topology": "cloud:1,edge:3,device:30", "model": "mlp"},
    ("simulate", "edge_profile"): {"topology": "cloud:1,edge:3,device:30"},
    ("simulate", "link_bandwidth"): {"topology": "cloud:1,edge:3,device:30"},
    ("edge", "max_selected"): {"selection": "deadline"},
    ("edge", "distill"): {"tier_model": "cnn"},
    ("edge", "tls_cert"): {"tls_key": "client.key"},
    ("edge", "tls_key"): {"tls_cert": "client.pem"},
    ("aggregator", "dp_population"): {"dp_epsilon": 8.0},
    ("aggregator", "dp_clip_count_stddev"): {"dp_noise_multiplier": 1.0},
    ("edge", "dp_population"): {"dp_epsilon": 8.0},
    ("edge", "dp_clip_count_stddev"): {"dp_noise_multiplier": 1.0},
    ("simulate", "aggregator.dp_population"): {"aggregator.dp_epsilon": 8.0},
    ("simulate", "aggregator.dp_clip_count_stddev"): {"aggregator.dp_noise_multiplier": 1.0},
}
"""Settings another one needs beside it (each pair is refused apart: see the refusals)."""
FILES = ("ca.pem", "client.pem", "client.key", "device.pem", "device.key")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No FLEETLEARN_* setting from the machine; the TLS example files exist."""
    for name in list(os.environ):
        if name.startswith("FLEETLEARN_") and (name not in OTHER_ENV
                                               or name == "FLEETLEARN_CONFIG"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    for name in FILES:
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    yield


# --------------------------------------------------------------------------- helpers


def example(section: str, spec: Spec) -> Any:
    """A valid value of ``spec`` other than its default."""
    if spec.meta.example is not None:
        return spec.meta.example
    default = spec.fallback if spec.default is UNSET else spec.default
    if spec.kind.base == "bool":
        return not default
    if spec.kind.choices:
        return next(c for c in spec.kind.choices if c != default)
    if spec.kind.base == "int" and isinstance(default, int):
        return default + 1
    if spec.kind.base == "float" and isinstance(default, int | float):
        return float(default) * 2 if default else 0.5
    raise AssertionError(f"{section}.{spec.name}: no example value (give it example=...)")


def text(value: Any) -> str:
    """A value as typed in a flag or an environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_file(path: Path, section: str, values: dict[str, Any]) -> Path:
    """A unified file: ``[section]`` and its sub-tables at each setting's own place."""
    sec = SECTIONS[section]
    top: list[str] = []
    tables: dict[str, list[str]] = {}
    for name, value in values.items():
        spec = sec.spec(name)
        line = f"{spec.key if spec.table else name} = {toml_value(value)}"
        (tables.setdefault(spec.table, []) if spec.table else top).append(line)
    lines = [f"[{section}]", *top]
    for table, rows in tables.items():
        lines += [f"[{section}.{table}]", *rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def flag_argv(spec: Spec, value: Any) -> list[str]:
    if spec.flag is None:  # an overrides entry without a shortcut
        table, key = spec.name.split(".")
        return [f"--{table.replace('_', '-')}", f"{key}={text(value)}"]
    if spec.kind.base == "bool" and not spec.kind.optional:
        return [spec.flag if value else "--no-" + spec.flag[2:]]
    return [spec.flag, text(value)]


PARSER = build_parser()


def resolve(section: str, *, argv: list[str] = (), env: dict[str, str] | None = None,  # type: ignore[assignment]
            file: Path | None = None) -> Resolved:
    """Through the command's real parser, as ``fleetlearn <command>`` does."""
    cfg = ["--config", str(file)] if file is not None else []
    args = PARSER.parse_args([COMMAND[section], *cfg, *argv])
    return SECTIONS[section].from_args(args, env=env or {})


def built_value(res: Resolved, spec: Spec) -> Any:
    obj = res.build(spec.owner)
    for part in spec.path:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def expected(spec: Spec, value: Any) -> Any:
    if spec.meta.parse is not None:
        return spec.meta.parse(value)
    if spec.kind.base == "path":
        return Path(value)
    if spec.kind.base == "float":
        return float(value)
    return value


def all_specs() -> list[tuple[str, Spec]]:
    return [(name, spec) for name, sec in SECTIONS.items() for spec in sec.specs]


# --------------------------------------------------------------------------- every setting


@pytest.mark.parametrize(("section", "name"), [(n, s.name) for n, s in all_specs()])
def test_every_setting_from_every_source(section: str, name: str, tmp_path: Path) -> None:
    """Flag beats environment beats file beats default, for this setting; the value
    from each source reaches the built object."""
    sec = SECTIONS[section]
    spec = sec.spec(name)
    assert spec.meta.help, f"{section}.{name} has no help text"
    value = example(section, spec)
    default = spec.fallback if spec.default is UNSET else spec.default
    assert expected(spec, value) != default, f"{section}.{name}: example equals the default"
    base = {k: v for k, v in {**BASE[section], **COMPANIONS.get((section, name), {})}.items()
            if k != name}
    file = write_file(tmp_path / "fleet.toml", section, {**base, name: value})
    env = {spec.env[0]: text(value)}
    argv = [] if spec.flag is None and spec.default is not UNSET else flag_argv(spec, value)

    steps: list[tuple[list[str], dict[str, str], str]] = []
    if argv:
        steps.append((argv, env, "flag"))
    steps += [([], env, "env"), ([], {}, "file")]
    for step_argv, step_env, want in steps:
        res = resolve(section, argv=step_argv, env=step_env, file=file)
        assert res.sources[name].kind == want, (section, name, want, res.sources[name])
        assert built_value(res, spec) == expected(spec, value), (section, name, want)
    required = {k: v for k, v in BASE[section].items() if k != name}
    res = resolve(section, file=write_file(tmp_path / "base.toml", section, required))
    if spec.default is REQUIRED:
        assert res.missing() and res.missing()[0].name == name
        with pytest.raises(ConfigError, match=f"no {name} given"):
            res.build(spec.owner)
    else:
        assert res.sources[name].kind == "default"
        if spec.default is not UNSET:
            assert built_value(res, spec) == default
    if spec.flag is None and spec.default is not UNSET:
        # Only secrets go without a flag (ps shows every process's arguments).
        assert spec.meta.secret, f"{section}.{name} has no flag"
    for alias in spec.env[1:]:
        res = resolve(section, env={alias: text(value)}, file=write_file(
            tmp_path / "base.toml", section, base))
        assert res.sources[name].detail == alias
        assert built_value(res, spec) == expected(spec, value)


def test_the_settings_are_the_fields_of_the_configs() -> None:
    """Nothing of the classes a command runs with is left without a source."""
    internal = {f.name for f in dataclasses.fields(AggregatorConfig)} - {
        s.name for s in AGGREGATOR.specs}
    assert internal == {"extra"}  # refused when not empty; no setting
    assert {f.name for f in dataclasses.fields(AggregatorConnection)} <= {
        s.name for s in AGGREGATOR.specs}
    agent = {s.name for s in AGENT.specs}
    assert {f.name for f in dataclasses.fields(AgentOptions)} == agent
    assert {f.name for f in dataclasses.fields(EligibilityRules)} <= agent
    assert {f.name for f in dataclasses.fields(AgentSettings)} <= agent
    sim = {s.name for s in SIMULATE.specs}
    assert {f.name for f in dataclasses.fields(SimConfig)} - {"faults", "aggregator"} <= sim
    assert {f.name for f in dataclasses.fields(FaultSpec)} <= sim
    assert {f"aggregator.{f.name}" for f in dataclasses.fields(AggregatorConfig)
            if f.name not in (*SIM_OWNED, "extra")} <= sim


def test_precedence_with_different_values_in_each_source(tmp_path: Path) -> None:
    file = write_file(tmp_path / "f.toml", "aggregator", {
        "broker": "mqtt://file:1883", "rounds": 7, "quorum": 3, "lr": 0.1, "fleet": "f"})
    env = {"FLEETLEARN_AGGREGATOR_ROUNDS": "8", "FLEETLEARN_AGGREGATOR_QUORUM": "4"}
    res = resolve("aggregator", argv=["--rounds", "9"], env=env, file=file)
    config: AggregatorConfig = res.build(AggregatorConfig)
    assert (config.rounds, config.quorum, config.lr, config.fleet, config.seed) == (
        9, 4, 0.1, "f", 0)
    assert [str(res.sources[k]) for k in ("rounds", "quorum", "lr", "seed")] == [
        "flag --rounds", "env FLEETLEARN_AGGREGATOR_QUORUM", f"file {file} [aggregator]",
        "default"]
    # The agent: its own names, and the older ones deployed agents use.
    file = write_file(tmp_path / "a.toml", "agent", {**BASE["agent"], "threads": 3,
                                                     "ack_timeout_s": 5.0})
    env = {"FLEETLEARN_AGENT_THREADS": "2", "FLEETLEARN_THREADS": "4",
           "FLEETLEARN_ACK_TIMEOUT_S": "6"}
    res = resolve("agent", env=env, file=file)
    options: AgentOptions = res.build(AgentOptions)
    assert (options.threads, options.ack_timeout_s) == (2, 6.0)  # canonical name first
    res = resolve("simulate", argv=["--crash-fraction", "0.3", "--local-epochs", "2"], env={
        "FLEETLEARN_SIMULATE_CRASH_FRACTION": "0.2",
        "FLEETLEARN_SIMULATE_AGGREGATOR_LOCAL_EPOCHS": "3",
        "FLEETLEARN_SIMULATE_AGGREGATOR_SERVER_OPT": "fedadam"})
    sim: SimConfig = res.build(SimConfig)
    assert sim.faults.crash_fraction == 0.3
    assert sim.aggregator == {"local_epochs": 2, "server_opt": "fedadam"}
    assert sim.aggregator_config().server_opt == "fedadam"


# --------------------------------------------------------------------------- files


def test_unknown_keys_in_a_file_name_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    cases = {
        '[aggregator]\nroundz = 3\n': r"fleet.toml: unknown setting 'roundz' in \[aggregator\]"
                                      r" \(did you mean 'rounds'\?\)",
        '[agent.tls]\ncafile = "ca.pem"\n': r"fleet.toml: unknown setting \[agent.tls\] cafile",
        '[aggregater]\nrounds = 3\n[agent]\n': r"fleet.toml: unknown top-level key 'aggregater'",
        '[simulate.faults]\ncrash = 0.1\n': r"unknown setting \[simulate.faults\] crash",
        '[simulate.aggregator]\nmodel = "mlp"\n': r"sets model itself",
        '[aggregator]\nrounds = 3\n[aggregator.tls]\nca = "x"\n': r"unknown setting 'tls'",
        '[agent]\ntls_ca = "ca.pem"\n[agent.tls]\nca = "ca.pem"\n': r"tls_ca is given twice",
    }
    for body, message in cases.items():
        path.write_text(body)
        section = body.split("]")[0].strip("[").split(".")[0]
        sec = SECTIONS.get(section, AGGREGATOR)
        with pytest.raises(ConfigError, match=message):
            sec.resolve(env={}, config_file=path)
    path.write_text("rounds = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        AGGREGATOR.resolve(env={}, config_file=path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        AGGREGATOR.resolve(env={}, config_file=tmp_path / "missing.toml")


def test_the_old_agent_file_layout_still_loads(tmp_path: Path) -> None:
    """A flat agent.toml with top-level [tls], [eligibility], [protocol], [data] tables
    gives the same configuration as the same settings under [agent]."""
    body = (
        'broker = "mqtts://file:8883"\ndevice_id = "pi-7"\nthreads = 3\n'
        'password_file = "pw"\n'
        '[tls]\nca = "ca.pem"\ncert = "device.pem"\nkey = "device.key"\n'
        '[eligibility]\nrequire_charging = true\nmin_battery_percent = 40\n'
        '[protocol]\nack_timeout_s = 5\n'
        '[data]\nkind = "csv"\nlocation = "local.csv"\nlabel_column = 0\n')
    (tmp_path / "pw").write_text("secret-pw\n")
    old = tmp_path / "agent.toml"
    old.write_text(body)
    new = tmp_path / "fleet.toml"
    new.write_text("[aggregator]\nrounds = 3\n\n[agent]\n" + body.replace("[", "[agent."))
    configs = [load_agent_config(env={}, config_file=p) for p in (old, new)]
    assert configs[0] == configs[1]
    cfg = configs[0]
    assert cfg.tls is not None and cfg.tls.ca_certs == "ca.pem" and cfg.password == "secret-pw"
    assert cfg.rules.require_charging and cfg.rules.min_battery_percent == 40
    assert cfg.settings.ack_timeout_s == 5 and cfg.threads == 3
    assert (cfg.data.kind, cfg.data.location, cfg.data.label_column) == ("csv", "local.csv", 0)
    # An older aggregator file (settings at the top level) loads too.
    flat = tmp_path / "aggregator.toml"
    flat.write_text('rounds = 4\nmodel = "mlp"\n')
    assert load_config(flat, env={}).rounds == 4


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    file = write_file(tmp_path / "f.toml", "aggregator", {"rounds": 5})
    res = AGGREGATOR.resolve(env={"FLEETLEARN_CONFIG": str(file)})
    assert res.build(AggregatorConfig).rounds == 5
    assert str(res.file) == f"env FLEETLEARN_CONFIG={file}"
    other = write_file(tmp_path / "g.toml", "aggregator", {"rounds": 6})
    assert AGGREGATOR.resolve(env={"FLEETLEARN_CONFIG": str(file)}, config_file=other
                              ).build(AggregatorConfig).rounds == 6  # --config wins


# --------------------------------------------------------------------------- bad values


def test_a_bad_value_names_the_setting_and_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "FLEETLEARN_AGGREGATOR_ROUNDS='x' (environment): not an integer")):
        load_config(env={"FLEETLEARN_AGGREGATOR_ROUNDS": "x"})
    with pytest.raises(ConfigError, match=re.escape("--rounds 'x' (flag): not an integer")):
        resolve("aggregator", argv=["--rounds", "x"])
    file = write_file(tmp_path / "f.toml", "aggregator", {"rounds": "x"})
    with pytest.raises(ConfigError, match=re.escape(
            f"rounds = 'x' in {file} [aggregator]: not an integer")):
        load_config(file, env={})
    with pytest.raises(ConfigError, match=re.escape(
            "FLEETLEARN_AGENT_REQUIRE_IDLE='maybe' (environment): expected true or false")):
        AGENT.resolve(env={"FLEETLEARN_AGENT_REQUIRE_IDLE": "maybe"})
    with pytest.raises(ConfigError, match="not one of sync, async"):
        load_config(env={"FLEETLEARN_AGGREGATOR_MODE": "asynchronous"})
    with pytest.raises(ConfigError, match="not a finite number"):
        load_config(env={"FLEETLEARN_AGGREGATOR_LR": "nan"})
    # A check of the class itself gets the source of the settings it names.
    with pytest.raises(ConfigError, match=re.escape(
            "rounds must be a positive integer, got 0 (rounds from env "
            "FLEETLEARN_AGGREGATOR_ROUNDS)")):
        load_config(env={"FLEETLEARN_AGGREGATOR_ROUNDS": "0"})
    with pytest.raises(ConfigError, match=r"quorum must be in 1\.\.13 .*quorum from flag --quorum"):
        resolve("aggregator", argv=["--quorum", "99"]).build(AggregatorConfig)
    with pytest.raises(ConfigError, match=re.escape(
            "--aggregator lr='fast' (flag): not a number")):
        resolve("simulate", argv=["--aggregator", "lr=fast"])
    with pytest.raises(ConfigError, match="unknown setting 'lrr'"):
        resolve("simulate", argv=["--aggregator", "lrr=1"])


def test_optional_settings_take_none_from_every_source(tmp_path: Path) -> None:
    file = write_file(tmp_path / "f.toml", "aggregator", {"max_staleness": "none"})
    assert load_config(file, env={}).max_staleness is None
    assert load_config(env={"FLEETLEARN_AGGREGATOR_NORM_MEDIAN_MULTIPLE": "none"}
                       ).norm_median_multiple is None
    res = resolve("aggregator", argv=["--max-weight-multiple", "none"])
    assert res.build(AggregatorConfig).max_weight_multiple is None


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("settings", "why"), [
    ({"quorum": 99}, r"quorum must be in 1\.\.13"),
    ({"min_devices": 3, "quorum": 5}, "such rounds could only be abandoned"),
    ({"max_selected": 20}, "max_selected applies to selection = deadline"),
    ({"server_opt": "fedadam", "server_momentum": 0.5}, "server_opt = fedavgm only"),
    ({"robust": "krum", "byzantine": 2, "devices_per_round": 4, "over_selection": 1.0,
      "quorum": 2, "min_devices": 4}, "no round could be aggregated"),
    ({"robust": "multi_krum", "byzantine": 2, "quorum": 5},
     r"quorum \(5\) is below what multi_krum with byzantine = 2 needs"),
    ({"mode": "async", "robust": "krum", "byzantine": 2, "buffer_size": 5},
     r"buffer_size \(5\) is below .* no buffer could be aggregated"),
])
def test_contradictory_aggregator_settings_are_refused_with_the_reason(
        settings: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        AggregatorConfig(**settings)


def test_combinations_that_work_are_accepted() -> None:
    # Async mode applies robust rules and clipping like sync rounds (issue 13).
    cfg = AggregatorConfig(mode="async", robust="multi_krum", clip_norm=1.0)
    assert cfg.robust_config().uses_krum and cfg.robust_config().clip_norm == 1.0
    # A buffer larger than the devices in flight fills from re-sent tasks (FedBuff
    # re-dispatches a slot as soon as its update arrives): not a contradiction.
    assert AggregatorConfig(mode="async", concurrency=2, buffer_size=5).buffer_size == 5
    # Krum's need against the default quorum is left to the rounds (a round that
    # closes with fewer is abandoned, saying why): bench/robust.py runs this.
    assert AggregatorConfig(robust="multi_krum", byzantine=4).selected_per_round == 13
    AggregatorConfig(selection="deadline", max_selected=20)


def test_fedbuff_with_a_buffer_larger_than_its_concurrency_releases_models(
        tmp_path: Path, artifacts: Path) -> None:
    from aggregator_rig import devices, feed_async, make

    from broker_bridge import MemoryBroker

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=2, buffer_size=3,
               rounds=2, staleness="constant", norm_median_multiple=None)
    try:
        answered = feed_async(agg, fleet, 6)
        assert agg.model_version == 2  # two buffers of 3, never more than 2 tasks out
        assert len({d for d, _ in answered}) == 3 and len(set(answered)) == 6
    finally:
        agg.close()


def test_contradictory_agent_and_simulate_settings_are_refused(tmp_path: Path) -> None:
    base = dict(BASE["agent"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"time_scale": 0.5}, "time_scale scales the emulated time: it needs emulate"),
        ({"metered": True, "allow_metered": False}, "this device would never train"),
        ({"tls_cert": "device.pem"}, "tls_cert and tls_key go together"),
        ({"tls_ca": "nope.pem"}, "tls_ca file not found"),
        ({"holdout_fraction": 1.0}, r"holdout_fraction must be within \[0, 1\)"),
    ]
    for extra, why in cases:
        with pytest.raises(ConfigError, match=why):
            load_agent_config(flags={**base, **extra}, env={})
    # password and password_file: the stronger source wins, the same source is refused.
    (tmp_path / "pw").write_text("from-file\n")
    with pytest.raises(ConfigError, match=r"password .* and password_file .* are both given"):
        load_agent_config(flags={**base, "password": "a", "password_file": "pw"}, env={})
    cfg = load_agent_config(flags={**base, "password_file": "pw"},
                            env={"FLEETLEARN_PASSWORD": "from-env"})
    assert cfg.password == "from-file"
    with pytest.raises(ConfigError, match="are both given"):  # both from the environment
        load_agent_config(flags=base, env={"FLEETLEARN_AGENT_PASSWORD_FILE": "pw",
                                           "FLEETLEARN_PASSWORD": "from-env"})
    file = write_file(tmp_path / "f.toml", "agent", {**base, "password_file": "pw"})
    assert load_agent_config(env={"FLEETLEARN_PASSWORD": "from-env"}, config_file=file
                             ).password == "from-env"
    # The simulation: its aggregator may not contradict the simulation's own settings.
    with pytest.raises(ConfigError, match="the simulation sets model itself"):
        SimConfig(aggregator={"model": "mlp"})
    with pytest.raises(ConfigError, match="simulate sets codec itself"):
        resolve("simulate", argv=["--aggregator", "codec=fp32"])
    with pytest.raises(ConfigError, match="no round could be aggregated"):
        SimConfig(aggregator={"robust": "krum", "byzantine": 6})
    with pytest.raises(ConfigError, match=r"per_round must be within 1\.\.5"):
        SimConfig(devices=5, per_round=10)


# --------------------------------------------------------------------------- secrets


def test_secrets_never_come_from_a_refused_flag_nor_get_printed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # The aggregator has no --password: ps shows every process's arguments.
    with pytest.raises(SystemExit):
        PARSER.parse_args(["aggregator", "--broker", "mqtt://h", "--password", "x"])
    assert "--password " not in capsys.readouterr().err.split("usage")[0]
    spec = AGGREGATOR.spec("password")
    assert spec.flag is None and spec.env == ("FLEETLEARN_AGGREGATOR_PASSWORD",
                                              "FLEETLEARN_PASSWORD")
    creds = tmp_path / "creds.toml"
    creds.write_text('"aggregator" = "from-creds"\n')
    res = resolve("aggregator", argv=["--broker", "mqtt://h", "--password-file", str(creds)],
                  env={"FLEETLEARN_PASSWORD": "hunter2-env"})
    conn: AggregatorConnection = res.build(AggregatorConnection)
    assert conn.settings().password == "from-creds"  # the flag's file beats the variable
    assert "hunter2" not in repr(conn) and "from-creds" not in repr(conn.settings())
    res = resolve("aggregator", argv=["--broker", "mqtt://h"],
                  env={"FLEETLEARN_PASSWORD": "hunter2-env"})
    assert res.build(AggregatorConnection).settings().password == "hunter2-env"
    # A file holding a secret that other users can read draws a warning.
    file = tmp_path / "f.toml"
    file.write_text('[aggregator]\nbroker = "mqtt://h"\npassword = "hunter2-file"\n')
    file.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        AGGREGATOR.resolve(env={}, config_file=file)
    assert "other users may read it" in caplog.text
    # config show: never the value, in either format, nor in an error.
    monkeypatch.setenv("FLEETLEARN_AGENT_PASSWORD", "hunter2-agent")
    for fmt in ("text", "toml"):
        assert main(["config", "show", "--config", str(file), "--format", fmt]) == 0
        out = capsys.readouterr()
        assert "hunter2" not in out.out + out.err
        assert ("<secret>" if fmt == "text" else "not written (a secret)") in out.out
    assert main(["config", "show", "agent", "--broker", "mqtt://h", "--device-id", "d",
                 "--data", "d.npz", "--password", "hunter2-flag", "--threads", "0"]) == 2
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err and "threads must be >= 1" in out.err


# --------------------------------------------------------------------------- config show


def test_config_show_prints_values_and_where_they_came_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "fleet.toml"
    file.write_text(
        '[aggregator]\nbroker = "mqtt://broker:1883"\nrounds = 7\nquorum = 3\n'
        '[agent]\nbroker = "mqtt://broker:1883"\ndevice_id = "pi-1"\ndata = "d.npz"\n'
        '[agent.tls]\nca = "ca.pem"\n'
        '[simulate]\ndevices = 20\nper_round = 5\n[simulate.faults]\ncrash_fraction = 0.2\n'
        '[simulate.aggregator]\nlocal_epochs = 1\n')
    monkeypatch.setenv("FLEETLEARN_AGGREGATOR_QUORUM", "4")
    monkeypatch.setenv("FLEETLEARN_THREADS", "2")
    assert main(["config", "show", "--config", str(file)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "[aggregator]" in out and "[agent]" in out and "[simulate]" in out
    assert re.search(rf"rounds\s+7\s+file {re.escape(str(file))} \[aggregator\]", out)
    assert re.search(r"quorum\s+4\s+env FLEETLEARN_AGGREGATOR_QUORUM", out)
    assert re.search(r"threads\s+2\s+env FLEETLEARN_THREADS", rows["threads"])
    assert re.search(r'tls_ca \(tls\.ca\)\s+"ca\.pem"\s+file .*\[agent\.tls\]', out)
    assert re.search(r"aggregator\.local_epochs\s+1\s+file .*\[simulate\.aggregator\]", out)
    assert re.search(r"seed\s+0\s+default", rows["seed"])
    # One section, with its command's flags.
    assert main(["config", "show", "--config", str(file), "aggregator", "--rounds", "9",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[agent]" not in out
    assert re.search(r"rounds\s+9\s+flag --rounds", out)
    assert re.search(r"progress\s+false\s+flag --quiet", out)
    # A missing required setting is shown as such; a broken one fails with the reason.
    assert main(["config", "show", "agent"]) == 0
    assert re.search(r"broker\s+\(required, not set\)", capsys.readouterr().out)
    assert main(["config", "show", "aggregator", "--broker", "mqtt://h", "--quorum", "99"]
                ) == 2
    assert "quorum must be in 1..13" in capsys.readouterr().err


def test_config_show_toml_reproduces_the_configuration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "fleet.toml"
    file.write_text(
        '[aggregator]\nbroker = "mqtt://broker:1883"\nrounds = 7\nmax_staleness = "none"\n'
        '[agent]\nbroker = "mqtt://b:1883"\ndevice_id = "pi-1"\n'
        '[agent.data]\nkind = "callable"\nlocation = "mymod:load"\nkwargs = {n = 3, s = "x"}\n'
        '[agent.tls]\nca = "ca.pem"\n'
        '[simulate]\ndevices = 20\nper_round = 5\n[simulate.faults]\ncrash_fraction = 0.2\n'
        '[edge]\nbroker = "mqtt://site:1883"\ndevice_id = "edge-1"\n'
        'parents = "cloud@mqtt://broker:1883"\nrounds_per_task = 2\n')
    monkeypatch.setenv("FLEETLEARN_SIMULATE_AGGREGATOR_TRIM_FRACTION", "0.2")
    argv = ["config", "show", "--config", str(file), "--format", "toml"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    again = tmp_path / "again.toml"
    again.write_text(first)
    monkeypatch.delenv("FLEETLEARN_SIMULATE_AGGREGATOR_TRIM_FRACTION")
    for name, sec in SECTIONS.items():
        before = sec.resolve(config_file=file, env={
            "FLEETLEARN_SIMULATE_AGGREGATOR_TRIM_FRACTION": "0.2"})
        after = sec.resolve(config_file=again, env={})
        assert after.values == before.values, name
        assert {s.kind for s in after.sources.values()} <= {"file", "default"}
        for cls in sec.classes:
            assert after.build(cls) == before.build(cls)
    assert main(["config", "show", "--config", str(again), "--format", "toml"]) == 0
    assert capsys.readouterr().out == first  # a fixed point


# --------------------------------------------------------------------------- environment


def test_unknown_fleetlearn_variables_are_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    assert len(registered_sections()) >= 3
    with caplog.at_level(logging.WARNING):
        AGGREGATOR.resolve(env={"FLEETLEARN_AGGREGATOR_ROUNDZ": "3",
                                "FLEETLEARN_AGENT_THREADS": "2", "FLEETLEARN_CACHE_DIR": "x"})
    assert "FLEETLEARN_AGGREGATOR_ROUNDZ is not a fleetlearn setting" in caplog.text
    assert "did you mean FLEETLEARN_AGGREGATOR_ROUNDS" in caplog.text
    assert "FLEETLEARN_AGENT_THREADS" not in caplog.text  # the agent's, not unknown
    assert "FLEETLEARN_CACHE_DIR" not in caplog.text


def test_every_fleetlearn_variable_the_project_reads_is_known() -> None:
    """A FLEETLEARN_* name used anywhere in the code, scripts or docs is a setting's
    environment variable or one of OTHER_ENV (so it is never warned about)."""
    known = set(OTHER_ENV)
    for sec in SECTIONS.values():
        known |= sec.env_names()
    used: set[str] = set()
    for path in [*REPO.glob("*/*.py"), *REPO.glob("*/*/*.py"), *REPO.glob("scripts/*.sh"),
                 REPO / "README.md", *REPO.glob("docs/*.md")]:
        if ".venv" in path.parts or path.name == "test_config.py":  # names typos on purpose
            continue
        used |= set(re.findall(r"\bFLEETLEARN_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    prefixes = {sec.env_prefix.rstrip("_") for sec in SECTIONS.values()}
    unknown = {n for n in used - known - prefixes
               if not any(n.startswith(p) and n.endswith("NAME") for p in prefixes)}
    assert not unknown


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("command", ["aggregator", "agent", "simulate", "edge"])
def test_help_lists_every_flag_and_how_other_sources_name_it(
        command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for spec in SECTIONS[command].specs:
        if spec.flag is not None:
            assert spec.flag in out, spec.name
    assert f"{SECTIONS[command].env_prefix}NAME" in out and "--config FILE" in out
    assert "flags > environment > file > defaults" in " ".join(out.split())


def test_a_command_without_its_required_settings_says_where_to_give_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["aggregator"]) == 2
    err = capsys.readouterr().err
    assert "no broker given: use --broker, FLEETLEARN_AGGREGATOR_BROKER" in err
    assert main(["agent", "--broker", "mqtt://h"]) == 2
    assert "no device_id given: use --device-id" in capsys.readouterr().err


def test_simulate_print_device_ids_takes_its_settings_from_every_source(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLEARN_SIMULATE_DEVICES", "3")
    monkeypatch.setenv("FLEETLEARN_SIMULATE_PER_ROUND", "2")
    assert main(["simulate", "--print-device-ids"]) == 0
    assert capsys.readouterr().out.split() == ["dev-0", "dev-1", "dev-2"]


def test_the_readme_example_file_gives_every_command_its_settings(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- config-example:begin -->")[1].split("<!-- config-example:end -->")[0]
    body = block.split("```toml\n")[1].split("```")[0]
    file = tmp_path / "fleet.toml"
    file.write_text(body)
    for name, sec in SECTIONS.items():
        res = sec.resolve(config_file=file, env={})
        assert not res.missing(), name
        for cls in sec.classes:
            res.build(cls)
    agent = AGENT.resolve(config_file=file, env={}).build(AgentOptions)
    assert agent.require_charging and agent.tls_ca == Path("ca.pem")
    sim = SIMULATE.resolve(config_file=file, env={}).build(SimConfig)
    assert sim.faults.crash_fraction == 0.1 and sim.aggregator_config().local_epochs == 2
