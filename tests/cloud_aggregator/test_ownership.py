"""One aggregator per state dir (``_ownership``), and the checkpoint files a crash left
behind (``Store.sweep_checkpoints``), swept by the aggregator that owns the dir."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from aggregator_rig import FLEET, devices, make
from lock_holder import held_elsewhere

from broker_bridge import MemoryBroker
from cloud_aggregator import StateDirInUse, StoreError
from cloud_aggregator._ownership import LOCK_NAME


def test_a_second_aggregator_on_the_same_state_dir_is_refused(tmp_path: Path,
                                                             artifacts: Path) -> None:
    first = make(tmp_path, artifacts, MemoryBroker())
    with pytest.raises(StateDirInUse, match=f"pid {os.getpid()}"):
        make(tmp_path, artifacts, MemoryBroker())
    assert issubclass(StateDirInUse, StoreError)
    first.close()
    again = make(tmp_path, artifacts, MemoryBroker())  # the lock went with the first
    assert again.model_version == 0


def test_a_crashed_aggregator_leaves_no_lock(tmp_path: Path, artifacts: Path) -> None:
    """``abort`` (a simulated crash) lets the next aggregator in, as a process's death
    does (below)."""
    make(tmp_path, artifacts, MemoryBroker()).abort()
    assert make(tmp_path, artifacts, MemoryBroker()).model_version == 0


def test_another_process_holding_the_dir_is_named_and_its_death_frees_it(
    tmp_path: Path, artifacts: Path
) -> None:
    with held_elsewhere(tmp_path, LOCK_NAME) as pid, \
            pytest.raises(StateDirInUse, match=f"pid {pid} on "):
        make(tmp_path, artifacts, MemoryBroker())
    assert make(tmp_path, artifacts, MemoryBroker()).model_version == 0  # the kernel freed it


def test_a_file_system_without_locks_is_said_and_an_unopenable_lock_file_is_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno
    import fcntl

    from cloud_aggregator._ownership import lock_state_dir

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        lock = lock_state_dir(tmp_path)  # goes on, and says what it could not do
    assert not lock.held and f"nothing keeps {tmp_path} to one process" in caplog.text
    monkeypatch.undo()

    def refused(*_a: object, **_k: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(StoreError, match="cannot open the state dir's lock file"):
        lock_state_dir(tmp_path / "ro")


def test_checkpoint_files_no_record_names_are_swept_at_start(
    tmp_path: Path, artifacts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=2)
    assert agg.tick()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
    assert agg.tick() and agg.model_version == 1
    folder = agg.store.checkpoint_dir
    agg.close()
    kept = sorted(p.name for p in folder.iterdir())
    assert kept == [f"{FLEET}-v0000000000.npy", f"{FLEET}-v0000000001.npy"]
    # What a crash leaves: a file whose row was pruned (or never committed), a write cut
    # short; and what is not ours to delete: another fleet's file, anything else.
    left = {f"{FLEET}-v0000000007.npy": b"x" * 1000,
            f".{FLEET}-v0000000002.npy.a1b2c3.tmp": b"y" * 10}
    foreign = {"other-v0000000007.npy": b"z", "notes.txt": b"mine",
               f"{FLEET}-v7.npy": b"not our name"}
    for name, data in {**left, **foreign}.items():
        (folder / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="cloud_aggregator"):
        again = make(tmp_path, artifacts, MemoryBroker(), rounds=2)
    assert again.model_version == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept + list(foreign))
    assert "deleted 1 checkpoint file (" in caplog.text  # the temporary one: see _startup
    assert again.store.sweep_checkpoints(FLEET) == (0, 0)  # nothing more to find


def test_the_sweep_of_a_store_without_checkpoints_deletes_nothing(tmp_path: Path) -> None:
    from cloud_aggregator import Store

    with Store(tmp_path / "s.sqlite") as store:
        assert store.sweep_checkpoints(FLEET) == (0, 0)  # no folder yet
        store.checkpoint_dir.mkdir()
        (store.checkpoint_dir / "other-v0000000001.npy").write_bytes(b"z")
        (store.checkpoint_dir / f"{FLEET}-v0000000001.npy").write_bytes(b"zz")
        assert store.sweep_checkpoints(FLEET) == (1, 2)
        assert [p.name for p in store.checkpoint_dir.iterdir()] == ["other-v0000000001.npy"]
