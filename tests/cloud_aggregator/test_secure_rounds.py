"""Secure sync rounds on an in-memory broker: devices that speak the secure steps by hand
(``SecAggDevice`` per device), the real aggregator runtime, a manual clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from aggregator_rig import FakeDevice, devices, make

from broker_bridge import Kind, MemoryBroker
from broker_bridge._secagg import shared_subset
from broker_bridge._secagg_device import SecAggDevice
from broker_bridge._secagg_msg import Deliver, Keys, Setup, Unmask, parse, secagg_message
from cloud_aggregator._rounds import ManualClock
from cloud_aggregator._store import Store


class SecureFake:
    """A fake device's secure side: answers the aggregator's secagg messages."""

    def __init__(self, device: FakeDevice, *, signed: bool = True) -> None:
        self.device = device
        self.signed = signed
        self.sa: SecAggDevice | None = None
        self.seen = 0
        self.levels: np.ndarray | None = None

    def send(self, body: object) -> None:
        ch = self.device.channel
        ch.send(ch.topics.up(self.device.id, "secagg"),
                secagg_message(body, fleet=ch.fleet, device=self.device.id))  # type: ignore[arg-type]

    def step(self, *, upload: bool = True, reveal: bool = True) -> None:
        """Answer what arrived since the last step."""
        new, self.seen = self.device.other[self.seen:], len(self.device.other)
        for message in new:
            if message.kind != Kind.SECAGG:  # e.g. the training ledger's proofs
                continue
            body = parse(message.body)
            if isinstance(body, Setup):
                self.sa = SecAggDevice(fleet=message.fleet, setup=body)
                self.send(self.sa.advertise())
            elif isinstance(body, Keys):
                assert self.sa is not None
                self.send(self.sa.on_keys(body))
            elif isinstance(body, Deliver) and upload:
                assert self.sa is not None
                self.sa.on_deliver(body)
                setup = self.sa.setup
                words = len(shared_subset(setup.subset_seed, setup.size, setup.fraction))
                rng = np.random.default_rng(len(self.device.id) + self.device.tasks[-1].round)
                values = rng.uniform(-setup.clip, setup.clip, words).astype(np.float32)
                self.levels = self.sa.fixed.encode(values, rng.random(words))
                masked = self.sa.masked(self.levels)
                self.device.send_update(layout=None, codec="secagg",  # type: ignore[arg-type]
                                        codec_body=masked.to_bytes(), signed=self.signed)
            elif isinstance(body, Unmask) and reveal:
                assert self.sa is not None
                self.send(self.sa.on_unmask(body))


def drive(agg: object, clock: ManualClock, fakes: list[SecureFake], *, steps: int = 8,
          silent: frozenset[str] = frozenset(), phase_s: float = 1.0) -> None:
    """Let everyone answer what they can, then let a step's time pass; again."""
    for _ in range(steps):
        for _ in range(5):
            agg.tick()  # type: ignore[attr-defined]
            for f in fakes:
                f.step(reveal=f.device.id not in silent)
        clock.advance(phase_s + 0.01)


def test_a_secure_round_applies_the_exact_mean(tmp_path: Path, artifacts: Path) -> None:
    broker, clock = MemoryBroker(), ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, devices_per_round=4, rounds=1,
               secure_aggregation=True, secure_fraction=0.5, secure_phase_s=1.0,
               deadline_s=30.0, quorum=4)
    fakes = [SecureFake(d) for d in devices(broker, 4).values()]
    before = agg.params.copy()
    drive(agg, clock, fakes, silent=frozenset({"d1"}))  # d1 never answers the unmask
    assert agg.model_version == 1, [m.to_json() for m in agg.history]
    assert all(f.device.tasks[-1].codec == "secagg" for f in fakes)
    setup = fakes[0].sa.setup  # type: ignore[union-attr]
    fixed = fakes[0].sa.fixed  # type: ignore[union-attr]
    total = np.zeros(len(fakes[0].levels), np.uint32)  # type: ignore[arg-type]
    for f in fakes:
        total += f.levels  # type: ignore[arg-type]
    subset = shared_subset(setup.subset_seed, setup.size, setup.fraction)
    moved = agg.params - before
    expected = (fixed.decode_sum(total, 4) / 4).astype(np.float32)
    assert np.allclose(moved[subset], expected, atol=1e-6)  # fedavg, server lr 1
    assert not np.delete(moved, subset).any()
    assert all(f.device.acks and f.device.acks[-1].status == "accepted" for f in fakes)


def test_an_open_secure_round_is_abandoned_at_a_restart(tmp_path: Path,
                                                        artifacts: Path) -> None:
    broker, clock = MemoryBroker(), ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, devices_per_round=3, rounds=2,
               secure_aggregation=True, secure_phase_s=1.0)
    fakes = [SecureFake(d) for d in devices(broker, 3).values()]
    agg.tick()
    for f in fakes:
        f.step()
    assert agg.strategy.secure is not None  # type: ignore[attr-defined]
    agg.close()
    again = make(tmp_path, artifacts, broker, manual=clock, devices_per_round=3, rounds=2,
                 secure_aggregation=True, secure_phase_s=1.0)
    rounds = Store(tmp_path / "aggregator.sqlite").rounds("test")
    assert [r.state for r in rounds] == ["abandoned"]
    assert again.strategy.next_round == 2  # type: ignore[attr-defined]


def test_a_replacement_for_a_decliner_joins_the_secure_round(tmp_path: Path,
                                                            artifacts: Path) -> None:
    broker, clock = MemoryBroker(), ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, devices_per_round=3, rounds=1,
               secure_aggregation=True, secure_phase_s=1.0, quorum=3, min_devices=3)
    fleet = devices(broker, 4)
    fakes = {d.id: SecureFake(d) for d in fleet.values()}
    agg.tick()
    chosen = [d for d in fleet.values() if d.tasks]
    assert len(chosen) == 3
    chosen[0].decline()  # before it answers the setup
    agg.tick()
    spare = next(d for d in fleet.values() if d not in chosen)
    assert spare.tasks and any(parse(m.body).STEP == 1 for m in spare.other
                                   if m.kind == Kind.SECAGG)  # its setup
    drive(agg, clock, [fakes[d.id] for d in fleet.values() if d is not chosen[0]])
    assert agg.model_version == 1, [m.to_json() for m in agg.history]
    assert agg.history[0].devices_reported == 3


def test_a_masked_upload_must_be_signed_by_its_device(tmp_path: Path, artifacts: Path) -> None:
    """Secure rounds verify signatures like any other: an unsigned masked upload (or one
    from a party holding only a device's broker login) is refused and counts nothing."""
    broker, clock = MemoryBroker(), ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, devices_per_round=4, rounds=1,
               secure_aggregation=True, secure_fraction=0.5, secure_phase_s=1.0,
               deadline_s=6.0, quorum=3)
    fleet = devices(broker, 4)
    fakes = [SecureFake(d, signed=d.id != "d2") for d in fleet.values()]
    drive(agg, clock, fakes, steps=16)  # past the upload deadline: d2 may still re-send
    unsigned = fleet["d2"].acks
    assert unsigned and unsigned[-1].status == "rejected"
    assert unsigned[-1].reason.startswith("unsigned")
    assert all(fleet[d].acks[-1].status == "accepted" for d in ("d0", "d1", "d3"))
    assert agg.model_version == 1  # the three signed uploads still make the round


def test_the_status_line_says_which_secure_step_it_waits_for(tmp_path: Path,
                                                            artifacts: Path) -> None:
    broker, clock = MemoryBroker(), ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, devices_per_round=3, rounds=1,
               secure_aggregation=True, secure_phase_s=1.0)
    devices(broker, 3)  # they never answer the secure steps
    agg.tick()
    assert "secure aggregation waits for the devices' public keys" in agg.status_line()
