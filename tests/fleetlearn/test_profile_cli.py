"""``fleetlearn profile`` measures real ONNX Runtime training steps, even on a fresh machine.

The composition root builds the reference artifacts the agent's probe needs into
``$FLEETLEARN_CACHE_DIR/reference-artifacts/`` when the cloud extra is installed;
without it, the probe measures what is cached and the command says what it left out.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_profiles import DeviceProfile, load_profile_file
from fleetlearn import _probe
from fleetlearn.cli import main

MODELS = ("mlp", "cnn", "mlp-xl")


@dataclass(frozen=True, kw_only=True)
class Run:
    code: int
    stderr: str
    profile: DeviceProfile | None


def profile_command(out: Path, *extra: str) -> Run:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["profile", "--out", str(out), "--seconds", "0.05", *extra])
    profile = None
    if out.exists():
        json_out = out.suffix == ".json"
        profile = DeviceProfile.from_json(out.read_text()) if json_out else load_profile_file(out)
    return Run(code=code, stderr=err.getvalue(), profile=profile)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """One run on an empty cache (building the artifacts is the slow part: once)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEETLEARN_CACHE_DIR", str(cache))
        run = profile_command(cache / "p.toml")
    return cache, run


def test_a_fresh_machine_gets_real_step_times(fresh: tuple[Path, Run]) -> None:
    cache, run = fresh
    assert run.code == 0
    assert run.profile is not None
    steps = dict(run.profile.measured_step_ms)
    assert set(steps) == set(MODELS)
    assert all(ms > 0 for ms in steps.values())
    assert run.profile.measured_batch_size == 32
    assert "built reference artifacts" in run.stderr
    for name in MODELS:
        assert (cache / "reference-artifacts" / name / "artifacts.json").is_file()


def test_cached_artifacts_are_reused(
    fresh: tuple[Path, Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _ = fresh
    monkeypatch.setenv("FLEETLEARN_CACHE_DIR", str(cache))
    run = profile_command(tmp_path / "again.json")
    assert run.code == 0 and "built" not in run.stderr
    assert run.profile is not None and set(dict(run.profile.measured_step_ms)) == set(MODELS)


def test_without_the_cloud_extra_it_measures_what_is_cached(
    fresh: tuple[Path, Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _ = fresh
    device_cache = tmp_path / "device-cache"
    shutil.copytree(cache / "reference-artifacts" / "mlp",
                    device_cache / "reference-artifacts" / "mlp")
    monkeypatch.setenv("FLEETLEARN_CACHE_DIR", str(device_cache))
    monkeypatch.setattr(_probe, "cloud_extra_installed", lambda: False)
    run = profile_command(tmp_path / "device.toml")
    assert run.code == 0
    assert run.profile is not None and set(dict(run.profile.measured_step_ms)) == {"mlp"}
    assert "cloud extra is not installed" in run.stderr
    assert "cnn, mlp-xl" in run.stderr and "cached reference models only (mlp)" in run.stderr
    assert not (device_cache / "reference-artifacts" / "cnn").exists()


def test_no_build_and_catalogue_build_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETLEARN_CACHE_DIR", str(tmp_path))
    run = profile_command(tmp_path / "bare.toml", "--no-build")
    assert run.code == 0 and run.profile is not None
    assert run.profile.measured_step_ms == ()
    assert "--no-build" in run.stderr
    assert main(["profile", "--catalogue"]) == 0
    assert "pi4" in capsys.readouterr().out
    assert not (tmp_path / "reference-artifacts").exists()


def test_cached_onnxruntime_training_artifacts_are_rebuilt(
    fresh: tuple[Path, Run], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An older fleetlearn cached onnxruntime-training artifacts (format 1), which plain
    # onnxruntime cannot run: the probe rebuilds them as portable ones.
    import json

    cache, _ = fresh
    old = tmp_path / "old-cache"
    shutil.copytree(cache / "reference-artifacts", old / "reference-artifacts")
    manifest = old / "reference-artifacts" / "mlp" / "artifacts.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                    "format": "fleetlearn-artifacts/1"}))
    monkeypatch.setenv("FLEETLEARN_CACHE_DIR", str(old))
    run = profile_command(tmp_path / "again.json")
    assert run.code == 0 and "built reference artifacts for mlp" in run.stderr
    assert json.loads(manifest.read_text())["format"] == "fleetlearn-artifacts/2"
