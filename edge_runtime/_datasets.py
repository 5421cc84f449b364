"""The reference task's data (MNIST-1D, generated locally) and how it is split over devices.

MNIST-1D comes from ``mnist1d.data.make_dataset`` with its default arguments,
10,000 samples and seed 42: 8,000 train and 2,000 test samples of 40 features.
Generation takes a few seconds, so the arrays are cached as an ``.npz`` (written
atomically). The package's download path (``get_dataset`` / ``from_pickle`` with a
URL) is never used: a simulation must not depend on the network.

Partitioners return one sorted int64 index array per device; together they cover
every sample exactly once.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker_bridge import atomic_write
from edge_runtime._errors import DataError

MNIST1D_SAMPLES = 10_000
MNIST1D_SEED = 42
CACHE_ENV = "FLEETLEARN_CACHE_DIR"


@dataclass(frozen=True, kw_only=True)
class Mnist1D:
    """MNIST-1D arrays: x float32 ``(n, 40)``, y int64 class indices 0-9."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def default_cache_dir() -> Path:
    """``$FLEETLEARN_CACHE_DIR``, else ``~/.cache/fleetlearn``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fleetlearn"


def _generate(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError(
            f"generating MNIST-1D needs the mnist1d package (pip install 'fleetlearn[sim]'): {exc}"
        ) from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    # make_dataset reseeds the global numpy and random generators: put them back.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x_train": np.asarray(data["x"], dtype=np.float32),
        "y_train": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def load_mnist1d(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    num_samples: int = MNIST1D_SAMPLES,
    seed: int = MNIST1D_SEED,
) -> Mnist1D:
    """MNIST-1D, from the cache when present, else generated locally and cached."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"mnist1d-n{num_samples}-seed{seed}.npz"
    arrays: dict[str, np.ndarray] | None = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            arrays = None  # a damaged cache is regenerated
    if arrays is None:
        arrays = _generate(num_samples, seed)
        directory.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, x_train=arrays["x_train"], y_train=arrays["y_train"],
                 x_test=arrays["x_test"], y_test=arrays["y_test"])
        atomic_write(path, buf.getvalue())
    return Mnist1D(**arrays)


def _check(num_samples: int, num_devices: int, min_samples: int = 1) -> None:
    if num_devices < 1:
        raise ValueError("num_devices must be >= 1")
    if num_samples < num_devices * min_samples:
        raise ValueError(
            f"{num_samples} samples cannot give {num_devices} devices {min_samples} each"
        )


def partition_iid(num_samples: int, num_devices: int, *, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and split into near-equal parts."""
    _check(num_samples, num_devices)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_devices)]


def partition_dirichlet(
    labels: np.ndarray,
    num_devices: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_samples: int = 8,
) -> list[np.ndarray]:
    """Label skew: each class is split over devices by proportions drawn from Dirichlet(alpha).

    Smaller ``alpha`` means more skew. Devices left under ``min_samples`` then take
    random samples from the largest devices, so every device can train.
    """
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    labels = np.asarray(labels)
    _check(len(labels), num_devices, min_samples)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for device, chunk in enumerate(np.split(members, cuts)):
            parts[device].extend(chunk.tolist())
    for device in range(num_devices):
        while len(parts[device]) < min_samples:
            donor = max(range(num_devices), key=lambda d: len(parts[d]))
            taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
            parts[device].append(taken)
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def partition_shards(
    labels: np.ndarray, num_devices: int, *, shards_per_device: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Pathological label skew: sort by label, cut into shards, give each device a few."""
    if shards_per_device < 1:
        raise ValueError("shards_per_device must be >= 1")
    labels = np.asarray(labels)
    num_shards = num_devices * shards_per_device
    _check(len(labels), num_shards)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards)
    return [
        np.sort(np.concatenate([shards[s] for s in dealt[d::num_devices]])).astype(np.int64)
        for d in range(num_devices)
    ]
