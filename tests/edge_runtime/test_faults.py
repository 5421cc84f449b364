"""The simulator's faults, applied through the agent's public hooks (edge_runtime._faults)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from agent_rig import Rig, expected_delta, idle, make_data
from waiting import wait_for

from broker_bridge import (
    Hello,
    MosquittoProcess,
    TaskSpec,
    UpdateMeta,
    decode_update,
    unpack_update_body,
)
from device_profiles import get_profile
from edge_runtime import AgentHooks, UpdateDraft
from edge_runtime._faults import Byzantine, FaultSpec, SlowEmulation, chain
from fleetlearn._simulate import SimConfig, run_simulation

TASK = TaskSpec(round=4, model_version=0, artifacts_hash="a" * 64, model_hash="b" * 64,
                nonce="nonce-of-round-4")


def draft(values: list[float]) -> UpdateDraft:
    meta = UpdateMeta(num_samples=96, steps=3, nonce=TASK.nonce, train_loss=1.0, duration_s=0.1)
    return UpdateDraft(task=TASK, delta=np.asarray(values, np.float32), meta=meta)


def test_byzantine_kinds_transform_the_draft_and_the_hello() -> None:
    flip = Byzantine(FaultSpec(byzantine_fraction=1.0, byzantine_scale=10.0))
    out = flip.attack(draft([1.0, -2.0]))
    np.testing.assert_array_equal(out.delta, [-10.0, 20.0])
    assert out.meta.num_samples == 96
    norm = Byzantine(FaultSpec(byzantine_kind="norm", byzantine_scale=9000.0))
    assert float(np.linalg.norm(norm.attack(draft([3.0, 4.0])).delta)) == pytest.approx(9000.0)
    np.testing.assert_array_equal(norm.attack(draft([0.0, 0.0])).delta, [0.0, 0.0])
    samples = Byzantine(FaultSpec(byzantine_kind="samples", byzantine_samples=10**9))
    claimed = samples.attack(draft([1.0, 2.0]))
    np.testing.assert_array_equal(claimed.delta, [1.0, 2.0])
    assert claimed.meta.num_samples == 10**9
    assert samples.announce(Hello(num_samples=50)).num_samples == 10**9
    assert flip.announce(Hello(num_samples=50)).num_samples == 50


def test_chained_transforms_run_in_order() -> None:
    assert chain(None, None) is None
    double = chain(lambda d: replace(d, delta=d.delta * 2), None,
                   lambda d: replace(d, delta=d.delta + 1))
    assert double is not None
    np.testing.assert_array_equal(double(draft([1.0, 2.0])).delta, [3.0, 5.0])


def test_a_slow_device_reports_its_factor_of_the_profiles_time() -> None:
    profile = get_profile("pi4")
    kw = dict(task=TASK, num_parameters=10_000, samples=96, steps=3, update_bytes=4_000)
    base = SlowEmulation(profile=profile, model="mlp").emulated_s(**kw)  # type: ignore[arg-type]
    slow = SlowEmulation(profile=profile, model="mlp", slow_factor=4.0).emulated_s(**kw)  # type: ignore[arg-type]
    assert base > 0 and slow == pytest.approx(4.0 * base)


def test_fault_draws_are_independent_across_devices_and_rounds() -> None:
    """Per-task crashes of a 20-device fleet at p = 0.1 are Binomial(20, 0.1) per round,
    not bursts where half the fleet crashes in one round and none in the next (a draw
    from a CRC of near-identical strings did that); attackers are spread likewise."""
    from edge_runtime._faults import draw
    from edge_runtime._fleet import device_ids

    ids = device_ids(20)
    per_round = np.array([sum(draw(0, "crash", d, r) < 0.1 for d in ids)
                          for r in range(1, 401)])
    assert abs(per_round.mean() - 2.0) < 0.3
    assert 1.2 < per_round.var() < 2.6  # 20 x 0.1 x 0.9 = 1.8
    assert per_round.max() <= 8
    small = [sorted(d for d in range(8) if draw(seed, "byzantine", f"dev-{d:03d}") < 0.25)
             for seed in range(200)]
    pairs = {tuple(x) for x in small if len(x) == 2}
    assert len(pairs) > 15  # which two of eight attack varies with the seed


def test_a_byzantine_agent_sends_its_attack(rig: Rig) -> None:
    data = make_data()
    byz = Byzantine(FaultSpec(byzantine_fraction=1.0, byzantine_scale=10.0))
    agent = rig.agent(data=data, hooks=AgentHooks(transform_update=byz.attack,
                                                  transform_hello=byz.announce))
    task = rig.agg.task(round_=1)
    rig.agg.send_task("dev-1", task)
    assert wait_for(lambda: rig.agg.updates and idle(agent))
    _, body = unpack_update_body(rig.agg.updates[0].body)
    want = expected_delta(rig.artifacts_dir, rig.agg.models[0], data.x, data.y, task)
    np.testing.assert_allclose(decode_update(body, rig.agg.layout), -10.0 * want, rtol=1e-6)


@pytest.mark.slow
def test_a_simulated_norm_attack_reaches_the_aggregator_and_is_screened(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    def run(faults: FaultSpec, out: Path) -> list[dict[str, object]]:
        result = run_simulation(SimConfig(
            devices=20, per_round=5, model="mlp", rounds=6, partition="iid",
            availability=False, codec="fp32", seed=3, broker=mosquitto.url, out_dir=out,
            max_wall_s=240.0, faults=faults), quiet=True)
        assert result.report["final_accuracy"] is not None
        assert all(r["outcome"] == "closed" for r in result.rounds)
        return result.rounds

    clean = run(FaultSpec(), tmp_path / "clean")
    attacked = run(FaultSpec(byzantine_fraction=0.3, byzantine_kind="norm",
                             byzantine_scale=9000.0), tmp_path / "attacked")
    # Attackers' updates (norm 9000, through the transform_update hook) are refused by
    # the norm screen once it has a history; nothing is refused without them.
    assert sum(int(r["rejected"]) for r in clean) == 0  # type: ignore[call-overload]
    assert sum(int(r["rejected"]) for r in attacked) >= 1  # type: ignore[call-overload]
