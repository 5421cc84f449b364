"""Running the onnxruntime-training backend from the tests.

That backend's wheel cannot share a virtual environment with plain onnxruntime (both
own the ``onnxruntime`` package), so ``scripts/test.sh`` keeps it in
``.venv-ort-training`` and the tests drive it through ``python -m`` subprocesses of
this module (``FLEETLEARN_ORT_TRAINING_PYTHON`` names that interpreter). Where the
wheel does not exist (aarch64, Python >= 3.13) the comparison tests skip and say so;
under ``scripts/test.sh`` on a machine that has it (``FLEETLEARN_REQUIRE_ORT_TRAINING``)
a missing environment fails instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def python() -> Path:
    """The interpreter of the onnxruntime-training environment (skips or fails without)."""
    import pytest

    named = os.environ.get("FLEETLEARN_ORT_TRAINING_PYTHON")
    path = Path(named) if named else REPO / ".venv-ort-training" / "bin" / "python"
    if path.exists():
        return path
    why = (f"no onnxruntime-training environment at {path} (scripts/test.sh makes it where "
           "the wheel exists: x86_64, Python <= 3.12)")
    if os.environ.get("FLEETLEARN_REQUIRE_ORT_TRAINING") == "1":
        pytest.fail(why)
    pytest.skip(why)


def run(command: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Run one command of ``main`` in the onnxruntime-training environment."""
    result = subprocess.run(
        [str(python()), "-m", "tests.ort_training", json.dumps(command)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"onnxruntime-training worker failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main(argv: list[str]) -> int:
    """Commands: ``build`` (artifacts of a reference model) and ``train`` (from given
    weights on given data, then save the weights)."""
    import numpy as np

    command = json.loads(argv[0])
    if command["do"] == "build":
        from cloud_aggregator._artifacts import build_artifacts
        from cloud_aggregator._models import build_reference_model

        info = build_artifacts(build_reference_model(command["model"], 0), command["out"],
                               backend="ort-training", optimizer=command.get("optimizer", "sgd"))
        print(json.dumps({"content_hash": info.content_hash}))
        return 0
    if command["do"] == "train":
        import onnxruntime

        from edge_runtime._training import open_trainer

        trainer = open_trainer(command["artifacts"])
        data = np.load(command["data"])
        trainer.set_parameters(np.load(command["weights"]))
        result = trainer.train(data["x"], data["y"], epochs=command["epochs"],
                               batch_size=command["batch_size"], lr=command["lr"],
                               seed=command["seed"], max_steps=command.get("max_steps"))
        np.save(command["out"], trainer.get_parameters())
        print(json.dumps({"backend": trainer.backend, "steps": result.steps,
                          "mean_loss": result.mean_loss, "ort": onnxruntime.__version__}))
        return 0
    raise SystemExit(f"unknown command {command['do']!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
