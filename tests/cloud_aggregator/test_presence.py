"""The aggregator's own retained presence on ``broadcast/aggregator``: ``online`` while
it serves, ``offline`` when it closes or (by its last will) when its connection dies."""

from __future__ import annotations

from pathlib import Path

from aggregator_rig import FLEET, make

from broker_bridge import AGGREGATOR_PRESENCE, Channel, MemoryBroker, MemoryTransport, Message


def watch(broker: MemoryBroker) -> list[str]:
    """The statuses a late subscriber sees (the retained one first)."""
    seen: list[str] = []
    transport = MemoryTransport(broker=broker, client_id="watcher")
    channel = Channel(transport=transport, fleet=FLEET)
    transport.connect()

    def on(topic: str, message: Message) -> None:
        seen.append(str(message.json()["status"]))

    channel.subscribe(channel.topics.broadcast(AGGREGATOR_PRESENCE), on)
    return seen


def test_the_aggregator_says_online_and_offline_when_it_closes(tmp_path: Path,
                                                                artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = make(tmp_path, artifacts, broker)
    seen = watch(broker)
    assert seen == ["online"]
    agg.close()
    assert seen == ["online", "offline"]
    assert watch(broker) == ["offline"]  # retained for whoever comes next


def test_a_dead_aggregator_is_said_offline_by_its_last_will(tmp_path: Path,
                                                            artifacts: Path) -> None:
    broker = MemoryBroker()
    agg = make(tmp_path, artifacts, broker)
    seen = watch(broker)
    transport = agg.channel.transport
    assert isinstance(transport, MemoryTransport)
    agg.abort()  # no close: the process is gone (its transport dies uncleanly)
    assert seen == ["online", "offline"]
    again = make(tmp_path, artifacts, broker)  # a restart says online again
    assert seen[-1] == "online"
    again.close()
