"""Strategies over the shared round aggregate: FedBuff with robust rules and clipping
(checked against numpy), journal replay after a crash, events, custom parts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import FLEET, devices, fake_update, feed_async, make
from waiting import wait_for

from broker_bridge import (
    CodecSpec,
    Layout,
    MemoryBroker,
    MemoryTransport,
    decode_update,
    encode_update,
)
from cloud_aggregator import (
    Contribution,
    DeviceOnline,
    ModelReleased,
    RoundEnded,
    RoundOpened,
    SyncRounds,
    UpdateAccepted,
    UpdateRefused,
)
from cloud_aggregator._robust import coordinate_median, multi_krum
from cloud_aggregator._store import Store


@pytest.mark.parametrize(("robust", "reference"), [
    ("median", lambda u: coordinate_median(np.stack(u))),
    ("multi_krum", lambda u: multi_krum(np.stack(u), f=1, m=4)),  # m defaults to n - f
])
def test_fedbuff_applies_robust_rules_like_numpy(tmp_path: Path, artifacts: Path, robust: str,
                                                 reference: object) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 6)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=6, buffer_size=5,
               rounds=1, robust=robust, byzantine=1, staleness="constant",
               norm_median_multiple=None)
    start = agg.params.copy()
    answered = feed_async(agg, fleet, 5)
    assert agg.model_version == 1
    updates = [fake_update(d, r, agg.layout.size) for d, r in answered]
    np.testing.assert_allclose(agg.params, start + reference(updates), atol=1e-6)  # type: ignore[operator]


def test_fedbuff_clips_like_sync_rounds(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=4, buffer_size=3,
               rounds=1, clip_norm=0.05, staleness="constant", norm_median_multiple=None)
    start = agg.params.copy()
    answered = feed_async(agg, fleet, 3)
    clipped = []
    for d, r in answered:
        u = fake_update(d, r, agg.layout.size).astype(np.float64)
        clipped.append(u * min(1.0, 0.05 / np.linalg.norm(u)))
    assert all(np.linalg.norm(fake_update(d, r, agg.layout.size)) > 0.05 for d, r in answered)
    np.testing.assert_allclose(agg.params, start + np.mean(clipped, axis=0), atol=1e-6)


def test_a_fedbuff_buffer_survives_a_crash_through_its_journal(tmp_path: Path,
                                                                artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 5)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=5, buffer_size=4,
               rounds=1, staleness="constant", norm_median_multiple=None)
    start = agg.params.copy()
    answered = feed_async(agg, fleet, 2)
    assert agg.model_version == 0
    assert isinstance(agg.channel.transport, MemoryTransport)
    agg.abort()  # crash: two updates accepted, buffer half full
    again = make(tmp_path, artifacts, broker, mode="async", concurrency=5, buffer_size=4,
                 rounds=1, staleness="constant", norm_median_multiple=None)
    # The journal put both back; a redelivery of one is a duplicate, not a third.
    first = fleet[answered[0][0]]
    first.send_update(layout=again.layout, round_index=answered[0][1])
    assert first.last_ack().status == "duplicate"
    answered += feed_async(again, fleet, 2)
    assert again.model_version == 1
    mean = np.mean([fake_update(d, r, again.layout.size) for d, r in answered], axis=0)
    np.testing.assert_allclose(again.params, start + mean, atol=1e-6)


def test_sparse_updates_add_up_like_dense_ones(tmp_path: Path, artifacts: Path) -> None:
    """A top-k update is added from its nonzeros; the model is what the dense sum gives."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1, codec="topk:0.05",
               norm_median_multiple=None)
    start = agg.params.copy()
    agg.tick()
    layout: Layout = agg.layout
    sent = []
    for d in fleet.values():
        vec = fake_update(d.id, 1, layout.size)
        body = encode_update(vec, layout, CodecSpec.parse("topk:0.05"), rng=0).body
        d.send_update(layout=layout, codec="topk:0.05", codec_body=body)
        sent.append(decode_update(body, layout))  # dense: the top 5% and zeros
    assert all(np.count_nonzero(v) < 0.06 * v.size for v in sent)
    assert agg.tick() and agg.model_version == 1
    np.testing.assert_allclose(agg.params, start + np.mean(sent, axis=0), atol=1e-6)


def test_events_tell_what_happened(tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    seen: list[object] = []
    agg = make(tmp_path, artifacts, broker, rounds=1, norm_median_multiple=None)
    agg.subscribe(seen.append)
    fleet = devices(broker, 3)
    agg.tick()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
    fleet["d0"].send_update(layout=agg.layout, round_index=99)  # no such round
    assert agg.tick()
    kinds = [type(e) for e in seen]
    assert kinds.count(DeviceOnline) == 3 and kinds.count(RoundOpened) == 1
    assert kinds.count(UpdateAccepted) == 3 and kinds.count(UpdateRefused) == 1
    assert kinds.index(ModelReleased) < kinds.index(RoundEnded)
    ended = next(e for e in seen if isinstance(e, RoundEnded))
    assert ended.metrics.outcome == "closed" and ended.metrics.devices_reported == 3


def test_a_strategy_of_ones_own(tmp_path: Path, artifacts: Path) -> None:
    """SyncRounds with another ``combine``: here, a server step capped in norm."""

    class CappedStep(SyncRounds):
        def combine(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
            norm = float(np.linalg.norm(delta))
            return params + delta * min(1.0, 0.01 / norm)

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1, strategy=CappedStep(),
               norm_median_multiple=None)
    start = agg.params.copy()
    agg.tick()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
    assert agg.tick() and agg.model_version == 1
    assert np.linalg.norm(agg.params - start) == pytest.approx(0.01, rel=1e-4)


def test_a_journal_batch_never_overfills_a_robust_fedbuff_buffer(tmp_path: Path,
                                                                  artifacts: Path) -> None:
    """While run() loops, updates wait in the journal for a group commit. A robust
    buffer holds 2 x buffer_size updates; those waiting must count against its room,
    or an update would be acknowledged and then not fit (lost)."""
    import threading

    broker = MemoryBroker()
    fleet = devices(broker, 6)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=6, buffer_size=2,
               rounds=50, robust="median", staleness="constant", norm_median_multiple=None)
    agg.tick()
    assert all(d.tasks for d in fleet.values())
    agg.journal.max_delay_s = 0.5  # one batch for all six
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 30.0}, daemon=True)
    runner.start()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
    deadline = time.monotonic() + 20
    while sum(1 for d in fleet.values() if d.acks) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    agg.stop()
    runner.join(timeout=20)
    statuses = sorted(d.acks[0].status for d in fleet.values())
    accepted = statuses.count("accepted")
    assert accepted == 4, statuses  # the buffer's room: 2 x buffer_size
    assert [a.reason.split(":")[0] for d in fleet.values() for a in d.acks
            if a.status == "rejected"] == ["buffer_full"] * 2
    # What was acknowledged is what the models were made of.
    assert agg.model_version == 1 and agg.history[-1].devices_reported == 4


def test_a_round_never_ends_with_an_admitted_update_left_uncounted(
        tmp_path: Path, artifacts: Path) -> None:
    """An update admitted before the deadline but still waiting for its group commit
    when the deadline passes is counted in the round it answered (it is acknowledged
    'accepted' after its commit: it must then be in the model)."""
    import threading

    from cloud_aggregator import ManualClock

    broker = MemoryBroker()
    clock = ManualClock()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, manual=clock, rounds=1, quorum=2,
               deadline_s=30.0, norm_median_multiple=None)
    assert agg.tick()
    start = agg.params.copy()
    agg.journal.max_delay_s = 60.0  # nothing commits on its own while run() loops
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 30.0}, daemon=True)
    runner.start()
    for d in fleet.values():
        d.send_update(layout=agg.layout)
    time.sleep(0.2)
    assert not any(d.acks for d in fleet.values())  # all three wait for their commit
    clock.advance(31.0)
    agg.wake()
    runner.join(timeout=20)
    assert not runner.is_alive()
    assert [d.acks[0].status for d in fleet.values()] == ["accepted"] * 3
    assert agg.model_version == 1 and agg.history[-1].devices_reported == 3
    mean = np.mean([fake_update(d, 1, agg.layout.size) for d in fleet], axis=0)
    np.testing.assert_allclose(agg.params, start + mean, atol=1e-6)


def test_a_full_journal_batch_commits_at_once(tmp_path: Path, artifacts: Path) -> None:
    """However fast updates arrive, the batch waiting for its group commit stays bounded
    (in count and in body bytes): the update that fills it commits it."""
    import threading

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1, norm_median_multiple=None)
    assert agg.tick()
    agg.journal.max_delay_s = 60.0  # the run loop would wait a minute
    agg.journal.max_batch = 2
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 30.0}, daemon=True)
    runner.start()
    first, second, third = fleet.values()
    first.send_update(layout=agg.layout)
    assert not first.acks  # waiting for its batch
    second.send_update(layout=agg.layout)  # fills the batch: its commit starts now
    # (on the journal's writer thread, not in a minute: the acks follow its fsync)
    assert wait_for(lambda: first.acks and second.acks, 20.0)
    assert [d.acks[0].status for d in (first, second)] == ["accepted", "accepted"]
    agg.journal.max_batch = 128
    agg.journal.max_bytes = 1  # now the byte budget fills first: any body fills it
    third.send_update(layout=agg.layout)
    assert wait_for(lambda: third.acks, 20.0)
    assert third.last_ack().status == "accepted"
    agg.stop()
    runner.join(timeout=20)


def test_a_dropped_fedbuff_buffer_is_not_replayed_after_a_restart(
        tmp_path: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffer whose model cannot be made (here: not finite) is dropped; a restart
    must not bring its updates back into the next buffer."""
    from cloud_aggregator import AggregatorError, ModelState

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=3, buffer_size=2,
               rounds=2, staleness="constant", norm_median_multiple=None)

    def broken(self: ModelState, delta: np.ndarray) -> np.ndarray:
        raise AggregatorError("the new global model is not finite")

    with monkeypatch.context() as patch:
        patch.setattr(ModelState, "stepped", broken)
        feed_async(agg, fleet, 2)
        assert agg.model_version == 0 and agg.strategy.buffered == 0  # type: ignore[attr-defined]
    agg.abort()
    again = make(tmp_path, artifacts, broker, mode="async", concurrency=3, buffer_size=2,
                 rounds=2, staleness="constant", norm_median_multiple=None)
    assert again.model_version == 0  # the dropped updates did not come back as a model
    assert again.strategy.buffered == 0  # type: ignore[attr-defined]


def test_fedbuff_releases_between_checkpoints_are_re_derived_after_a_crash(
        tmp_path: Path, artifacts: Path) -> None:
    """Releases need no checkpoint to be durable: after a crash the journals since the
    last checkpoint give the very same model again (bit for bit), each metrics line is
    written once, and the next checkpoint drops those journals."""
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    settings = dict(mode="async", concurrency=4, buffer_size=2, rounds=10,
                    staleness="constant", checkpoint_every_s=3600.0)
    agg = make(tmp_path, artifacts, broker, **settings)
    feed_async(agg, fleet, 7)  # three releases and one update in the open buffer
    assert agg.model_version == 3
    released = agg.params.copy()
    saved = agg.store.checkpoint(FLEET)
    assert saved is not None and saved.model_version == 0  # released, not checkpointed
    agg.abort()
    again = make(tmp_path, artifacts, broker, **settings)
    assert again.model_version == 3
    assert again.params.tobytes() == released.tobytes()
    assert again.strategy.buffered == 1  # type: ignore[attr-defined]
    rounds = [row["round"] for row in again.metrics_log.read()]
    assert rounds == [1, 2, 3]
    again.close()  # a stop checkpoints the last release and drops its journals
    store = Store(tmp_path / "aggregator.sqlite")
    try:
        record = store.checkpoint(FLEET)
        assert record is not None and record.model_version == 3
        assert len(list(store.round_updates(FLEET, 3))) == 1  # the open buffer stays
        assert all(not list(store.round_updates(FLEET, s)) for s in range(3))
    finally:
        store.close()


def test_checkpoint_every_s_zero_checkpoints_every_fedbuff_release(
        tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=3, buffer_size=2,
               rounds=5, staleness="constant", checkpoint_every_s=0.0)
    feed_async(agg, fleet, 4)
    record = agg.store.checkpoint(FLEET)
    assert agg.model_version == 2 and record is not None and record.model_version == 2


def test_sync_rounds_tell_subclasses_each_counted_contribution(tmp_path: Path,
                                                               artifacts: Path) -> None:
    """``opened``/``counted``: a subclass sees every update the round's aggregate adds,
    those a bootstrapping round judged at its close included, and again after a restart."""
    seen: dict[int, list[str]] = {}

    class Watching(SyncRounds):
        def opened(self, index: int) -> None:
            seen[index] = []

        def counted(self, contribution: Contribution) -> None:
            seen[max(seen)].append(contribution.device)

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=3, strategy=Watching())
    for _ in range(2):
        assert agg.tick()
        for d in fleet.values():
            d.send_update(layout=agg.layout)
        assert agg.tick()
    assert {i: sorted(v) for i, v in seen.items()} == {1: ["d0", "d1", "d2"],
                                                       2: ["d0", "d1", "d2"]}
    assert agg.tick()  # round 3 opens; two updates come, then the aggregator stops
    for d in list(fleet.values())[:2]:
        d.send_update(layout=agg.layout)
    agg.close()
    again = make(tmp_path, artifacts, broker, rounds=3, strategy=Watching())
    assert sorted(seen[3]) == ["d0", "d1"]  # replayed from the journal into a fresh one
    again.close()
