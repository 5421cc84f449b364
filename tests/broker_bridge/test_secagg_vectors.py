"""docs/vectors/secagg.json read as an implementation in another language would: every
derived value recomputed from the secrets in the file with ``cryptography``'s primitives
and the rules of docs/PROTOCOL.md section 11 (not with fleetlearn's helpers), every body
parsed by the reference parser."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np
from conformance import VECTOR_DIR
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker_bridge._secagg_msg import Advertise, Deliver, Keys, Masked, Reveal, Shares, parse

P = 2**521 - 1


def load() -> Any:
    return json.loads((VECTOR_DIR / "secagg.json").read_text())


def keystream(key: bytes, words: int) -> np.ndarray:
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(4 * words)), "<u4")


def context(fleet: str, rnd: int, session: bytes, *indices: int) -> bytes:
    f = fleet.encode()
    return bytes([len(f)]) + f + struct.pack("<I", rnd) + session + b"".join(
        struct.pack("<I", i) for i in indices)


def derive(secret: bytes, public: bytes, info: bytes) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(secret).exchange(
        X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def public(secret: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def lagrange_at_zero(points: list[tuple[int, int]]) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num, den = num * xj % P, den * (xj - xi) % P
        total = (total + yi * num * pow(den, -1, P)) % P
    return total


def test_the_primitives_are_what_section_11_says() -> None:
    v = load()["primitives"]
    assert keystream(bytes.fromhex(v["prg"]["key_hex"]), 8).tobytes().hex() == \
        v["prg"]["words_hex"]
    # Fisher-Yates driven by rejection-sampled keystream words
    key = bytes.fromhex(v["permutation"]["key_hex"])
    stream = iter(keystream(key, 1000).tolist())
    perm = list(range(v["permutation"]["n"]))
    for i in range(len(perm)):
        r = len(perm) - i
        while (w := next(stream)) >= 2**32 - 2**32 % r:
            pass
        j = i + w % r
        perm[i], perm[j] = perm[j], perm[i]
    assert perm == v["permutation"]["result"]
    g = v["graph"]
    for i, near in g["neighbours"].items():
        assert len(near) == g["degree"] and all(int(i) in g["neighbours"][str(n)] for n in near)
    fp = v["fixed_point"]
    x = np.frombuffer(bytes.fromhex(fp["values_f32_hex"]), "<f4").astype(np.float64)
    levels = np.floor(np.clip(x, -fp["clip"], fp["clip"]) * fp["scale"] + fp["uniforms"])
    words = (levels.astype(np.int64) & 0xFFFFFFFF).astype("<u4")
    assert words.tobytes().hex() == fp["words_hex"]


def test_a_whole_round_recomputes_from_its_secrets() -> None:
    r = load()["round"]
    fleet, rnd, session = r["fleet"], r["round"], bytes.fromhex(r["session_hex"])
    devs = {d["index"]: d for d in r["devices"]}
    secret = {i: {k: bytes.fromhex(d[f"{k}_hex"]) for k in ("share_secret", "mask_secret",
                                                            "seed")} for i, d in devs.items()}
    for i, d in devs.items():
        adv = parse(bytes.fromhex(d["advertise_hex"]))
        assert isinstance(adv, Advertise) and adv.session == session and adv.round == rnd
        assert adv.share_public == public(secret[i]["share_secret"])
        assert adv.mask_public == public(secret[i]["mask_secret"])
        assert adv.seed_commitment == hashlib.sha256(
            b"fleetlearn secagg commit v1" + context(fleet, rnd, session)
            + secret[i]["seed"]).digest()
        keys = parse(bytes.fromhex(d["keys_hex"]))
        assert isinstance(keys, Keys) and keys.index == i and keys.threshold == r["threshold"]
        assert [n.index for n in keys.neighbours] == d["neighbours"]
    # every sealed share opens with its direction's key; shares reconstruct the secrets
    held: dict[int, dict[int, tuple[int, int]]] = {i: {} for i in devs}
    for s, d in devs.items():
        shares = parse(bytes.fromhex(d["shares_hex"]))
        assert isinstance(shares, Shares)
        for sealed in shares.sealed:
            key = derive(secret[s]["share_secret"], public(secret[sealed.peer]["share_secret"]),
                         b"fleetlearn secagg share v1" + context(fleet, rnd, session, s,
                                                                   sealed.peer))
            plain = ChaCha20Poly1305(key).decrypt(bytes(12), sealed.ciphertext, None)
            held[s][sealed.peer] = (int.from_bytes(plain[:66], "little"),
                                    int.from_bytes(plain[66:], "little"))
    t = r["threshold"]
    for s in devs:
        points = sorted(held[s].items())[:t]
        assert lagrange_at_zero([(x, y[0]) for x, y in points]) == \
            int.from_bytes(secret[s]["seed"], "little")
        assert lagrange_at_zero([(x, y[1]) for x, y in points]) == \
            int.from_bytes(secret[s]["mask_secret"], "little")
    # masked = levels + PRG(seed) + sum over delivered neighbours of +-PRG(pair seed)
    total = np.zeros(len(r["subset"]), np.uint32)
    for i, d in devs.items():
        deliver = parse(bytes.fromhex(d["deliver_hex"]))
        assert isinstance(deliver, Deliver)
        if "masked_hex" not in d:
            assert d["device"] == r["drops_before_upload"]
            continue
        levels = np.frombuffer(bytes.fromhex(d["levels_hex"]), "<u4")
        y = levels + keystream(secret[i]["seed"], len(levels))
        for peer in (s.peer for s in deliver.sealed):
            lo, hi = sorted((i, peer))
            seed = derive(secret[i]["mask_secret"], public(secret[peer]["mask_secret"]),
                          b"fleetlearn secagg mask v1" + context(fleet, rnd, session, lo, hi))
            y = y + keystream(seed, len(levels)) if peer > i else y - keystream(seed,
                                                                               len(levels))
        masked = parse(bytes.fromhex(d["masked_hex"]))
        assert isinstance(masked, Masked) and np.array_equal(masked.words, y)
        total += levels
        if d["device"] == r["drops_after_upload"]:
            assert "reveal_hex" not in d
        else:
            assert isinstance(parse(bytes.fromhex(d["reveal_hex"])), Reveal)
    assert total.tobytes().hex() == r["sum_hex"]
    assert sorted(r["counted"]) == sorted(d["device"] for d in devs.values()
                                          if "masked_hex" in d)


def test_a_private_devices_levels_follow_section_11_4() -> None:
    v = load()["primitives"]["private_levels"]
    setup = parse(bytes.fromhex(v["setup_hex"]))
    assert setup.dp is not None  # type: ignore[attr-defined]
    mechanism, clip, bound, variance = struct.unpack_from("<Iddd", bytes.fromhex(
        v["setup_hex"]), 92)
    assert (mechanism, clip, bound, variance) == (1, v["clip"], v["norm_bound"],
                                                  v["device_variance"])
    x = np.frombuffer(bytes.fromhex(v["values_f32_hex"]), "<f4").astype(np.float64)
    norm = float(np.sqrt(np.sum(x * x)))
    x = x * min(1.0, clip / norm) * v["scale"]
    low = np.floor(x)
    rounded = (low + (np.array(v["uniforms"]) < x - low)).astype(np.int64)
    assert float(np.sqrt(np.sum(rounded * rounded))) <= bound
    assert rounded.tolist() == v["rounded"]
    words = (rounded + np.array(v["noise"])) % 2**32
    assert words.astype("<u4").tobytes().hex() == v["words_hex"]
