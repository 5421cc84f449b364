"""Device profiles: schema, validation, TOML/JSON round-trips, catalogue, availability."""

from __future__ import annotations

import argparse
import json
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from device_profiles import (
    DEFAULT_MIX,
    Availability,
    AvailabilityKind,
    ConfigError,
    DeviceProfile,
    PowerSource,
    ProfileError,
    dumps_toml,
    get_profile,
    load_catalogue,
    load_profile_file,
    measure_machine,
    parse_mix,
    profile_mix,
)
from device_profiles._cli import register

CATALOGUE = load_catalogue()

HOUR = 3600.0


def _base(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "test-box",
        "display_name": "Test box",
        "device_class": "sbc",
        "cores": 4,
        "memory_mb": 1024,
        "storage_gb": 8.0,
        "gflops": 5.0,
        "step_overhead_ms": 1.0,
        "downlink_mbps": 50.0,
        "uplink_mbps": 10.0,
        "latency_ms": 20.0,
        "power": "mains",
    }
    data.update(overrides)
    return data


# -- the catalogue -------------------------------------------------------------------------


def test_catalogue_has_at_least_eight_real_device_classes() -> None:
    assert len(CATALOGUE) >= 8
    expected = {"pi-zero-2w", "pi4", "pi5", "jetson-nano", "jetson-orin-nano", "x86-gateway"}
    assert expected <= set(CATALOGUE)
    assert {"phone-low", "phone-mid", "phone-high"} <= set(CATALOGUE)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_catalogue_entry_round_trips_through_toml_and_json(name: str) -> None:
    profile = CATALOGUE[name]
    assert DeviceProfile.from_toml(profile.to_toml()) == profile
    assert DeviceProfile.from_json(profile.to_json()) == profile
    assert DeviceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_every_catalogue_number_is_sourced_or_marked_estimated(name: str) -> None:
    profile = CATALOGUE[name]
    numeric = ["cores", "memory_mb", "storage_gb", "gflops", "step_overhead_ms"]
    numeric += ["downlink_mbps", "uplink_mbps", "latency_ms"]
    sourced = {k for k, _ in profile.sources}
    for field in numeric:
        assert field in sourced or field in profile.estimated, f"{name}.{field}"
    assert profile.notes, name
    # Estimates say how they were derived.
    if "gflops" in profile.estimated:
        assert "gflops" in profile.notes


def test_catalogue_files_are_named_after_their_profiles() -> None:
    root = Path(__file__).resolve().parents[2] / "device_profiles" / "catalogue"
    for path in root.glob("*.toml"):
        assert load_profile_file(path).name == path.stem


def test_get_profile_unknown_name_lists_known_names() -> None:
    assert get_profile("pi4").cores == 4
    with pytest.raises(ProfileError, match=r"known: .*pi4"):
        get_profile("pi9")


def test_catalogue_ordering_is_sane() -> None:
    # Published relative speeds: Pi Zero 2 W < Pi 4 < Pi 5, low < mid < high phones.
    g = {n: p.gflops for n, p in CATALOGUE.items()}
    assert g["pi-zero-2w"] < g["pi4"] < g["pi5"]
    assert g["phone-low"] < g["phone-mid"] < g["phone-high"]
    assert CATALOGUE["pi-zero-2w"].memory_mb == 512


# -- fleet mixes ---------------------------------------------------------------------------


def test_profile_mix_counts_follow_weights_exactly() -> None:
    fleet = profile_mix("pi4:0.3,phone-mid:0.5,pi-zero-2w:0.2", 10, seed=1)
    names = [p.name for p in fleet]
    assert names.count("pi4") == 3
    assert names.count("phone-mid") == 5
    assert names.count("pi-zero-2w") == 2


def test_profile_mix_is_seeded() -> None:
    a = [p.name for p in profile_mix(DEFAULT_MIX, 50, seed=7)]
    b = [p.name for p in profile_mix(DEFAULT_MIX, 50, seed=7)]
    c = [p.name for p in profile_mix(DEFAULT_MIX, 50, seed=8)]
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c)
    assert len(profile_mix(n=1000)) == 1000


def test_profile_mix_rejects_bad_specs() -> None:
    with pytest.raises(ConfigError):
        parse_mix("pi4=0.3")
    with pytest.raises(ConfigError):
        parse_mix("pi4:abc")
    with pytest.raises(ConfigError):
        parse_mix("pi4:-1")
    with pytest.raises(ConfigError):
        parse_mix("")
    with pytest.raises(ProfileError, match="known"):
        parse_mix("nokia-3310:1")
    assert parse_mix({"pi4": 1, "pi5": 3}) == {"pi4": 0.25, "pi5": 0.75}


# -- validation ----------------------------------------------------------------------------


def test_valid_minimal_profile_gets_defaults() -> None:
    p = DeviceProfile.from_dict(_base())
    assert p.power is PowerSource.MAINS
    assert p.availability.kind is AvailabilityKind.ALWAYS_ON
    assert p.measured_step_ms == ()


@pytest.mark.parametrize(
    "field", ["gflops", "downlink_mbps", "uplink_mbps", "storage_gb", "latency_ms"]
)
def test_negative_values_are_rejected(field: str) -> None:
    with pytest.raises(ProfileError, match=field):
        DeviceProfile.from_dict(_base(**{field: -1.0}))


@pytest.mark.parametrize("field", ["cores", "memory_mb", "gflops", "power", "uplink_mbps"])
def test_missing_values_are_rejected(field: str) -> None:
    data = _base()
    del data[field]
    with pytest.raises(ProfileError, match=field):
        DeviceProfile.from_dict(data)


@pytest.mark.parametrize(
    "overrides",
    [
        {"cores": 0},
        {"cores": 2.5},
        {"cores": True},
        {"memory_mb": "lots"},
        {"gflops": float("nan")},
        {"gflops": float("inf")},
        {"power": "nuclear"},
        {"name": "Bad Name"},
        {"gflopz": 3.0},
        {"estimated": ["no_such_field"]},
        {"sources": {"no_such_field": "x"}},
        {"measured_step_ms": {"mlp": -1.0}},
        {"availability": {"kind": "sometimes"}},
        {"availability": {"kind": "diurnal", "start_hour": 8.0}},
        {"availability": {"kind": "diurnal", "start_hour": 8.0, "end_hour": 25.0}},
        {"availability": {"kind": "diurnal", "start_hour": 8.0, "end_hour": 8.0}},
        {"availability": {"kind": "flaky", "mean_up_s": 10.0, "mean_down_s": 0.0}},
        {"availability": {"kind": "always_on", "mean_up_s": 10.0}},
        {
            "availability": {
                "kind": "charging",
                "start_hour": 1.0,
                "end_hour": 2.0,
                "daily_probability": 1.5,
            }
        },
    ],
)
def test_bad_values_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ProfileError):
        DeviceProfile.from_dict(_base(**overrides))


def test_bad_text_raises_profile_error() -> None:
    with pytest.raises(ProfileError):
        DeviceProfile.from_toml("name = ")
    with pytest.raises(ProfileError):
        DeviceProfile.from_json("{not json")
    with pytest.raises(ProfileError):
        DeviceProfile.from_json("[1, 2]")


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ProfileError):
        replace(CATALOGUE["pi4"], uplink_mbps=0.0)


# -- the TOML writer -------------------------------------------------------------------------


def test_toml_writer_escapes_and_round_trips() -> None:
    data = {
        "s": 'quote " backslash \\ newline \n tab \t bell \x07 unicode é',
        "i": 3,
        "f": 1.0,
        "tiny": 1e-300,
        "b": True,
        "arr": ["a", "b"],
        "table": {"weird key": 1.5, "k": "v"},
    }
    assert tomllib.loads(dumps_toml(data)) == data
    with pytest.raises(ProfileError):
        dumps_toml({"t": {"nested": {"x": 1}}})
    with pytest.raises(ProfileError):
        dumps_toml({"x": float("nan")})


def test_measured_step_times_round_trip() -> None:
    p = DeviceProfile.from_dict(_base(measured_step_ms={"mlp": 0.4, "cnn": 1.25}))
    assert p.step_ms("mlp") == 0.4
    assert p.step_ms("mlp-xl") is None
    assert DeviceProfile.from_toml(p.to_toml()) == p


# -- availability ----------------------------------------------------------------------------


def test_always_on() -> None:
    a = Availability()
    assert a.is_available(123.0, seed=0)
    assert a.intervals(0.0, 10.0, seed=0) == [(0.0, 10.0)]
    assert a.expected_fraction() == 1.0


def test_diurnal_window() -> None:
    a = Availability(kind=AvailabilityKind.DIURNAL, start_hour=9.0, end_hour=17.0)
    assert a.is_available(10 * HOUR, seed=0)
    assert not a.is_available(8 * HOUR, seed=0)
    assert a.is_available(24 * HOUR + 16.9 * HOUR, seed=0)
    assert a.intervals(0.0, 48 * HOUR, seed=0) == [
        (9 * HOUR, 17 * HOUR),
        (33 * HOUR, 41 * HOUR),
    ]
    assert a.expected_fraction() == pytest.approx(8 / 24)


def test_charging_window_wraps_midnight_and_skips_some_nights() -> None:
    every = Availability(kind=AvailabilityKind.CHARGING, start_hour=23.0, end_hour=7.0)
    assert every.is_available(2 * HOUR, seed=0)  # the window that began the day before
    assert every.is_available(23.5 * HOUR, seed=0)
    assert not every.is_available(12 * HOUR, seed=0)
    some = replace(every, daily_probability=0.5)
    nights = [some.is_available(day * 24 * HOUR + 1 * HOUR, seed=3) for day in range(400)]
    assert 0.4 < sum(nights) / len(nights) < 0.6
    assert nights == [some.is_available(d * 24 * HOUR + 1 * HOUR, seed=3) for d in range(400)]


def test_flaky_is_deterministic_per_seed_and_matches_its_mean_uptime() -> None:
    a = Availability(kind=AvailabilityKind.FLAKY, mean_up_s=300.0, mean_down_s=100.0)
    horizon = 400.0 * 2000
    first = a.intervals(0.0, horizon, seed=11)
    assert first == a.intervals(0.0, horizon, seed=11)
    assert first != a.intervals(0.0, horizon, seed=12)
    uptime = sum(off - on for on, off in first) / horizon
    assert uptime == pytest.approx(a.expected_fraction(), abs=0.04)
    # A window query agrees with the full history.
    window = a.intervals(5000.0, 9000.0, seed=11)
    for t in (5000.0, 6123.4, 8999.0):
        inside = any(on <= t < off for on, off in window)
        assert inside == a.is_available(t, seed=11)


# -- measuring this machine -------------------------------------------------------------------


def test_measure_machine_reports_plausible_numbers(tmp_path: Path) -> None:
    p = measure_machine(step_times_ms={"mlp": 0.5}, gemm_seconds=0.03, storage_path=str(tmp_path))
    assert p.cores >= 1
    assert p.memory_mb > 64
    assert p.gflops > 0
    assert p.step_ms("mlp") == 0.5
    assert "uplink_mbps" in p.estimated
    assert DeviceProfile.from_toml(p.to_toml()) == p


def test_profile_cli_writes_a_loadable_file(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "profile.toml"
    args = parser.parse_args(["profile", "--out", str(out), "--seconds", "0.03", "--name", "me"])
    assert args.handler(args) == 0
    assert load_profile_file(out).name == "me"
    out_json = tmp_path / "profile.json"
    args = parser.parse_args(["profile", "--out", str(out_json), "--seconds", "0.03"])
    assert args.handler(args) == 0
    assert DeviceProfile.from_json(out_json.read_text()).name == "this-machine"
