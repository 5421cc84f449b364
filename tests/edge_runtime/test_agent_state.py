"""Crash-safe agent state, the artifact cache and the shared model cache."""

from __future__ import annotations

import errno
import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from broker_bridge import (
    CodecError,
    CodecSpec,
    Layout,
    ModelMeta,
    TaskSpec,
    content_hash,
    encode_model,
    weights_hash,
)
from edge_runtime import (
    AgentState,
    ArtifactCache,
    ArtifactError,
    CommitStep,
    DiskFull,
    ModelCache,
    StateError,
    Submission,
    TaskStatus,
)

TASK = TaskSpec(round=3, model_version=2, artifacts_hash="a" * 64, model_hash="b" * 64,
                nonce="task-nonce-3", codec="ef+topk:0.1+q8")


class Crash(Exception):
    pass


def _submission(residual: bytes | None = b"R1") -> Submission:
    return Submission(round=3, attempt=0, model_version=2, codec="ef+topk:0.1+q8",
                      body=b"update-bytes", residual=residual)


def test_submission_round_trips() -> None:
    for residual in (None, b"", b"xyz"):
        s = Submission(round=1, attempt=2, model_version=3, codec="fp32", body=b"\x00b",
                       residual=residual)
        back = Submission.from_bytes(s.to_bytes())
        assert (back.round, back.attempt, back.model_version, back.codec, back.body,
                back.residual) == (1, 2, 3, "fp32", b"\x00b", residual)
    with pytest.raises(StateError):
        Submission.from_bytes(b"FLSB\xff\xff\xff\xff")


def test_commit_then_restart_resends_same_bytes(tmp_path: Path) -> None:
    state = AgentState(directory=tmp_path)
    state.begin(TASK, attempt=0)
    state.set_status(TaskStatus.TRAINING)
    state.commit(_submission())
    again = AgentState(directory=tmp_path)
    assert again.record is not None and again.record.status == TaskStatus.ENCODED
    assert again.submission is not None and again.submission.body == b"update-bytes"
    assert again.residual() == b"R1"
    with pytest.raises(StateError, match="submitted"):
        again.set_status(TaskStatus.TRAINING)
    again.set_status(TaskStatus.ACKED)
    assert AgentState(directory=tmp_path).record.status == TaskStatus.ACKED  # type: ignore[union-attr]


@pytest.mark.parametrize("point", [CommitStep.SUBMISSION_WRITTEN, CommitStep.RECORD_COMMITTED])
def test_a_crash_around_the_commit_point_loses_nothing(tmp_path: Path, point: CommitStep) -> None:
    # The residual of the previous round is in place.
    (tmp_path / "residual.ef").write_bytes(b"R0")
    steps: list[CommitStep] = []

    def hook(at: CommitStep) -> None:
        steps.append(at)
        if at == point:
            raise Crash(at)

    state = AgentState(directory=tmp_path, on_step=hook)
    state.begin(TASK, attempt=0)
    state.set_status(TaskStatus.TRAINING)
    with pytest.raises(Crash):
        state.commit(_submission())
    assert steps[-1] == point
    after = AgentState(directory=tmp_path)
    assert after.record is not None
    if point == CommitStep.SUBMISSION_WRITTEN:
        # Not committed: the task is still in progress (train again), old residual kept.
        assert after.record.status == TaskStatus.TRAINING
        assert after.submission is None and after.residual() == b"R0"
    else:
        # Committed: re-send it; the residual write is rolled forward.
        assert after.record.status == TaskStatus.ENCODED
        assert after.submission is not None and after.submission.body == b"update-bytes"
        assert after.residual() == b"R1"


def test_a_damaged_submission_is_never_retrained(tmp_path: Path) -> None:
    state = AgentState(directory=tmp_path)
    state.begin(TASK, attempt=0)
    state.commit(_submission())
    (tmp_path / "submission.bin").write_bytes(b"garbage")
    after = AgentState(directory=tmp_path)
    assert after.record is not None and after.record.status == TaskStatus.FAILED
    assert not after.record.status.in_progress


def test_corrupt_task_file_starts_afresh(tmp_path: Path) -> None:
    (tmp_path / "task.json").write_text("{not json")
    assert AgentState(directory=tmp_path).record is None


def test_full_disk_is_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_runtime._state as mod

    def no_space(path: Path, data: bytes, **kw: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    state = AgentState(directory=tmp_path)
    monkeypatch.setattr(mod, "atomic_write", no_space)
    with pytest.raises(DiskFull) as info:
        state.begin(TASK, attempt=0)
    assert info.value.errno == errno.ENOSPC
    assert state.record is None


# -- artifact cache --------------------------------------------------------------------


def _bundle() -> tuple[dict[str, bytes], str]:
    files = {name: name.encode() * 10 for name in
             ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")}
    listed = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    content = content_hash(listed)
    manifest = {"format": "fleetlearn-artifacts/1", "files": listed, "content_hash": content}
    files["artifacts.json"] = json.dumps(manifest).encode()
    return files, content


def test_artifact_cache_verifies_before_anything_is_visible(tmp_path: Path) -> None:
    cache = ArtifactCache(root=tmp_path)
    files, content = _bundle()
    with pytest.raises(ArtifactError, match="task expects"):
        cache.install(files, expected_hash="b" * 64)
    bad = dict(files, checkpoint=b"tampered")
    with pytest.raises(ArtifactError, match="corrupt"):
        cache.install(bad, expected_hash=content)
    with pytest.raises(ArtifactError, match=r"no artifacts\.json"):
        cache.install({k: v for k, v in files.items() if k != "artifacts.json"},
                      expected_hash=content)
    assert cache.hashes() == [] and cache.path(content) is None
    assert list(tmp_path.iterdir()) == []  # no temp folders left behind
    path = cache.install(files, expected_hash=content)
    assert cache.path(content) == path and (path / "checkpoint").read_bytes() == files["checkpoint"]


def test_artifact_cache_shared_by_concurrent_installers(tmp_path: Path) -> None:
    cache_a, cache_b = ArtifactCache(root=tmp_path), ArtifactCache(root=tmp_path)
    files, content = _bundle()
    errors: list[BaseException] = []

    def install(cache: ArtifactCache) -> None:
        try:
            cache.install(files, expected_hash=content)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=install, args=(c,)) for c in (cache_a, cache_b) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in tmp_path.iterdir()] == [content]


# -- model cache -----------------------------------------------------------------------


def _model(run: str, version: int, weights: np.ndarray, layout: Layout,
           base: np.ndarray | None = None) -> tuple[ModelMeta, bytes]:
    from broker_bridge import ModelVersion

    fp32 = CodecSpec.parse("fp32")
    body = encode_model(weights, layout, fp32, base=None if base is None else
                        ModelVersion(version=version - 1, weights=base))
    return ModelMeta(run=run, model_version=version, model_hash=weights_hash(weights)), body


def test_model_cache_decodes_once_applies_deltas_and_keeps_the_last_few() -> None:
    layout = Layout(tensors=(("w", (4,)), ("b", (2,))))
    v1 = np.arange(6, dtype=np.float32)
    v2 = v1 + 0.5
    cache = ModelCache(keep=2)
    m1, b1 = _model("run-a", 1, v1, layout)
    assert cache.offer(m1, b1)
    assert not cache.offer(m1, b"ignored: already known")
    m2, b2 = _model("run-a", 2, v2, layout, base=v1)
    cache.offer(m2, b2)
    got = cache.get(m2.model_hash, layout)
    assert got is not None and got.version == 2
    np.testing.assert_allclose(got.weights, v2)
    assert cache.get(m2.model_hash, layout) is got  # decoded once, shared
    m3, b3 = _model("run-a", 3, v2 + 1, layout)
    cache.offer(m3, b3)
    assert cache.versions() == [2, 3] and cache.get(m1.model_hash, layout) is None


def test_model_cache_never_serves_another_runs_weights_for_a_version_number() -> None:
    """An aggregator started afresh numbers from 0 again: its version 0 must not be
    evicted by an old run's higher numbers, and its version 4 must not be taken for the
    old run's version 4."""
    layout = Layout(tensors=(("w", (6,)),))
    cache = ModelCache(keep=3)
    old = {v: np.full(6, v, np.float32) for v in (3, 4, 5)}
    for v, w in old.items():
        cache.offer(*_model("old-run", v, w, layout))
    fresh0 = np.full(6, -1.0, np.float32)
    m0, b0 = _model("new-run", 0, fresh0, layout)
    assert cache.offer(m0, b0)
    got = cache.get(m0.model_hash, layout)
    assert got is not None and np.array_equal(got.weights, fresh0)
    fresh4 = np.full(6, 40.0, np.float32)
    m4, b4 = _model("new-run", 4, fresh4, layout)
    assert cache.offer(m4, b4)  # a new model, not "version 4, already known"
    got4 = cache.get(m4.model_hash, layout)
    assert got4 is not None and np.array_equal(got4.weights, fresh4)
    # a body whose weights do not match the hash it claims is refused, not served
    lie = ModelMeta(run="x", model_version=9, model_hash=weights_hash(fresh4 + 1))
    cache.offer(lie, b4)
    with pytest.raises(CodecError, match="other weights"):
        cache.get(lie.model_hash, layout)
    assert not cache.has(lie.model_hash)
