"""The agent on an aarch64 board (Debian 13, Python 3.13, a Raspberry Pi 4's Cortex-A72),
emulated with qemu user mode, against an x86 aggregator and Mosquitto on this machine.

The project's wheel is built here, installed (with plain onnxruntime, numpy, paho-mqtt
zstandard and cryptography from PyPI's aarch64 wheels: the base dependencies) into an
aarch64 venv, and ``fleetlearn agent`` runs there on a real MNIST-1D shard; its key,
made on the board, is enrolled the way an operator does it (``fleetlearn devices key``
there, ``fleetlearn devices enroll`` here), and the aggregator must accept its signed
updates for two rounds. The venv is cached in ``$FLEETLEARN_ARM64_VENV`` (default
``~/.cache/fleetlearn/arm64-venv``) and the Debian sysroot by the emulation tool, so a
second run only reinstalls the wheel. Emulated code is ~100x slower than native: only
correctness and memory mean anything here.

The emulation tool is ``arm64-python.sh`` (``$FLEETLEARN_ARM64_TOOL``, else the
workspace's ``shared/tools``). Without it the test skips, unless
``FLEETLEARN_REQUIRE_ARM64=1`` (``scripts/test.sh`` sets it when the tool is there).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from broker_bridge import MosquittoProcess
from edge_runtime._datasets import load_mnist1d, partition_dirichlet

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEVICE_DEPS = tuple(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                    ["dependencies"])
"""What a device installs: the base package's dependencies, as pyproject.toml says."""


def arm_tool() -> Path:
    named = os.environ.get("FLEETLEARN_ARM64_TOOL")
    candidates = [Path(named)] if named else []
    candidates += [REPO.parent / "shared" / "tools" / "arm64-python.sh",
                   Path("/work/shared/tools/arm64-python.sh")]
    for path in candidates:
        if path.is_file():
            return path
    why = "no arm64-python.sh (set FLEETLEARN_ARM64_TOOL) to emulate an aarch64 board"
    if os.environ.get("FLEETLEARN_REQUIRE_ARM64") == "1":
        pytest.fail(why)
    pytest.skip(why)


def _tool(*args: str, timeout: float = 1800) -> str:
    result = subprocess.run(["bash", str(arm_tool()), *args], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"arm64-python.sh {args[0]} failed:\n{result.stderr[-4000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def arm_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An aarch64 venv with the device dependencies (cached) and this checkout's wheel."""
    venv = Path(os.environ.get("FLEETLEARN_ARM64_VENV",
                               Path.home() / ".cache" / "fleetlearn" / "arm64-venv"))
    stamp = venv / ".fleetlearn-deps"
    want = hashlib.sha256("\n".join(DEVICE_DEPS).encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != want:
        _tool("venv", str(venv), *DEVICE_DEPS)
        stamp.write_text(want)
    wheels = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("fleetlearn-*-py3-none-any.whl")
    _tool("pip", str(venv), "install", "--no-deps", "--force-reinstall", str(wheel))
    return venv


def test_the_wheel_installs_plain_onnxruntime_on_aarch64_python313(arm_venv: Path) -> None:
    code = ("import json, platform, sys, importlib.metadata as md\n"
            "import edge_runtime, onnxruntime\n"
            "print(json.dumps({'machine': platform.machine(), 'python': sys.version_info[:2],"
            " 'ort': onnxruntime.__version__, 'fleetlearn': md.version('fleetlearn'),"
            " 'training_wheel': [d.metadata['Name'] for d in md.distributions()"
            " if 'training' in d.metadata['Name']],"
            " 'onnx': 'onnx' in sys.modules, 'torch': 'torch' in sys.modules}))\n")
    info = json.loads(_tool("run", str(arm_venv), "--", "python", "-c", code).splitlines()[-1])
    assert info["machine"] == "aarch64" and info["python"] == [3, 13]
    assert info["training_wheel"] == [] and not info["onnx"] and not info["torch"]
    assert info["fleetlearn"] == "0.1.0"


def test_emulated_training_matches_x86(arm_venv: Path, tmp_path: Path) -> None:
    """The same task from the same weights gives the same parameters on both machines."""
    from cloud_aggregator._artifacts import build_artifacts
    from cloud_aggregator._models import build_reference_model
    from edge_runtime import PortableTrainer

    build_artifacts(build_reference_model("mlp", 0), tmp_path / "mlp")
    data = load_mnist1d()
    np.savez(tmp_path / "data.npz", x=data.x_train[:256], y=data.y_train[:256])
    script = (
        "import sys, numpy as np\n"
        "from edge_runtime import PortableTrainer\n"
        "t = PortableTrainer(artifacts_dir=sys.argv[1])\n"
        "d = np.load(sys.argv[2])\n"
        "r = t.train(d['x'], d['y'], epochs=2, batch_size=32, lr=0.05, seed=3)\n"
        "np.save(sys.argv[3], t.get_parameters())\n"
        "print(r.steps, r.mean_loss)\n"
    )
    out = _tool("run", str(arm_venv), "--", "python", "-c", script, str(tmp_path / "mlp"),
                str(tmp_path / "data.npz"), str(tmp_path / "arm.npy"))
    steps, _ = out.split()[-2:]
    assert int(steps) == 16
    native = PortableTrainer(artifacts_dir=tmp_path / "mlp")
    native.train(data.x_train[:256], data.y_train[:256], epochs=2, batch_size=32, lr=0.05,
                 seed=3)
    np.testing.assert_allclose(np.load(tmp_path / "arm.npy"), native.get_parameters(),
                               rtol=1e-4, atol=1e-5)


def test_aarch64_agent_updates_are_accepted_by_an_x86_aggregator(
    arm_venv: Path, mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    fleet = "arm-fleet"
    data = load_mnist1d()
    shards = partition_dirichlet(data.y_train, num_devices=40, alpha=0.5, seed=0)
    shard = shards[0][:200]
    np.savez(tmp_path / "shard.npz", x=data.x_train[shard], y=data.y_train[shard])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # The operator's enrolment: the key is made on the board and only its public half
    # comes here.
    line = _tool("run", str(arm_venv), "--", "fleetlearn", "devices", "key", "--device-id",
                 "pi-01", "--state-dir", str(tmp_path / "pi-01")).strip().splitlines()[-1]
    assert line.startswith("pi-01 ed25519:"), line
    (tmp_path / "keys.txt").write_text(line + "\n")
    enrolment = tmp_path / "enrolment.toml"
    subprocess.run([sys.executable, "-m", "fleetlearn", "devices", "enroll", "--enrolment",
                    str(enrolment), "--fleet", fleet, "--from", str(tmp_path / "keys.txt")],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    state = tmp_path / "aggregator"
    aggregator = subprocess.Popen(
        [sys.executable, "-m", "fleetlearn", "aggregator", "--broker", mosquitto.url,
         "--fleet", fleet, "--model", "mlp", "--rounds", "2", "--devices-per-round", "1",
         "--over-selection", "1", "--quorum", "1", "--min-devices", "1",
         "--local-epochs", "1", "--deadline-s", "900", "--state-dir", str(state),
         "--enrolment", str(enrolment), "--quiet"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    agent_log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        ["bash", str(arm_tool()), "run", str(arm_venv), "--", "fleetlearn", "agent",
         "--broker", mosquitto.url, "--fleet", fleet, "--device-id", "pi-01",
         "--data", str(tmp_path / "shard.npz"), "--state-dir", str(tmp_path / "pi-01"),
         "--profile", "pi4"],
        stdout=agent_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 1500
        while aggregator.poll() is None and time.monotonic() < deadline:
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
            time.sleep(1)
        assert aggregator.returncode == 0, (
            (aggregator.stderr.read() if aggregator.stderr else b"").decode()[-3000:]
            + (tmp_path / "agent.log").read_text()[-3000:])
    finally:
        for proc in (agent, aggregator):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        agent_log.close()
    rounds = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rounds] == ["closed", "closed"]
    assert all(r["devices_reported"] == 1 and r["updates_rejected"] == 0 for r in rounds)
    assert rounds[-1]["model_version"] == 2
    log = (tmp_path / "agent.log").read_text()
    assert "fleetlearn agent pi-01" in log and "onnxruntime 1." in log
