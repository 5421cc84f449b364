"""Envelope, chunking and channel: unit tests and decoder fuzzing (no network)."""

from __future__ import annotations

import contextlib
import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_bridge import (
    Channel,
    Chunk,
    ChunkError,
    ConfigError,
    EnvelopeError,
    EnvelopeLimits,
    Kind,
    MemoryBroker,
    MemoryTransport,
    Message,
    Reassembler,
    ReassemblyLimits,
    Topics,
    json_message,
    new_transfer_id,
    split_message,
    topic_matches,
)
from broker_bridge._envelope import HEADER_SIZE


def _msg(body: bytes, **kw: object) -> Message:
    fields: dict[str, object] = dict(kind=Kind.UPDATE, fleet="f1", device="dev-7", round=12,
                                     model_version=11, attempt=2, codec="topk:0.01+q8+zstd",
                                     body=body)
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


def _reassemble(payloads: list[bytes], r: Reassembler | None = None) -> list[Message]:
    r = r or Reassembler()
    out = []
    for p in payloads:
        m = r.feed(Chunk.from_bytes(p))
        if m is not None:
            out.append(m)
    return out


def test_single_chunk_round_trip_keeps_every_field() -> None:
    m = _msg(b"hello")
    (payload,) = split_message(m, max_payload=4096)
    (back,) = _reassemble([payload])
    assert (back.kind, back.fleet, back.device, back.round, back.model_version, back.attempt,
            back.codec, back.body) == (m.kind, m.fleet, m.device, 12, 11, 2, m.codec, b"hello")
    assert back.idempotency_key == ("f1", 12, "dev-7", 2)


def test_multi_chunk_out_of_order_with_duplicates() -> None:
    body = random.Random(1).randbytes(300_000)
    payloads = split_message(_msg(body), max_payload=16 * 1024)
    assert len(payloads) == 19 and all(len(p) <= 16 * 1024 for p in payloads)
    shuffled = payloads + payloads[3:7]
    random.Random(2).shuffle(shuffled)
    r = Reassembler()
    out = _reassemble(shuffled, r)
    assert len(out) == 1 and out[0].body == body
    assert r.stats.duplicates == 4 and r.pending_sets == 0 and r.pending_bytes == 0


def test_a_known_body_checksum_is_taken_as_is() -> None:
    """A sender that sends one body many times (a model version served to each device
    that asks) gives its CRC-32 once: the same payloads as computing it; a wrong one is
    the sender's bug, and every receiver drops the set."""
    import zlib
    from dataclasses import replace

    body = random.Random(3).randbytes(100_000)
    m = _msg(body, transfer_id=77)
    given = split_message(replace(m, body_crc32=zlib.crc32(body)), max_payload=16 * 1024)
    assert given == split_message(m, max_payload=16 * 1024)
    assert _reassemble(given)[0].body == body
    wrong = split_message(replace(m, body_crc32=zlib.crc32(body) ^ 1), max_payload=16 * 1024)
    with pytest.raises(ChunkError, match="checksum"):
        _reassemble(wrong)


def test_chunks_of_a_set_hold_views_of_immutable_payloads_and_copies_of_others() -> None:
    """A chunk of a larger set keeps a view of its payload (the body is joined once, not
    copied chunk by chunk first); a payload in a buffer a transport may reuse is copied,
    so writing over that buffer afterwards changes nothing of the reassembled body."""
    body = random.Random(3).randbytes(50_000)
    payloads = split_message(_msg(body), max_payload=16 * 1024)
    assert len(payloads) > 1
    assert isinstance(Chunk.from_bytes(payloads[0]).data, memoryview)
    r = Reassembler()
    out = []
    for p in payloads:
        buffer = bytearray(p)
        m = r.feed(Chunk.from_bytes(buffer))  # type: ignore[arg-type]
        buffer[:] = bytes(len(buffer))  # the transport reuses its buffer
        if m is not None:
            out.append(m)
    assert len(out) == 1 and out[0].body == body and type(out[0].body) is bytes


def test_empty_body_is_one_chunk() -> None:
    (p,) = split_message(_msg(b""), max_payload=4096)
    assert _reassemble([p])[0].body == b""


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: p[:10], "truncated"),
        (lambda p: b"XX" + p[2:], "magic"),
        (lambda p: p[:2] + b"\x09" + p[3:], "version 9"),
        (lambda p: p[:3] + b"\x63" + p[4:], "unknown message kind"),
        (lambda p: p + b"extra", "length mismatch"),
        (lambda p: p[:10] + bytes([p[10] ^ 1]) + p[11:], "header checksum"),
        (lambda p: p[:32] + struct.pack("<I", 10**9) + p[36:], "chunk count"),
        (lambda p: p[:28] + struct.pack("<I", 5) + p[32:], "not below"),
        (lambda p: p[:36] + struct.pack("<Q", 2**40) + p[44:], "exceeds the limit"),
    ],
)
def test_bad_headers_raise_typed_errors(mutate: object, match: str) -> None:
    (p,) = split_message(_msg(b"x" * 100), max_payload=4096)
    with pytest.raises(EnvelopeError, match=match):
        Chunk.from_bytes(mutate(p))  # type: ignore[operator]


def test_corrupt_body_data_is_caught_by_the_body_checksum() -> None:
    (p,) = split_message(_msg(b"x" * 100), max_payload=4096)
    with pytest.raises(ChunkError, match="checksum"):
        Reassembler().feed(Chunk.from_bytes(p[:-1] + bytes([p[-1] ^ 1])))
    parts = split_message(_msg(b"y" * 30_000), max_payload=8192)
    parts[1] = parts[1][:-1] + bytes([parts[1][-1] ^ 1])
    with pytest.raises(ChunkError, match="checksum"):
        _reassemble(parts)


def test_limits_are_enforced_before_allocation() -> None:
    payloads = split_message(_msg(b"y" * 50_000), max_payload=8192)
    with pytest.raises(EnvelopeError, match="exceeds"):
        Chunk.from_bytes(payloads[0], limits=EnvelopeLimits(max_body_bytes=10_000))
    with pytest.raises(EnvelopeError, match="chunk count"):
        Chunk.from_bytes(payloads[0], limits=EnvelopeLimits(max_chunks=2))


def test_inconsistent_chunk_drops_its_set() -> None:
    a = split_message(_msg(b"a" * 20_000, transfer_id=5), max_payload=8192)
    b = split_message(_msg(b"b" * 30_000, transfer_id=5), max_payload=8192)
    r = Reassembler()
    assert r.feed(Chunk.from_bytes(a[0])) is None
    with pytest.raises(ChunkError, match="disagrees"):
        r.feed(Chunk.from_bytes(b[1]))
    assert r.pending_sets == 0 and r.pending_bytes == 0


def test_incomplete_sets_expire_and_memory_is_bounded() -> None:
    now = [0.0]
    r = Reassembler(limits=ReassemblyLimits(ttl_s=10, max_pending_sets=2,
                                            max_pending_bytes=20_000),
                    clock=lambda: now[0])
    sets = [split_message(_msg(bytes([i]) * 30_000), max_payload=8192) for i in range(3)]
    r.feed(Chunk.from_bytes(sets[0][0]))
    now[0] = 5
    r.feed(Chunk.from_bytes(sets[1][0]))
    assert r.pending_sets == 2
    now[0] = 11  # set 0 is past its TTL
    assert r.expire() == 1 and r.stats.expired == 1
    with pytest.raises(ChunkError, match="buffer full"):
        for p in sets[2]:
            r.feed(Chunk.from_bytes(p))
    assert r.pending_bytes <= 20_000


def test_max_pending_sets_evicts_the_oldest() -> None:
    r = Reassembler(limits=ReassemblyLimits(max_pending_sets=2))
    sets = [split_message(_msg(bytes([i]) * 20_000), max_payload=8192) for i in range(3)]
    for s in sets:
        r.feed(Chunk.from_bytes(s[0]))
    assert r.pending_sets == 2 and r.stats.evicted == 1


def test_one_sender_cannot_evict_anothers_sets_or_hold_empty_chunks() -> None:
    r = Reassembler(limits=ReassemblyLimits(max_pending_sets=16, max_sets_per_sender=4))
    honest = split_message(_msg(b"h" * 100_000, device="dev-1"), max_payload=8192)
    for p in honest[:6]:
        assert r.feed(Chunk.from_bytes(p)) is None
    for tid in range(300):  # one device's small incomplete sets
        part = split_message(_msg(b"n" * 3000, device="dev-2", transfer_id=tid + 1),
                             max_payload=2048)[0]
        r.feed(Chunk.from_bytes(part))
    assert r.sender_usage("f1", "dev-2")[0] == 4 and r.stats.sender_limited >= 296
    done = [r.feed(Chunk.from_bytes(p)) for p in honest[6:]]
    assert done[-1] is not None and done[-1].body == b"h" * 100_000
    # every chunk is charged its record's cost: many tiny chunks are not free
    tiny = ReassemblyLimits(max_bytes_per_sender=64 * 1024, chunk_overhead=512)
    r = Reassembler(limits=tiny)
    with pytest.raises(ChunkError, match="holds"):
        for i in range(1000):
            chunk = Chunk(kind=Kind.UPDATE, fleet="f1", device="dev-2", round=1,
                          model_version=0, attempt=0, codec="raw", transfer_id=9,
                          chunk_index=i, chunk_count=65536, total_length=10**6,
                          offset=i, body_crc32=0, data=b"x")
            r.feed(chunk)
    assert r.pending_bytes == 0
    empty = Chunk(kind=Kind.UPDATE, fleet="f1", device="dev-2", round=1, model_version=0,
                  attempt=0, codec="raw", transfer_id=9, chunk_index=3, chunk_count=65536,
                  total_length=100, offset=0, body_crc32=0, data=b"")
    with pytest.raises(EnvelopeError, match="empty chunk"):
        Chunk.from_bytes(empty.to_bytes())


def test_message_validates_fields() -> None:
    with pytest.raises(ConfigError):
        _msg(b"", device="bad/id")
    with pytest.raises(ConfigError):
        _msg(b"", round=-1)
    with pytest.raises(ConfigError):
        Topics(fleet="a+b")


def test_json_message_round_trip_and_malformed_json() -> None:
    m = json_message(Kind.TASK, fleet="f1", device="d1", payload={"lr": 0.05})
    assert m.json() == {"lr": 0.05}
    with pytest.raises(EnvelopeError, match="not json"):
        _msg(b"{").json()
    with pytest.raises(EnvelopeError, match="malformed"):
        Message(kind=Kind.TASK, fleet="f1", codec="json", body=b"{nope").json()


def test_topics_and_filters() -> None:
    t = Topics(fleet="f1")
    assert t.up("d1", "update") == "fl/f1/devices/d1/up/update"
    assert topic_matches(t.all_up, "fl/f1/devices/d1/up/update")
    assert not topic_matches(t.all_up, "fl/f1/devices/d1/down/task")
    assert topic_matches(t.all_broadcast, "fl/f1/broadcast/model")
    assert t.device_of("fl/f1/devices/d9/up/hello") == "d9"
    assert t.device_of("fl/f1/broadcast/model") is None


def test_channel_drops_bad_payloads_and_impersonation() -> None:
    hub = MemoryBroker()
    agg = Channel(transport=MemoryTransport(broker=hub, client_id="agg"), fleet="f1")
    dev = Channel(transport=MemoryTransport(broker=hub, client_id="d1"), fleet="f1")
    agg.transport.connect()
    dev.transport.connect()
    got: list[Message] = []
    agg.subscribe(agg.topics.all_up, lambda _t, m: got.append(m))
    topic = dev.topics.up("d1", "update")
    dev.transport.publish(topic, b"garbage that is not an envelope")
    dev.send(topic, _msg(b"spoof", device="d2"))  # claims to be d2 on d1's topic
    dev.send(topic, _msg(b"real", device="d1"))
    assert [m.body for m in got] == [b"real"]
    assert agg.dropped["EnvelopeError"] == 1 and agg.dropped["device_mismatch"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_only_raise_envelope_errors(data: bytes) -> None:
    with contextlib.suppress(EnvelopeError):
        Chunk.from_bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_payloads_never_escape_typed_errors(data: st.DataObject) -> None:
    (p,) = split_message(_msg(b"payload" * 20), max_payload=4096)
    buf = bytearray(p)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(HEADER_SIZE - 8, len(buf)))
    r = Reassembler()
    with contextlib.suppress(EnvelopeError, ChunkError):
        r.feed(Chunk.from_bytes(bytes(buf[:cut])))


def test_json_bodies_are_bounded_before_reassembly_and_parsing() -> None:
    """A JSON control message (hello, request, error, ack, presence) is at most
    MAX_JSON_BYTES: a longer one is refused from its header, before any chunk of it is
    held, and ``parse_json`` refuses one however it arrived."""
    from broker_bridge import MAX_JSON_BYTES, parse_json

    big = b'{"agent": "' + b"x" * MAX_JSON_BYTES + b'"}'
    hello = Message(kind=Kind.HELLO, fleet="f1", device="d1", codec="json", body=big)
    parts = split_message(hello, max_payload=16 * 1024)
    r = Reassembler()
    for p in parts:  # every chunk: a receiver may see any of them first
        with pytest.raises(EnvelopeError, match=f"json body of {len(big)} bytes exceeds"):
            r.feed(Chunk.from_bytes(p))
    assert r.pending_sets == 0 and r.pending_bytes == 0
    (single,) = split_message(hello, max_payload=len(big) + 1024)
    with pytest.raises(EnvelopeError, match="exceeds"):
        Chunk.from_bytes(single)
    with pytest.raises(EnvelopeError, match="exceeds"):
        hello.json()
    with pytest.raises(EnvelopeError, match="exceeds"):
        parse_json(big)
    # at the bound: accepted; the same size with another codec (an update) too
    at_limit = b'{"agent": "' + b"x" * (MAX_JSON_BYTES - 13) + b'"}'
    assert len(at_limit) == MAX_JSON_BYTES
    ok = Message(kind=Kind.HELLO, fleet="f1", device="d1", codec="json", body=at_limit)
    got = _reassemble(split_message(ok, max_payload=16 * 1024))
    assert got[0].json()["agent"] == "x" * (MAX_JSON_BYTES - 13)
    assert _reassemble(split_message(_msg(big), max_payload=16 * 1024))[0].body == big
    # a sender cannot build one that every receiver would drop
    with pytest.raises(EnvelopeError, match="exceeds"):
        json_message(Kind.HELLO, fleet="f1", payload={"agent": "x" * MAX_JSON_BYTES})


def test_channel_drops_an_oversized_json_message_and_counts_it() -> None:
    hub = MemoryBroker()
    agg = Channel(transport=MemoryTransport(broker=hub, client_id="agg"), fleet="f1")
    dev = Channel(transport=MemoryTransport(broker=hub, client_id="d1"), fleet="f1")
    agg.transport.connect()
    dev.transport.connect()
    got: list[Message] = []
    agg.subscribe(agg.topics.all_up, lambda _t, m: got.append(m))
    topic = dev.topics.up("d1", "hello")
    n = dev.send(topic, Message(kind=Kind.HELLO, fleet="f1", device="d1", codec="json",
                                body=b'{"agent": "' + b"x" * 1_000_000 + b'"}'))
    dev.send(topic, json_message(Kind.HELLO, fleet="f1", device="d1", payload={"agent": "a"}))
    assert [m.json() for m in got] == [{"agent": "a"}]
    assert n == 8 and agg.dropped["EnvelopeError"] == n
    assert agg.reassembler.pending_bytes == 0


def test_a_full_buffer_evicts_from_the_heaviest_sender_not_a_light_newcomer() -> None:
    """Two devices holding large incomplete sets fill the global byte budget: a third
    device's multi-chunk message still goes through, and the set that makes room is the
    heaviest sender's; a heavy sender that overflows the buffer loses its own set."""
    lim = ReassemblyLimits(max_pending_bytes=110_000, max_bytes_per_sender=100_000)
    r = Reassembler(limits=lim)

    def parts(device: str, size: int, tid: int) -> list[Chunk]:
        payloads = split_message(_msg(bytes([tid]) * size, device=device, transfer_id=tid),
                                 max_payload=8192)
        return [Chunk.from_bytes(p) for p in payloads]

    heavy_a, heavy_b = parts("dev-a", 200_000, 1), parts("dev-b", 200_000, 2)
    for chunk in heavy_a[:6] + heavy_b[:6]:
        assert r.feed(chunk) is None
    assert r.pending_bytes > lim.max_pending_bytes - 8192  # no room for one more chunk
    light = parts("dev-c", 30_000, 3)
    done = [r.feed(chunk) for chunk in light]
    assert done[-1] is not None and done[-1].body == bytes([3]) * 30_000
    assert r.stats.evicted == 1 and r.pending_sets == 1  # one heavy set made room
    assert r.sender_usage("f1", "dev-c") == (0, 0)
    # the heavy sender left grows on to fill the buffer, then loses its own set
    (survivor,) = [d for d in ("dev-a", "dev-b") if r.sender_usage("f1", d)[0]]
    rest = (heavy_a if survivor == "dev-a" else heavy_b)[6:]
    small = parts("dev-d", 25_000, 4)[:3]
    for chunk in small:
        assert r.feed(chunk) is None
    with pytest.raises(ChunkError, match="buffer full"):
        for chunk in rest:
            r.feed(chunk)
    assert r.sender_usage("f1", survivor) == (0, 0)
    assert r.sender_usage("f1", "dev-d")[0] == 1  # the lighter sender keeps its set
    assert r.stats.evicted == 1 and r.pending_bytes <= lim.max_pending_bytes


def test_transfer_ids_are_distinct_and_a_forked_child_draws_its_own() -> None:
    """Ids come from the OS's CSPRNG in draws of many: never repeated within a process,
    and a forked child (the simulator's workers) never sends its parent's next ids."""
    ids = [new_transfer_id() for _ in range(3000)]  # several draws
    assert len(set(ids)) == len(ids)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(reader)
        os.write(writer, struct.pack("<8Q", *(new_transfer_id() for _ in range(8))))
        os._exit(0)
    os.close(writer)
    child = struct.unpack("<8Q", os.read(reader, 64))
    os.close(reader)
    os.waitpid(pid, 0)
    mine = [new_transfer_id() for _ in range(8)]
    assert not set(child) & set(mine)
