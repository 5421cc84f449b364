"""The ack state machine over a real Mosquitto (docs/PROTOCOL.md section 5.1).

A device speaking the protocol by hand: a malformed update is refused with a code that
allows a retry and a corrected attempt counts; after the round closed, the same
update sent again is answered ``duplicate`` (``already_counted``), not ``stale_round``.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from mqtt_rig import Device, aggregator
from waiting import wait_for

from broker_bridge import AckCode, MosquittoProcess, ack_code, may_retry


def test_retry_and_late_redelivery_over_mosquitto(
    mosquitto: MosquittoProcess, tmp_path: Path, artifacts: Path
) -> None:
    fleet = "acks"
    agg = aggregator(mosquitto.url, fleet, tmp_path, artifacts, rounds=2)
    agg.start()
    devs = [Device(mosquitto.url, fleet, f"dev-{i}") for i in range(2)]
    runner = threading.Thread(target=agg.run, kwargs={"timeout_s": 60}, daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: all(d.tasks for d in devs))
        d0, d1 = devs
        good = d0.update(agg.layout.size, layout=agg.layout)
        d0.send(replace(good, body=good.body[:-8], transfer_id=0))  # cut short
        assert wait_for(lambda: d0.ack(1) is not None)
        first = d0.ack(1)
        assert first is not None and first.status == "rejected"
        assert ack_code(first) == AckCode.CODEC and may_retry(ack_code(first))
        d0.send(replace(good, attempt=1, transfer_id=0))  # the corrected update
        assert wait_for(lambda: (a := d0.ack(1)) is not None and a.attempt == 1)
        assert d0.ack(1).status == "accepted"  # type: ignore[union-attr]
        d1.send(d1.update(agg.layout.size, layout=agg.layout))
        assert wait_for(lambda: agg.model_version >= 1)
        assert agg.store.count_accepted(fleet, 1) == 2
        with d0.lock:
            d0.acks.clear()
        d0.send(replace(good, attempt=1, transfer_id=0))  # its ack was lost, say
        assert wait_for(lambda: d0.ack(1) is not None)
        late = d0.ack(1)
        assert late is not None and late.status == "duplicate"
        assert ack_code(late) == AckCode.ALREADY_COUNTED and "attempt 1" in late.reason
    finally:
        agg.stop()
        runner.join(10)
        for d in devs:
            d.close()
        agg.close()
        agg.channel.transport.close()
