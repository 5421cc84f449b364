"""Checkpoint retention (``_retention``): the newest ``keep_checkpoints`` files, the
oldest, and those the ledger checks models against are kept; the others go, and the
ledger still verifies and a restart still resumes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from aggregator_rig import FLEET, FakeDevice, devices, make

from broker_bridge import MemoryBroker
from cloud_aggregator import Aggregator, AggregatorConfig, verify_ledger
from device_profiles import ConfigError


def _rounds(agg: Aggregator, fleet: dict[str, FakeDevice], rounds: int) -> None:
    for _ in range(rounds):
        assert agg.tick()  # a round opens
        for d in fleet.values():
            if d.tasks and d.tasks[-1].round == agg.round_index:
                d.send_update(layout=agg.layout)
        assert agg.tick()  # ... and closes


def _versions(agg: Aggregator) -> tuple[list[int], list[int]]:
    """(versions with a checkpoint record, versions with a checkpoint file)."""
    store = agg.store
    rows = [v for v in range(agg.model_version + 1)
            if store.checkpoint(FLEET, model_version=v) is not None]
    latest = store.checkpoint(FLEET)
    assert latest is not None
    files = sorted(int(p.stem.rsplit("-v", 1)[1]) for p in latest.path.parent.glob("*.npy"))
    return rows, files


def test_the_newest_and_the_oldest_are_kept_and_the_ledger_verifies(
    tmp_path: Path, artifacts: Path
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=5, keep_checkpoints=2)
    _rounds(agg, fleet, 5)
    assert agg.model_version == 5
    assert _versions(agg) == ([0, 4, 5], [0, 4, 5])
    agg.close()
    (report,) = verify_ledger(tmp_path)  # every model re-derived from version 0
    assert report.ok and report.models_rederived == 5, report
    again = make(tmp_path, artifacts, MemoryBroker(), rounds=6, keep_checkpoints=2)
    assert again.model_version == 5  # resumed from the newest


def test_zero_keeps_every_checkpoint(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=3, keep_checkpoints=0)
    _rounds(agg, fleet, 3)
    assert _versions(agg) == ([0, 1, 2, 3], [0, 1, 2, 3])


def test_a_checkpoint_the_ledger_checks_a_model_against_is_kept(tmp_path: Path,
                                                                artifacts: Path) -> None:
    """A private round's model is checked against its file, not re-derived: its file
    stays whatever ``keep_checkpoints`` says, and the ledger verifies."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=4, keep_checkpoints=1,
               dp_noise_multiplier=1.0, dp_clipping="fixed", clip_norm=1.0)
    _rounds(agg, fleet, 4)
    assert _versions(agg) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    agg.close()
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.secure_taken == 4, report


def test_a_negative_count_is_refused() -> None:
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 0"):
        AggregatorConfig(keep_checkpoints=-1)


def test_a_store_from_before_retention_marks_what_its_ledger_needs(tmp_path: Path,
                                                                   artifacts: Path) -> None:
    """Schema 7 marks, from the entries already written, the checkpoints the ledger checks
    models against; pruning then leaves them, and the whole ledger still verifies."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    private = {"dp_noise_multiplier": 1.0, "dp_clipping": "fixed", "clip_norm": 1.0}
    agg = make(tmp_path, artifacts, broker, rounds=3, keep_checkpoints=0, **private)
    _rounds(agg, fleet, 3)
    agg.close()
    with sqlite3.connect(tmp_path / "aggregator.sqlite") as conn:  # as version 6 left it
        conn.execute("ALTER TABLE checkpoints DROP COLUMN keep")
        conn.execute("UPDATE schema_version SET version = 6")
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=5, keep_checkpoints=1, **private)
    assert agg.store.schema_version() == 7
    _rounds(agg, fleet, 2)
    assert _versions(agg) == ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])
    agg.close()
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.secure_taken == 5, report
