"""Local data adapters, validation against the model input, MNIST-1D and partitioners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime import DataError
from edge_runtime._data import DataSource, load_callable, load_csv, load_npz, validate_for_model
from edge_runtime._datasets import (
    load_mnist1d,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)


def _xy(n: int = 20, features: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, features)).astype(np.float32), np.arange(n) % 10


def test_npz(tmp_path: Path) -> None:
    x, y = _xy()
    np.savez(tmp_path / "d.npz", feats=x.astype(np.float64), labels=y.astype(np.int32))
    got_x, got_y = load_npz(tmp_path / "d.npz", x_key="feats", y_key="labels")
    assert got_x.dtype == np.float32 and got_y.dtype == np.int64
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    with pytest.raises(DataError, match="no array named x"):
        load_npz(tmp_path / "d.npz")
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "absent.npz")
    np.savez(tmp_path / "r.npz", x=x, y=x[:, 0])
    _, target = DataSource(kind="npz", location=str(tmp_path / "r.npz"), task="regression").load()
    assert target.dtype == np.float32
    with pytest.raises(DataError, match="whole numbers"):
        load_npz(tmp_path / "r.npz")


def test_csv_with_and_without_header(tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("a,label,b\n1,3,2\n4,5,6\n")
    x, y = load_csv(tmp_path / "h.csv", label_column="label")
    np.testing.assert_array_equal(x, [[1, 2], [4, 6]])
    np.testing.assert_array_equal(y, [3, 5])
    (tmp_path / "n.csv").write_text("0;1.5;2.5\n1;3.5;4.5\n")
    x, y = load_csv(tmp_path / "n.csv", label_column=0, delimiter=";")
    assert x.shape == (2, 2) and list(y) == [0, 1]
    x, y = DataSource(
        kind="csv", location=str(tmp_path / "n.csv"), delimiter=";", header=False, task="regression"
    ).load()
    assert y.dtype == np.float32 and list(y) == [2.5, 4.5]  # the last column by default
    with pytest.raises(DataError, match="no column named"):
        load_csv(tmp_path / "h.csv", label_column="class")
    (tmp_path / "bad.csv").write_text("1,2,3\n4,x,6\n")
    with pytest.raises(DataError, match="non-numeric"):
        load_csv(tmp_path / "bad.csv", header=False)
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,6\n")
    with pytest.raises(DataError, match="row 2"):
        load_csv(tmp_path / "ragged.csv")


def test_callable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def load(n=5):\n"
        "    return np.ones((n, 40)), np.zeros(n, dtype=int)\n"
        "def wrong():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y = load_callable("mydata:load", kwargs={"n": 7})
    assert x.shape == (7, 40) and x.dtype == np.float32 and y.dtype == np.int64
    with pytest.raises(DataError, match=r"\(x, y\)"):
        load_callable("mydata:wrong")
    with pytest.raises(DataError, match="module:function"):
        load_callable("mydata.load")
    with pytest.raises(DataError, match="cannot import"):
        load_callable("no_such_module_here:load")
    with pytest.raises(DataError, match="no callable"):
        load_callable("mydata:absent")


def test_validate_for_model() -> None:
    x, y = _xy(features=41)
    with pytest.raises(DataError) as info:
        validate_for_model(x, y, ["batch", 40])
    assert str(info.value) == (
        "data has 41 features per sample; the model's input 'input' takes [batch, 40]"
    )
    x, y = _xy()
    validate_for_model(x, y, ["batch", 40], num_classes=10)
    with pytest.raises(DataError, match=r"\[0, 9\]"):
        validate_for_model(x, y, ["batch", 40], num_classes=5)
    with pytest.raises(DataError, match="float32"):
        validate_for_model(x.astype(np.float64), y, ["batch", 40])
    with pytest.raises(DataError, match="shape"):
        validate_for_model(x.reshape(20, 4, 10), y, ["batch", 40])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        validate_for_model(bad, y, ["batch", 40])
    validate_for_model(x, x[:, 0].copy(), [None, 40], task="regression")


def test_mnist1d_is_generated_once_and_cached(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = tmp_path_factory.getbasetemp().parent / "fleetlearn-cache"
    data = load_mnist1d(cache_dir=cache)
    assert data.x_train.shape == (8000, 40) and data.x_test.shape == (2000, 40)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert set(np.unique(data.y_train)) == set(range(10))
    assert (cache / "mnist1d-n10000-seed42.npz").exists()
    again = load_mnist1d(cache_dir=cache)
    np.testing.assert_array_equal(again.x_train, data.x_train)


def _check_partition(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert len(np.unique(joined)) == n  # no overlap, nothing lost


def test_reference_dirichlet_partition() -> None:
    labels = np.random.default_rng(5).integers(0, 10, 8000)
    parts = partition_dirichlet(labels, 100, alpha=0.5, seed=0)
    _check_partition(parts, 8000)
    assert min(len(p) for p in parts) >= 8
    again = partition_dirichlet(labels, 100, alpha=0.5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_dirichlet(labels, 100, alpha=0.5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    # Label skew: a typical device is dominated by few classes.
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert float(np.median(top_share)) > 0.3


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(50, 400),
    devices=st.integers(1, 20),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 1000),
)
def test_dirichlet_covers_every_sample(n: int, devices: int, alpha: float, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, 10, n)
    parts = partition_dirichlet(labels, devices, alpha=alpha, seed=seed, min_samples=2)
    _check_partition(parts, n)
    assert min(len(p) for p in parts) >= 2


def test_iid_and_shards() -> None:
    parts = partition_iid(1003, 10, seed=0)
    _check_partition(parts, 1003)
    assert {len(p) for p in parts} <= {100, 101}
    labels = np.repeat(np.arange(10), 100)
    shards = partition_shards(labels, 20, shards_per_device=2, seed=0)
    _check_partition(shards, 1000)
    assert max(len(np.unique(labels[p])) for p in shards) <= 2
    with pytest.raises(ValueError):
        partition_shards(labels[:10], 20, shards_per_device=2)
