"""The verifiable training ledger on the in-memory rig: entries, re-derivation, tampering."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from aggregator_rig import (
    FLEET,
    FakeDevice,
    devices,
    feed_async,
    kept_body,
    make,
    set_kept_body,
)

from broker_bridge import (
    InclusionProof,
    Kind,
    MemoryBroker,
    TreeHead,
    check_inclusion,
)
from cloud_aggregator import Aggregator, LedgerMismatch, verify_ledger
from cloud_aggregator._ledger import KEY_FILE, read_public_key
from cloud_aggregator._ledger_verify import model_sha256
from cloud_aggregator._rounds import ManualClock
from cloud_aggregator._store import Store, StoreError
from fleetlearn.cli import main as cli


def _sync_rounds(agg: Aggregator, fleet: dict[str, FakeDevice], rounds: int, *,
                 bad: str | None = None) -> None:
    for _ in range(rounds):
        assert agg.tick()  # a round opens
        for d in fleet.values():
            if d.tasks and d.tasks[-1].round == agg.round_index:
                if d.id == bad:  # a body that does not decode: refused, listed
                    d.send_update(layout=agg.layout, codec_body=b"\x00" * 40)
                d.send_update(layout=agg.layout, attempt=1 if d.id == bad else 0)
        assert agg.tick()  # ... and closes


def _proofs(d: FakeDevice) -> list[InclusionProof]:
    return [InclusionProof.from_message(m) for m in d.other if m.kind == Kind.PROOF]


def _ok(state: Path) -> None:
    reports = verify_ledger(state)
    assert reports and all(r.ok for r in reports), [(r.first_bad, r.problem) for r in reports]


@pytest.mark.parametrize("opts", [
    {"server_opt": "fedavg", "robust": "mean"},
    {"server_opt": "fedadam", "robust": "mean", "clip_norm": 0.05},
    {"server_opt": "fedavgm", "robust": "trimmed_mean", "trim_fraction": 0.2},
    {"server_opt": "fedyogi", "robust": "multi_krum", "byzantine": 0},
])
def test_sync_rounds_verify_and_rederive_byte_for_byte(tmp_path: Path, artifacts: Path,
                                                         opts: dict[str, object]) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 4)
    agg = make(tmp_path, artifacts, broker, rounds=3, devices_per_round=4, **opts)
    _sync_rounds(agg, fleet, 3, bad="d2")
    assert agg.model_version == 3
    final = agg.params.copy()
    entries = agg.store.ledger_entries(FLEET)
    assert [e.index for e in entries] == [0, 1, 2] and [e.round for e in entries] == [1, 2, 3]
    header = entries[-1].header_json()
    assert header["model"] == model_sha256(final)
    assert header["rule"]["optimizer"]["name"] == opts["server_opt"]
    assert header["rule"]["robust"]["method"] == opts["robust"]
    records = [json.loads(line) for line in entries[0].accepted]
    assert sorted(r["device"] for r in records) == ["d0", "d1", "d2", "d3"]
    for r in records:  # what each device signed, as the verify stage checked it
        assert r["signature"] and r["body_sha256"] and r["codec"] == "fp32"
        assert r["model_version"] == 0
    details = json.loads(entries[0].details)
    assert sorted(details["selected"]) == ["d0", "d1", "d2", "d3"]
    assert {(r["device"], r["reason"]) for r in details["rejected"]} == {("d2", "codec")}
    agg.close()
    _ok(tmp_path)
    assert cli(["ledger", "verify", str(tmp_path)]) == 0
    assert cli(["ledger", "verify", str(tmp_path), "--public-key",
                read_public_key(tmp_path).hex()]) == 0


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_fedbuff_releases_verify(tmp_path: Path, artifacts: Path, every_s: float) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 5)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=5, buffer_size=3,
               rounds=3, staleness="sqrt", robust="mean", server_opt="fedadam",
               norm_median_multiple=None, checkpoint_every_s=every_s)
    feed_async(agg, fleet, 9)
    assert agg.model_version == 3
    # Entries commit with the checkpoint: at every release, or (every_s) at the next one.
    assert len(agg.store.ledger_entries(FLEET)) == (3 if every_s == 0 else 0)
    agg.close()  # checkpoints the last release, with the entries of all three
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.entries == report.models_rederived == 3, report
    with Store(tmp_path / "aggregator.sqlite") as store:
        entries = store.ledger_entries(FLEET)
        versions = [c.model_version for c in (store.checkpoint(FLEET, model_version=v)
                                              for v in range(4)) if c is not None]
    assert versions == ([0, 1, 2, 3] if every_s == 0 else [0, 3])
    assert [e.header_json()["outcome"] for e in entries] == ["aggregated"] * 3
    assert [e.header_json()["model_version"] for e in entries] == [1, 2, 3]
    scales = [json.loads(line)["scale"] for e in entries for line in e.accepted]
    assert any(s < 1.0 for s in scales)  # stale updates were discounted, and recorded


def test_an_abandoned_round_is_an_entry_that_keeps_the_model(tmp_path: Path,
                                                                artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    clock = ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, quorum=2, rounds=2)
    agg.tick()
    fleet["d0"].send_update(layout=agg.layout)
    clock.advance(31)
    assert agg.tick() and agg.history[-1].outcome == "abandoned"
    _sync_rounds(agg, fleet, 1)
    entries = agg.store.ledger_entries(FLEET)
    first = entries[0].header_json()
    assert first["outcome"] == "abandoned" and first["model"] == first["prev_model"]
    assert first["accepted_count"] == 1
    agg.close()
    _ok(tmp_path)


def test_a_round_abandoned_right_after_an_adoption_names_the_adopted_model(
        tmp_path: Path, artifacts: Path) -> None:
    """An adopted model (an edge's parent's) is the next entry's predecessor: an abandoned
    round right after cites it, where it once cited the replaced model and raised."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    clock = ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, quorum=2, rounds=3)
    adopted = (agg.params + np.float32(0.25)).astype(np.float32)
    agg.adopt(adopted)
    agg.tick()
    fleet["d0"].send_update(layout=agg.layout)
    clock.advance(31)
    assert agg.tick() and agg.history[-1].outcome == "abandoned"
    (entry,) = agg.store.ledger_entries(FLEET)
    header = entry.header_json()
    assert header["prev_model"] == header["model"] == model_sha256(adopted)
    agg.close()


def test_inclusion_proofs_verify_and_a_forged_head_fails(tmp_path: Path,
                                                          artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=2)
    _sync_rounds(agg, fleet, 2)
    key = agg.trail.key.public_bytes
    heads = [TreeHead.from_message(m) for m in fleet["d0"].other if m.kind == Kind.LEDGER]
    assert heads and heads[-1].size == 2 and heads[-1].verify(FLEET, key)
    for d in fleet.values():
        proofs = _proofs(d)
        assert [p.round for p in proofs] == [1, 2]
        for p in proofs:
            out = check_inclusion(p, fleet=FLEET, device=d.id, public_key=key)
            assert out.status == "verified", out
            assert check_inclusion(p, fleet=FLEET, device=d.id,
                                   public_key=None).status == "unpinned"
            # Someone else's proof, a forged root, a wrong key, a forged body: failed.
            assert check_inclusion(p, fleet=FLEET, device="other",
                                   public_key=key).status == "failed"
            assert check_inclusion(p, fleet=FLEET, device=d.id, public_key=key,
                                   digest="0" * 64).status == "failed"
            forged = InclusionProof(**{**p.to_dict(), "root": "ab" * 32})
            assert check_inclusion(forged, fleet=FLEET, device=d.id,
                                   public_key=key).status == "failed"
            resigned = InclusionProof(**{**p.to_dict(), "timestamp_ms": p.timestamp_ms + 1})
            assert check_inclusion(resigned, fleet=FLEET, device=d.id,
                                   public_key=key).status == "failed"
            other_key = bytes(32 - len(b"k")) + b"k"
            assert check_inclusion(p, fleet=FLEET, device=d.id,
                                   public_key=other_key).status == "failed"
    agg.close()


def test_the_key_is_private_and_printable(tmp_path: Path, artifacts: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    broker = MemoryBroker()
    agg = make(tmp_path, artifacts, broker)
    public = agg.trail.key.public_hex
    agg.close()
    mode = stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode)
    assert mode == 0o600
    assert cli(["ledger", "key", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == public
    again = make(tmp_path, artifacts, broker)  # the same key at the next start
    assert again.trail.key.public_hex == public


# -- tampering ---------------------------------------------------------------------------


@pytest.fixture
def ledger_dir(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Path:
    state = tmp_path_factory.mktemp("ledger")
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(state, artifacts, broker, rounds=3, server_opt="fedadam")
    _sync_rounds(agg, fleet, 3, bad="d1")
    agg.close()
    _ok(state)
    return state


def _db(state: Path) -> sqlite3.Connection:
    return sqlite3.connect(state / "aggregator.sqlite", isolation_level=None)


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def _first_bad(state: Path) -> int | None:
    (report,) = verify_ledger(state)
    return report.first_bad


@pytest.mark.parametrize("column", ["header", "accepted", "details", "signature"])
def test_any_flipped_byte_of_an_entry_fails_naming_it(ledger_dir: Path, column: str) -> None:
    with _db(ledger_dir) as conn:
        (data,) = conn.execute(f"SELECT {column} FROM ledger_entries WHERE idx = 1").fetchone()
    data = bytes(data)
    positions = sorted({0, 1, len(data) // 3, len(data) // 2, len(data) - 1})
    for at in positions:
        with _db(ledger_dir) as conn:
            conn.execute(f"UPDATE ledger_entries SET {column} = ? WHERE idx = 1",
                         (_flip(data, at),))
        assert _first_bad(ledger_dir) == 1, (column, at)
        with _db(ledger_dir) as conn:
            conn.execute(f"UPDATE ledger_entries SET {column} = ? WHERE idx = 1", (data,))
    _ok(ledger_dir)


def test_every_byte_of_a_header_is_covered(ledger_dir: Path) -> None:
    with _db(ledger_dir) as conn:
        (data,) = conn.execute("SELECT header FROM ledger_entries WHERE idx = 2").fetchone()
    data = bytes(data)
    for at in range(0, len(data), 7):
        with _db(ledger_dir) as conn:
            conn.execute("UPDATE ledger_entries SET header = ? WHERE idx = 2",
                         (_flip(data, at),))
        assert _first_bad(ledger_dir) == 2, at
    with _db(ledger_dir) as conn:
        conn.execute("UPDATE ledger_entries SET header = ? WHERE idx = 2", (data,))
    _ok(ledger_dir)


def test_a_flipped_byte_of_a_kept_body_fails_naming_its_entry(ledger_dir: Path) -> None:
    with _db(ledger_dir) as conn:
        (accepted,) = conn.execute("SELECT accepted FROM ledger_entries WHERE idx = 2"
                                   ).fetchone()
        digest = json.loads(bytes(accepted).split(b"\n")[0])["digest"]
        body = kept_body(conn, digest)
    for at in (0, len(body) // 2, len(body) - 1):
        with _db(ledger_dir) as conn:
            set_kept_body(conn, digest, _flip(body, at))
        assert _first_bad(ledger_dir) == 2
    with _db(ledger_dir) as conn:
        conn.execute("DELETE FROM ledger_refs WHERE sha256 = ?", (digest,))
    assert _first_bad(ledger_dir) == 2


def test_a_changed_model_file_fails_naming_the_entry(ledger_dir: Path) -> None:
    ckpts = sorted((ledger_dir / "aggregator.sqlite.checkpoints").glob("*.npy"))
    assert len(ckpts) == 4  # versions 0..3
    second = ckpts[2].read_bytes()
    ckpts[2].write_bytes(_flip(second, len(second) - 2))  # a weight of version 2
    assert _first_bad(ledger_dir) == 1  # the entry that made version 2
    assert cli(["ledger", "verify", str(ledger_dir)]) == 1
    ckpts[2].write_bytes(second)
    initial = ckpts[0].read_bytes()
    ckpts[0].write_bytes(_flip(initial, len(initial) - 1))  # the initial model
    assert _first_bad(ledger_dir) == 0
    with pytest.raises(LedgerMismatch) as info:
        verify_ledger(ledger_dir)[0].check()
    assert info.value.index == 0


def test_another_key_fails_and_show_prints_an_entry(ledger_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ledger", "verify", str(ledger_dir), "--public-key", "11" * 32]) == 1
    assert "entry 0 FAILS" in capsys.readouterr().out
    assert cli(["ledger", "show", str(ledger_dir), "--round", "2"]) == 0
    out = capsys.readouterr().out
    assert "entry 1  round 2" in out and "codec" not in out.split("rejected")[0]
    with _db(ledger_dir) as conn:
        conn.execute("DELETE FROM ledger_entries WHERE idx = 1")  # a hole in the chain
    assert _first_bad(ledger_dir) == 1


# -- a real crash mid-append -------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    from aggregator_rig import devices, make
    from broker_bridge import MemoryBroker
    import cloud_aggregator._store as store_module
    from cloud_aggregator._store_ledger import append_tx

    kill_at = int(sys.argv[4])

    def append_then_die(conn, pending, frontiers):
        appended = append_tx(conn, pending, frontiers)
        # the row is written, the transaction not committed:
        if appended is not None and appended.index == kill_at:
            print(f"KILLING in entry {appended.index}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return appended

    store_module.append_tx = append_then_die
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(__import__("pathlib").Path(sys.argv[1]), __import__("pathlib").Path(sys.argv[2]),
               broker, rounds=10, server_opt="fedadam")
    while True:
        assert agg.tick()
        for d in fleet.values():
            d.send_update(layout=agg.layout)
        assert agg.tick()
        print(f"RELEASED {agg.model_version}", flush=True)
    """
)


@pytest.mark.parametrize("kill_at", [0, 2])
def test_a_sigkill_mid_append_leaves_a_consistent_ledger(tmp_path: Path, artifacts: Path,
                                                         kill_at: int) -> None:
    tests_dir = Path(__file__).resolve().parents[1]
    repo = tests_dir.parent
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(artifacts), str(tests_dir),
         str(kill_at)], capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"KILLING in entry {kill_at}" in proc.stdout
    assert proc.stdout.count("RELEASED") == kill_at
    # The killed transaction is gone whole: no entry, no checkpoint, the round still open.
    with sqlite3.connect(tmp_path / "aggregator.sqlite") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        idx = [r[0] for r in conn.execute("SELECT idx FROM ledger_entries ORDER BY idx")]
        versions = [r[0] for r in conn.execute(
            "SELECT model_version FROM checkpoints ORDER BY model_version")]
        states = dict(conn.execute("SELECT round, state FROM rounds").fetchall())
    assert idx == list(range(kill_at))
    assert versions == list(range(kill_at + 1))
    assert states[kill_at + 1] == "open"
    if kill_at:
        _ok(tmp_path)
    # A restart resumes the round and appends its entry at the same index: no fork.
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=kill_at + 2, server_opt="fedadam")
    assert agg.tick()  # the resumed round (its updates came back from the journal) closes
    _sync_rounds(agg, fleet, 1)
    entries = agg.store.ledger_entries(FLEET)
    assert [e.index for e in entries] == list(range(kill_at + 2))
    assert [e.round for e in entries] == list(range(1, kill_at + 3))
    agg.close()
    _ok(tmp_path)


def test_contribution_records_from_the_hook_are_kept(tmp_path: Path, artifacts: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=2)
    seen: list[tuple[int, int]] = []

    def contributions(round_index: int, records: object) -> list[dict[str, object]]:
        rows = list(records)  # type: ignore[call-overload]
        seen.append((round_index, len(rows)))
        return [{"device": r["device"], "round": round_index, "weight": r["weight"],
                 "cosine": 0.5, "marginal": None} for r in rows]

    agg.trail.contributions = contributions
    _sync_rounds(agg, fleet, 2)
    assert seen == [(1, 3), (2, 3)]
    details = json.loads(agg.store.ledger_entries(FLEET)[1].details)
    assert sorted(c["device"] for c in details["contributions"]) == ["d0", "d1", "d2"]
    agg.close()
    _ok(tmp_path)
    assert cli(["ledger", "show", str(tmp_path)]) == 0
    assert '"cosine": 0.5' in capsys.readouterr().out


def test_a_strategy_that_combines_its_own_way_is_named_and_checked_not_rederived(
        tmp_path: Path, artifacts: Path) -> None:
    """An edge tier or an agglomerative cloud combines models its own way: ``verify``
    checks everything else and takes each such model from its checkpoint file, saying
    so; a changed checkpoint file still fails."""
    from cloud_aggregator import SyncRounds

    class Halved(SyncRounds):
        def combine(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
            return self.ctx.model.stepped(delta * np.float32(0.5))

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1, strategy=Halved())
    _sync_rounds(agg, fleet, 1)
    assert agg.store.ledger_entries(FLEET)[0].header_json()["rule"]["combine"] == \
        "custom:Halved"
    agg.close()
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.combined_taken == 1 and report.models_rederived == 0, report
    assert any("combines models its own way" in n for n in report.notes)
    ckpt = sorted((tmp_path / "aggregator.sqlite.checkpoints").glob("*.npy"))[-1]
    data = ckpt.read_bytes()
    ckpt.write_bytes(_flip(data, len(data) - 2))
    (report,) = verify_ledger(tmp_path)
    assert report.first_bad == 0 and "checkpoint file" in report.problem, report


_ASYNC_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from aggregator_rig import devices, feed_async, make
    from broker_bridge import MemoryBroker
    import cloud_aggregator._store as store_module
    from cloud_aggregator._store_ledger import append_tx

    def append_then_die(conn, pending, frontiers):
        appended = append_tx(conn, pending, frontiers)
        if appended is not None and appended.index == 1:  # written, not committed
            print(f"KILLING in entry {appended.index}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return appended

    store_module.append_tx = append_then_die
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(Path(sys.argv[1]), Path(sys.argv[2]), broker, mode="async", concurrency=3,
               buffer_size=2, rounds=3, staleness="constant", checkpoint_every_s=3600.0)
    feed_async(agg, fleet, 6)
    print(f"RELEASED {agg.model_version} unsaved", flush=True)
    agg.close()  # the checkpoint of version 3, with the three entries, dies mid-append
    """
)


def test_a_sigkill_mid_append_of_fedbuff_entries_re_derives_them(tmp_path: Path,
                                                                  artifacts: Path) -> None:
    tests_dir = Path(__file__).resolve().parents[1]
    repo = tests_dir.parent
    proc = subprocess.run(
        [sys.executable, "-c", _ASYNC_CHILD, str(tmp_path), str(artifacts), str(tests_dir)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)},
        cwd=repo, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "RELEASED 3 unsaved" in proc.stdout and "KILLING in entry 1" in proc.stdout
    with sqlite3.connect(tmp_path / "aggregator.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM ledger_entries").fetchone() == (0,)
        assert conn.execute("SELECT max(model_version) FROM checkpoints").fetchone() == (0,)
    # The restart re-derives the three releases from the journal, and their entries with
    # them; its stop checkpoints version 3 with all three.
    broker = MemoryBroker()
    devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, mode="async", concurrency=3, buffer_size=2,
               rounds=3, staleness="constant", checkpoint_every_s=3600.0)
    assert agg.model_version == 3
    agg.close()
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.entries == report.models_rederived == 3, report


def test_a_store_from_before_the_ledger_migrates_and_its_ledger_starts_there(
        tmp_path: Path, artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1)
    _sync_rounds(agg, fleet, 1)
    agg.close()
    with _db(tmp_path) as conn:  # as a version-4 store (before the ledger) leaves it
        conn.execute("DROP TABLE ledger_refs")
        conn.execute("DROP TABLE ledger_entries")
        conn.execute("DROP TABLE ledger_bodies")
        conn.execute("ALTER TABLE checkpoints DROP COLUMN keep")  # version 7's
        conn.execute("UPDATE schema_version SET version = 4")
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=3)
    assert agg.store.schema_version() == 7 and agg.store.ledger_entries(FLEET) == []
    _sync_rounds(agg, fleet, 2)
    entries = agg.store.ledger_entries(FLEET)
    assert [(e.index, e.round) for e in entries] == [(0, 2), (1, 3)]
    agg.close()
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.models_rederived == 2, report
    assert any("starts at model version 1" in n for n in report.notes)


def test_a_version_5_store_keeps_its_copied_bodies_and_references_new_ones(
        tmp_path: Path, artifacts: Path) -> None:
    """Schema 6 keeps an entry's bodies where the journal wrote them; entries of a
    version-5 store cite copies in ``ledger_bodies``, which stay readable: the whole
    ledger verifies after the migration, old entries and new."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=2)
    _sync_rounds(agg, fleet, 2)
    agg.close()
    with _db(tmp_path) as conn:  # as version 5 left it: copies, journal rows dropped
        conn.execute("INSERT INTO ledger_bodies (sha256, body) SELECT l.sha256, r.body"
                     " FROM ledger_refs l JOIN round_updates r ON r.seq = l.seq")
        copied = conn.execute("SELECT count(*) FROM ledger_bodies").fetchone()[0]
        conn.execute("DROP TABLE ledger_refs")
        conn.execute("DELETE FROM round_updates")
        conn.execute("ALTER TABLE checkpoints DROP COLUMN keep")  # version 7's
        conn.execute("UPDATE schema_version SET version = 5")
    assert copied >= 3
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=4)
    assert agg.store.schema_version() == 7
    _sync_rounds(agg, fleet, 2)
    agg.close()
    with _db(tmp_path) as conn:
        refs = conn.execute("SELECT count(*) FROM ledger_refs").fetchone()[0]
        kept_rows = conn.execute("SELECT count(*) FROM round_updates r JOIN ledger_refs l"
                                 " ON l.seq = r.seq").fetchone()[0]
        old = conn.execute("SELECT count(*) FROM ledger_bodies").fetchone()[0]
    assert refs == kept_rows >= 3 and old == copied  # new entries: no copies
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.entries == 4 and report.models_rederived == 4, report


def test_verify_reads_a_running_aggregators_store_without_writing(
        tmp_path: Path, artifacts: Path) -> None:
    """``ledger verify`` and ``show`` on the state dir of an aggregator still running:
    both read, neither writes (the store opens read-only), and the aggregator goes on."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=3)
    _sync_rounds(agg, fleet, 2)
    (report,) = verify_ledger(tmp_path)  # the aggregator holds its store open
    assert report.ok and report.entries == 2, report
    assert "round" in show_entry_text(tmp_path)
    _sync_rounds(agg, fleet, 1)  # ... and writes on
    assert agg.done
    agg.close()
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.entries == 3, report


def show_entry_text(state: Path) -> str:
    from cloud_aggregator._ledger_cli import show_entry

    with Store(state / "aggregator.sqlite", read_only=True) as store:
        with pytest.raises(StoreError, match="read-only"):
            store.put_state("x", b"y")
        return show_entry(store, FLEET)


def test_verify_refuses_an_older_store_and_leaves_it_as_it_was(
        tmp_path: Path, artifacts: Path) -> None:
    """A store of an older schema is migrated by the aggregator that starts on it, never by
    ``ledger verify`` (an aggregator of the old version may be running on it): verify
    says so and the store keeps its version."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1)
    _sync_rounds(agg, fleet, 1)
    agg.close()
    with _db(tmp_path) as conn:  # as version 6 left it
        conn.execute("ALTER TABLE checkpoints DROP COLUMN keep")
        conn.execute("UPDATE schema_version SET version = 6")
    with pytest.raises(StoreError, match=r"schema version 6, older .* migrates"):
        verify_ledger(tmp_path)
    with _db(tmp_path) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 6
    with pytest.raises(StoreError, match="no aggregator store"):
        Store(tmp_path / "elsewhere.sqlite", read_only=True)
    assert not (tmp_path / "elsewhere.sqlite").exists()


def test_a_cited_journal_row_cannot_be_dropped(tmp_path: Path, artifacts: Path) -> None:
    """The journal's clean-ups leave the rows the ledger cites; dropping one by hand
    is refused by the store's foreign key rather than losing a kept body silently."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=1)
    _sync_rounds(agg, fleet, 1)
    agg.close()
    with _db(tmp_path) as conn:
        conn.execute("PRAGMA foreign_keys=ON")  # as the store opens it
        assert conn.execute("SELECT count(*) FROM ledger_refs").fetchone()[0] >= 3
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("DELETE FROM round_updates")

def test_device_signatures_are_checked_and_bound_to_enrolled_keys(
        tmp_path: Path, artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every update is signed (the rig's devices sign, the verify stage checks): the entry
    records the signature, also across a restart, and ``verify`` checks it over the
    update's statement, and against the enrolment file when given."""
    from keys import ENROLMENT

    from broker_bridge import Enrolment

    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=2)
    _sync_rounds(agg, fleet, 1)
    assert agg.tick()  # round 2 opens; two updates, then a restart
    for d in ("d0", "d1"):
        fleet[d].send_update(layout=agg.layout)
    agg.abort()
    again = make(tmp_path, artifacts, broker, rounds=2)
    fleet["d2"].send_update(layout=again.layout)
    assert again.tick() and again.model_version == 2
    records = [json.loads(line) for e in again.store.ledger_entries(FLEET)
               for line in e.accepted]
    assert len(records) == 6 and all(r["signature"] and r["codec"] for r in records)
    again.close()
    (report,) = verify_ledger(tmp_path, enrolment=ENROLMENT)
    assert report.ok and report.device_signatures == report.device_signatures_checked == 6
    assert report.device_keys_enrolled == 6
    (report,) = verify_ledger(tmp_path)  # no enrolment: verified under the carried keys
    assert report.ok and report.device_keys_enrolled == 0
    assert any("not checked against enrolled keys" in n for n in report.notes)
    # d1 enrolled with another key: its first entry fails.
    other = Enrolment(keys={**ENROLMENT.keys, "d1": bytes(31) + b"\x01"})
    (report,) = verify_ledger(tmp_path, enrolment=other)
    assert report.first_bad == 0 and "'d1'" in report.problem and "enrolled" in report.problem
    path = tmp_path / "enrolment.toml"
    other.write(path)
    assert cli(["ledger", "verify", str(tmp_path), "--enrolment", str(path)]) == 1
    ENROLMENT.write(path)
    assert cli(["ledger", "verify", str(tmp_path), "--enrolment", str(path)]) == 0
    assert "6/6 device signatures verified, 6 by enrolled keys" in capsys.readouterr().out
    # A check of one's own replaces the built-in one.
    (report,) = verify_ledger(tmp_path, device_signature=lambda d, body, sig: d != "d2")
    assert report.first_bad == 0 and "'d2'" in report.problem


def test_a_secure_round_keeps_its_masked_uploads_and_its_model_is_checked_as_recorded(
        tmp_path: Path, artifacts: Path) -> None:
    """A secure round's sum comes from the devices' reveals, which the ledger does not
    hold: its entry lists the masked uploads (kept) and its model is checked
    against its checkpoint file, not re-derived; the rest of the ledger holds as ever."""
    from test_secure_rounds import SecureFake, drive

    broker, clock = MemoryBroker(), ManualClock()
    agg = make(tmp_path, artifacts, broker, manual=clock, devices_per_round=4, rounds=1,
               secure_aggregation=True, secure_fraction=0.5, secure_phase_s=1.0,
               deadline_s=30.0, quorum=4)
    fakes = [SecureFake(d) for d in devices(broker, 4).values()]
    drive(agg, clock, fakes, silent=frozenset())
    assert agg.model_version == 1
    (entry,) = agg.store.ledger_entries(FLEET)
    assert entry.header_json()["rule"]["secure_aggregation"] is True
    records = [json.loads(line) for line in entry.accepted]
    assert sorted(r["device"] for r in records) == ["d0", "d1", "d2", "d3"]
    assert all(r["codec"] == "secagg" for r in records)
    agg.close()
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.secure_taken == 1 and report.models_rederived == 0, report
    assert report.device_signatures_checked == sum(bool(r["signature"]) for r in records)
    ckpt = sorted((tmp_path / "aggregator.sqlite.checkpoints").glob("*.npy"))[-1]
    data = ckpt.read_bytes()
    ckpt.write_bytes(_flip(data, len(data) - 1))  # the secure round's model changed
    assert _first_bad(tmp_path) == 0


def test_a_private_rounds_model_is_checked_as_recorded(tmp_path: Path,
                                                       artifacts: Path) -> None:
    """Central DP's noise is not recorded (it would undo the privacy it gives): a private
    round's entry names the mechanism and its model is checked against its checkpoint,
    not re-derived; a changed model file still fails."""
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=2, dp_noise_multiplier=1.0,
               dp_clipping="fixed", clip_norm=1.0)
    _sync_rounds(agg, fleet, 2)
    assert agg.model_version == 2
    rules = [e.header_json()["rule"] for e in agg.store.ledger_entries(FLEET)]
    assert all(r["differential_privacy"]["noise_multiplier"] == 1.0 for r in rules)
    agg.close()
    (report,) = verify_ledger(tmp_path)
    assert report.ok and report.secure_taken == 2 and report.models_rederived == 0, report
    assert any("private" in n for n in report.notes)
    ckpt = sorted((tmp_path / "aggregator.sqlite.checkpoints").glob("*.npy"))[-1]
    data = ckpt.read_bytes()
    ckpt.write_bytes(_flip(data, len(data) - 1))
    assert _first_bad(tmp_path) == 1


def test_the_rounds_contribution_records_are_in_its_entry(tmp_path: Path,
                                                          artifacts: Path) -> None:
    broker = MemoryBroker()
    fleet = devices(broker, 3)
    agg = make(tmp_path, artifacts, broker, rounds=2)
    _sync_rounds(agg, fleet, 2)
    entries = agg.store.ledger_entries(FLEET)
    for entry, metrics in zip(entries, agg.history, strict=True):
        details = json.loads(entry.details)
        assert details["contributions"] == [r.to_json() for r in metrics.contributions]
        assert sorted(c["device"] for c in details["contributions"]) == ["d0", "d1", "d2"]
    agg.close()
    _ok(tmp_path)
