"""A whole secure-aggregation round in one process: real devices (``SecAggDevice``) and a
real aggregator (``SecAggRound``) passing each other's bytes, with devices that drop at
any step. Used by tests/broker_bridge/test_secagg.py and bench/secagg.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from broker_bridge._secagg import Words
from broker_bridge._secagg_device import SecAggDevice
from broker_bridge._secagg_msg import parse
from cloud_aggregator._secagg import SecAggRound

STAGES = ("advertise", "share", "upload", "reveal")
"""Where a device may drop: before advertising its keys, before sharing its seeds,
before uploading its masked vector, or after uploading (before revealing shares)."""


@dataclass
class FleetRound:
    server: SecAggRound
    devices: dict[str, SecAggDevice]
    uploaded: list[str] = field(default_factory=list)
    total: Words | None = None


def rng_bytes(rng: random.Random) -> Callable[[int], bytes]:
    return lambda n: rng.randbytes(n)


def run_round(levels: dict[str, Words], *, drop: dict[str, str] | None = None,
              seed: int = 0, fleet: str = "f", round_index: int = 1,
              failure_bits: int = 20, dropout: float = 1 / 3, size: int | None = None,
              fraction: float = 1.0,
              tamper: Callable[[str, bytes], bytes] | None = None,
              max_devices: int | None = None) -> FleetRound:
    """Run one round; ``drop[device]`` is the stage (of ``STAGES``) the device misses.
    Every message goes through ``to_bytes``/``parse`` (and ``tamper`` on the way to the
    aggregator, if given). Raises what the aggregator raises."""
    drop = drop or {}
    rng = random.Random(seed)
    words = len(next(iter(levels.values())))
    server = SecAggRound(fleet=fleet, round_index=round_index, clip=1.0, scale=1000.0,
                         fraction=fraction, size=size or words,
                         max_devices=max_devices or max(len(levels), 3),
                         failure_bits=failure_bits, dropout=dropout, randbytes=rng_bytes(rng),
                         randbelow=rng.randrange)
    setup = parse(server.setup.to_bytes())
    devices = {d: SecAggDevice(fleet=fleet, setup=setup, randbytes=rng_bytes(rng),  # type: ignore[arg-type]
                               randbelow=rng.randrange) for d in levels}
    out = FleetRound(server=server, devices=devices)

    def up(device: str, body: bytes) -> bytes:
        return tamper(device, body) if tamper else body

    def alive(device: str, stage: str) -> bool:
        missed = drop.get(device)
        return missed is None or STAGES.index(missed) > STAGES.index(stage)

    for d, dev in devices.items():
        if alive(d, "advertise"):
            server.on_advertise(d, parse(up(d, dev.advertise().to_bytes())))  # type: ignore[arg-type]
    for d, keys in server.close_advertising().items():
        if alive(d, "share"):
            shares = devices[d].on_keys(parse(keys.to_bytes()))  # type: ignore[arg-type]
            server.on_shares(d, parse(up(d, shares.to_bytes())))  # type: ignore[arg-type]
    for d, deliver in server.close_sharing().items():
        if alive(d, "upload"):
            devices[d].on_deliver(parse(deliver.to_bytes()))  # type: ignore[arg-type]
            masked = devices[d].masked(levels[d])
            server.on_masked(d, parse(up(d, masked.to_bytes())))  # type: ignore[arg-type]
    for d, request in server.close_upload().items():
        if alive(d, "reveal"):
            reveal = devices[d].on_unmask(parse(request.to_bytes()))  # type: ignore[arg-type]
            server.on_reveal(d, parse(up(d, reveal.to_bytes())))  # type: ignore[arg-type]
    out.total, out.uploaded = server.finish()
    return out


def random_levels(devices: Sequence[str], words: int, bound: int,
                  rng: np.random.Generator) -> dict[str, Words]:
    """Fixed-point levels in [-bound, bound] per device, as u32 words."""
    return {d: (rng.integers(-bound, bound + 1, size=words) & 0xFFFFFFFF).astype(np.uint32)
            for d in devices}


def plain_sum(levels: dict[str, Words], devices: Sequence[str]) -> Words:
    total = np.zeros(len(next(iter(levels.values()))), dtype=np.uint32)
    for d in devices:
        total += levels[d]
    return total
