"""The fleet simulator: many real device agents in one process.

Every virtual device is a production ``Agent`` with its own MQTT session (client id,
will, persistent session), its own data shard and state folder, training with real
ONNX Runtime. What they share is what one process can share without changing the
code path: a few ``NetworkLoop`` threads drive all sockets, a small executor runs the
training jobs, a ``TrainerPool`` lends ONNX Runtime sessions, and the artifact and
model caches are common (the broadcast model is decoded once, not once per device).

Devices behave like their profiles: an ``Emulation`` reports the time the profile
implies (download, train, encode, upload) in each update, and optionally waits it
out in real time. Faults are injected deterministically from the seed:

- a *crash* kills a device after it trained, before it uploads (its socket dies, the
  broker publishes its will); it restarts from its state folder some rounds later,
  as the real agent would after a reboot;
- *slow* devices take ``slow_factor`` times what their profile says;
- *Byzantine* devices send their true update sign-flipped and scaled (``flip``),
  stretched to a huge norm (``norm``), or claim an absurd sample count (``samples``);
- *availability* follows each profile's pattern (always on, diurnal, charging-only,
  flaky) in emulated time, starting at ``start_hour``.

The faults live in ``_faults`` and reach the agents only through public parts: a crash
is a ``transform_update`` hook that calls ``Agent.abort()``, a Byzantine device's
tampering is its ``transform_update`` and ``transform_hello`` hooks, a slow device an
``Emulation`` subclass.

Each virtual device has its own Ed25519 key (kept in memory for the run: a rebooted
device signs with the key it had); ``Fleet.enrolment`` holds their public keys, which the
simulator hands to its aggregator, so a simulated fleet runs with signatures checked, as
a real one does. A Byzantine device signs its tampered update with its own key: that is
its legitimate identity, and the screens and robust rules deal with what it says.

Fleet changes happen only between rounds (``advance``); the simulator then waits until
the aggregator's view of who is online matches, so the same seed gives the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from broker_bridge import Channel, Enrolment, NetworkLoop
from device_profiles import DEFAULT_MIX, ConfigError, DeviceProfile, profile_mix
from edge_runtime._agent import Agent, make_agent_transport
from edge_runtime._artifact_cache import ArtifactCache, ModelCache
from edge_runtime._data import LocalData
from edge_runtime._datasets import partition_dirichlet, partition_iid, partition_shards
from edge_runtime._eligibility import DeviceStatus
from edge_runtime._faults import Byzantine, FaultSpec, SlowEmulation, draw
from edge_runtime._hooks import AgentHooks, UpdateDraft
from edge_runtime._identity import DeviceKey
from edge_runtime._settings import AgentSettings
from edge_runtime._trainer_pool import TrainerPool

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FleetConfig:
    fleet: str = "sim"
    devices: int = 100
    profile_mix: str = DEFAULT_MIX
    partition: str = "dirichlet:0.5"
    seed: int = 0
    model: str | None = None
    """Reference model name (exact FLOPs in the cost model); None: 6 x parameters."""
    network_loops: int = 2
    training_workers: int = 2
    time_scale: float | None = None
    """Real-time mode: wait ``emulated_s * time_scale`` before uploading; None: virtual."""
    availability: bool = True
    start_hour: float = 23.5
    faults: FaultSpec = field(default_factory=FaultSpec)
    holdout_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError("a fleet needs at least one device")
        if self.network_loops < 1 or self.training_workers < 1:
            raise ConfigError("network_loops and training_workers must be >= 1")
        parse_partition(self.partition)


def parse_partition(spec: str) -> tuple[str, float]:
    """``iid``, ``dirichlet:ALPHA`` or ``shards:N``."""
    name, _, arg = spec.partition(":")
    try:
        if name == "iid" and not arg:
            return ("iid", 0.0)
        if name == "dirichlet":
            alpha = float(arg or 0.5)
            if alpha > 0 and math.isfinite(alpha):
                return ("dirichlet", alpha)
        if name == "shards":
            n = int(arg or 2)
            if n >= 1:
                return ("shards", float(n))
    except ValueError:
        pass
    raise ConfigError(f"partition {spec!r}: use iid, dirichlet:ALPHA (e.g. 0.5) or shards:N")


def partition(labels: np.ndarray, devices: int, spec: str, *, seed: int) -> list[np.ndarray]:
    kind, arg = parse_partition(spec)
    if kind == "iid":
        return partition_iid(len(labels), devices, seed=seed)
    if kind == "dirichlet":
        return partition_dirichlet(labels, devices, alpha=arg, seed=seed)
    return partition_shards(labels, devices, shards_per_device=int(arg), seed=seed)


@dataclass
class DeviceRecord:
    """The simulator's view of one virtual device (agents come and go; this stays)."""

    device_id: str
    profile: DeviceProfile
    data: LocalData
    state_dir: Path
    slow: bool
    byzantine: bool = False
    agent: Agent | None = None
    crashed_at_round: int | None = None
    tasks: int = 0
    completed: int = 0
    crashes: int = 0
    _seen_tasks: int = 0
    _seen_acked: int = 0

    @property
    def online(self) -> bool:
        return self.agent is not None


class Fleet:
    """Builds, connects and drives the virtual devices of one simulated fleet."""

    def __init__(
        self,
        *,
        config: FleetConfig,
        broker_url: str,
        x: np.ndarray,
        y: np.ndarray,
        state_root: Path,
        password_for: Callable[[str], str | None] | None = None,
        settings: AgentSettings | None = None,
    ) -> None:
        self.config = config
        self.broker_url = broker_url
        self.state_root = Path(state_root)
        self._password_for = password_for or (lambda _d: None)
        self._settings = settings or AgentSettings(ack_timeout_s=10.0, eligibility_interval_s=3600,
                                                   status_interval_s=None)
        self._loops = [NetworkLoop(name=f"fleet-net-{i}") for i in range(config.network_loops)]
        self._executor = ThreadPoolExecutor(max_workers=config.training_workers,
                                            thread_name_prefix="fleet-train")
        self._trainers = TrainerPool(sessions_per_model=config.training_workers,
                                     intra_op_threads=1)
        self._artifacts = ArtifactCache(root=self.state_root / "artifact-cache")
        self._models = ModelCache(keep=3)
        self._lock = threading.Lock()
        self.round_index = 0
        self.emulated_now = 0.0
        profiles = profile_mix(config.profile_mix, config.devices, seed=config.seed)
        shards = partition(y, config.devices, config.partition, seed=config.seed)
        self.devices: list[DeviceRecord] = []
        for i, (profile, idx, device_id) in enumerate(
                zip(profiles, shards, device_ids(config.devices), strict=True)):
            data = LocalData.split(x[idx], y[idx], holdout_fraction=config.holdout_fraction,
                                   seed=config.seed + i)
            self.devices.append(DeviceRecord(
                device_id=device_id, profile=profile, data=data,
                state_dir=self.state_root / "devices" / device_id,
                slow=config.faults.is_slow(config.seed, device_id),
                byzantine=config.faults.is_byzantine(config.seed, device_id),
            ))
        self._keys = {d.device_id: DeviceKey.generate() for d in self.devices}
        self.enrolment = Enrolment(fleet=config.fleet)
        """Every virtual device's public key, for the aggregator (``Aggregator(enrolment=)``):
        the simulator enrols its own devices, as an operator would."""
        for device_id, key in self._keys.items():
            self.enrolment.enrol(device_id, key.public_key)

    # -- life cycle ------------------------------------------------------------------

    def pin_ledger_key(self, public_key: str) -> None:
        """Agents started after this check the training ledger's inclusion proofs against
        ``public_key`` (the aggregator's, hex)."""
        self._settings = dataclasses.replace(self._settings, ledger_public_key=public_key)

    def start(self, *, progress: Callable[[int, int], None] | None = None) -> None:
        """Connect every device that should be online now."""
        want = [d for d in self.devices if self._should_be_online(d)]
        for n, d in enumerate(want, 1):
            self._boot(d)
            if progress is not None and (n % 100 == 0 or n == len(want)):
                progress(n, len(want))

    def stop(self) -> None:
        for d in self.devices:
            self._shutdown(d)
        self._executor.shutdown(wait=True, cancel_futures=True)
        for loop in self._loops:
            loop.close()

    def remove_state(self) -> None:
        shutil.rmtree(self.state_root / "devices", ignore_errors=True)

    # -- between rounds --------------------------------------------------------------

    def advance(self, *, round_index: int, emulated_now: float) -> tuple[list[str], list[str]]:
        """Apply reboots and availability for the round about to open.

        Returns (devices that came online, devices that went offline).
        """
        self.round_index = round_index
        self.emulated_now = emulated_now
        came, went = [], []
        for d in self.devices:
            self._collect(d)
            should = self._should_be_online(d)
            if should and not d.online:
                if d.crashed_at_round is not None:
                    d.crashed_at_round = None
                self._boot(d)
                came.append(d.device_id)
            elif not should and d.online:
                self._shutdown(d)
                went.append(d.device_id)
        return came, went

    def poll(self) -> None:
        """Periodic agent work (re-sends of unacknowledged updates)."""
        now = time.monotonic()
        for d in self.devices:
            agent = d.agent
            if agent is not None:
                try:
                    agent.poll(now)
                except Exception:
                    log.exception("poll of %s failed", d.device_id)

    def online_ids(self) -> list[str]:
        return [d.device_id for d in self.devices if d.online]

    def participation(self) -> dict[str, dict[str, int]]:
        """Tasks, completions, drop-outs and crashes per profile."""
        out: dict[str, dict[str, int]] = {}
        for d in self.devices:
            self._collect(d)
            row = out.setdefault(d.profile.name, {"devices": 0, "tasks": 0, "completed": 0,
                                                  "dropped": 0, "crashes": 0})
            row["devices"] += 1
            row["tasks"] += d.tasks
            row["completed"] += d.completed
            row["crashes"] += d.crashes
            row["dropped"] += max(0, d.tasks - d.completed)
        return out

    # -- internals ---------------------------------------------------------------------

    def _should_be_online(self, d: DeviceRecord) -> bool:
        if d.crashed_at_round is not None and (
            self.round_index < d.crashed_at_round + self.config.faults.restart_after_rounds
        ):
            return False
        if not self.config.availability:
            return True
        t = self.config.start_hour * 3600.0 + self.emulated_now
        seed = zlib.crc32(f"{self.config.seed}/{d.device_id}".encode())
        return bool(d.profile.availability.is_available(t, seed=seed))

    def _boot(self, d: DeviceRecord) -> None:
        loop = self._loops[int(d.device_id.rsplit("-", 1)[-1]) % len(self._loops)]
        transport = make_agent_transport(
            self.broker_url, fleet=self.config.fleet, device_id=d.device_id,
            password=self._password_for(d.device_id), loop=loop,
            backoff_min_s=0.2, backoff_max_s=5.0, max_queued=0,
        )
        faults = self.config.faults
        emulation = SlowEmulation(
            profile=d.profile, model=self.config.model, time_scale=self.config.time_scale,
            slow_factor=faults.slow_factor if d.slow else 1.0,
        )
        crash = self._crash_hook(d) if faults.crash_fraction > 0 else None
        hooks = (Byzantine(faults).hooks(crash) if d.byzantine
                 else AgentHooks(transform_update=crash))
        agent = Agent(
            device_id=d.device_id, channel=Channel(transport=transport, fleet=self.config.fleet),
            data=d.data, state_dir=d.state_dir, profile=d.profile,
            status_probe=_plugged_in, executor=self._executor, trainers=self._trainers,
            artifacts=self._artifacts, models=self._models, emulation=emulation,
            settings=self._settings, owns_transport=True, hooks=hooks,
            key=self._keys[d.device_id],  # its key survives its crashes, as on its disk
            lock_state=False,  # the fleet owns its devices' folders (and a lock each would
            # cost a descriptor per agent, beside its connection)
        )
        d.agent = agent
        d._seen_tasks = d._seen_acked = 0
        agent.start(timer=False)

    def _crash_hook(self, d: DeviceRecord) -> Callable[[UpdateDraft], UpdateDraft]:
        """Crash after training, before uploading: the device dies as in a power cut (its
        socket drops without DISCONNECT, so the broker publishes its will) and reboots from
        its state folder ``restart_after_rounds`` rounds later."""
        fraction = self.config.faults.crash_fraction

        def maybe_crash(draft: UpdateDraft) -> UpdateDraft:
            round_ = draft.task.round
            if draw(self.config.seed, "crash", d.device_id, round_) >= fraction:
                return draft
            log.info("%s crashes in round %d (injected)", d.device_id, round_)
            self._shutdown(d, crashed_in=round_)  # the agent writes and sends nothing more
            return draft

        return maybe_crash

    def _shutdown(self, d: DeviceRecord, *, crashed_in: int | None = None) -> None:
        """Take the device offline: its agent stops (and says ``offline``), or, when it
        crashed in round ``crashed_in``, is aborted as in a power cut (the broker
        publishes its will) and the crash is counted with it."""
        with self._lock:
            if crashed_in is not None:
                d.crashes += 1
                d.crashed_at_round = crashed_in
            self._collect(d)
            agent, d.agent = d.agent, None
        if agent is None:
            return
        if crashed_in is None:
            agent.stop(timeout=5.0)
        else:
            agent.abort()

    def _collect(self, d: DeviceRecord) -> None:
        """Fold the running agent's counters into the device record."""
        agent = d.agent
        if agent is None:
            return
        s = agent.stats
        d.tasks += s.tasks - d._seen_tasks
        d.completed += s.acked - d._seen_acked
        d._seen_tasks, d._seen_acked = s.tasks, s.acked


def _plugged_in() -> DeviceStatus:
    """Virtual devices are eligible (availability is simulated by connecting them)."""
    return DeviceStatus()


def wait_until(cond: Callable[[], bool], *, timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def device_ids(devices: int) -> list[str]:
    """The ids of a simulated fleet: ``dev-`` and the index, zero-padded to the width of
    the largest (100 devices: dev-00 ... dev-99), in fleet ``sim``."""
    width = len(str(devices - 1))
    return [f"dev-{i:0{width}d}" for i in range(devices)]


def summarise_ids(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


