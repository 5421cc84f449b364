"""Secure sync rounds over a real Mosquitto with real agents: the round's sum is exactly
the plain sum of the devices' quantized updates, with devices gone after uploading;
below threshold the round is abandoned; the aggregator's journal holds masked vectors
only. With distributed DP: the sum is exactly the devices' noisy levels, its noise has the
variance of the devices summed, and the epsilon reported is the Skellam accountant's for
them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from keys import ENROLMENT, enrol_agent
from mqtt_rig import transport as mqtt_transport

from broker_bridge import Channel, MosquittoProcess, unpack_update_body
from broker_bridge._errors import SecAggRejected
from broker_bridge._secagg_device import SecAggDevice
from broker_bridge._secagg_msg import Masked, parse
from broker_bridge._skellam import privatize
from cloud_aggregator import Aggregator
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._secagg import SecAggRound
from cloud_aggregator._skellam_dp import skellam_epsilon
from cloud_aggregator._store import Store
from edge_runtime import _secure as secure_module


@dataclass
class Seen:
    """What the test sees from inside the process (never what the aggregator uses)."""

    levels: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (round, index)
    sums: list[tuple[int, np.ndarray, list[str]]] = field(default_factory=list)
    journaled: list[bytes] = field(default_factory=list)
    silent: set[str] = field(default_factory=set)  # devices gone after their upload
    agents: dict[str, Any] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    private: dict[tuple[int, int], Any] = field(default_factory=dict)  # (round, index)
    noised: dict[int, Any] = field(default_factory=dict)  # thread -> its last privatize
    no_upload: set[str] = field(default_factory=set)  # their shares "do not open"
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[Seen]:
    s = Seen()
    masked, unmask = SecAggDevice.masked, SecAggDevice.on_unmask
    deliver = SecAggDevice.on_deliver

    def refuse_delivery(self: SecAggDevice, body: Any) -> None:
        # A device whose delivered shares do not open leaves the round: it never uploads.
        assert self.keys is not None
        if f"dev-{self.keys.index - 1:02d}" in s.no_upload:
            raise SecAggRejected("bad_share", "the test's shares do not open")
        deliver(self, body)
    finish, journal = SecAggRound.finish, Store.journal
    close_upload = SecAggRound.close_upload

    def power_cut(self: SecAggRound) -> Any:
        # From round 2 on, the silent devices really go: their agents lose power after
        # uploading, before the unmask requests (round 1: they only never answer them).
        if self.setup.round >= 2:
            for name in sorted(s.silent):
                s.agents[name].abort()
                s.aborted.append(name)
        return close_upload(self)

    def record_masked(self: SecAggDevice, levels: np.ndarray) -> Masked:
        assert self.keys is not None
        with s.lock:
            s.levels[(self.setup.round, self.keys.index)] = levels.copy()
            out = s.noised.pop(threading.get_ident(), None)  # what these levels hold
            if out is not None:
                assert np.array_equal(out.words, levels)
                s.private[(self.setup.round, self.keys.index)] = out
        return masked(self, levels)

    def record_private(values: np.ndarray, params: Any, scale: float) -> Any:
        out = privatize(values, params, scale)
        with s.lock:
            s.noised[threading.get_ident()] = out
        return out

    def maybe_silent(self: SecAggDevice, request: Any) -> Any:
        assert self.keys is not None
        name = f"dev-{self.keys.index - 1:02d}"  # indices follow sorted device ids
        if name in s.silent:
            raise SecAggRejected("unexpected", "this device is gone")
        return unmask(self, request)

    def record_finish(self: SecAggRound) -> Any:
        total, counted = finish(self)
        with s.lock:
            s.sums.append((self.setup.round, total.copy(), counted))
        return total, counted

    def record_journal(self: Store, entries: Any, **kw: Any) -> Any:
        with s.lock:
            s.journaled.extend(e.body for e in entries)
        return journal(self, entries, **kw)

    monkeypatch.setattr(SecAggDevice, "masked", record_masked)
    monkeypatch.setattr(SecAggDevice, "on_unmask", maybe_silent)
    monkeypatch.setattr(SecAggDevice, "on_deliver", refuse_delivery)
    monkeypatch.setattr(SecAggRound, "finish", record_finish)
    monkeypatch.setattr(Store, "journal", record_journal)
    monkeypatch.setattr(SecAggRound, "close_upload", power_cut)
    monkeypatch.setattr(secure_module, "privatize", record_private)
    yield s


def fixed_training(seed: int) -> Any:
    """Local training that moves the parameters by a known, device-specific step."""
    from edge_runtime import LocalResult

    def train(task: Any, params: np.ndarray, data: Any, trainer: Any, budget: Any) -> Any:
        rng = np.random.default_rng([seed, task.round])
        step = rng.normal(0, 0.02, params.size).astype(np.float32)
        return LocalResult(parameters=params + step, samples=32, steps=1, loss=0.5)
    return train


def run_fleet(mosquitto: MosquittoProcess, tmp_path: Path, *, devices: int, rounds: int,
              seen: Seen, silent: set[str], **settings: Any) -> Aggregator:
    from edge_runtime import Agent, DeviceStatus, LocalData, make_agent_transport

    fleet = "secure"
    seen.silent |= silent
    config = AggregatorConfig(
        fleet=fleet, model="mlp", rounds=rounds, devices_per_round=devices, over_selection=1.0,
        quorum=settings.pop("quorum", devices - len(silent)), deadline_s=20.0,
        secure_aggregation=True,
        secure_fraction=0.25, secure_phase_s=3.0, state_dir=tmp_path / "agg",
        store_synchronous="NORMAL", max_abandoned=rounds + 1, **settings)
    agg = Aggregator(config=config, channel=Channel(
        transport=mqtt_transport(mosquitto.url, "aggregator", fleet, device=False), fleet=fleet),
        enrolment=ENROLMENT)
    agg.start()
    agents = []
    rng = np.random.default_rng(0)
    try:
        for i in range(devices):
            did = f"dev-{i:02d}"
            transport = make_agent_transport(mosquitto.url, fleet=fleet, device_id=did,
                                             backoff_min_s=0.1, backoff_max_s=1.0)
            agent = Agent(device_id=did, channel=Channel(transport=transport, fleet=fleet),
                          data=LocalData(x=rng.normal(size=(32, 40)).astype(np.float32),
                                         y=rng.integers(0, 10, 32)),
                          state_dir=tmp_path / did, owns_transport=True,
                          status_probe=lambda: DeviceStatus(), training=fixed_training(i))
            enrol_agent(agent)  # masked uploads are signed and verified like any update
            agent.start()
            agents.append(agent)
            seen.agents[did] = agent
        runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 120.0}, daemon=True)
        runner.start()
        runner.join(timeout=130.0)
    finally:
        agg.stop()
        for agent in agents:
            agent.stop()
        agg.close()
        agg.channel.transport.close()
    return agg


@pytest.mark.slow
@pytest.mark.parametrize("gone", [0, 1, 3])  # of 9: 0%, 10%, 33% after their upload
def test_a_secure_round_sums_exactly_what_devices_quantized(
        mosquitto: MosquittoProcess, tmp_path: Path, seen: Seen, gone: int) -> None:
    agg = run_fleet(mosquitto, tmp_path, devices=9, rounds=2, seen=seen,
                    silent={f"dev-{i:02d}" for i in range(gone)})
    closed = [m for m in agg.history if m.outcome == "closed"]
    assert len(closed) == 2 and all(m.devices_reported == 9 for m in closed), \
        [m.to_json() for m in agg.history]
    assert len(seen.sums) == 2
    assert sorted(seen.aborted) == sorted(f"dev-{i:02d}" for i in range(gone))
    for round_index, total, counted in seen.sums:
        assert len(counted) == 9
        plain = np.zeros_like(total)
        for (r, _), levels in seen.levels.items():
            if r == round_index:
                plain += levels
        assert np.array_equal(total, plain)
    # what the aggregator stored of each update: masked words, never the levels
    assert len(seen.journaled) == 18
    for body in seen.journaled:
        _, codec_body = unpack_update_body(body)
        masked = parse(codec_body)
        assert isinstance(masked, Masked)
        for levels in seen.levels.values():
            assert np.count_nonzero(masked.words == levels) < len(levels) // 100 + 2


@pytest.mark.slow
def test_below_threshold_a_secure_round_is_abandoned(
        mosquitto: MosquittoProcess, tmp_path: Path, seen: Seen) -> None:
    # of 9 (t = 5 of 8 neighbours): 5 gone after uploading leave 3 answers per device
    agg = run_fleet(mosquitto, tmp_path, devices=9, rounds=1, seen=seen,
                    silent={f"dev-{i:02d}" for i in range(5)})
    assert agg.history and agg.history[0].outcome == "abandoned"
    assert "abandoned" in agg.history[0].reason
    assert agg.model_version == 0 and seen.sums == []


@pytest.mark.slow
@pytest.mark.parametrize("gone", [0, 3])  # of 9, after their upload
def test_a_private_secure_round_sums_the_devices_noisy_levels_exactly(
        mosquitto: MosquittoProcess, tmp_path: Path, seen: Seen, gone: int) -> None:
    agg = run_fleet(mosquitto, tmp_path, devices=9, rounds=2, seen=seen,
                    silent={f"dev-{i:02d}" for i in range(gone)},
                    dp_noise_multiplier=1.0, dp_delta=1e-5, clip_norm=0.05)
    assert agg.privacy is not None
    sk = agg.privacy.plan.skellam
    assert sk is not None and sk.min_summed == 9 - gone
    closed = [m for m in agg.history if m.outcome == "closed"]
    assert len(closed) == 2, [m.to_json() for m in agg.history]
    assert len(seen.sums) == 2
    for round_index, total, counted in seen.sums:
        assert len(counted) == 9  # those gone after uploading are summed, noise and all
        mine = {i: p for (r, i), p in seen.private.items() if r == round_index}
        assert len(mine) == 9
        levels = total.view(np.int32).astype(np.int64)
        rounded = np.sum([p.rounded for p in mine.values()], axis=0)
        noise = np.sum([p.noise for p in mine.values()], axis=0)
        # exactly the sum of what the devices noised, as they computed it
        assert np.array_equal(levels, rounded + noise)
        for p in mine.values():
            assert float(np.linalg.norm(p.rounded)) <= sk.norm_bound
        # the aggregator's result is the clean sum plus noise of 9 devices' variance
        diff = (levels - rounded).astype(np.float64)
        assert float(np.var(diff)) == pytest.approx(9 * sk.device_variance, rel=0.2)
    # epsilon after each round: the Skellam accountant for the devices summed (9 each)
    eps = [float(m.dp_epsilon or 0.0) for m in closed]
    for n, e in enumerate(eps, start=1):
        want = skellam_epsilon([(8 * sk.device_variance, n)], l1=sk.l1, l2=sk.norm_bound,
                               delta=1e-5)
        assert e == pytest.approx(want, rel=1e-9)
    # sized for 9 - gone survivors: the noise of 9 summed is charged below the plan's
    assert eps[-1] <= skellam_epsilon([(sk.variance, 2)], l1=sk.l1, l2=sk.norm_bound,
                                      delta=1e-5)
    assert agg.privacy.report()["charged_by_summed"] == [[9, 2]]


@pytest.mark.slow
def test_a_private_round_without_some_uploads_is_charged_for_what_it_summed(
        mosquitto: MosquittoProcess, tmp_path: Path, seen: Seen) -> None:
    # dev-00 never uploads (its delivered shares do not open), dev-01 leaves after its
    # upload: the sum holds 8 devices' noise, and each round is charged 7 of them.
    seen.no_upload.add("dev-00")
    agg = run_fleet(mosquitto, tmp_path, devices=9, rounds=2, seen=seen, silent={"dev-01"},
                    quorum=7, dp_noise_multiplier=1.0, dp_delta=1e-5, clip_norm=0.05)
    assert agg.privacy is not None
    sk = agg.privacy.plan.skellam
    assert sk is not None and sk.min_summed == 7
    closed = [m for m in agg.history if m.outcome == "closed"]
    assert len(closed) == 2, [m.to_json() for m in agg.history]
    for round_index, total, counted in seen.sums:
        assert len(counted) == 8 and "dev-00" not in counted and "dev-01" in counted
        mine = [p for (r, _), p in seen.private.items() if r == round_index]
        assert len(mine) == 8
        levels = total.view(np.int32).astype(np.int64)
        assert np.array_equal(levels, sum(p.rounded + p.noise for p in mine))
        noise = levels - sum(p.rounded for p in mine)
        assert float(np.var(noise.astype(np.float64))) == pytest.approx(
            8 * sk.device_variance, rel=0.2)
    eps = [float(m.dp_epsilon or 0.0) for m in closed]
    for n, e in enumerate(eps, start=1):
        assert e == pytest.approx(skellam_epsilon([(7 * sk.device_variance, n)], l1=sk.l1,
                                                  l2=sk.norm_bound, delta=1e-5), rel=1e-9)
    # fewer summed than asked: more epsilon per round than a round summing all nine
    assert eps[-1] > skellam_epsilon([(8 * sk.device_variance, 2)], l1=sk.l1,
                                     l2=sk.norm_bound, delta=1e-5)
    assert agg.privacy.report()["charged_by_summed"] == [[8, 2]]
