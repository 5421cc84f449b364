"""Device identity over a real Mosquitto, with real agents (ONNX Runtime training).

The broker is configured as `fleetlearn broker config` writes it (a password per device,
an ACL keyed on the user name, the client id bound to it) and the aggregator reads the
enrolment file it writes, with each agent's key enrolled as `fleetlearn devices enroll`
does. The attacker is a party that holds a device's broker password (a stolen password,
or a compromised device given another's credentials) but not that device's key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_rig import make_data
from mqtt_rig import transport
from waiting import wait_for

from broker_bridge import (
    Ack,
    Channel,
    CodecSpec,
    Enrolment,
    Kind,
    Message,
    MosquittoProcess,
    SignedBody,
    TaskSpec,
    UpdateMeta,
    ack_code,
    encode_update,
    free_port,
    presence_message,
    update_message,
    write_broker_config,
)
from broker_bridge._brokers import _child_user
from cloud_aggregator import Aggregator
from cloud_aggregator._config import AggregatorConfig
from edge_runtime import (
    Agent,
    AgentHooks,
    AgentSettings,
    DeviceKey,
    DeviceStatus,
    UpdateDraft,
    make_agent_transport,
    state_key_path,
)

FLEET = "trust"
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def deployment(tmp: Path, devices: list[str]) -> Iterator[tuple[str, dict[str, str], Path]]:
    """Mosquitto as `fleetlearn broker config` configures it: (url, credentials, the
    enrolment file)."""
    port = free_port()
    files = write_broker_config(tmp / "broker", fleet=FLEET, devices=devices, port=port,
                                bind_address="127.0.0.1", run_as_user=_child_user())
    creds = tomllib.loads(files.credentials.read_text())
    assert files.enrolment is not None
    with MosquittoProcess(conf_text=files.conf.read_text(), port=port,
                          workdir=tmp / "broker") as broker:
        yield broker.url, creds, files.enrolment


def enrol(enrolment: Path, device: str, state: Path) -> DeviceKey:
    """What the operator does: `fleetlearn devices key` on the device (the agent's key,
    made in its state folder), then `fleetlearn devices enroll`."""
    key = DeviceKey.load_or_create(state_key_path(state))
    book = Enrolment.load(enrolment, fleet=FLEET)
    book.enrol(device, key.public_key)
    book.write(enrolment)
    return key


def start_agent(url: str, creds: dict[str, str], device: str, state: Path, *,
                hooks: AgentHooks | None = None,
                spy: list[Message] | None = None) -> Agent:
    t = make_agent_transport(url, fleet=FLEET, device_id=device, password=creds[device],
                             backoff_min_s=0.1, backoff_max_s=1.0)
    agent = Agent(device_id=device, channel=Channel(transport=t, fleet=FLEET),
                  data=make_data(n=64, seed=len(device) + ord(device[-1])), state_dir=state,
                  status_probe=lambda: DeviceStatus(), hooks=hooks, owns_transport=True,
                  settings=AgentSettings(request_timeout_s=10.0))
    if spy is not None:  # every update exactly as it goes on the wire
        send = agent.channel.send

        def capture(topic: str, message: Message, **kw: object) -> int:
            if message.kind == Kind.UPDATE:
                spy.append(message)
            return send(topic, message, **kw)  # type: ignore[arg-type]

        agent.channel.send = capture  # type: ignore[method-assign]
    agent.start()
    return agent


def start_aggregator(url: str, creds: dict[str, str], state: Path, artifacts: Path,
                     **settings: object) -> tuple[Aggregator, threading.Thread]:
    base: dict[str, object] = dict(
        fleet=FLEET, model="mlp", over_selection=1.0, deadline_s=120.0, state_dir=state,
        local_epochs=1, server_opt="fedavg", store_synchronous="NORMAL", progress=False)
    base.update(settings)
    t = transport(url, "aggregator", FLEET, device=False, username="aggregator",
                  password=creds["aggregator"])
    agg = Aggregator(config=AggregatorConfig(**base),  # type: ignore[arg-type]
                     channel=Channel(transport=t, fleet=FLEET), artifacts_dir=artifacts)
    agg.start()
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 240}, daemon=True)
    runner.start()
    return agg, runner


class Attacker:
    """Connected with a device's broker password; speaks the protocol by hand."""

    def __init__(self, url: str, device: str, password: str) -> None:
        self.device = device
        self.channel = Channel(transport=transport(url, device, FLEET, username=device,
                                                   password=password), fleet=FLEET)
        self.tasks: list[TaskSpec] = []
        self.acks: list[Ack] = []
        self.lock = threading.Lock()
        self.channel.subscribe(self.channel.topics.device_down(device), self._on)
        self.channel.transport.connect(timeout=30)

    def _on(self, _topic: str, m: Message) -> None:
        with self.lock:
            if m.kind == Kind.TASK:
                self.tasks.append(TaskSpec.from_message(m))
            elif m.kind == Kind.ACK:
                self.acks.append(Ack.from_message(m))

    def announce(self) -> None:
        from broker_bridge import Hello

        topics = self.channel.topics
        self.channel.send(topics.presence(self.device), presence_message(
            fleet=FLEET, device=self.device, status="online"), retain=True)
        self.channel.send(topics.up(self.device, "hello"), Hello(
            eligibility={"eligible": True}, num_samples=64).to_message(fleet=FLEET,
                                                                       device=self.device))

    def send(self, message: Message) -> str:
        """Send an update; the code of the aggregator's answer."""
        with self.lock:
            before = len(self.acks)
        self.channel.send(self.channel.topics.up(self.device, "update"),
                          dataclasses.replace(message, transfer_id=0))
        assert wait_for(lambda: len(self.acks) > before, 60), "no answer"
        with self.lock:
            ack = self.acks[-1]
        return ack_code(ack) or ack.status

    def leave(self) -> None:
        self.channel.send(self.channel.topics.presence(self.device), presence_message(
            fleet=FLEET, device=self.device, status="offline"), retain=True)
        self.channel.transport.flush(timeout=5)
        self.channel.transport.close()


def crash_in(round_: int, holder: dict[str, Agent], device: str) -> AgentHooks:
    """Die after training in ``round_``, before sending (the simulator's crash)."""
    def hook(draft: UpdateDraft) -> UpdateDraft:
        if draft.task.round == round_:
            holder[device].abort()
        return draft

    return AgentHooks(transform_update=hook)


def hold_in(round_: int, release: threading.Event) -> AgentHooks:
    """Keep working on ``round_`` (after training, before sending) until ``release``: the
    round stays open, waiting for this device, while the others crash."""
    def hook(draft: UpdateDraft) -> UpdateDraft:
        if draft.task.round == round_:
            release.wait(150)
        return draft

    return AgentHooks(transform_update=hook)


def rejected(agg: Aggregator, code: str) -> int:
    return int(agg.counters.snapshot()["updates"].get(f"rejected:{code}", 0))


def stop_all(agents: list[Agent], agg: Aggregator, runner: threading.Thread) -> None:
    for agent in agents:
        agent.stop()
    agg.stop()
    runner.join(20)
    agg.close()
    agg.channel.transport.close()


def test_a_stolen_password_without_the_key_gets_no_update_counted(
        tmp_path: Path, artifacts: Path) -> None:
    release = threading.Event()  # no device waits on it here (the finally sets it)
    with deployment(tmp_path, ["dev-a", "dev-b"]) as (url, creds, enrolment):
        keys = {d: enrol(enrolment, d, tmp_path / d) for d in ("dev-a", "dev-b")}
        agg, runner = start_aggregator(url, creds, tmp_path / "agg", artifacts, rounds=1,
                                       devices_per_round=2, quorum=2, min_devices=2,
                                       enrolment=enrolment)
        agents = [start_agent(url, creds, "dev-b", tmp_path / "dev-b")]
        try:
            # dev-b's owner holds dev-a's broker password, and only its own key.
            thief = Attacker(url, "dev-a", creds["dev-a"])
            thief.announce()
            assert wait_for(lambda: thief.tasks, 120), "dev-a (the thief) was never asked"
            task = thief.tasks[-1]
            size = agg.layout.size
            body = encode_update(make_data().x[0].repeat(size // 40 + 1)[:size] * 0 + 0.01,
                                 agg.layout, CodecSpec.parse(task.codec)).body
            meta = UpdateMeta(num_samples=64, steps=2, nonce=task.nonce, train_loss=0.1,
                              duration_s=0.1)
            forged = update_message(fleet=FLEET, device="dev-a", round=task.round,
                                    model_version=task.model_version, attempt=0,
                                    codec=task.codec, meta=meta, codec_body=body)
            assert thief.send(forged) == "unsigned"
            signed = keys["dev-b"].sign_update(forged)  # its own key, under dev-a's name
            assert thief.send(signed) == "wrong_key"
            block = SignedBody.from_bytes(signed.body)
            assert block is not None
            claimed = dataclasses.replace(block, public_key=keys["dev-a"].public_key)
            assert thief.send(dataclasses.replace(signed, body=claimed.to_bytes())) == \
                "bad_signature"
            for attempt in range(1, 6):  # more than the 4 refused attempts a device has
                assert thief.send(dataclasses.replace(keys["dev-b"].sign_update(
                    dataclasses.replace(forged, attempt=attempt)))) == "wrong_key"
            thief.leave()
            assert agg.model_version == 0  # nothing of it reached the model
            # The real dev-a comes: its task is sent again, its attempt 0 counts.
            agents.append(start_agent(url, creds, "dev-a", tmp_path / "dev-a"))
            runner.join(200)
            assert agg.model_version == 1, agg.status_line()
            # (The round dev-a left may have been abandoned, nothing of it applied; the
            # model came from a round both real devices answered.)
            (closed,) = agg.store.rounds(FLEET, state="closed")
            assert agg.store.accepted_attempt(FLEET, closed.round, "dev-a") == 0
            assert agg.store.count_accepted(FLEET, closed.round) == 2
            assert (rejected(agg, "unsigned"), rejected(agg, "wrong_key"),
                    rejected(agg, "bad_signature")) == (1, 6, 1)
        finally:
            release.set()
            stop_all(agents, agg, runner)


def test_a_captured_signed_update_replayed_later_is_refused(
        tmp_path: Path, artifacts: Path) -> None:
    devices = ["dev-a", "dev-b", "dev-c"]
    with deployment(tmp_path, devices) as (url, creds, enrolment):
        for d in devices:
            enrol(enrolment, d, tmp_path / d)
        agg, runner = start_aggregator(url, creds, tmp_path / "agg", artifacts, rounds=2,
                                       devices_per_round=3, quorum=3, min_devices=3,
                                       enrolment=enrolment)
        holder: dict[str, Agent] = {}
        captured: list[Message] = []
        agents = []
        release = threading.Event()
        for d in devices:  # dev-b and dev-c die in round 2 after training; dev-a holds it
            holder[d] = start_agent(url, creds, d, tmp_path / d, spy=captured if d == "dev-b"
                                    else None, hooks=crash_in(2, holder, d)
                                    if d != "dev-a" else hold_in(2, release))
            agents.append(holder[d])
        try:
            assert wait_for(lambda: agg.model_version == 1, 180), agg.status_line()
            assert wait_for(lambda: not holder["dev-b"].channel.transport.connected
                            and not holder["dev-c"].channel.transport.connected, 60)
            (round1,) = [m for m in captured if m.round == 1]
            as_b = Attacker(url, "dev-b", creds["dev-b"])
            # the same bytes again: round 1 closed, it counted once
            assert as_b.send(round1) == "already_counted"
            # restamped for round 2, which is open and waits for dev-b
            assert as_b.send(dataclasses.replace(round1, round=2, model_version=1)) == \
                "bad_signature"
            as_b.channel.transport.close()
            as_c = Attacker(url, "dev-c", creds["dev-c"])
            # presented by another device (dev-c's password, dev-c's name, round 2)
            assert as_c.send(dataclasses.replace(round1, device="dev-c", round=2,
                                                 model_version=1)) == "wrong_key"
            as_c.channel.transport.close()
            assert agg.store.count_accepted(FLEET, 1) == 3
            assert agg.store.count_accepted(FLEET, 2) == 0 and agg.model_version == 1
            # dev-a sends its round-2 update; dev-b and dev-c reboot: theirs count too.
            release.set()
            for d in ("dev-b", "dev-c"):
                holder[d] = start_agent(url, creds, d, tmp_path / d)
                agents.append(holder[d])
            runner.join(200)
            assert agg.model_version == 2, agg.status_line()
            assert agg.store.count_accepted(FLEET, 2) == 3
            assert (rejected(agg, "bad_signature"), rejected(agg, "wrong_key")) == (1, 1)
        finally:
            release.set()
            stop_all(agents, agg, runner)


def test_trust_on_first_use_records_the_first_key_and_refuses_another(
        tmp_path: Path, artifacts: Path) -> None:
    devices = ["dev-a", "dev-b"]
    with deployment(tmp_path, devices) as (url, creds, _enrolment):
        agg, runner = start_aggregator(url, creds, tmp_path / "agg", artifacts, rounds=2,
                                       devices_per_round=2, quorum=2, min_devices=2,
                                       trust_on_first_use=True)  # no enrolment file
        holder: dict[str, Agent] = {}
        agents: list[Agent] = []
        release = threading.Event()
        for d in devices:
            holder[d] = start_agent(url, creds, d, tmp_path / d,
                                    hooks=crash_in(2, holder, d) if d == "dev-b"
                                    else hold_in(2, release))
            agents.append(holder[d])
        try:
            assert wait_for(lambda: agg.model_version == 1, 180), agg.status_line()
            for d in devices:
                assert agg.store.device_key(d) == holder[d].key.public_key
            assert wait_for(lambda: not holder["dev-b"].channel.transport.connected, 120)
            # dev-b's password, a key of one's own (a valid signature): refused for good
            attacker = Attacker(url, "dev-b", creds["dev-b"])
            forged = DeviceKey.generate().sign_update(update_message(
                fleet=FLEET, device="dev-b", round=2, model_version=1, attempt=0,
                codec="fp32", meta=UpdateMeta(num_samples=64, steps=2, nonce="x" * 16,
                                              train_loss=0.1, duration_s=0.1),
                codec_body=encode_update(make_data().x[0][:1].repeat(agg.layout.size),
                                         agg.layout, CodecSpec.parse("fp32")).body))
            assert attacker.send(forged) == "wrong_key"
            attacker.channel.transport.close()
            assert agg.store.device_key("dev-b") == holder["dev-b"].key.public_key
            release.set()
            holder["dev-b"] = start_agent(url, creds, "dev-b", tmp_path / "dev-b")
            agents.append(holder["dev-b"])
            runner.join(200)
            assert agg.model_version == 2, agg.status_line()
            assert agg.store.count_accepted(FLEET, 2) == 2
        finally:
            release.set()
            stop_all(agents, agg, runner)


