"""The journal's group commit on its writer thread, over a real SQLite store."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from cloud_aggregator._journal import Journal, Outcome
from cloud_aggregator._store import JournalEntry, Store, StoreError, UpdateKey

FLEET = "f"


class GatedStore(Store):
    """A real store whose journal writes wait for ``gate`` (to look at a batch while it
    is being written) and can be made to fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def journal(self, entries: Sequence[JournalEntry], *, at: float | None = None
                ) -> list[bool]:
        assert self.gate.wait(20.0), "the test never opened the gate"
        if self.fail:
            raise StoreError("disk full")
        return super().journal(entries, at=at)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GatedStore]:
    s = GatedStore(tmp_path / "j.sqlite")
    yield s
    s.close()


def entry(device: str, round_index: int = 1, attempt: int = 0, stream: int = 1
          ) -> JournalEntry:
    return JournalEntry(key=UpdateKey(fleet=FLEET, round=round_index, device_id=device,
                                      attempt=attempt),
                        stream=stream, body=device.encode() * 10, meta={"n": 1})


def test_a_batch_being_written_still_counts_and_settles_in_order(store: GatedStore) -> None:
    journal = Journal(store)
    seen: list[tuple[str, Outcome]] = []
    written = threading.Event()
    def then(dev: str) -> Callable[[Outcome], None]:
        return lambda outcome: seen.append((dev, outcome))

    for dev in ("a", "b"):
        journal.submit(entry(dev), then(dev))
    store.gate.clear()
    assert journal.begin(written.set)
    assert journal.writing and journal.pending == 2
    assert journal.holds("a") and journal.queued_attempt(1, "b") == 0
    assert not journal.begin(written.set)  # one batch at a time
    journal.submit(entry("c"), lambda o: seen.append(("c", o)))  # arrives meanwhile
    assert journal.wait_s() is None  # the writer's end wakes the caller
    assert journal.finish(wait=False) == 0 and seen == []  # not durable yet: no ack
    store.gate.set()
    assert written.wait(20.0)
    assert journal.finish(wait=False) == 2
    assert seen == [("a", "fresh"), ("b", "fresh")] and journal.pending == 1
    assert not journal.holds("a") and journal.holds("c")
    assert journal.flush() == 1 and seen[-1] == ("c", "fresh")
    assert [k.device_id for k in store.accepted_keys(FLEET)] == ["a", "b", "c"]
    journal.close()


def test_flush_waits_for_the_batch_being_written_first(store: GatedStore) -> None:
    journal = Journal(store)
    seen: list[str] = []
    journal.submit(entry("a"), lambda o: seen.append("a"))
    store.gate.clear()
    journal.begin(lambda: None)
    journal.submit(entry("b"), lambda o: seen.append("b"))
    threading.Timer(0.05, store.gate.set).start()
    assert journal.flush() == 2 and seen == ["a", "b"]
    journal.close()


def test_a_failed_write_acknowledges_nothing_and_a_duplicate_is_told(store: GatedStore
                                                                     ) -> None:
    journal = Journal(store)
    seen: list[Outcome] = []
    journal.submit(entry("a"), seen.append)
    assert journal.flush() == 1 and seen == ["fresh"]
    store.fail = True
    journal.submit(entry("b"), seen.append)
    done = threading.Event()
    journal.begin(done.set)
    assert done.wait(20.0)
    assert journal.finish(wait=True) == 1 and seen[-1] == "failed"
    store.fail = False
    journal.submit(entry("a"), seen.append)  # a redelivery of a's update
    assert journal.flush() == 1 and seen[-1] == "duplicate"
    journal.close()


def test_the_stream_is_named_when_the_batch_is_taken(store: GatedStore) -> None:
    """A FedBuff release between two batches moves later entries to the next buffer's
    stream, even those queued before it (their batch had not been taken)."""
    journal = Journal(store)
    current = [4]
    journal.submit(entry("a", stream=4), lambda o: None, stream=lambda: current[0])
    current[0] = 5  # a release happened before the batch was taken
    journal.flush()
    assert [u.key.device_id for u in store.round_updates(FLEET, 5)] == ["a"]
    assert list(store.round_updates(FLEET, 4)) == []
    journal.close()


def test_a_slow_write_says_what_it_waits_for(store: GatedStore,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("cloud_aggregator._journal.SLOW_WRITE_S", 0.05)
    journal = Journal(store)
    seen: list[Outcome] = []
    journal.submit(entry("a"), seen.append)
    store.gate.clear()
    journal.begin(lambda: None)
    threading.Timer(0.3, store.gate.set).start()
    with caplog.at_level("WARNING", logger="cloud_aggregator._journal"):
        assert journal.finish(wait=True) == 1
    assert seen == ["fresh"]
    assert "waiting for the journal's write of 1 updates" in caplog.text
    journal.close()
