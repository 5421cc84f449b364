"""The public API: ``import fleetlearn``, the error tree it documents, and the README's
embedding examples, run exactly as written."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fleetlearn
from broker_bridge import Channel, MosquittoProcess
from cloud_aggregator import Aggregator, AggregatorConfig
from device_profiles import FleetlearnError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("device_profiles", "broker_bridge", "edge_runtime", "cloud_aggregator", "fleetlearn")


def _import_everything() -> None:
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)


def _documented_tree() -> dict[str, tuple[str | None, str]]:
    """name -> (parent, package) from the tree in device_profiles._errors' docstring."""
    doc = importlib.import_module("device_profiles._errors").__doc__ or ""
    tree: dict[str, tuple[str | None, str]] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        found = re.match(r"^    ([│ ├└─]*)(\w+Error|\w+)\s+(\w+)\b", line)
        if not found or not found.group(2)[0].isupper():
            continue
        depth = len(found.group(1)) // 4
        while stack and stack[-1][0] >= depth:
            stack.pop()
        tree[found.group(2)] = (stack[-1][1] if stack else None, found.group(3))
        stack.append((depth, found.group(2)))
    return tree


def _real_tree() -> dict[str, tuple[str | None, str]]:
    tree: dict[str, tuple[str | None, str]] = {}

    def walk(cls: type, parent: str | None) -> None:
        if cls.__module__.split(".")[0] not in PACKAGES:
            return  # a test's own subclass
        tree[cls.__name__] = (parent, cls.__module__.split(".")[0])
        for sub in cls.__subclasses__():
            walk(sub, cls.__name__)

    walk(FleetlearnError, None)
    return tree


def test_the_documented_error_tree_is_the_real_one() -> None:
    _import_everything()
    documented, real = _documented_tree(), _real_tree()
    assert len(documented) >= 20, "the tree in device_profiles._errors did not parse"
    missing = sorted(set(real) - set(documented))
    assert not missing, f"error classes missing from the documented tree: {missing}"
    stale = sorted(set(documented) - set(real))
    assert not stale, f"documented error classes that do not exist: {stale}"
    for name, where in real.items():
        assert documented[name] == where, f"{name}: documented {documented[name]}, is {where}"


def test_every_error_is_public_twice() -> None:
    """From ``fleetlearn`` and from the front door of the package that defines it."""
    _import_everything()
    for name, (_, package) in _real_tree().items():
        assert getattr(fleetlearn, name).__name__ == name
        assert name in importlib.import_module(package).__all__, f"{package} lacks {name}"


def test_the_api_names_resolve_where_they_say() -> None:
    assert set(fleetlearn.__all__) == set(fleetlearn._WHERE)
    for name in fleetlearn.__all__:
        value = getattr(fleetlearn, name)
        if isinstance(value, type) or inspect.isfunction(value):
            assert value.__module__.split(".")[0] in PACKAGES, (name, value.__module__)
        else:  # a type alias (Event: a union of event classes; LocalTraining: a Callable)
            assert value is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Aggregater'"):
        fleetlearn.Aggregater  # noqa: B018
    assert {"Aggregator", "Agent", "simulate", "Strategy", "BasePolicy",
            "FleetlearnError"} <= set(dir(fleetlearn))


def _loaded_after(statement: str) -> set[str]:
    code = (f"import sys\n{statement}\n"
            "print(','.join(m for m in ('cloud_aggregator', 'edge_runtime', 'onnx')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    return set(filter(None, out.split(",")))


def test_import_fleetlearn_loads_neither_side() -> None:
    assert _loaded_after("import fleetlearn") == set()
    assert _loaded_after("from fleetlearn import Agent, AgentSettings, FleetlearnError") == {
        "edge_runtime"}  # a device never loads the cloud side (nor onnx)


def _readme_example(name: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"README has no '{name}' example"
    return found.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["policy", "strategy"])
def test_the_readme_examples_run_as_written(name: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = _readme_example(name)
    assert len(code.splitlines()) < 30
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"readme_{name}"}
    exec(compile(code, f"README.md:{name}", "exec"), namespace)
    out = capsys.readouterr().out
    found = re.search(r"final accuracy (\S+)", out)
    assert found, out[-2000:]
    accuracy = float(found.group(1))
    assert 0.1 < accuracy <= 1.0  # trained: above chance (10 classes) after three rounds
    report = namespace["result"].report  # type: ignore[attr-defined]
    assert len(report["rounds"]) == 3
    assert all(r["outcome"] == "closed" for r in report["rounds"])


def test_the_readme_policy_chooses_the_least_recent(tmp_path: Path) -> None:
    namespace: dict[str, object] = {"__name__": "readme_policy"}
    code = _readme_example("policy").split("\nresult = ")[0]  # the class, not the run
    exec(compile(code, "README.md:policy", "exec"), namespace)
    policy = namespace["LeastRecentFirst"]()  # type: ignore[operator]
    candidates = [fleetlearn.Candidate(device_id=f"d{i}", predicted_duration_s=1.0)
                  for i in range(4)]
    for device, last in (("d0", 3), ("d2", 1), ("d3", 2)):
        policy.history.selected([device], last)
    import numpy as np

    chosen = policy.select(candidates, 2, round_index=4, rng=np.random.default_rng(0))
    assert chosen == ["d1", "d2"]  # never trained, then the longest ago


def test_an_aggregator_connects_to_a_broker_by_url(tmp_path: Path, artifacts: Path) -> None:
    with MosquittoProcess() as broker:
        config = AggregatorConfig(fleet="api", model="mlp", rounds=1, state_dir=tmp_path,
                                  progress=False)
        agg = Aggregator.connect(config, broker=broker.url, artifacts_dir=artifacts)
        assert isinstance(agg.channel, Channel) and agg.channel.fleet == "api"
        agg.start()
        assert agg.channel.transport.connected
        seen: list[object] = []
        agg.subscribe(seen.append)
        assert agg.status_line()
        agg.close()
        assert not agg.channel.transport.connected  # the connection it made is closed
