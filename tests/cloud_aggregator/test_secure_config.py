"""The secure_aggregation setting: what it refuses at configuration time, its fixed
point, and the flags it derives."""

from __future__ import annotations

import pytest

from cloud_aggregator._config import AggregatorConfig
from device_profiles import ConfigError
from fleetlearn._sim_config import SimConfig


def test_secure_aggregation_refuses_what_needs_to_see_updates() -> None:
    for codec in ("q8", "topk:0.1+q8+zstd:3", "fp16", "fp32+zstd:1"):
        with pytest.raises(ConfigError, match="does not work with secure aggregation"):
            AggregatorConfig(secure_aggregation=True, codec=codec)
    for bad in ({"robust": "median"}, {"clip_norm": 1.0}, {"max_update_norm": 5.0}):
        with pytest.raises(ConfigError, match="hides each update"):
            AggregatorConfig(secure_aggregation=True, **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sync rounds only"):
        AggregatorConfig(secure_aggregation=True, mode="async")
    with pytest.raises(ConfigError, match="secure_fraction"):
        AggregatorConfig(secure_aggregation=True, secure_fraction=0.0)
    with pytest.raises(ConfigError, match="secure_clip"):
        AggregatorConfig(secure_aggregation=True, secure_clip=-1.0)
    with pytest.raises(ConfigError, match="1,024"):
        AggregatorConfig(secure_aggregation=True, devices_per_round=2_000_000)
    # the same settings without secure aggregation are fine
    AggregatorConfig(codec="q8", robust="median")


def test_the_fixed_point_fits_every_round_it_can_select() -> None:
    for per_round in (3, 10, 100, 1000):
        cfg = AggregatorConfig(secure_aggregation=True, devices_per_round=per_round,
                               secure_clip=0.5, secure_fraction=0.25)
        fixed = cfg.secure_fixed_point()
        assert fixed.max_devices >= 2 * cfg.selected_per_round
        assert fixed.clip == 2.0  # clip / fraction: values are scaled up by 1/fraction
        assert fixed.max_devices * fixed.level_bound <= 2**31 - 1
        assert fixed.max_devices * fixed.level_bound * 2 > 2**31 - 1  # the finest that fits


def test_simulate_turns_it_on_with_the_codec_it_takes() -> None:
    cfg = SimConfig(secure_aggregation=True)
    agg = cfg.aggregator_config()
    assert agg.secure_aggregation and agg.codec == "fp32"
    with pytest.raises(ConfigError, match="does not work with secure aggregation"):
        SimConfig(secure_aggregation=True, codec="q8")
    with pytest.raises(ConfigError, match="sets secure_aggregation itself"):
        SimConfig(aggregator={"secure_aggregation": True})
