"""Long waits say what they wait for: the agent's status line follows its phase, the
simulator says when it waits for the aggregator to see the fleet and warns when that
does not happen."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from agent_rig import Rig, idle
from waiting import wait_for

from edge_runtime import Phase


def test_the_status_line_says_when_the_update_is_held_to_its_emulated_duration(
        rig: Rig) -> None:
    from device_profiles import get_profile
    from edge_runtime import Emulation

    class Slow(Emulation):
        def emulated_s(self, **_kw: object) -> float:
            return 1000.0

    agent = rig.agent(emulation=Slow(profile=get_profile("pi4"), time_scale=1.0))
    rig.agg.send_task("dev-1", rig.agg.task(round_=6))
    assert wait_for(lambda: agent.phase == Phase.ENCODING and "holding" in agent.status_line())
    line = agent.status_line()
    assert line.startswith("round 6: holding the encoded update") and "emulated" in line
    assert "training" not in line
    rig.agg.cancel("dev-1", 6)  # ends the wait; nothing is sent
    assert wait_for(lambda: idle(agent))
    assert rig.agg.updates == []


class _Fleet:
    def online_ids(self) -> list[str]:
        return ["dev-0", "dev-1", "dev-2"]


def _aggregator(online: list[str]) -> SimpleNamespace:
    devices = [SimpleNamespace(device_id=d) for d in online]
    return SimpleNamespace(registry=SimpleNamespace(online=lambda: devices))


def test_the_simulator_says_it_waits_for_the_aggregator_to_see_the_fleet() -> None:
    from fleetlearn._simulate import _await_online

    lines: list[str] = []
    agg = _aggregator(["dev-0", "dev-1", "dev-2"])
    assert _await_online(agg, _Fleet(), lines.append, timeout=5.0)  # type: ignore[arg-type]
    assert lines == ["waiting for the aggregator to see the 3 connected devices (up to 5 s)"]


def test_the_simulator_warns_when_the_aggregator_does_not_see_the_fleet(
        caplog: pytest.LogCaptureFixture) -> None:
    from fleetlearn._simulate import _await_online

    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="fleetlearn"):
        seen_all = _await_online(_aggregator(["dev-0"]), _Fleet(),  # type: ignore[arg-type]
                                 lines.append, timeout=0.05)
    assert not seen_all
    assert lines[0].startswith("waiting for the aggregator to see the 3 connected devices")
    assert lines[1] == ("warning: after 0 s the aggregator sees 1 of the 3 connected devices "
                        "(not dev-1, dev-2); starting anyway")
    assert any("dev-1, dev-2" in r.getMessage() for r in caplog.records)
