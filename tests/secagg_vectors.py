"""docs/vectors/secagg.json: the primitives and one whole secure round, byte for byte.

Six devices, one of which drops after sharing its seeds (before its masked vector) and
one after uploading (it never reveals shares): both kinds of unmasking appear. Every
random value comes from a seeded generator, and every secret is written out, so an
implementation in another language can recompute each derived key, mask, ciphertext and
body from the file (docs/PROTOCOL.md section 11 says how).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from broker_bridge._secagg import (
    FixedPoint,
    degree,
    neighbours,
    pair_key,
    permutation,
    prg,
    public_bytes,
    share_key,
    shared_subset,
    threshold,
)
from broker_bridge._secagg_device import SecAggDevice
from broker_bridge._secagg_msg import Setup
from broker_bridge._skellam import SkellamParams, conditional_round, l2_clip, norm_bound
from cloud_aggregator._secagg import SecAggRound

FLEET = "demo"
ROUND = 7
DEVICES = [f"dev-{i}" for i in range(1, 7)]
DROPS_BEFORE_UPLOAD = "dev-2"
DROPS_AFTER_UPLOAD = "dev-5"
SIZE = 20
FRACTION = 0.4


def primitive_vectors() -> dict[str, Any]:
    key = bytes(range(32))
    seed = bytes(range(32, 64))
    fixed = FixedPoint(clip=0.5, scale=1000.0, max_devices=6)
    values = np.array([0.1234, -0.0005, 0.75, -2.0, 0.0], dtype=np.float32)
    uniforms = np.array([0.5, 0.25, 0.0, 0.99, 0.1])
    return {
        "prg": {"key_hex": key.hex(), "words": 8,
                "words_hex": prg(key, 8).tobytes().hex()},
        "permutation": {"key_hex": seed.hex(), "n": 10, "result": permutation(seed, 10)},
        "shared_subset": {"seed_hex": seed.hex(), "size": 50, "fraction": 0.1,
                          "indices": shared_subset(seed, 50, 0.1).tolist()},
        "graph": {"seed_hex": seed.hex(), "devices": 12, "degree": 4,
                  "neighbours": {str(i): neighbours(i, 12, 4, seed) for i in range(1, 13)}},
        "degree": {str(n): degree(n) for n in (3, 10, 100, 500, 1000, 10000)},
        "fixed_point": {"clip": fixed.clip, "scale": fixed.scale,
                        "max_devices": fixed.max_devices,
                        "values_f32_hex": values.tobytes().hex(),
                        "uniforms": uniforms.tolist(),
                        "words_hex": fixed.encode(values, uniforms).tobytes().hex()},
        "private_levels": private_vector(),
    }


class _Uniforms:
    """Stands in for a generator: the given uniforms, in order (one draw of the round)."""

    def __init__(self, uniforms: np.ndarray) -> None:
        self.uniforms = uniforms

    def random(self, shape: Any) -> np.ndarray:
        return self.uniforms


def private_vector() -> dict[str, Any]:
    """Section 11.4: a private round's setup and one device's levels, with the rounding
    uniforms and the noise given (a device draws both from its own CSPRNG)."""
    clip, scale, dim = 0.05, 1024.0, 6
    dp = SkellamParams(clip=clip, norm_bound=norm_bound(clip=clip, scale=scale, dim=dim),
                       device_variance=12.5)
    setup = Setup(round=ROUND, session=bytes(range(16)), clip=clip, scale=scale, fraction=1.0,
                  max_devices=6, size=dim, subset_seed=bytes(range(32, 64)), dp=dp)
    values = np.array([0.03, -0.04, 0.001, 0.0, 0.02, -0.011], dtype=np.float32)
    uniforms = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    clipped = l2_clip(values, clip)
    rounded = conditional_round(clipped * scale, dp.norm_bound, _Uniforms(uniforms))  # type: ignore[arg-type]
    noise = np.array([3, -5, 0, 1, -2, 7], dtype=np.int64)
    words = ((rounded + noise) & 0xFFFFFFFF).astype("<u4")
    return {"setup_hex": setup.to_bytes().hex(), "clip": clip, "scale": scale,
            "norm_bound": dp.norm_bound, "device_variance": dp.device_variance,
            "values_f32_hex": values.tobytes().hex(), "uniforms": uniforms.tolist(),
            "rounded": rounded.tolist(), "noise": noise.tolist(),
            "words_hex": words.tobytes().hex()}


def round_vector() -> dict[str, Any]:
    rng = random.Random(2026)
    server = SecAggRound(fleet=FLEET, round_index=ROUND, clip=0.5, scale=1000.0,
                         fraction=FRACTION, size=SIZE, max_devices=len(DEVICES),
                         randbytes=rng.randbytes, randbelow=rng.randrange)
    devices = {d: SecAggDevice(fleet=FLEET, setup=server.setup, randbytes=rng.randbytes,
                               randbelow=rng.randrange) for d in DEVICES}
    subset = shared_subset(server.setup.subset_seed, SIZE, FRACTION)
    data = np.random.default_rng(7)
    record: dict[str, dict[str, Any]] = {d: {"device": d} for d in DEVICES}
    fixed = FixedPoint(clip=0.5, scale=1000.0, max_devices=len(DEVICES))

    def body(d: str, name: str, message: Any) -> None:
        record[d][f"{name}_hex"] = message.to_bytes().hex()

    for d, dev in devices.items():
        adv = dev.advertise()
        server.on_advertise(d, adv)
        body(d, "advertise", adv)
        record[d].update(share_secret_hex=dev._share_secret.private_bytes_raw().hex(),
                         mask_secret_hex=dev._mask_bytes.hex(), seed_hex=dev._seed.hex())
    for d, keys in server.close_advertising().items():
        body(d, "keys", keys)
        shares = devices[d].on_keys(keys)
        server.on_shares(d, shares)
        body(d, "shares", shares)
    for d, deliver in server.close_sharing().items():
        body(d, "deliver", deliver)
        if d == DROPS_BEFORE_UPLOAD:
            continue
        devices[d].on_deliver(deliver)
        values = data.uniform(-0.5, 0.5, size=SIZE).astype(np.float32)
        levels = fixed.encode(values[subset], data.random(len(subset)))
        record[d].update(update_f32_hex=values.tobytes().hex(),
                         levels_hex=levels.tobytes().hex())
        masked = devices[d].masked(levels)
        server.on_masked(d, masked)
        body(d, "masked", masked)
    for d, request in server.close_upload().items():
        body(d, "unmask", request)
        if d == DROPS_AFTER_UPLOAD:
            continue
        reveal = devices[d].on_unmask(request)
        server.on_reveal(d, reveal)
        body(d, "reveal", reveal)
    total, counted = server.finish()
    for d, dev in devices.items():
        assert dev.keys is not None
        record[d]["index"] = dev.keys.index
        record[d]["neighbours"] = [n.index for n in dev.keys.neighbours]
    by_index = {record[d]["index"]: d for d in DEVICES}
    secrets = {record[d]["index"]: (bytes.fromhex(record[d]["share_secret_hex"]),
                                    bytes.fromhex(record[d]["mask_secret_hex"]))
               for d in DEVICES}
    session = server.setup.session
    pairs, directions = [], []
    for a in sorted(secrets):
        for b in record[by_index[a]]["neighbours"]:
            if a < b:
                pairs.append({"a": a, "b": b, "mask_seed_hex": pair_key(
                    secrets[a][1], public_bytes(secrets[b][1]), fleet=FLEET,
                    round_index=ROUND, session=session, a=a, b=b).hex()})
            directions.append({"sender": a, "receiver": b, "key_hex": share_key(
                secrets[a][0], public_bytes(secrets[b][0]), fleet=FLEET, round_index=ROUND,
                session=session, sender=a, receiver=b).hex()})
    levels_sum = np.zeros(len(subset), dtype=np.uint32)
    for d in counted:
        levels_sum += np.frombuffer(bytes.fromhex(record[d]["levels_hex"]), "<u4")
    assert np.array_equal(levels_sum, total)
    return {
        "fleet": FLEET, "round": ROUND, "session_hex": session.hex(),
        "setup_hex": server.setup.to_bytes().hex(),
        "subset_seed_hex": server.setup.subset_seed.hex(), "size": SIZE,
        "fraction": FRACTION, "subset": subset.tolist(),
        "clip": fixed.clip, "scale": fixed.scale, "max_devices": fixed.max_devices,
        "degree": server.degree, "threshold": threshold(server.degree),
        "drops_before_upload": DROPS_BEFORE_UPLOAD, "drops_after_upload": DROPS_AFTER_UPLOAD,
        "devices": [record[d] for d in DEVICES],
        "pair_mask_seeds": pairs, "share_keys": directions,
        "counted": counted, "sum_hex": total.tobytes().hex(),
        "sum_decoded": fixed.decode_sum(total, len(counted)).tolist(),
    }


def secagg_vectors() -> dict[str, Any]:
    return {
        "description": "Secure aggregation (PROTOCOL.md section 11): the primitives, then one "
                       "round of six devices in which dev-2 drops after sharing and dev-5 "
                       "after uploading. Every secret is given; recompute each public key, "
                       "commitment, pair mask seed, share key, ciphertext, masked vector and "
                       "the sum, and parse each *_hex body.",
        "primitives": primitive_vectors(),
        "round": round_vector(),
    }
