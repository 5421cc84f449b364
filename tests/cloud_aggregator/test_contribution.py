"""Contribution records and reputation: the records (against numpy), the score, the
policies and the weight stage that use it, persistence with the round and across a
restart (and from a version-2 store)."""

from __future__ import annotations

import json
import math
import sqlite3
import zlib
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import FakeDevice, devices, feed_async, make

from broker_bridge import MemoryBroker, MemoryTransport
from cloud_aggregator._aggregate import Contribution, RoundAggregate
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._contribution import (
    MIN_CONSENSUS,
    SKETCH_DIM,
    ContributionLog,
    ContributionRecord,
    Standing,
    reputation,
    weight_factor,
)
from cloud_aggregator._errors import StoreError
from cloud_aggregator._history import DeviceHistory, FleetHistory
from cloud_aggregator._ingest import ReputationWeight, UpdateItem
from cloud_aggregator._metrics import RoundMetrics
from cloud_aggregator._robust import RobustConfig
from cloud_aggregator._selection import Candidate, RandomPolicy
from cloud_aggregator._store import _SCHEMA, SCHEMA_VERSION, Store
from cloud_aggregator._store_devices import migrate_v2, put_histories
from device_profiles import ConfigError


def _loo_unit_cosines(updates: list[np.ndarray]) -> list[float]:
    """The reference: cosine of each update with the sum of the others at unit length."""
    units = [u.astype(np.float64) / np.linalg.norm(u) for u in updates]
    total = np.sum(units, axis=0)
    out = []
    for u in units:
        rest = total - u
        out.append(float(u @ rest / (np.linalg.norm(u) * np.linalg.norm(rest))))
    return out


# -- records ---------------------------------------------------------------------------


def test_a_record_round_trips_through_json_and_refuses_what_is_not_one() -> None:
    record = ContributionRecord("dev-1", 7, 0.25, -0.5, 0.0125)
    again = ContributionRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record
    assert ContributionRecord.from_json({"device": "d", "round": 0, "weight": 0,
                                         "cosine": None, "marginal": None}).cosine is None
    bad = [[], {"device": "d", "round": 1}, {"device": "", "round": 1, "weight": 1},
           {"device": "d", "round": -1, "weight": 1}, {"device": "d", "round": True, "weight": 1},
           {"device": "d", "round": 1, "weight": float("nan")},
           {"device": "d", "round": 1, "weight": 1, "cosine": 2.0},
           {"device": "d", "round": 1, "weight": 1, "marginal": "x"}]
    for data in bad:
        with pytest.raises(StoreError, match="contribution record"):
            ContributionRecord.from_json(data)


def test_round_metrics_carry_records_through_json() -> None:
    m = RoundMetrics(round=3, model_version=3, outcome="closed",
                     contributions=(ContributionRecord("a", 3, 0.5, 0.9, None),),
                     screened=("b",))
    again = RoundMetrics.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m
    with pytest.raises(StoreError):
        RoundMetrics.from_json({"round": 1, "model_version": 1, "outcome": "closed",
                                "contributions": [{"device": 3}]})


@pytest.mark.parametrize("size", [1000, 200_000])
def test_sketched_cosines_match_numpy(size: int) -> None:
    """Exact up to SKETCH_DIM parameters; above, within 0.08 of the exact cosine (the
    estimate's standard error is about 0.02), sparse and dense alike."""
    rng = np.random.default_rng(size)
    shared = rng.standard_normal(size)
    updates = [(shared * w + rng.standard_normal(size)).astype(np.float32)
               for w in (1.0, 0.8, 0.5, -1.0)]
    log = ContributionLog(size=size)
    for i, u in enumerate(updates):
        if i % 2:  # top-10% sparse
            idx = np.argsort(-np.abs(u))[: size // 10]
            updates[i] = np.zeros(size, np.float32)
            updates[i][idx] = u[idx]
            log.note(device=f"d{i}", indices=idx.astype(np.int64), values=u[idx],
                     norm=float(np.linalg.norm(updates[i])), weight=1.0, scale=1.0)
        else:
            log.note(device=f"d{i}", indices=None, values=u, norm=float(np.linalg.norm(u)),
                     weight=1.0, scale=1.0)
    got = [r.cosine for r in log.records(1)]
    want = _loo_unit_cosines(updates)
    tolerance = 1e-9 if size <= SKETCH_DIM else 0.08
    assert got == pytest.approx(want, abs=tolerance)
    assert want[3] < -0.05 < 0.05 < min(want[:3])  # the flipped one stands apart


def test_round_aggregate_records_weight_shares_and_marginals() -> None:
    size = 64
    rng = np.random.default_rng(0)
    updates = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    weights, scales = [10.0, 30.0, 60.0], [1.0, 0.5, 1.0]
    agg = RoundAggregate(size=size, robust=RobustConfig(method="mean"), capacity=8,
                         max_bytes=1 << 20, keep_exact=True)
    for i, (u, w, s) in enumerate(zip(updates, weights, scales, strict=True)):
        agg.add(Contribution(indices=None, values=u, weight=w, norm=float(np.linalg.norm(u)),
                             scale=s, device=f"d{i}"))
    delta = agg.result()
    params = np.zeros(size, np.float32)
    target = updates[0].astype(np.float64)

    def score(p: np.ndarray) -> float:  # a stand-in for accuracy: closeness to a target
        return -float(np.linalg.norm(p - target))

    marginals = agg.log.marginals(aggregate=delta, params=params, accuracy=score)
    records = agg.records(5, marginals=marginals)
    assert [r.device for r in records] == ["d0", "d1", "d2"]
    assert [r.weight for r in records] == pytest.approx([0.1, 0.15, 0.6])
    total = sum(weights)
    for i, r in enumerate(records):
        without = (sum(w * s * u.astype(np.float64) for j, (u, w, s)
                       in enumerate(zip(updates, weights, scales, strict=True)) if j != i)
                   / (total - weights[i]))
        assert r.marginal == pytest.approx(score(delta) - score(without), rel=1e-5)
    assert records[0].marginal is not None and records[0].marginal > 0  # it is the target


def test_a_device_with_two_updates_in_a_buffer_gets_one_record() -> None:
    log = ContributionLog(size=8)
    for device, vec in (("a", [1.0] * 8), ("b", [1.0] * 7 + [0.0]), ("a", [1.0] * 8)):
        v = np.array(vec, np.float32)
        log.note(device=device, indices=None, values=v, norm=float(np.linalg.norm(v)),
                 weight=1.0, scale=1.0)
    records = log.records(2)
    assert [r.device for r in records] == ["a", "b"]
    assert records[0].weight == pytest.approx(2 / 3)
    assert sum(r.weight for r in records) == pytest.approx(1.0)


# -- the score -------------------------------------------------------------------------


def test_anti_aligned_devices_lose_reputation_and_honest_ones_keep_it() -> None:
    history = FleetHistory()
    assert history.get("new").reputation == 1.0
    for round_index in range(1, 6):
        records = [ContributionRecord("honest", round_index, 0.4, 0.45, None),
                   ContributionRecord("noisy", round_index, 0.3, 0.02 if round_index % 2 else
                                      0.3, None),
                   ContributionRecord("flipper", round_index, 0.3, -0.45, None)]
        history.apply(history.contributed(records))
    assert history.get("honest").reputation == 1.0
    assert history.get("noisy").reputation == 1.0
    assert history.get("flipper").reputation == 0.0
    assert history.get("flipper").alignment < -0.3
    assert history.get("flipper").contributions == 5
    assert history.get("honest").weight_total == pytest.approx(2.0)


def test_screen_refusals_lower_reputation_and_one_refusal_is_forgiven() -> None:
    once = Standing().observed(refused=True)
    assert 0.3 < reputation(once) < 0.5  # one refusal: still above the default floor
    twice = once.observed(refused=True)
    assert reputation(twice) < 0.3
    recovered = once
    for _ in range(4):
        recovered = recovered.observed(cosine=0.5, refused=False)
    assert reputation(recovered) > 0.8
    history = FleetHistory()
    history.apply(history.contributed([], screened=["x", "x"]))
    assert history.get("x").refusal_rate == pytest.approx(1.8 / 2.44)  # as 'twice'
    assert weight_factor(0.1, 0.3) == 0.1 and weight_factor(0.5, 0.3) == 1.0
    assert weight_factor(0.0, 0.3) == pytest.approx(1e-3) and weight_factor(0.0, None) == 1.0


def test_apply_keeps_what_else_changed_in_the_record() -> None:
    history = FleetHistory()
    pending = history.contributed([ContributionRecord("a", 1, 1.0, -0.9, None)])
    history.selected(["a"], 2)  # meanwhile
    history.apply(pending)
    h = history.get("a")
    assert h.selections == 1 and h.last_round == 2 and h.contributions == 1


# -- who uses it -----------------------------------------------------------------------


def _candidates(n: int) -> list[Candidate]:
    return [Candidate(device_id=f"d{i}", predicted_duration_s=1.0, num_samples=10)
            for i in range(n)]


def _distrust(history: FleetHistory, *devices: str) -> None:
    for r in range(3):
        history.apply(history.contributed(
            [ContributionRecord(d, r, 0.1, -0.8, None) for d in devices]))


def test_policies_leave_distrusted_devices_out_while_enough_others_remain() -> None:
    history = FleetHistory()
    _distrust(history, "d0", "d1")
    policy = RandomPolicy(history=history)
    policy.min_reputation = 0.3
    picks = set()
    for r in range(30):
        picks |= set(policy.select(_candidates(6), 3, round_index=r))
    assert picks == {"d2", "d3", "d4", "d5"}
    # Five wanted, four trusted: the best-reputed distrusted device fills the gap.
    chosen = policy.select(_candidates(6), 5, round_index=0)
    assert len(chosen) == 5 and len({"d0", "d1"} & set(chosen)) == 1
    policy.min_reputation = None
    assert len(policy.select(_candidates(6), 6, round_index=0)) == 6


def test_the_reputation_stage_weighs_a_distrusted_device_by_its_reputation() -> None:
    history = FleetHistory()
    _distrust(history, "bad")
    stage = ReputationWeight(reputation=lambda d: history.get(d).reputation, floor=0.3)
    item = UpdateItem(device="bad", message=None, task_round=1, weight=40.0)  # type: ignore[arg-type]
    stage.process(item)
    assert item.weight == pytest.approx(40.0 * 1e-3)
    assert item.notes and item.notes[0][0] == "bounded:reputation"
    good = UpdateItem(device="good", message=None, task_round=1, weight=40.0)  # type: ignore[arg-type]
    stage.process(good)
    assert good.weight == 40.0 and not good.notes


# -- persistence -----------------------------------------------------------------------


def _aligned(device: str, round_index: int, size: int, sign: float) -> np.ndarray:
    """A shared direction of the round plus the device's own noise (sign -1: flipped)."""
    shared = np.random.default_rng(round_index).standard_normal(size)
    own = np.random.default_rng([zlib.crc32(device.encode()), round_index]).standard_normal(size)
    return (0.01 * sign * (shared + 0.5 * own)).astype(np.float32)


def test_reputation_is_saved_with_the_round_and_survives_a_restart(tmp_path: Path,
                                                                  artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    settings = dict(rounds=4, devices_per_round=4, over_selection=1.0, min_devices=4,
                    norm_median_multiple=None, reputation_floor=0.3)
    agg = make(tmp_path, artifacts, broker, **settings)  # type: ignore[arg-type]
    for _ in range(2):  # every device trains each round; d0 sends its update flipped
        agg.tick()
        index = agg.round_index
        assert index is not None
        for d in fleet.values():
            assert d.tasks[-1].round == index
            sign = -1.0 if d.id == "d0" else 1.0
            d.send_update(layout=agg.layout, values=_aligned(d.id, index, agg.layout.size, sign))
        assert agg.tick()
    before = {d: agg.registry.history.get(d) for d in fleet}
    assert before["d0"].contributions == 2 and before["d0"].reputation < 0.3
    assert all(before[d].reputation == 1.0 and before[d].contributions == 2
               for d in ("d1", "d2", "d3"))
    last = agg.history[-1]
    records = {r.device: r for r in last.contributions}
    assert set(records) == set(fleet)
    assert records["d0"].cosine is not None and records["d0"].cosine < -0.2
    assert all((records[d].cosine or 0.0) > 0.2 for d in ("d1", "d2", "d3"))
    assert records["d0"].weight < 0.01  # down-weighted in round 2: below the floor
    assert last.devices_distrusted == 1
    # Saved in the release's transaction: the store has it before any registry batch.
    with Store(tmp_path / "aggregator.sqlite") as store:
        stored = {r.device_id: r.history for r in store.devices()}
    assert stored["d0"].standing == before["d0"].standing
    assert isinstance(agg.channel.transport, MemoryTransport)
    agg.abort()
    again = make(tmp_path, artifacts, broker, **settings)  # type: ignore[arg-type]
    for d, h in before.items():
        assert again.registry.history.get(d).standing == h.standing
        assert again.registry.history.get(d).contributions == h.contributions
    fleet.update(devices_from(broker, "d4"))
    again.tick()  # five devices, four wanted: the distrusted one is left out
    index = again.round_index
    assert index == 3
    asked = {d.id for d in fleet.values() if d.tasks and d.tasks[-1].round == index}
    assert asked == {"d1", "d2", "d3", "d4"}


def devices_from(broker: MemoryBroker, *names: str) -> dict[str, FakeDevice]:
    return {n: FakeDevice(broker, n) for n in names}


def test_a_version_2_store_gains_the_contribution_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_SCHEMA)
    migrate_v2(conn)
    conn.execute("INSERT INTO schema_version (version) VALUES (2)")
    conn.execute("INSERT INTO devices (device_id, profile) VALUES ('a', '{}')")
    conn.execute("INSERT INTO device_history (device_id, selections, completions)"
                 " VALUES ('a', 4, 3)")
    conn.commit()
    conn.close()
    with Store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 7  # 5: ledger, 6: refs, 7: keep
        (record,) = store.devices()
        assert record.history.selections == 4 and record.history.contributions == 0
        assert record.history.reputation == 1.0
        h = DeviceHistory(contributions=2, weight_total=0.5, marginal_total=-0.01,
                          standing=Standing().observed(cosine=-0.7, refused=False))
        with store._write() as c:
            put_histories(c, {"a": h, "b": h})  # "b": no device row yet
    with Store(path) as store:
        got = {r.device_id: r.history for r in store.devices()}
        assert got["a"].standing == h.standing and got["b"].marginal_total == -0.01
        assert got["a"].selections == 0  # the release's record is the whole record
        assert math.isclose(got["b"].reputation, h.reputation)


def test_a_fedbuff_release_records_its_buffer(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=4, buffer_size=4,
               rounds=1, staleness="constant", norm_median_multiple=None,
               checkpoint_every_s=0.0)
    answered = feed_async(agg, fleet, 4)  # MIN_CONSENSUS updates: each one is judged
    (m,) = agg.history
    assert m.outcome == "aggregated"
    assert {r.device for r in m.contributions} == {d for d, _ in answered}
    assert all(r.round == 1 and r.cosine is not None for r in m.contributions)
    assert sum(r.weight for r in m.contributions) == pytest.approx(1.0)
    with Store(tmp_path / "aggregator.sqlite") as store:
        stored = {r.device_id: r.history for r in store.devices()}
    assert all(stored[d].contributions == 1 for d, _ in answered)


def test_marginals_are_measured_on_the_evaluation_set_when_asked(tmp_path: Path,
                                                                 artifacts: Path) -> None:
    rng = np.random.default_rng(0)
    eval_path = tmp_path / "eval.npz"
    np.savez(eval_path, x=rng.standard_normal((200, 40)).astype(np.float32),
             y=rng.integers(0, 10, 200))
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path / "state", artifacts, broker, rounds=1, norm_median_multiple=None,
               eval_data=eval_path, contribution_marginal=True)
    agg.tick()
    start = agg.params.copy()
    sent = {}
    for d in fleet.values():
        sent[d.id] = _aligned(d.id, 1, agg.layout.size, 1.0) * 50
        d.send_update(layout=agg.layout, values=sent[d.id])
    assert agg.tick()
    (m,) = agg.history
    evaluator = agg.recorder.evaluator
    assert evaluator is not None
    mean = np.mean(list(sent.values()), axis=0)
    base = evaluator.evaluate(start + mean).accuracy
    for r in m.contributions:
        without = np.mean([v for d, v in sent.items() if d != r.device], axis=0)
        want = base - evaluator.evaluate((start + without).astype(np.float32)).accuracy
        assert r.marginal == pytest.approx(want, abs=1e-6)
    assert agg.registry.history.get("d0").marginal_total == pytest.approx(
        next(r.marginal for r in m.contributions if r.device == "d0"))


def test_fedbuff_standing_released_without_a_checkpoint_is_derived_again_after_a_crash(
        tmp_path: Path, artifacts: Path) -> None:
    """A FedBuff release is durable through its journal, not a checkpoint: the standing
    it changed is saved with the next checkpoint, never by the registry's batches, and a
    restart that releases the journaled buffers again reaches the same standing."""
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    settings = dict(mode="async", concurrency=4, buffer_size=2, rounds=10,
                    staleness="constant", checkpoint_every_s=3600.0,
                    norm_median_multiple=None)
    agg = make(tmp_path, artifacts, broker, **settings)  # type: ignore[arg-type]
    feed_async(agg, fleet, 5)  # two releases, one update in the open buffer
    assert agg.model_version == 2
    before = {d: agg.registry.history.get(d) for d in fleet}
    assert sum(h.contributions for h in before.values()) == 4
    agg.registry.flush()  # the advisory batch: devices, counters, never the standing
    with Store(tmp_path / "aggregator.sqlite") as store:
        assert all(r.history.contributions == 0 for r in store.devices())
    assert isinstance(agg.channel.transport, MemoryTransport)
    agg.abort()
    again = make(tmp_path, artifacts, broker, **settings)  # type: ignore[arg-type]
    assert again.model_version == 2
    for d, h in before.items():
        got = again.registry.history.get(d)
        assert (got.contributions, got.weight_total, got.standing) == (
            h.contributions, pytest.approx(h.weight_total), h.standing)
    again.close()  # a stop checkpoints the last release, and its standing with it
    with Store(tmp_path / "aggregator.sqlite") as store:
        stored = {r.device_id: r.history for r in store.devices()}
    assert all(stored[d].standing == h.standing for d, h in before.items())


@pytest.mark.parametrize("floor", [0.0, 1.0, 1.5, -0.1])
def test_a_reputation_floor_outside_0_1_is_refused(floor: float) -> None:
    with pytest.raises(ConfigError, match="reputation_floor must be within"):
        AggregatorConfig(reputation_floor=floor)
    assert AggregatorConfig(reputation_floor=None).reputation_floor is None


def test_a_round_of_fewer_than_four_updates_judges_no_alignment() -> None:
    """Two honest devices with different data can point apart: with one or two others to
    compare with there is no consensus, so no cosine (and no reputation change)."""
    rng = np.random.default_rng(3)
    shared = rng.standard_normal(64)
    for n, judged in ((2, False), (3, False), (MIN_CONSENSUS, True)):
        log = ContributionLog(size=64)
        for i in range(n):
            v = (shared * (-1.0 if i == 0 else 1.0) + 0.3 * rng.standard_normal(64)
                 ).astype(np.float32)
            log.note(device=f"d{i}", indices=None, values=v, norm=float(np.linalg.norm(v)),
                     weight=1.0, scale=1.0)
        records = log.records(1)
        assert all((r.cosine is not None) == judged for r in records), (n, records)
        if judged:
            assert records[0].cosine is not None and records[0].cosine < -0.5


def test_two_device_rounds_of_opposed_honest_updates_keep_their_reputation(
        tmp_path: Path, artifacts: Path) -> None:
    """An edge with two children whose data differ: their updates point apart every round.
    Neither may be taken for an attacker on a comparison with the other alone."""
    broker = MemoryBroker()
    fleet = devices(broker, 2)
    agg = make(tmp_path, artifacts, broker, rounds=3, devices_per_round=2, min_devices=2,
               quorum=2, norm_median_multiple=None, reputation_floor=0.3)
    for _ in range(3):
        assert agg.tick()
        index = agg.round_index
        assert index is not None
        for d in fleet.values():
            sign = -1.0 if d.id == "d0" else 1.0
            d.send_update(layout=agg.layout,
                          values=_aligned(d.id, index, agg.layout.size, sign))
        assert agg.tick()
    assert all(agg.registry.history.get(d).reputation == 1.0 for d in fleet)
    assert agg.history[-1].devices_distrusted == 0
    assert all(r.cosine is None for r in agg.history[-1].contributions)
