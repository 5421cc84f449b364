"""Secure aggregation, the primitives both sides need (Bonawitz et al. 2017; the sparse
neighbourhood graph of SecAgg+, Bell et al. 2020).

The aggregator of a secure round learns only the sum of the round's updates. Each device
turns its update into integers mod 2^32 (``FixedPoint``), adds a pairwise mask per
neighbour (``+`` towards a neighbour whose round index is higher, ``-`` towards a lower
one, so the pairwise masks cancel in the sum) and a self mask, and sends the result. The
seeds behind the masks are Shamir-shared among the neighbours, so that after the upload
deadline the aggregator can remove the pairwise masks of devices that dropped and the
self masks of those that uploaded, and nothing else (docs/PROTOCOL.md section 11).

Everything here is deterministic given its inputs (random values come in as arguments),
so docs/vectors/secagg.json can pin it byte for byte:

- ``prg(key, words)``: the mask expansion, ChaCha20 keystream (RFC 8439 block function,
  all-zero 96-bit nonce, block counter from 0) read as little-endian u32 words.
- ``pair_key``/``share_key``: X25519 shared secrets through HKDF-SHA256 into a mask seed
  (both directions the same) or a one-way share-encryption key (ChaCha20-Poly1305).
- ``share_secret``/``reconstruct``: Shamir over GF(2^521 - 1). Our own ~40 lines rather
  than pycryptodome's ``Crypto.Protocol.SecretSharing``: that one works in GF(2^128), so
  each 32-byte seed would need two sharings, and it would add a dependency to every
  device; this one is tested exhaustively (tests/broker_bridge/test_secagg.py).
- ``degree``/``neighbours``: the SecAgg+ graph, a Harary graph (ring, k/2 each side) over
  a seeded permutation of the round's devices, complete while the fleet is small.
- ``FixedPoint``: clip, scale, stochastic rounding, mod 2^32, with the overflow check
  (n devices x the largest level must fit in a signed 32-bit sum).
- ``shared_subset``: the round's random coordinate subset (sparsification that survives
  masking: every device sends the same coordinates, chosen from a shared seed).
- ``check_codec``: which update codecs work with secure aggregation (only ``fp32``: the
  masked upload is its own format, see the function).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker_bridge._codec_spec import CodecSpec
from broker_bridge._errors import SecAggRejected
from device_profiles._errors import ConfigError

PRIME = 2**521 - 1
"""The Shamir field: a Mersenne prime above every 32-byte secret."""
SHARE_BYTES = 66
"""A share value (an element of the field), little-endian."""
SECRET_BYTES = 32
MODULUS_BITS = 32
U32 = np.dtype("<u4")
Words = npt.NDArray[np.uint32]
RandomInt = Callable[[int], int]
"""``f(bound) -> int`` uniform in [0, bound): ``secrets.randbelow`` in production."""

MASK_INFO = b"fleetlearn secagg mask v1"
SHARE_INFO = b"fleetlearn secagg share v1"
COMMIT_INFO = b"fleetlearn secagg commit v1"


def rejected(code: str, detail: str) -> SecAggRejected:
    return SecAggRejected(code, detail)


# ---------------------------------------------------------------- keys and the PRG

Secret = bytes | X25519PrivateKey
"""An X25519 secret: its 32 bytes, or the key object (loading the bytes costs as much as
an exchange, so a device keeps the object)."""


def private_key(secret: Secret) -> X25519PrivateKey:
    if isinstance(secret, X25519PrivateKey):
        return secret
    return X25519PrivateKey.from_private_bytes(secret)


def public_bytes(secret: Secret) -> bytes:
    """The X25519 public key (32 bytes) of a secret."""
    return private_key(secret).public_key().public_bytes_raw()


def _exchange(secret: Secret, peer_public: bytes) -> bytes:
    try:
        return private_key(secret).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives the all-zero secret
        raise rejected("malformed", f"unusable X25519 public key: {exc}") from exc


def context(fleet: str, round_index: int, session: bytes, *indices: int) -> bytes:
    """What a derived key is bound to: u8 length + the fleet id (ASCII), the round (u32),
    the 16-byte session, then each device's round index (u32), all little-endian."""
    fleet_bytes = fleet.encode("ascii")
    return (len(fleet_bytes).to_bytes(1, "little") + fleet_bytes
            + round_index.to_bytes(4, "little") + session
            + b"".join(i.to_bytes(4, "little") for i in indices))


def hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def pair_key(secret: Secret, peer_public: bytes, *, fleet: str, round_index: int,
             session: bytes, a: int, b: int) -> bytes:
    """The pairwise mask seed of devices ``a`` and ``b`` (round indices; the same seed
    from either side)."""
    lo, hi = sorted((a, b))
    return hkdf(_exchange(secret, peer_public),
                MASK_INFO + context(fleet, round_index, session, lo, hi))


def share_key(secret: Secret, peer_public: bytes, *, fleet: str, round_index: int,
              session: bytes, sender: int, receiver: int) -> bytes:
    """The ChaCha20-Poly1305 key of the shares ``sender`` encrypts for ``receiver``
    (one message per direction, so the all-zero nonce is used once per key)."""
    return hkdf(_exchange(secret, peer_public),
                SHARE_INFO + context(fleet, round_index, session, sender, receiver))


def commitment(seed: bytes, *, fleet: str, round_index: int, session: bytes) -> bytes:
    """SHA-256 commitment to a (fresh, random) self-mask seed, sent with the device's
    keys; a seed reconstructed from shares must match it, so lying shares cannot change
    the sum, only abandon the round."""
    return hashlib.sha256(COMMIT_INFO + context(fleet, round_index, session) + seed).digest()


def prg(key: bytes, words: int) -> Words:
    """``words`` u32 words of ChaCha20 keystream under ``key`` (nonce 0, counter 0)."""
    if len(key) != 32:
        raise ValueError("a PRG key is 32 bytes")
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * words)), dtype=U32).astype(np.uint32)


def uniform_below(key: bytes, bounds: Sequence[int]) -> list[int]:
    """One integer uniform in [0, r) per bound r (1 <= r <= 2^32), by rejection from the
    PRG's words: word w is used when w < 2^32 - (2^32 mod r), as w mod r."""
    out: list[int] = []
    stream = prg(key, 2 * len(bounds) + 16)
    pos = 0
    for r in bounds:
        limit = (1 << 32) - ((1 << 32) % r)
        while True:
            if pos == len(stream):
                stream = np.concatenate([stream, _more(key, len(stream))])
            w = int(stream[pos])
            pos += 1
            if w < limit:
                out.append(w % r)
                break
    return out


def _more(key: bytes, have: int) -> Words:
    return prg(key, 2 * have)[have:]


def permutation(key: bytes, n: int, take: int | None = None) -> list[int]:
    """The first ``take`` (default n) entries of a Fisher-Yates shuffle of 0..n-1 driven
    by ``uniform_below``: for i in 0..take-1, swap i with i + uniform_below(n - i)."""
    take = n if take is None else take
    perm = list(range(n))
    for i, j in enumerate(uniform_below(key, [n - i for i in range(take)])):
        perm[i], perm[i + j] = perm[i + j], perm[i]
    return perm[:take]


def shared_subset(seed: bytes, size: int, fraction: float) -> npt.NDArray[np.int64]:
    """The round's coordinates: ``ceil(fraction * size)`` (at least 1) distinct indices
    of 0..size-1, increasing; the same on every device given the round's seed."""
    if not (0.0 < fraction <= 1.0) or size < 1:
        raise ConfigError(f"a shared subset needs 0 < fraction <= 1 and size >= 1, "
                          f"got {fraction}, {size}")
    count = min(size, max(1, math.ceil(fraction * size)))
    if count == size:
        return np.arange(size, dtype=np.int64)
    return np.sort(np.asarray(permutation(seed, size, count), dtype=np.int64))


def check_codec(spec: CodecSpec) -> None:
    """Refuse (``ConfigError``) an uplink codec that cannot be summed under masks.

    Only ``fp32`` works: the masked upload replaces the codec (fixed point with the
    round's common scale, the round's shared coordinate subset, u32 words). Each other
    stage is refused for its own reason: ``topk``/``thresh`` choose coordinates from the
    device's own values (devices would send different coordinates, and the positions
    alone leak); ``q8``/``q4``/``tern``/``q1`` carry a scale per device, and levels of
    different scales do not add up; ``fp16`` is a float coding, replaced by fixed point;
    ``zstd`` cannot compress masked words (they are uniformly random); ``ef`` needs one of
    those lossy stages."""
    problems = []
    if spec.sparsify is not None:
        problems.append(f"{spec.sparsify} picks coordinates from each device's own values "
                        f"(use the round's shared random subset instead)")
    if spec.values.quantized:
        problems.append(f"{spec.values.kind} scales each device's values differently, so "
                        f"their levels do not add up")
    elif spec.values.kind == "fp16":
        problems.append("fp16 is replaced by the round's fixed point")
    if spec.zstd_level is not None:
        problems.append("zstd cannot compress masked (uniformly random) words")
    if problems:
        raise ConfigError(f"codec {str(spec)!r} does not work with secure aggregation: "
                          + "; ".join(problems) + " (use 'fp32')")


# ---------------------------------------------------------------- Shamir

def share_secret(secret: bytes, xs: Sequence[int], threshold: int,
                 randbelow: RandomInt) -> dict[int, int]:
    """Shamir shares of a 32-byte secret (little-endian integer) at the points ``xs``
    (distinct, 1..2^32-1): any ``threshold`` of them give it back, fewer say nothing."""
    if len(secret) != SECRET_BYTES:
        raise ValueError("a secret is 32 bytes")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or min(xs) < 1:
        raise ValueError(f"cannot share {threshold}-of-{len(xs)} at {list(xs)[:8]}...")
    coeffs = [int.from_bytes(secret, "little")] + [randbelow(PRIME)
                                                  for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % PRIME
        out[x] = acc
    return out


def reconstruct(shares: dict[int, int], threshold: int) -> bytes:
    """The secret from ``threshold`` shares (x -> y); more are ignored (see ``recover``)."""
    if len(shares) < threshold:
        raise rejected("bad_share", f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())[:threshold]
    for x, y in points:
        if not (1 <= x < PRIME and 0 <= y < PRIME):
            raise rejected("malformed", f"share ({x}, ...) out of the field")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise rejected("bad_share", "shares do not interpolate to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "little")


def recover(shares: dict[int, int], threshold: int, check: Callable[[bytes], bool],
            *, attempts: int = 64, randbelow: RandomInt | None = None) -> bytes:
    """A secret that ``check`` accepts, from ``threshold`` of ``shares``: first the lowest
    points, then up to ``attempts`` other subsets (drawn with ``randbelow``) in case
    some shares lie. Raises ``SecAggRejected('bad_share')`` rather than return a secret
    that fails ``check``."""
    points = sorted(shares)

    def tries() -> Iterator[list[int]]:
        yield points[:threshold]
        if randbelow is None or len(points) <= threshold:
            return
        for _ in range(attempts):
            pool = list(points)
            for i in range(threshold):
                j = i + randbelow(len(pool) - i)
                pool[i], pool[j] = pool[j], pool[i]
            yield sorted(pool[:threshold])

    for subset in tries():
        try:
            secret = reconstruct({x: shares[x] for x in subset}, threshold)
        except SecAggRejected:
            continue
        if check(secret):
            return secret
    raise rejected("bad_share", f"no {threshold} of {len(shares)} shares pass the check")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "little")


def share_from_bytes(data: bytes) -> int:
    y = int.from_bytes(data, "little")
    if len(data) != SHARE_BYTES or y >= PRIME:
        raise rejected("malformed", "a share is 66 bytes, below 2^521 - 1")
    return y


# ---------------------------------------------------------------- the neighbourhood graph

def degree(n: int, *, dropout: float = 1 / 3, failure_bits: int = 20) -> int:
    """Neighbours per device for a round of ``n``: the smallest even k such that, with a
    ``dropout`` fraction of devices gone at random, the chance that some device keeps
    fewer than ``threshold(k)`` responding neighbours is at most 2^-failure_bits (a
    binomial bound, which the hypergeometric truth only improves); n - 1 (every other
    device) when that is no more. k = O(log n)."""
    if n < 2:
        return 0
    alive = 1.0 - dropout
    k = 2
    while k < n - 1:
        t = threshold(k)
        tail = sum(math.comb(k, i) * alive**i * dropout ** (k - i) for i in range(t))
        if n * tail <= 2.0**-failure_bits:
            return k
        k += 2
    return n - 1


def threshold(k: int) -> int:
    """Shares needed of a device's k: more than half, so that an aggregator that tells
    some neighbours a device dropped and others it survived still cannot get both its
    self-mask seed and its mask key."""
    return k // 2 + 1


def neighbours(index: int, n: int, k: int, seed: bytes) -> list[int]:
    """Round indices (1..n) of the neighbours of device ``index``: devices sit on a ring in
    the order of ``permutation(seed, n)`` and each is joined to the k/2 before and after
    it (all others when k >= n - 1). Symmetric."""
    if not 1 <= index <= n:
        raise rejected("malformed", f"index {index} outside 1..{n}")
    if k >= n - 1:
        return [j for j in range(1, n + 1) if j != index]
    ring, where_of = _ring(seed, n)
    where = where_of[index - 1]
    half = k // 2
    out = {ring[(where + d) % n] + 1 for d in range(-half, half + 1) if d}
    return sorted(out)


@functools.lru_cache(maxsize=4)
def _ring(seed: bytes, n: int) -> tuple[list[int], list[int]]:
    """The round's ring and each device's place on it (an aggregator numbers every
    device of a round against the same ring)."""
    ring = permutation(seed, n)
    where = [0] * n
    for place, device in enumerate(ring):
        where[device] = place
    return ring, where


# ---------------------------------------------------------------- fixed point

def secure_level_bound(devices: int) -> int:
    """The largest level each of ``devices`` may send so that their sum fits."""
    return ((1 << (MODULUS_BITS - 1)) - 1) // devices


@dataclass(frozen=True, kw_only=True)
class FixedPoint:
    """Values clipped to [-clip, clip], times ``scale``, stochastically rounded to
    integers, mod 2^32. ``max_devices`` of them must sum without wrapping: refused at
    construction otherwise (a ``ConfigError``)."""

    clip: float
    scale: float
    max_devices: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secure aggregation clip must be > 0, got {self.clip}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"secure aggregation scale must be > 0, got {self.scale}")
        if self.max_devices < 1:
            raise ConfigError("secure aggregation needs at least one device per round")
        if self.max_devices * self.level_bound > (1 << (MODULUS_BITS - 1)) - 1:
            raise ConfigError(
                f"secure aggregation overflows: {self.max_devices} devices x clip "
                f"{self.clip} x scale {self.scale} (levels up to {self.level_bound}) "
                f"does not fit a signed {MODULUS_BITS}-bit sum; lower the clip or scale")

    @property
    def level_bound(self) -> int:
        """The largest |level| one device sends."""
        return math.ceil(self.clip * self.scale)

    def encode(self, values: npt.NDArray[np.float32], uniforms: npt.NDArray[np.float64]
               ) -> Words:
        """Levels floor(x * scale + u) for u ~ U[0, 1) (unbiased), as u32 words."""
        x = np.clip(np.asarray(values, dtype=np.float64), -self.clip, self.clip)
        levels = np.floor(x * self.scale + uniforms).astype(np.int64)
        levels = np.clip(levels, -self.level_bound, self.level_bound)
        return (levels & 0xFFFFFFFF).astype(np.uint32)

    def decode_sum(self, words: Words, devices: int) -> npt.NDArray[np.float64]:
        """The float sum of ``devices`` encoded vectors from their u32 sum."""
        if devices > self.max_devices:
            raise ConfigError(f"{devices} devices exceed max_devices {self.max_devices}")
        return words.astype(np.uint32).view(np.int32).astype(np.float64) / self.scale

    def decode_levels(self, words: Words) -> npt.NDArray[np.int64]:
        return words.astype(np.uint32).view(np.int32).astype(np.int64)
