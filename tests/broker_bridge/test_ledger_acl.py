"""Under the generated broker ACL only the aggregator writes the training ledger's topics:
a device reads the retained tree head, cannot replace it, and cannot send another
device a proof (a real Mosquitto with the files of ``fleetlearn broker config``)."""

from __future__ import annotations

import threading
import time
import tomllib
from pathlib import Path

from waiting import wait_for

from broker_bridge import (
    Channel,
    InclusionProof,
    Kind,
    Message,
    MosquittoProcess,
    MqttTransport,
    TreeHead,
    write_broker_config,
)
from broker_bridge._brokers import _child_user, free_port

FLEET = "ledger-acl"
HEAD = TreeHead(size=3, timestamp_ms=1, root="aa" * 32, signature="bb" * 64)
FORGED = TreeHead(size=4, timestamp_ms=2, root="cc" * 32, signature="dd" * 64)


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.lock = threading.Lock()

    def __call__(self, _topic: str, m: Message) -> None:
        with self.lock:
            self.messages.append(m)


def _channel(url: str, user: str, password: str) -> Channel:
    return Channel(transport=MqttTransport(url=url, client_id=user, username=user,
                                           password=password, backoff_min_s=0.1,
                                           backoff_max_s=1.0), fleet=FLEET)


def test_only_the_aggregator_writes_tree_heads_and_proofs(tmp_path: Path) -> None:
    port = free_port()
    files = write_broker_config(tmp_path, fleet=FLEET, devices=["dev-a", "dev-b"], port=port,
                                bind_address="127.0.0.1", run_as_user=_child_user())
    creds = tomllib.loads(files.credentials.read_text())
    with MosquittoProcess(conf_text=files.conf.read_text(), port=port, workdir=tmp_path) as broker:
        agg = _channel(broker.url, "aggregator", creds["aggregator"])
        a = _channel(broker.url, "dev-a", creds["dev-a"])
        b = _channel(broker.url, "dev-b", creds["dev-b"])
        downs = _Inbox()
        proof = InclusionProof(round=1, index=0, entry="{}", update="{}", update_index=0,
                               size=1, timestamp_ms=1, root="aa" * 32, signature="bb" * 64)
        with agg.transport, a.transport, b.transport:
            b.subscribe(b.topics.device_down("dev-b"), downs)
            agg.send(agg.topics.broadcast("ledger"), HEAD.to_message(fleet=FLEET), retain=True)
            time.sleep(0.3)
            # dev-a tries to replace the retained head and to send dev-b a proof
            a.send(a.topics.broadcast("ledger"), FORGED.to_message(fleet=FLEET), retain=True)
            a.send(a.topics.down("dev-b", "proof"),
                   proof.to_message(fleet=FLEET, device="dev-b", round=1))
            time.sleep(0.3)
            # the aggregator's proof, sent after, is the positive control
            agg.send(agg.topics.down("dev-b", "proof"),
                     proof.to_message(fleet=FLEET, device="dev-b", round=2))
            assert wait_for(lambda: len(downs.messages) >= 1)
            time.sleep(0.5)
        assert [m.round for m in downs.messages] == [2]
        heads = _Inbox()
        late = _channel(broker.url, "dev-a", creds["dev-a"])
        with late.transport:
            late.subscribe(late.topics.all_broadcast, heads)
            assert wait_for(lambda: len(heads.messages) >= 1)
            time.sleep(0.5)
        assert [m.kind for m in heads.messages] == [Kind.LEDGER]
        assert TreeHead.from_message(heads.messages[0]) == HEAD  # the aggregator's, kept
