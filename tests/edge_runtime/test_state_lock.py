"""One agent per state folder: a second is refused with ``StateInUse`` naming the
holder; ``stop``, ``abort`` and a dropped agent free the folder; the simulator, which owns
its fleet's folders, opts out."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
from agent_rig import FLEET, make_data
from lock_holder import held_elsewhere

from broker_bridge import Channel, MemoryBroker, MemoryTransport
from edge_runtime import Agent, StateError, StateInUse
from edge_runtime._state import AGENT_LOCK


def _agent(broker: MemoryBroker, folder: Path, **kw: Any) -> Agent:
    transport = MemoryTransport(broker=broker, client_id="dev-1")
    return Agent(device_id="dev-1", channel=Channel(transport=transport, fleet=FLEET),
                 data=make_data(), state_dir=folder, **kw)


def test_a_second_agent_on_the_same_folder_is_refused_until_the_first_stops(
    tmp_path: Path
) -> None:
    broker = MemoryBroker()
    first = _agent(broker, tmp_path / "dev")
    with pytest.raises(StateInUse, match=f"pid {os.getpid()} on "):
        _agent(broker, tmp_path / "dev")
    assert issubclass(StateInUse, StateError)
    first.stop()
    again = _agent(broker, tmp_path / "dev")  # the lock went with the first
    again.abort()  # a power cut frees it too (its process would be gone)
    _agent(broker, tmp_path / "dev").stop()


def test_a_dropped_agent_frees_its_folder(tmp_path: Path) -> None:
    broker = MemoryBroker()
    first = _agent(broker, tmp_path / "dev")
    del first
    gc.collect()
    _agent(broker, tmp_path / "dev").stop()


def test_a_folder_held_by_another_process_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    with held_elsewhere(folder, AGENT_LOCK) as pid:
        with pytest.raises(StateInUse, match=f"pid {pid} on "):
            _agent(MemoryBroker(), folder)
        assert (folder / AGENT_LOCK).read_text().startswith(f"pid {pid} on ")
    _agent(MemoryBroker(), folder).stop()  # the kernel freed it


def test_an_owner_of_the_folders_may_opt_out(tmp_path: Path) -> None:
    broker = MemoryBroker()
    first = _agent(broker, tmp_path / "dev", lock_state=False)
    second = _agent(broker, tmp_path / "dev", lock_state=False)
    assert not (tmp_path / "dev" / AGENT_LOCK).exists()
    first.stop()
    second.stop()
