"""Shared fixtures: a real Mosquitto per test, started on a free port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_bridge import MosquittoProcess
from broker_bridge._brokers import find_mosquitto

# Keep ONNX Runtime and BLAS from taking both cores in every test process.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def mosquitto() -> Iterator[MosquittoProcess]:
    """A private mosquitto (anonymous, persistence on) that tests may stop and restart."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; scripts/test.sh installs it (apt-get)")
    broker = MosquittoProcess().start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training artifacts of the reference ``mlp``, built once per test session."""
    from cloud_aggregator._artifacts import build_artifacts
    from cloud_aggregator._models import build_reference_model

    out = tmp_path_factory.mktemp("mlp-artifacts")
    build_artifacts(build_reference_model("mlp", 0), out)
    return out
