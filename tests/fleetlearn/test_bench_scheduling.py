"""bench/scheduling.py end to end on a tiny fleet: it runs, compares each policy with
the baseline of the same seed, and its JSON says what the README quotes from it.

No timing is asserted: emulated seconds come from the device profiles, not the host.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scheduling.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scheduling", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_scheduling_bench_on_a_tiny_fleet(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()
    out: dict[str, Any] = bench.main([
        "--devices", "12", "--per-round", "3", "--rounds", "4", "--num-samples", "3000",
        "--local-epochs", "2", "--target", "0.2", "--seeds", "0,1",
        "--policies", "deadline,deadline_k", "--max-selected", "8",
    ])
    assert out["setting"]["seeds"] == [0, 1] and out["setting"]["fedcs_max_selected"] == 8
    assert set(out["runs"]) == {"0", "1"}
    for results in out["runs"].values():
        assert set(results) == {"random", "deadline", "deadline_k"}
        base = results["random"]
        assert base["rounds"] == 4 and base["rounds_charged_deadline"] == 0
        assert base["speedup_vs_random"] in (1.0, None)
        # FedCS may take up to 8 devices a round, deadline_k the baseline's count (3 x
        # 1.3 over-selection = 4): over 4 rounds it counts more updates, never fewer.
        wide, narrow = results["deadline"], results["deadline_k"]
        assert narrow["updates_counted"] + narrow["updates_missed"] <= 4 * 4
        assert wide["updates_counted"] > narrow["updates_counted"]
        for row in results.values():
            assert row["mb_up"] > 0 and row["final_accuracy"] is not None
    summary = out["summary"]
    assert set(summary) == {"deadline", "deadline_k"}
    for row in summary.values():
        assert len(row["speedup_vs_random"]) == len(row["final_accuracy_delta_vs_random"]) == 2
        assert isinstance(row["meets_target"], bool)
    assert out["target_met"] == [p for p in summary if summary[p]["meets_target"]]
    assert capsys.readouterr().out.strip().startswith("{")


def test_scheduling_bench_refuses_an_unknown_policy() -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--policies", "fastest-first"])
