"""One agent per state folder: a second is refused with ``StateInUse`` naming the
holder; ``stop``, ``abort`` and a dropped agent free the folder; the simulator, which owns
its fleet's folders, opts out."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agent_rig import FLEET, make_data

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
    code = ("import sys, time; from pathlib import Path; "
            "from edge_runtime._state import lock_state_folder; "
            "lock = lock_state_folder(Path(sys.argv[1])); print('held', flush=True); "
            "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(StateInUse, match=f"pid {child.pid} on "):
            _agent(MemoryBroker(), folder)
        assert (folder / AGENT_LOCK).read_text().startswith(f"pid {child.pid} on ")
    finally:
        child.kill()
        child.wait()
    _agent(MemoryBroker(), folder).stop()


def test_an_owner_of_the_folders_may_opt_out(tmp_path: Path) -> None:
    broker = MemoryBroker()
    first = _agent(broker, tmp_path / "dev", lock_state=False)
    second = _agent(broker, tmp_path / "dev", lock_state=False)
    assert not (tmp_path / "dev" / AGENT_LOCK).exists()
    first.stop()
    second.stop()
