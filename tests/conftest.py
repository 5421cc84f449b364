"""Shared fixtures: a real Mosquitto per test, started on a free port; the broker matrix.

``any_broker`` runs a test over each MQTT 3.1.1 broker the project promises to work
with and that Debian ships: Mosquitto (a fresh instance per test), RabbitMQ's MQTT
plugin and NATS' MQTT gateway (one private instance per test session each, started on
free ports by ``tests/brokers.py``; tests keep apart by fleet and client ids). The
RabbitMQ and NATS variants are marked ``slow``: RabbitMQ takes about ten seconds to
boot, and the default suite stays fast.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import Nats, RabbitMq

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


@pytest.fixture
def mosquittos() -> Iterator[Callable[..., MosquittoProcess]]:
    """Start private mosquittos (``mosquittos(conf_text=..., port=...)`` passes on its
    arguments); every one started is stopped at teardown, passed or failed."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; scripts/test.sh installs it (apt-get)")
    started: list[MosquittoProcess] = []

    def start(**kwargs: Any) -> MosquittoProcess:
        broker = MosquittoProcess(**kwargs)
        started.append(broker)
        return broker.start()

    try:
        yield start
    finally:
        for broker in started:
            broker.close()


def _private(kind: type[RabbitMq] | type[Nats]) -> Iterator[RabbitMq | Nats]:
    missing = kind.available()
    if missing is not None:
        pytest.fail(missing)
    broker = kind()
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMq | Nats]:
    """A private RabbitMQ (MQTT plugin) for the whole session."""
    yield from _private(RabbitMq)


@pytest.fixture(scope="session")
def nats() -> Iterator[RabbitMq | Nats]:
    """A private nats-server (JetStream, MQTT gateway) for the whole session."""
    yield from _private(Nats)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """An empty folder every user can enter, as /etc/... is (pytest's own are 0700): for
    a root-started Mosquitto, which drops to user mosquitto."""
    path = Path(tempfile.mkdtemp(prefix="fleetlearn-open-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=[
    pytest.param("mosquitto", id="mosquitto"),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.slow),
    pytest.param("nats", id="nats", marks=pytest.mark.slow),
])
def any_broker(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(broker kind, mqtt:// URL) for each broker of the matrix."""
    kind = str(request.param)
    broker = request.getfixturevalue(kind)
    return kind, broker.url


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training artifacts of the reference ``mlp``, built once per test session."""
    from cloud_aggregator._artifacts import build_artifacts
    from cloud_aggregator._models import build_reference_model

    out = tmp_path_factory.mktemp("mlp-artifacts")
    build_artifacts(build_reference_model("mlp", 0), out)
    return out


@pytest.fixture
def rig(tmp_path: Path, artifacts: Path) -> Iterator[Any]:
    """A device rig (``agent_rig.Rig``: the aggregator stand-in over MemoryTransport,
    and the agents it makes), stopped at teardown (test_agent.py has its own)."""
    from agent_rig import Rig

    r = Rig(tmp_path, artifacts)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(autouse=True)
def _aggregators_closed() -> Iterator[None]:
    """Whatever ``aggregator_rig.make`` opened is closed when the test ends, passed or
    failed (closing twice is harmless)."""
    yield
    rig = sys.modules.get("aggregator_rig")  # only tests that use it have imported it
    if rig is not None:
        rig.close_all()
