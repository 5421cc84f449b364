"""Secure aggregation's crypto core: the PRG, Shamir, the graph, fixed point, the shared
subset, and whole rounds of real devices and a real aggregator in one process.

The sums are checked exactly (u32 words) against the plain sum of the same levels.
"""

from __future__ import annotations

import itertools
import math
import random
import struct

import numpy as np
import pytest
from secagg_fleet import plain_sum, random_levels, run_round

from broker_bridge import CodecSpec
from broker_bridge._secagg import (
    PRIME,
    FixedPoint,
    SecAggRejected,
    check_codec,
    degree,
    neighbours,
    permutation,
    prg,
    reconstruct,
    recover,
    share_from_bytes,
    share_secret,
    shared_subset,
    threshold,
)
from broker_bridge._secagg_msg import (
    Advertise,
    Masked,
    Reveal,
    Revealed,
    ShareKind,
    Step,
    Unmask,
    parse,
)
from cloud_aggregator._secagg import SecAggAbandoned
from device_profiles import ConfigError


def ids(n: int) -> list[str]:
    return [f"dev-{i:04d}" for i in range(n)]


# ---------------------------------------------------------------- primitives

def test_the_prg_is_rfc8439_chacha20_with_a_zero_nonce() -> None:
    # RFC 8439 appendix A.1, test vector 1: key 0, nonce 0, block counter 0.
    expected = bytes.fromhex(
        "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
        "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")
    assert prg(bytes(32), 16).tobytes() == expected
    assert prg(bytes(32), 16).dtype == np.uint32
    assert not np.array_equal(prg(bytes(31) + b"\x01", 16), prg(bytes(32), 16))


def test_shamir_every_subset_of_threshold_or_more_reconstructs() -> None:
    rng = random.Random(1)
    for n in range(1, 8):
        for t in range(1, n + 1):
            secret = rng.randbytes(32)
            xs = rng.sample(range(1, 1000), n)
            shares = share_secret(secret, xs, t, rng.randrange)
            for size in range(1, n + 1):
                for subset in itertools.combinations(xs, size):
                    picked = {x: shares[x] for x in subset}
                    if size >= t:
                        assert reconstruct(picked, t) == secret
                    else:
                        # t-1 shares interpolate to a random field element
                        with pytest.raises(SecAggRejected):
                            reconstruct(picked, t)
                        if size == t - 1:
                            # read as a (t-1)-threshold sharing, they point elsewhere
                            try:
                                assert reconstruct(picked, size) != secret
                            except SecAggRejected as exc:
                                assert exc.code == "bad_share"


def test_shamir_refuses_malformed_and_repairs_a_lying_share() -> None:
    rng = random.Random(2)
    secret = rng.randbytes(32)
    shares = share_secret(secret, list(range(1, 8)), 4, rng.randrange)
    with pytest.raises(SecAggRejected) as bad:
        share_from_bytes((PRIME + 5).to_bytes(66, "little"))
    assert bad.value.code == "malformed"
    with pytest.raises(SecAggRejected):
        share_from_bytes(b"\x01" * 65)
    with pytest.raises(SecAggRejected):
        reconstruct({**shares, 3: PRIME}, 7)
    lying = dict(shares)
    lying[1] = (lying[1] + 1) % PRIME
    check = secret.__eq__
    assert reconstruct(dict(sorted(lying.items())[:4]), 4) != secret
    assert recover(lying, 4, check, randbelow=rng.randrange) == secret
    with pytest.raises(SecAggRejected) as failed:
        recover({x: (y + 1) % PRIME for x, y in shares.items()}, 4, check,
                randbelow=rng.randrange)
    assert failed.value.code == "bad_share"
    with pytest.raises(ValueError):
        share_secret(secret, [1, 1, 2], 2, rng.randrange)


def test_the_graph_is_symmetric_regular_and_logarithmic() -> None:
    for n, k in [(10, 4), (31, 8), (64, 12), (200, 16)]:
        seed = bytes([n]) * 32
        graph = {i: neighbours(i, n, k, seed) for i in range(1, n + 1)}
        for i, near in graph.items():
            assert len(near) == k and i not in near
            assert all(i in graph[j] for j in near)
    assert neighbours(3, 5, 4, bytes(32)) == [1, 2, 4, 5]
    assert degree(10) == 9 and degree(100) == 99  # small rounds: complete graphs
    sizes = [1_000, 10_000, 100_000, 1_000_000]
    ks = [degree(n) for n in sizes]
    assert ks == sorted(ks) and ks[-1] < 1_000
    # k = a * ln(n) + b with b >= 0: each 10x in n adds about the same
    steps = [b - a for a, b in itertools.pairwise(ks)]
    assert max(steps) <= 2 * min(steps) + 2
    assert all(threshold(k) * 2 > k for k in ks)


def test_permutation_and_the_shared_subset_are_deterministic() -> None:
    seed = bytes(range(32))
    assert sorted(permutation(seed, 50)) == list(range(50))
    subset = shared_subset(seed, 1000, 0.1)
    assert len(subset) == 100 and len(set(subset.tolist())) == 100
    assert np.all(np.diff(subset) > 0) and subset[-1] < 1000
    assert np.array_equal(subset, shared_subset(seed, 1000, 0.1))
    assert not np.array_equal(subset, shared_subset(bytes(32), 1000, 0.1))
    assert np.array_equal(shared_subset(seed, 7, 1.0), np.arange(7))
    # every coordinate is picked about equally often over many rounds
    counts = np.zeros(50)
    for r in range(400):
        counts[shared_subset(struct.pack("<I", r) + bytes(28), 50, 0.2)] += 1
    assert counts.min() > 40 and counts.max() < 120  # expected 80 each
    with pytest.raises(ConfigError):
        shared_subset(seed, 10, 0.0)


def test_fixed_point_round_trips_and_refuses_overflow() -> None:
    fixed = FixedPoint(clip=1.0, scale=2**20, max_devices=1000)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.5, 1.5, size=10_000).astype(np.float32)
    words = fixed.encode(x, rng.random(x.size))
    back = fixed.decode_sum(words, 1)
    assert np.max(np.abs(back - np.clip(x, -1, 1))) <= 1 / fixed.scale
    # stochastic rounding is unbiased: the mean error vanishes
    many = [fixed.decode_sum(fixed.encode(np.full(1, 0.3e-6, np.float32), rng.random(1)), 1)[0]
            for _ in range(4000)]
    assert abs(np.mean(many) - 0.3e-6) < 4 * (1 / fixed.scale) / math.sqrt(4000)
    # the sum of max_devices clipped vectors does not wrap
    total = np.zeros(1, np.uint32)
    for _ in range(1000):
        total += fixed.encode(np.array([-9.0], np.float32), np.zeros(1))
    assert fixed.decode_sum(total, 1000)[0] == -1000.0
    with pytest.raises(ConfigError, match="overflows"):
        FixedPoint(clip=1.0, scale=2**21, max_devices=1024)
    with pytest.raises(ConfigError):
        FixedPoint(clip=0.0, scale=1.0, max_devices=1)


def test_only_fp32_is_accepted_as_the_codec_of_a_secure_round() -> None:
    check_codec(CodecSpec.parse("fp32"))
    refused = {"topk:0.1+q8+zstd:3": ("topk", "q8", "zstd"), "q8": ("q8",),
               "fp16": ("fp16",), "ef+topk:0.01+fp32": ("topk",), "thresh:0.1": ("thresh",),
               "fp32+zstd:1": ("zstd",), "ef+q1:sr": ("q1",)}
    for text, stages in refused.items():
        with pytest.raises(ConfigError, match="secure aggregation") as err:
            check_codec(CodecSpec.parse(text))
        assert all(stage in str(err.value) for stage in stages), str(err.value)


# ---------------------------------------------------------------- whole rounds

@pytest.mark.parametrize("fraction", [0.0, 0.1, 1 / 3])
def test_the_sum_is_exact_with_devices_dropped_after_upload(fraction: float) -> None:
    rng = np.random.default_rng(int(fraction * 100))
    for fleet_seed in range(8):
        n = int(rng.integers(9, 31))
        devices = ids(n)
        levels = random_levels(devices, int(rng.integers(1, 60)), 10_000, rng)
        order = list(rng.permutation(devices))
        gone_after = order[:math.floor(fraction * n)]
        drop = {d: "reveal" for d in gone_after}
        result = run_round(levels, drop=drop, seed=fleet_seed)
        assert result.uploaded == devices
        assert result.total is not None
        assert np.array_equal(result.total, plain_sum(levels, devices))


def test_a_third_dropped_at_any_step_after_advertising_still_sums_exactly() -> None:
    rng = np.random.default_rng(11)
    for fleet_seed in range(6):
        n = int(rng.integers(9, 28))
        devices = ids(n)
        levels = random_levels(devices, 16, 10_000, rng)
        gone = list(rng.permutation(devices))[:n // 3]
        drop = {d: str(rng.choice(["share", "upload", "reveal"])) for d in gone}
        result = run_round(levels, drop=drop, seed=fleet_seed)
        expected = sorted(d for d in devices if drop.get(d) in (None, "reveal"))
        assert result.uploaded == expected
        assert np.array_equal(result.total, plain_sum(levels, expected))  # type: ignore[arg-type]


def test_the_sum_is_exact_with_drops_at_every_step_on_a_sparse_graph() -> None:
    rng = np.random.default_rng(5)
    for fleet_seed in range(3):
        n = 80
        devices = ids(n)
        levels = random_levels(devices, 40, 10_000, rng)
        order = list(rng.permutation(devices))
        drop = {d: "advertise" for d in order[:20]}          # any number before the keys
        drop.update({d: "share" for d in order[20:22]})
        drop.update({d: "upload" for d in order[22:24]})
        drop.update({d: "reveal" for d in order[24:28]})     # 10% after the upload
        result = run_round(levels, drop=drop, seed=fleet_seed, dropout=0.1)
        assert 2 < result.server.degree < 59  # really sparse
        expected = sorted(set(devices) - set(order[:24]))
        assert result.uploaded == expected
        assert np.array_equal(result.total, plain_sum(levels, expected))  # type: ignore[arg-type]


def test_a_masked_vector_looks_uniform() -> None:
    devices = ids(10)
    zeros = {d: np.zeros(1 << 16, np.uint32) for d in devices}
    result = run_round(zeros, seed=3)
    masked = result.server.members[devices[0]].masked
    assert isinstance(masked, Masked)

    def chi2(data: bytes, bins: int) -> float:
        counts = np.bincount(np.frombuffer(data, np.uint8), minlength=bins)
        expected = len(data) / bins
        return float(np.sum((counts - expected) ** 2 / expected))

    # Wilson-Hilferty: the chi-square(255) quantile at z = 8 (p ~ 1e-15)
    df = 255
    limit = df * (1 - 2 / (9 * df) + 8 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2(masked.words.tobytes(), 256) < limit
    high = (masked.words >> 24).astype(np.uint8).tobytes()  # top byte of each word
    assert chi2(high, 256) < limit
    # the same test does fail on an unmasked vector of small levels
    small = random_levels(devices[:1], 1 << 16, 1000, np.random.default_rng(0))
    assert chi2(small[devices[0]].tobytes(), 256) > limit
    assert result.total is not None and not result.total.any()


def test_below_threshold_the_round_is_abandoned_never_wrong() -> None:
    devices = ids(12)  # complete graph: k = 11, t = 6
    levels = random_levels(devices, 10, 100, np.random.default_rng(1))
    with pytest.raises(SecAggAbandoned, match="shares of"):
        run_round(levels, drop={d: "reveal" for d in devices[:6]})
    with pytest.raises(SecAggAbandoned, match="masked vectors arrived"):
        run_round(levels, drop={d: "upload" for d in devices[:7]})
    with pytest.raises(SecAggAbandoned, match="advertised"):
        run_round({d: levels[d] for d in devices[:2]})
    # lying shares from every responder: the seeds fail their checks, no sum
    def lie(device: str, body: bytes) -> bytes:
        msg = parse(body)
        if isinstance(msg, Reveal):
            forged = tuple(Revealed(peer=r.peer, kind=r.kind,
                                    share=((int.from_bytes(r.share, "little") + 1) % PRIME)
                                    .to_bytes(66, "little")) for r in msg.revealed)
            return Reveal(round=msg.round, session=msg.session, revealed=forged).to_bytes()
        return body
    with pytest.raises(SecAggAbandoned, match="does not reconstruct"):
        run_round(levels, tamper=lie)
    # one liar among twelve is outvoted: the sum is still exact
    liar = devices[4]
    result = run_round(levels, tamper=lambda d, b: lie(d, b) if d == liar else b)
    assert np.array_equal(result.total, plain_sum(levels, devices))  # type: ignore[arg-type]


def test_the_aggregator_rejects_replays_wrong_rounds_and_malformed_shares() -> None:
    devices = ids(9)
    levels = random_levels(devices, 5, 100, np.random.default_rng(2))
    result = run_round(levels, seed=4)
    server, device = result.server, result.devices[devices[0]]
    old = device.advertise()
    assert parse(old.to_bytes()) == old

    fresh = run_round(levels, seed=5, round_index=2).server
    with pytest.raises(SecAggRejected) as wrong:
        fresh.on_advertise(devices[0], old)  # last round's keys
    assert wrong.value.code == "wrong_round"
    again = run_round(levels, seed=5, round_index=2)
    assert again.server.setup.session != server.setup.session

    from cloud_aggregator._secagg import SecAggRound
    live = SecAggRound(fleet="f", round_index=7, clip=1, scale=10, fraction=1.0, size=5,
                       max_devices=9)
    mine = Advertise(round=7, session=live.setup.session, share_public=bytes(range(32)),
                     mask_public=bytes(32), seed_commitment=bytes(32))
    live.on_advertise("a", mine)
    live.on_advertise("a", mine)  # a redelivered copy is the same message
    other = Advertise(round=7, session=live.setup.session, share_public=bytes(32),
                      mask_public=bytes(32), seed_commitment=bytes(32))
    with pytest.raises(SecAggRejected) as replayed:
        live.on_advertise("a", other)
    assert replayed.value.code == "replayed"
    with pytest.raises(SecAggRejected) as early:
        live.on_masked("a", Masked(round=7, session=live.setup.session,
                                   words=np.zeros(5, np.uint32)))
    assert early.value.code == "unexpected"

    # a malformed share in a reveal
    def bad(device: str, body: bytes) -> bytes:
        msg = parse(body)
        if isinstance(msg, Reveal) and device == devices[1]:
            first = msg.revealed[0]
            broken = Revealed(peer=first.peer, kind=first.kind, share=b"\xff" * 66)
            return Reveal(round=msg.round, session=msg.session,
                          revealed=(broken, *msg.revealed[1:])).to_bytes()
        return body
    with pytest.raises(SecAggRejected) as malformed:
        run_round(levels, tamper=bad)
    assert malformed.value.code == "malformed"
    # a reveal that answers for the wrong kind of share
    def swapped(device: str, body: bytes) -> bytes:
        msg = parse(body)
        if isinstance(msg, Reveal) and device == devices[1]:
            first = msg.revealed[0]
            flipped = Revealed(peer=first.peer, kind=ShareKind.MASK_KEY, share=first.share)
            return Reveal(round=msg.round, session=msg.session,
                          revealed=(flipped, *msg.revealed[1:])).to_bytes()
        return body
    with pytest.raises(SecAggRejected, match="not those asked"):
        run_round(levels, tamper=swapped)


def test_a_device_refuses_what_would_leak_or_corrupt() -> None:
    devices = ids(9)
    levels = random_levels(devices, 5, 100, np.random.default_rng(3))
    result = run_round(levels, seed=6)
    device = result.devices[devices[2]]
    request = device._unmask
    assert request is not None
    assert device.on_unmask(request) is device._reveal  # the same request: the same answer
    # asked again with the lists changed (a survivor now "dropped"): refused
    changed = Unmask(round=request.round, session=request.session,
                     survivors=request.survivors[1:],
                     dropped=request.dropped + request.survivors[:1])
    with pytest.raises(SecAggRejected) as twice:
        device.on_unmask(changed)
    assert twice.value.code == "replayed"
    other = Unmask(round=request.round + 1, session=request.session,
                   survivors=request.survivors, dropped=())
    with pytest.raises(SecAggRejected) as wrong:
        device.on_unmask(other)
    assert wrong.value.code == "wrong_round"
    # a graph that is not the round's, a threshold of half or less, forged shares
    from broker_bridge._secagg_device import SecAggDevice
    from cloud_aggregator._secagg import SecAggRound
    server = SecAggRound(fleet="f", round_index=1, clip=1, scale=10, fraction=1.0, size=5,
                         max_devices=9)
    fleet = {d: SecAggDevice(fleet="f", setup=server.setup) for d in devices}
    for d, dev in fleet.items():
        server.on_advertise(d, dev.advertise())
    keys = server.close_advertising()
    k0 = keys[devices[0]]
    import dataclasses
    with pytest.raises(SecAggRejected, match="graph"):
        fleet[devices[0]].on_keys(dataclasses.replace(k0, neighbours=k0.neighbours[:-1]))
    with pytest.raises(SecAggRejected, match="more than half"):
        fleet[devices[0]].on_keys(dataclasses.replace(k0, threshold=k0.degree // 2))
    for d, dev in fleet.items():
        server.on_shares(d, dev.on_keys(keys[d]))
    delivered = server.close_sharing()
    d1 = delivered[devices[1]]
    first = d1.sealed[0]
    forged = dataclasses.replace(first, ciphertext=bytes(len(first.ciphertext)))
    with pytest.raises(SecAggRejected) as opened:
        fleet[devices[1]].on_deliver(dataclasses.replace(d1, sealed=(forged, *d1.sealed[1:])))
    assert opened.value.code == "bad_share"


def test_every_message_parses_back_and_truncation_is_refused() -> None:
    devices = ids(9)
    levels = random_levels(devices, 3, 100, np.random.default_rng(4))
    result = run_round(levels, seed=8)
    dev = result.devices[devices[0]]
    bodies = [result.server.setup, dev.advertise(), dev.keys, dev._masked, dev._unmask,
              dev._reveal]
    for body in bodies:
        assert body is not None
        raw = body.to_bytes()
        assert parse(raw) == body
        for cut in (0, 5, 27, len(raw) - 1):
            with pytest.raises(SecAggRejected) as short:
                parse(raw[:cut])
            assert short.value.code == "malformed"
        with pytest.raises(SecAggRejected):
            parse(raw + b"\x00")
    with pytest.raises(SecAggRejected):
        parse(b"FLSA\x01\x63" + bytes(22))
    assert Step.REVEAL == 8


# ---------------------------------------------------------------- cost

def test_per_device_cost_grows_with_log_n() -> None:
    """Bytes, messages, key exchanges, field multiplications and PRG words of each
    device, counted over real rounds of 32 to 512 devices (sparse graphs)."""
    words = 64
    per_device = {}
    for n in (32, 64, 128, 256, 512):
        devices = ids(n)
        levels = random_levels(devices, words, 100, np.random.default_rng(n))
        result = run_round(levels, seed=n, dropout=0.1, failure_bits=5)
        costs = [dev.cost for dev in result.devices.values()]
        per_device[n] = {
            "bytes": max(c.bytes_up + c.bytes_down for c in costs),
            "exchanges": max(c.key_exchanges for c in costs),
            "mults": max(c.field_mults for c in costs),
            "prg_words": max(c.prg_words for c in costs),
            "messages": max(c.messages_up + c.messages_down for c in costs),
            "degree": result.server.degree,
        }
        assert np.array_equal(result.total, plain_sum(levels, devices))  # type: ignore[arg-type]
    small, large = per_device[32], per_device[512]
    log_ratio = math.log(512) / math.log(32)  # 1.8, while n grows 16x
    for what in ("bytes", "exchanges", "prg_words"):
        assert large[what] <= log_ratio * small[what], (what, per_device)
    assert large["mults"] <= log_ratio**2 * small["mults"]  # k shares x threshold k/2
    assert large["messages"] == small["messages"] == 8
