"""A wrong start is a clear error at start-up (issue 12, items 8, 10, 11, aggregator side).

Each case was a silent wrong run, a crash on every restart, or a traceback: another
model on a run's state dir, an emptied database beside its checkpoints, eval data of
the wrong shape, a corrupted SQLite page, a garbage state blob, a kill between a
checkpoint and its metrics line, a killed checkpoint write.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import FLEET, devices, make

from broker_bridge import Channel, MemoryBroker, MemoryTransport
from cloud_aggregator import Aggregator
from cloud_aggregator._config import AggregatorConfig
from cloud_aggregator._recorder import RoundRecorder
from cloud_aggregator._store import StoreError
from device_profiles import ConfigError, FleetlearnError


def one_round(tmp: Path, artifacts: Path, rounds: int = 1, **overrides: object) -> Path:
    """A state dir holding ``rounds`` closed rounds of a 3-device mlp fleet."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp, artifacts, broker, rounds=rounds, **overrides)
    while agg.model_version < rounds:
        agg.tick()
        for d in fleet.values():
            if d.tasks and d.tasks[-1].round == agg.round_index:
                d.send_update(layout=agg.layout)
        agg.tick()
    agg.close()
    return tmp


def own_state_dir(tmp: Path, model: str) -> Aggregator:
    """An aggregator that builds its artifacts in its state dir (as the CLI does)."""
    config = AggregatorConfig(fleet=FLEET, model=model, state_dir=tmp,
                              store_synchronous="NORMAL")
    agg = Aggregator(config=config, channel=Channel(
        transport=MemoryTransport(broker=MemoryBroker(), client_id="agg"), fleet=FLEET))
    agg.start()
    return agg


def test_another_model_on_a_runs_state_dir_is_refused(tmp_path: Path) -> None:
    own_state_dir(tmp_path, "mlp").close()
    with pytest.raises(ConfigError, match=r"holds a run of the reference model 'mlp'.*cnn"):
        own_state_dir(tmp_path, "cnn")  # exited 0 and kept training the mlp
    # an artifacts folder built from another model is refused too, run record or not
    (tmp_path / "aggregator.sqlite").unlink()
    for extra in tmp_path.glob("aggregator.sqlite-*"):
        extra.unlink()
    shutil.rmtree(tmp_path / "aggregator.sqlite.checkpoints")
    (tmp_path / "metrics.jsonl").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="holds artifacts of the reference model 'mlp'"):
        own_state_dir(tmp_path, "cnn")
    agg = own_state_dir(tmp_path, "mlp")  # the same model resumes
    assert agg.model_version == 0
    agg.close()


def test_an_emptied_database_beside_its_checkpoints_is_refused(
    tmp_path: Path, artifacts: Path
) -> None:
    state = one_round(tmp_path / "s", artifacts, rounds=2)
    assert (state / "aggregator.sqlite.checkpoints").is_dir()
    (state / "aggregator.sqlite").write_bytes(b"")
    for extra in state.glob("aggregator.sqlite-*"):
        extra.unlink()
    with pytest.raises(StoreError, match=r"records no run.*checkpoints up to version 2"):
        make(state, artifacts, MemoryBroker())  # silently restarted at version 0
    assert sorted(p.name for p in (state / "aggregator.sqlite.checkpoints").glob("*.npy")) == [
        f"{FLEET}-v{v:010d}.npy" for v in (0, 1, 2)]  # nothing overwritten


def test_eval_data_that_does_not_fit_is_refused_at_start(
    tmp_path: Path, artifacts: Path
) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((20, 12), np.float32), y=np.zeros(20, np.int64))
    with pytest.raises(ConfigError, match="does not fit the model"):
        make(tmp_path / "a", artifacts, MemoryBroker(), eval_data=wrong)
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((20, 40), np.float32), y=np.arange(20, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"labels range over \[0, 19\]; the model has 10"):
        make(tmp_path / "b", artifacts, MemoryBroker(), eval_data=labels)
    truncated = tmp_path / "truncated.npz"
    ok = tmp_path / "ok.npz"
    np.savez(ok, x=np.zeros((20, 40), np.float32), y=np.zeros(20, np.int64))
    truncated.write_bytes(ok.read_bytes()[:200])
    with pytest.raises(ConfigError, match=r"need an \.npz"):
        make(tmp_path / "c", artifacts, MemoryBroker(), eval_data=truncated)
    agg = make(tmp_path / "d", artifacts, MemoryBroker(), eval_data=ok)
    assert agg.recorder.evaluator is not None  # good data: the aggregator evaluates


def test_a_corrupted_database_page_is_a_store_error(tmp_path: Path, artifacts: Path) -> None:
    state = one_round(tmp_path / "s", artifacts, rounds=2)
    conn = sqlite3.connect(state / "aggregator.sqlite")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    seen_errors = 0
    for page in range(1, pages):
        copy = tmp_path / f"c{page}"
        shutil.copytree(state, copy)
        db = copy / "aggregator.sqlite"
        data = bytearray(db.read_bytes())
        data[4096 * page:4096 * (page + 1)] = os.urandom(4096)
        db.write_bytes(bytes(data))
        try:
            agg = make(copy, artifacts, MemoryBroker())
        except FleetlearnError as exc:  # sqlite3.DatabaseError before: a traceback
            assert "aggregator.sqlite" in str(exc) or "store" in str(exc)
            seen_errors += 1
            continue
        agg.tick()
        agg.close()
    assert seen_errors >= 1, (seen_errors, pages)


def test_a_garbage_state_blob_is_a_store_error(tmp_path: Path, artifacts: Path) -> None:
    state = one_round(tmp_path / "s", artifacts)
    for name, body in (("aggregator", b"\x00\xff{"), ("aggregator", b"[" * 100_000),
                       ("server_opt", b"garbage"), ("run", b"{}")):
        copy = tmp_path / f"{name}-{len(body)}"
        shutil.copytree(state, copy)
        conn = sqlite3.connect(copy / "aggregator.sqlite")
        conn.execute("UPDATE state_blobs SET body = ? WHERE name = ?", (body, name))
        conn.commit()
        conn.close()
        with pytest.raises(FleetlearnError, match=r"unreadable|malformed"):
            make(copy, artifacts, MemoryBroker())


def test_a_stop_between_checkpoint_and_metrics_line_loses_no_line(
    tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=2)
    agg.tick()
    for d in fleet.values():
        d.send_update(layout=agg.layout)

    class Killed(BaseException):
        pass

    def killed(*_a: object, **_k: object) -> None:
        raise Killed  # the process dies right after the checkpoint transaction

    monkeypatch.setattr(RoundRecorder, "record", killed)
    with pytest.raises(Killed):
        agg.tick()
    monkeypatch.undo()
    assert agg.store.checkpoint(FLEET).model_version == 1  # type: ignore[union-attr]
    assert agg.metrics_log.read() == []
    agg.abort()
    again = make(tmp_path, artifacts, broker, rounds=2)
    rows = again.metrics_log.read()
    assert [(r["round"], r["outcome"], r["devices_reported"]) for r in rows] == [(1, "closed", 3)]
    again.close()
    make(tmp_path, artifacts, broker, rounds=2).close()  # not written twice
    assert len(again.metrics_log.read()) == 1


def test_leftovers_of_killed_writes_are_cleaned_and_tolerated(
    tmp_path: Path, artifacts: Path
) -> None:
    state = one_round(tmp_path / "s", artifacts)
    ckpt = state / "aggregator.sqlite.checkpoints"
    leftover = ckpt / f".{FLEET}-v0000000002.npy.x1y2z3.tmp"
    leftover.write_bytes(b"\x93NUMPY half a checkpoint")
    with (state / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 2, "outc')  # a line a kill cut short
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(state, artifacts, broker, rounds=2)
    assert not leftover.exists()  # stayed for ever before
    agg.tick()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
    agg.tick()
    rows = agg.metrics_log.read()
    assert [r["round"] for r in rows] == [1, 2]
    assert json.loads((state / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 2
