"""A tree on this machine: a cloud aggregator, edges, devices, one Mosquitto per site.

``LocalTree`` starts a Mosquitto for the cloud and one for each edge site (on free
ports), the cloud ``Aggregator`` on the cloud's broker (fleet ``cloud``), one
``EdgeAggregator`` per site (children on the site's broker as fleet ``site-<i>``, its
device side on the cloud's broker as device ``edge-<i>``), and real device agents
(``FailoverAgent``: the site's edge first, the other edges as candidates) training the
reference task on MNIST-1D with ONNX Runtime. ``flat=True`` attaches the same devices
straight to the cloud instead: the baseline a tree is measured against.

Every part speaks MQTT to the others; nothing is shared in memory but the process
(and, for speed, one ONNX Runtime session pool for the devices). ``kill_edge`` is a site
failure: the edge aggregator dies as in a crash and its broker is killed;
``restart_edge`` brings the edge back from its stores. ``edge_class`` may be a subclass
of ``EdgeAggregator`` (edges of your own). ``TreeSpec.faults`` makes some devices
Byzantine, the same devices and attacks a flat fleet of that seed has
(``FaultSpec.is_byzantine``, ``Byzantine.hooks``).

``TreeSpec.tier_models`` (``device:mlp,edge:cnn,cloud:cnn-wide``) makes the tree
agglomerative (``_agglo``): devices train the device model, each edge exchanges the edge
model with the cloud and distils between the two on the bridge inputs, and the cloud
(``AgglomerativeRounds``) keeps the cloud model. Flat, the devices train the device
model straight with the cloud (flat FedAvg of the device-sized model).

Why this module is a little over 400 lines: it is the one place that builds a whole
tree (brokers, keys, the cloud, the edges, the devices and their faults) in the order
start-up needs; split, each part would need the others' half-built state.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from broker_bridge import Channel, Enrolment, MosquittoProcess, MqttTransport
from cloud_aggregator import Aggregator, AggregatorConfig, RoundMetrics
from device_profiles import ConfigError, DeviceProfile
from edge_runtime import (
    DeviceKey,
    DeviceStatus,
    Emulation,
    FailoverAgent,
    LocalData,
    ParentLink,
    TrainerPool,
    load_mnist1d,
    partition_dirichlet,
    state_key_path,
)
from edge_runtime._faults import Byzantine, FaultSpec
from fleetlearn._agglo import DistillSettings, TierLink, TierModel, TierModels, bridge_inputs
from fleetlearn._agglo_cloud import AgglomerativeRounds
from fleetlearn._edge import EdgeAggregator
from fleetlearn._tier_emulation import DeviceTierEmulation, EdgeEmulation, TierLog

log = logging.getLogger(__name__)

CLOUD_FLEET = "cloud"


def site_fleet(index: int) -> str:
    return f"site-{index}"


@dataclass(frozen=True, kw_only=True)
class TreeSpec:
    """The shape of a local tree and how each tier trains."""

    edges: int = 3
    devices_per_edge: int = 10
    cloud_rounds: int = 5
    rounds_per_task: int = 1
    """Child rounds an edge runs for each task of the cloud."""
    model: str = "mlp"
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    edge_devices_per_round: int | None = None
    """Children trained per edge round (default: all of a site's devices)."""
    cloud_quorum: int | None = None
    """Edges a cloud round needs (default: all but one, at least one)."""
    cloud_deadline_s: float = 120.0
    edge_deadline_s: float = 30.0
    codec: str = "fp32"
    """Uplink codec of both tiers."""
    server_opt: str = "fedavg"
    failover_after_s: float = 2.0
    seed: int = 0
    partition_seed: int = 0
    alpha: float = 0.5
    num_samples: int = 10_000
    """MNIST-1D samples generated (80% train over the devices, 20% held out)."""
    cloud_reputation_floor: float | None = 0.3
    """The cloud's ``reputation_floor`` (None: reputation recorded, never used)."""
    tier_models: str | None = None
    """``device:M,edge:M,cloud:M`` (default: ``model`` everywhere)."""
    distill: DistillSettings = field(default_factory=DistillSettings)
    cloud_distill: DistillSettings | None = None
    """The cloud's distillation, when not ``distill`` (e.g. another feedback)."""
    bridge_samples: int = 2_000
    clock: Literal["real", "virtual"] = "real"
    """The aggregators' clock: ``virtual`` judges deadlines in the emulated seconds the
    devices' and edges' profiles imply (``device_profiles``, ``edge_profile``)."""
    safety_timeout_s: float = 600.0
    """Virtual clock: wall seconds after which a round stops waiting."""
    device_profiles: tuple[DeviceProfile, ...] | None = None
    """One profile per device, in device order: each reports the cost model's time for
    its tasks (``UpdateMeta.emulated_s``) as a simulated fleet's devices do. None: no
    emulation."""
    edge_profile: DeviceProfile | None = None
    """The edges' profile: an edge reports its job's child rounds plus its own transfer
    and encode time on it (``EdgeEmulation``). None: no emulation."""
    faults: FaultSpec = field(default_factory=FaultSpec)
    """Byzantine devices (``byzantine_*``), drawn from ``seed`` as a flat fleet draws
    them; a tree injects no crashing or slow devices (refused)."""

    def tiers(self) -> TierModels:
        """The model of each tier (``tier_models`` checked)."""
        if self.tier_models is None:
            return TierModels(device=self.model, edge=self.model, cloud=self.model)
        return TierModels.parse(self.tier_models, default=self.model)


def check_tree_faults(faults: FaultSpec) -> None:
    """A tree emulates Byzantine devices, not crashing or slow ones (its edge sites fail
    instead: ``kill_edge``, ``edge_crash_fraction``)."""
    if faults.crash_fraction > 0 or faults.slow_fraction > 0:
        raise ConfigError("faults: a tree simulation injects Byzantine devices "
                          "(byzantine_*), not crashing or slow ones (edge sites fail "
                          "with edge_crash_fraction)")


def _device_id(d: int) -> str:
    return f"dev-{d:03d}"


class LocalTree:
    """The tree of ``spec`` under ``workdir`` (see the module doc)."""

    def __init__(self, spec: TreeSpec, *, workdir: str | Path | None = None,
                 flat: bool = False, cache_dir: str | Path | None = None,
                 artifacts_dir: str | Path | None = None,
                 edge_class: type[EdgeAggregator] = EdgeAggregator) -> None:
        self.spec = spec
        self.edge_class = edge_class
        self.flat = flat
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fleetlearn-tree-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir = Path(artifacts_dir or self.workdir / "artifacts")
        data = load_mnist1d(cache_dir=cache_dir, num_samples=spec.num_samples)
        n = spec.edges * spec.devices_per_edge
        self.parts = partition_dirichlet(data.y_train, n, alpha=spec.alpha,
                                         seed=spec.partition_seed)
        self.data = data
        np.savez(self.workdir / "test.npz", x=data.x_test, y=data.y_test)
        self.cloud_broker = MosquittoProcess()
        self.site_brokers: list[MosquittoProcess] = []
        self.edges: list[EdgeAggregator | None] = []
        self.devices: list[FailoverAgent] = []
        self.cloud: Aggregator | None = None
        self._cloud_thread: threading.Thread | None = None
        self._trainers = TrainerPool(sessions_per_model=2)
        self.tier_models = spec.tiers()
        if spec.device_profiles is not None and len(spec.device_profiles) != n:
            raise ConfigError(f"device_profiles: {len(spec.device_profiles)} profiles for "
                              f"{n} devices")
        check_tree_faults(spec.faults)
        self.byzantine = [_device_id(d) for d in range(n)
                          if spec.faults.is_byzantine(spec.seed, _device_id(d))]
        """The devices that attack, as ``spec.faults`` draws them."""
        self.device_log = TierLog()
        self.edge_log = TierLog()
        """Every emulated task of the devices and of the edges (``_tier_emulation``)."""
        self.agglomerative = not flat and not self.tier_models.uniform
        self.cloud_strategy: AgglomerativeRounds | None = None
        self.bridge = (bridge_inputs(samples=spec.bridge_samples, cache_dir=cache_dir)
                       if self.agglomerative else None)
        # Every update is signed: each device and each edge has its key (in its state
        # folder, as an agent keeps it); the cloud enrols the edges' keys (the devices'
        # when flat) and every edge all the devices' keys, since devices may move.
        n = spec.edges * spec.devices_per_edge
        self.device_keys = [DeviceKey.load_or_create(state_key_path(self._device_dir(d)))
                            for d in range(n)]
        self.edge_keys = [DeviceKey.load_or_create(state_key_path(
            self.workdir / f"edge-{i}" / "device")) for i in range(spec.edges)]
        self.cloud_enrolment = Enrolment(fleet=CLOUD_FLEET)
        for i, key in enumerate(self.device_keys if flat else self.edge_keys):
            self.cloud_enrolment.enrol(f"dev-{i:03d}" if flat else f"edge-{i}", key.public_key)
        self.edge_enrolments = [Enrolment(fleet=site_fleet(i)) for i in range(spec.edges)]
        for enrolment in self.edge_enrolments:
            for d, key in enumerate(self.device_keys):
                enrolment.enrol(_device_id(d), key.public_key)

    # -- building -----------------------------------------------------------------------

    def cloud_config(self) -> AggregatorConfig:
        """The cloud's rounds. Flat: every cloud round trains as many devices as a tree's
        cloud round does through its edges, and there are ``rounds_per_task`` times as
        many of them: equal device compute."""
        s = self.spec
        per_edge = s.edge_devices_per_round or s.devices_per_edge
        if self.flat:
            per_round, rounds = s.edges * per_edge, s.cloud_rounds * s.rounds_per_task
            quorum = s.cloud_quorum if s.cloud_quorum is not None else max(1, per_round // 2)
            epochs = s.local_epochs
        else:
            per_round, rounds = s.edges, s.cloud_rounds
            quorum = s.cloud_quorum if s.cloud_quorum is not None else max(1, per_round - 1)
            # An edge's update weighs its children's samples over its rounds: the
            # cloud's weight bound (epochs x announced samples) must allow them.
            epochs = s.local_epochs * s.rounds_per_task
        tiers = self.tier_models
        return AggregatorConfig(
            fleet=CLOUD_FLEET, model=tiers.device if self.flat else tiers.edge,
            rounds=rounds, devices_per_round=per_round,
            over_selection=1.0, quorum=quorum, min_devices=quorum,
            deadline_s=s.cloud_deadline_s, state_dir=self.workdir / "cloud",
            eval_data=self.workdir / "test.npz", codec=s.codec, server_opt=s.server_opt,
            local_epochs=epochs, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
            store_synchronous="NORMAL", reputation_floor=s.cloud_reputation_floor,
            clock=s.clock, safety_timeout_s=s.safety_timeout_s)

    def edge_config(self, index: int) -> AggregatorConfig:
        """An edge's rounds: they start once ``edge_devices_per_round`` children (default:
        the site's devices) are there, and train every child there is, up to the whole
        fleet (devices that failed over from another site included)."""
        s = self.spec
        needed = s.edge_devices_per_round or s.devices_per_edge
        return AggregatorConfig(
            fleet=site_fleet(index), model=self.tier_models.device,
            devices_per_round=s.edge_devices_per_round or s.devices_per_edge * s.edges,
            over_selection=1.0, quorum=max(1, needed // 2), min_devices=needed,
            deadline_s=s.edge_deadline_s, codec=s.codec, server_opt="fedavg",
            local_epochs=s.local_epochs, batch_size=s.batch_size, lr=s.lr,
            seed=s.seed + index + 1, store_synchronous="NORMAL", clock=s.clock,
            safety_timeout_s=s.safety_timeout_s)

    def start(self) -> None:
        s = self.spec
        self.cloud_broker.start()
        parts: dict[str, Any] = {}
        if self.agglomerative:
            assert self.bridge is not None
            tiers = self.tier_models
            settings = self.spec.cloud_distill or self.spec.distill
            self.cloud_strategy = AgglomerativeRounds(
                own=self._tier_model(tiers.cloud, settings),
                child=self._tier_model(tiers.edge, settings),
                bridge=self.bridge, eval_x=self.data.x_test, eval_y=self.data.y_test)
            parts["strategy"] = self.cloud_strategy
        cloud_model = self.cloud_config().model
        self.cloud = Aggregator(
            config=self.cloud_config(),
            channel=Channel(transport=_transport(self.cloud_broker.url, "aggregator"),
                            fleet=CLOUD_FLEET),
            artifacts_dir=self._artifacts(cloud_model), enrolment=self.cloud_enrolment,
            **parts)
        self.cloud.start()
        if not self.flat:
            for _i in range(s.edges):
                broker = MosquittoProcess()
                broker.start()
                self.site_brokers.append(broker)
            for i in range(s.edges):
                self.edges.append(self._make_edge(i))
                edge = self.edges[-1]
                assert edge is not None
                edge.start()
        for d in range(s.edges * s.devices_per_edge):
            self.devices.append(self._make_device(d))
            self.devices[-1].start()

    def _artifacts(self, model: str) -> Path:
        """Each tier's training artifacts: one folder per model."""
        return (self.artifacts_dir / model if self.agglomerative else self.artifacts_dir)

    def _tier_model(self, model: str, settings: DistillSettings | None = None) -> TierModel:
        """A tier model of its own (each aggregator distils in its own thread)."""
        settings = settings or self.spec.distill
        return TierModel(model, self.workdir / "distil" / f"{model}-t{settings.temperature:g}",
                         settings=settings, seed=self.spec.seed)

    def _tier_link(self) -> TierLink | None:
        if not self.agglomerative:
            return None
        assert self.bridge is not None
        tiers = self.tier_models
        return TierLink(own=self._tier_model(tiers.edge), child=self._tier_model(tiers.device),
                        bridge=self.bridge)

    def _make_edge(self, i: int) -> EdgeAggregator:
        return self.edge_class(
            config=self.edge_config(i), broker=self.site_brokers[i].url,
            device_id=f"edge-{i}", parents=[ParentLink(broker=self.cloud_broker.url,
                                                       fleet=CLOUD_FLEET, name="cloud")],
            state_dir=self.workdir / f"edge-{i}", rounds_per_task=self.spec.rounds_per_task,
            failover_after_s=self.spec.failover_after_s,
            artifacts_dir=self._artifacts(self.tier_models.device), key=self.edge_keys[i],
            enrolment=self.edge_enrolments[i], tier=self._tier_link(),
            emulation=self._edge_emulation(i))

    def _edge_emulation(self, i: int) -> Callable[[EdgeAggregator], Emulation] | None:
        profile = self.spec.edge_profile
        if profile is None:
            return None
        log_ = self.edge_log
        return lambda edge: EdgeEmulation(profile=profile, rounds_s=edge.job_emulated_s,
                                          who=f"edge-{i}", log=log_)

    def parents_of(self, device: int) -> list[ParentLink]:
        if self.flat:
            return [ParentLink(broker=self.cloud_broker.url, fleet=CLOUD_FLEET, name="cloud")]
        home = device // self.spec.devices_per_edge
        order = [home] + [i for i in range(self.spec.edges) if i != home]
        return [ParentLink(broker=self.site_brokers[i].url, fleet=site_fleet(i),
                           name=f"edge-{i}") for i in order]

    def _make_device(self, d: int) -> FailoverAgent:
        idx = self.parts[d]
        hooks: dict[str, Any] = ({"hooks": Byzantine(self.spec.faults).hooks()}
                                 if _device_id(d) in self.byzantine else {})
        return FailoverAgent(
            device_id=_device_id(d), parents=self.parents_of(d), **hooks,
            state_dir=self._device_dir(d), failover_after_s=self.spec.failover_after_s,
            data=LocalData(x=self.data.x_train[idx], y=self.data.y_train[idx]),
            status_probe=DeviceStatus, trainers=self._trainers, key=self.device_keys[d],
            **self._device_emulation(d))

    def _device_emulation(self, d: int) -> dict[str, Any]:
        """A device's profile and emulation, as a simulated fleet's devices have them."""
        profiles = self.spec.device_profiles
        if profiles is None:
            return {}
        return {"profile": profiles[d], "emulation": DeviceTierEmulation(
            profile=profiles[d], model=self.tier_models.device, who=_device_id(d),
            log=self.device_log)}

    def _device_dir(self, d: int) -> Path:
        return self.workdir / "devices" / _device_id(d)

    # -- running ------------------------------------------------------------------------

    def wait_ready(self, *, timeout_s: float = 60.0) -> bool:
        """Wait until the cloud sees all its children online (so the first round does
        not start with a part of the tree)."""
        assert self.cloud is not None
        cloud = self.cloud
        want = self.spec.edges * (self.spec.devices_per_edge if self.flat else 1)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with cloud._lock:
                ready = len(cloud.registry.ready())
            if ready >= want:
                return True
            time.sleep(0.1)
        return False

    def run(self, *, timeout_s: float) -> list[RoundMetrics]:
        """Run the cloud until its rounds are done (or ``timeout_s``), in this thread."""
        assert self.cloud is not None
        return self.cloud.run(timeout_s=timeout_s)

    def run_in_background(self, *, timeout_s: float) -> threading.Thread:
        assert self.cloud is not None
        self._cloud_thread = threading.Thread(target=self.cloud.run,
                                              kwargs={"timeout_s": timeout_s}, daemon=True)
        self._cloud_thread.start()
        return self._cloud_thread

    def kill_edge(self, i: int) -> None:
        """A site failure: the edge crashes, its broker is killed."""
        edge = self.edges[i]
        if edge is not None:
            edge.abort()
            self.edges[i] = None
        self.site_brokers[i].kill()

    def restart_edge(self, i: int, *, broker: bool = True) -> EdgeAggregator:
        """The site comes back: its broker (same port, same data) and its edge, which
        resumes from its stores."""
        if broker:
            self.site_brokers[i].restart()
        edge = self._make_edge(i)
        self.edges[i] = edge
        edge.start()
        return edge

    def close(self) -> None:
        for device in self.devices:
            try:
                device.stop()
            except Exception:
                log.exception("stopping a device failed")
        for edge in self.edges:
            if edge is not None:
                try:
                    edge.stop()
                except Exception:
                    log.exception("stopping an edge failed")
        if self.cloud is not None:
            self.cloud.stop()
            if self._cloud_thread is not None:
                self._cloud_thread.join(timeout=30)
            self.cloud.close()
            self.cloud.channel.transport.close()
        for broker in [*self.site_brokers, self.cloud_broker]:
            try:
                broker.close()
            except Exception:
                log.exception("stopping a broker failed")
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _transport(url: str, client_id: str, **kw: Any) -> MqttTransport:
    return MqttTransport(url=url, client_id=client_id, clean_session=False,
                         backoff_min_s=0.1, backoff_max_s=1.0, **kw)
