"""Device and edge profiles and per-link bandwidths in a tree simulation (issue #16)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from broker_bridge import TaskSpec
from device_profiles import ConfigError, Task, get_profile, predict, profile_mix
from fleetlearn import SimConfig
from fleetlearn._sim_tree import tier_profiles, tree_spec
from fleetlearn._tier_emulation import (
    DeviceTierEmulation,
    EdgeEmulation,
    TierLog,
    parse_bandwidth,
    parse_links,
)

TREE = "cloud:1,edge:2,device:6"


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mbps"), [("1mbit", 1.0), ("500kbit", 0.5),
                                            ("1.5gbit", 1500.0), ("100mbit", 100.0)])
def test_bandwidths_parse_in_megabits(text: str, mbps: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(mbps)


@pytest.mark.parametrize("text", ["1", "1mb", "1Mbps", "mbit", "0mbit", "-1mbit", "1 mbit",
                                  "1e3kbit", "1mbit/s", ""])
def test_bad_bandwidths_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="bandwidth"):
        parse_bandwidth(text)


def test_links_parse_and_bad_links_say_how_to_write_them() -> None:
    assert parse_links("device-edge:1mbit,edge-cloud:100mbit") == {
        "device-edge": 1.0, "edge-cloud": 100.0}
    assert parse_links("edge-cloud:2gbit") == {"edge-cloud": 2000.0}
    assert parse_links(None) == {}
    for bad, words in (("device-cloud:1mbit", "LINK one of device-edge, edge-cloud"),
                       ("device-edge", "LINK:BANDWIDTH"),
                       ("device-edge:1mbit,device-edge:2mbit", "given twice"),
                       ("device-edge:fast", "kbit, mbit or gbit")):
        with pytest.raises(ConfigError, match=words):
            parse_links(bad)


def test_tier_settings_are_checked() -> None:
    cfg = SimConfig(topology=TREE, edge_profile="x86-server",
                    link_bandwidth="device-edge:1mbit")
    assert cfg.edge_profile == "x86-server"
    with pytest.raises(ConfigError, match=r"edge_profile: unknown device profile 'mainframe'"
                       r".*known: .*x86-gateway.*x86-server"):
        SimConfig(topology=TREE, edge_profile="mainframe")
    with pytest.raises(ConfigError, match="need a topology"):
        SimConfig(link_bandwidth="device-edge:1mbit")
    with pytest.raises(ConfigError, match="need a topology"):
        SimConfig(edge_profile="x86-server")
    with pytest.raises(ConfigError, match="bandwidth"):
        SimConfig(topology=TREE, link_bandwidth="device-edge:1mbps")


def test_the_catalogue_has_a_gateway_and_a_server_class_for_edges() -> None:
    gateway, server = get_profile("x86-gateway"), get_profile("x86-server")
    assert (gateway.device_class, server.device_class) == ("gateway", "server")
    assert server.gflops > gateway.gflops and server.uplink_mbps > gateway.uplink_mbps


def test_tree_devices_get_the_flat_simulators_classes_and_links_their_bandwidth() -> None:
    cfg = SimConfig(topology="cloud:1,edge:3,device:30", seed=4,
                    link_bandwidth="device-edge:2mbit,edge-cloud:100mbit")
    spec = tree_spec(cfg)
    assert spec.clock == "virtual"
    flat = profile_mix(cfg.profile_mix, 30, seed=4)  # what the flat simulator's Fleet draws
    assert spec.device_profiles is not None and spec.edge_profile is not None
    assert [p.name for p in spec.device_profiles] == [p.name for p in flat]
    assert {(p.uplink_mbps, p.downlink_mbps) for p in spec.device_profiles} == {(2.0, 2.0)}
    assert [p.gflops for p in spec.device_profiles] == [p.gflops for p in flat]
    assert spec.edge_profile.name == "x86-gateway"
    assert (spec.edge_profile.uplink_mbps, spec.edge_profile.downlink_mbps) == (100.0, 100.0)
    other = tier_profiles(SimConfig(topology="cloud:1,edge:3,device:30", seed=5), 30)
    assert [p.name for p in other["device_profiles"]] != [p.name for p in flat]
    # No bandwidth given: each profile keeps its own.
    assert [p.uplink_mbps for p in other["device_profiles"]] == [
        p.uplink_mbps for p in profile_mix(cfg.profile_mix, 30, seed=5)]


# -- emulations ------------------------------------------------------------------------------

TASK = TaskSpec(round=3, model_version=1, artifacts_hash="a" * 64, model_hash="b" * 64,
                nonce="nonce-123", run="r", codec="fp32", epochs=1, batch_size=32, lr=0.05,
                max_steps=None, deadline_s=60.0, seed=1)


def test_a_device_emulation_is_the_flat_cost_model_and_is_recorded() -> None:
    log = TierLog()
    profile = get_profile("pi4")
    emu = DeviceTierEmulation(profile=profile, model="mlp", who="dev-001", log=log)
    got = emu.emulated_s(task=TASK, num_parameters=23_000, samples=100, steps=4,
                         update_bytes=10_000)
    want = predict(profile, Task(model_bytes=92_000, update_bytes=10_000,
                                 dense_update_bytes=92_000, n_samples=100, batch_size=32,
                                 model="mlp", max_steps=4)).total_s
    assert got == pytest.approx(want)
    (rec,) = log.snapshot()
    assert rec["who"] == "dev-001" and rec["round"] == 3 and rec["update_bytes"] == 10_000
    assert rec["upload_s"] - rec["latency_s"] == pytest.approx(10_000 * 8 / (
        profile.uplink_mbps * 1e6))


def test_an_edge_emulation_adds_its_own_transfer_to_its_childrens_rounds() -> None:
    log = TierLog()
    slow = get_profile("x86-gateway")
    fast = get_profile("x86-server")
    edge = EdgeEmulation(profile=slow, rounds_s=lambda: 7.5, who="edge-0", log=log)
    got = edge.emulated_s(task=TASK, num_parameters=23_000, samples=300, steps=2,
                          update_bytes=50_000)
    (rec,) = log.snapshot()
    own = got - 7.5
    assert rec["children_s"] == 7.5 and rec["emulated_s"] == got and rec["train_s"] == 0.0
    assert own == pytest.approx(rec["download_s"] + rec["encode_s"] + rec["upload_s"])
    assert rec["upload_s"] == pytest.approx(slow.latency_ms / 1e3 + 50_000 * 8 / (
        slow.uplink_mbps * 1e6))
    server = EdgeEmulation(profile=fast, rounds_s=lambda: 7.5).emulated_s(
        task=TASK, num_parameters=23_000, samples=300, steps=2, update_bytes=50_000)
    assert 7.5 < server < got


# -- a tree over real brokers ------------------------------------------------------------------


def _run(tmp_path: Path, name: str, links: str) -> dict[str, Any]:
    from fleetlearn import simulate

    result = simulate(topology=TREE, rounds=2, model="mlp", out_dir=tmp_path / name,
                      quiet=True, seed=1, link_bandwidth=links,
                      aggregator={"local_epochs": 1})
    return result.report


@pytest.mark.slow
def test_a_tree_simulation_reports_each_tiers_emulated_time_and_links(tmp_path: Path) -> None:
    fast = _run(tmp_path, "fast", "device-edge:1mbit,edge-cloud:100mbit")
    tiers = fast["tiers"]
    dev, edge, cloud, links = tiers["device"], tiers["edge"], tiers["cloud"], tiers["links"]
    # Devices carry the flat simulator's classes for the same fleet size and seed.
    assert dev["count"] == 6
    assert dev["profiles"] == dict(Counter(p.name for p in profile_mix(
        SimConfig().profile_mix, 6, seed=1)))
    assert dev["tasks"] == 12 and edge["tasks"] == 4 and cloud["rounds_closed"] == 2
    assert edge["profile"] == "x86-gateway" and cloud["clock"] == "virtual"
    # Emulated transfer time is the bytes that crossed each link over its bandwidth.
    de, ec = links["device-edge"], links["edge-cloud"]
    assert de["uploads"] == 12 and ec["uploads"] == 4
    assert de["transfer_s"] == pytest.approx(de["update_bytes"] * 8 / 1e6, abs=1e-5)
    assert ec["transfer_s"] == pytest.approx(ec["update_bytes"] * 8 / 100e6, abs=1e-5)
    assert de["update_bytes"] <= de["wire_bytes_up"] < 2 * de["update_bytes"]
    assert ec["update_bytes"] <= ec["wire_bytes_up"] < 2 * ec["update_bytes"]
    # The tiers' times nest: an edge's job is its slowest child's round (every child
    # counted) plus its own time, and a cloud round is its slowest edge.
    assert edge["children_s"]["max"] == pytest.approx(dev["emulated_s"]["max"], abs=1e-5)
    assert edge["own_s"]["mean"] > 0
    assert max(cloud["emulated_round_s"]) == pytest.approx(edge["emulated_s"]["max"],
                                                           abs=1e-5)
    assert cloud["emulated_s"] == pytest.approx(sum(cloud["emulated_round_s"]))
    assert cloud["accuracy"] == fast["final_accuracy"] is not None

    slow = _run(tmp_path, "slow", "device-edge:250kbit,edge-cloud:100mbit")["tiers"]
    sde = slow["links"]["device-edge"]
    assert sde["mbit_s"] == 0.25
    assert sde["transfer_s"] == pytest.approx(sde["update_bytes"] * 8 / 0.25e6, abs=1e-5)
    assert sde["transfer_s"] > 3 * de["transfer_s"]
    assert slow["device"]["emulated_s"]["mean"] > 3 * dev["emulated_s"]["mean"]
    assert slow["cloud"]["emulated_s"] > 3 * cloud["emulated_s"]


def test_an_edge_that_adopts_its_parents_model_names_it_in_its_ledger(tmp_path: Path) -> None:
    """After ``_adopt`` the ledger trail's model digest is the adopted model's: a round
    abandoned right after it writes its ledger entry against the adopted version's
    checkpoint (with the replaced model's digest that was a LedgerError that killed the
    edge's aggregator thread: seen in a tree simulation with tight emulated deadlines)."""
    import numpy as np

    from cloud_aggregator._ledger import model_sha256
    from fleetlearn._tree import LocalTree, TreeSpec

    tree = LocalTree(TreeSpec(edges=1, devices_per_edge=1, cloud_rounds=1),
                     workdir=tmp_path / "tree", cache_dir=tmp_path / "cache")
    try:
        tree.start()
        edge = tree.edges[0]
        assert edge is not None
        agg = edge.aggregator
        before = agg.model_version
        adopted = (agg.params + np.float32(0.25)).astype(np.float32)
        assert edge._adopt("run:1:nonce-1", adopted)
        assert agg.model_version == before + 1
        assert agg.releases.model_sha == model_sha256(adopted)
    finally:
        tree.close()
