"""The training ledger end to end: a real aggregator over a real Mosquitto, real agents
training MNIST-1D with ONNX Runtime, sync and async; every agent checks its inclusion
proofs against the pinned key; ``fleetlearn ledger verify`` re-derives every model, and
fails, naming the entry, once a kept update body is changed."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import kept_body, set_kept_body
from keys import ENROLMENT, enrol_agent
from mqtt_rig import transport as mqtt_transport
from waiting import wait_for

from broker_bridge import Channel, InclusionOutcome, MosquittoProcess
from cloud_aggregator import Aggregator, verify_ledger
from cloud_aggregator._config import AggregatorConfig
from fleetlearn.cli import main as cli


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_real_agents_get_verified_proofs_and_the_ledger_verifies(
        mosquitto: MosquittoProcess, tmp_path: Path, mode: str) -> None:
    from edge_runtime import (
        Agent,
        AgentHooks,
        DeviceStatus,
        LocalData,
        load_mnist1d,
        make_agent_transport,
        partition_dirichlet,
    )
    from edge_runtime._settings import AgentSettings

    fleet = f"ledger-{mode}"
    data = load_mnist1d(cache_dir=tmp_path.parent.parent / "fleetlearn-cache")
    parts = partition_dirichlet(data.y_train, 100, alpha=0.5, seed=0)
    opts: dict[str, object] = (
        {"mode": "async", "concurrency": 4, "buffer_size": 3, "server_opt": "fedadam"}
        if mode == "async" else {"devices_per_round": 4, "over_selection": 1.0,
                                  "server_opt": "fedavgm", "robust": "trimmed_mean",
                                  "trim_fraction": 0.25})
    config = AggregatorConfig(fleet=fleet, model="mlp", rounds=3, deadline_s=60.0,
                              state_dir=tmp_path / "agg", store_synchronous="NORMAL",
                              **opts)  # type: ignore[arg-type]
    agg = Aggregator(config=config, channel=Channel(
        transport=mqtt_transport(mosquitto.url, "aggregator", fleet, device=False), fleet=fleet),
        enrolment=ENROLMENT)
    key = agg.trail.key.public_hex
    agg.start()
    outcomes: dict[str, list[InclusionOutcome]] = {}
    agents = []
    for i in range(4):
        idx = np.concatenate([parts[2 * i], parts[2 * i + 1]])
        did = f"dev-{i}"
        got: list[InclusionOutcome] = []
        outcomes[did] = got
        transport = make_agent_transport(mosquitto.url, fleet=fleet, device_id=did,
                                         backoff_min_s=0.1, backoff_max_s=1.0)
        pinned = key if i < 3 else None  # dev-3 has no key configured
        agent = Agent(device_id=did, channel=Channel(transport=transport, fleet=fleet),
                      data=LocalData(x=data.x_train[idx], y=data.y_train[idx]),
                      state_dir=tmp_path / did, owns_transport=True,
                      status_probe=lambda: DeviceStatus(),
                      settings=AgentSettings(ledger_public_key=pinned),
                      hooks=AgentHooks(on_inclusion=got.append))
        enrol_agent(agent).start()
        agents.append(agent)
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 240.0}, daemon=True)
    runner.start()
    try:
        runner.join(timeout=250.0)
        assert agg.model_version == 3, [m.to_json() for m in agg.history]
        entries = agg.store.ledger_entries(fleet)
        counted = sum(len(e.accepted) for e in entries)
        assert wait_for(lambda: sum(len(o) for o in outcomes.values()) >= counted, 30)
    finally:
        agg.stop()
        for agent in agents:
            agent.stop()
        agg.close()
    assert len(entries) == 3 and counted >= 9
    for did, got in outcomes.items():
        want = "unpinned" if did == "dev-3" else "verified"
        assert got and all(o.status == want for o in got), (did, got)
        assert all(o.digest for o in got)
    state = tmp_path / "agg"
    (report,) = verify_ledger(state, enrolment=ENROLMENT)
    # (FedBuff may release once more while closing: what it committed is what counts)
    assert report.ok and report.models_rederived == report.entries >= 3, report
    # every update was signed by its agent's own key, the one enrolled
    assert report.device_signatures == report.device_keys_enrolled >= counted
    assert cli(["ledger", "verify", str(state), "--public-key", key]) == 0
    # One byte of one kept body of the second entry changed: that entry fails.
    digest = entries[1].header_json()  # (the header names the root; the record the digest)
    first = json.loads(entries[1].accepted[0])["digest"]
    with sqlite3.connect(state / "aggregator.sqlite", isolation_level=None) as conn:
        body = kept_body(conn, first)
        set_kept_body(conn, first, body[:-1] + bytes([body[-1] ^ 1]))
    assert digest["index"] == 1
    (report,) = verify_ledger(state)
    assert report.first_bad == 1 and report.verified == 1
    assert cli(["ledger", "verify", str(state)]) == 1
