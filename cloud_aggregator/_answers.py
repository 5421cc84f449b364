"""What the aggregator answers to an update: the ack state machine's memory.

docs/PROTOCOL.md section 5.1 is the contract; ``broker_bridge._acks`` names the codes.
This module keeps what the answers depend on beyond the open round's device states:

- ``AttemptLedger``: the attempts of each device that were judged and refused, per task
  round. An attempt is judged once: the same attempt arriving again (a redelivery, a
  re-send after a lost ack) gets its first answer back. After a refusal that allows a
  retry (``may_retry``) a corrected update with another attempt number is judged, at
  most ``MAX_JUDGED_ATTEMPTS`` per device and round (each costs a decode), and never
  after a refusal that does not. The open round's part is persisted with the round
  (``to_json``/``load``), so a restarted aggregator neither forgets a refusal nor asks
  a refused device again.
- ``after_round``: the answer to an update whose round (or asynchronous task) is no
  longer open, from the store's accepted keys, which outlive the round: counted
  (``duplicate``), held but thrown away with an abandoned round (``round_abandoned``),
  refused before (its first answer), or never seen (``stale_round``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Literal

from broker_bridge import AckCode, may_retry, printable, reason_text
from cloud_aggregator._rounds import SyncRound
from cloud_aggregator._store import Store, StoreError

MAX_JUDGED_ATTEMPTS = 4
"""Refused attempts judged per device and round; the next is ``too_many_attempts``."""
MAX_REMEMBERED_ROUNDS = 16
"""Rounds (or async tasks) whose refusals stay in memory to answer late redeliveries."""
MAX_DETAIL = 300

Status = Literal["accepted", "duplicate", "rejected"]


@dataclass(frozen=True, kw_only=True)
class Answer:
    """One update ack's status, code and detail."""

    status: Status
    code: str = ""
    detail: str = ""

    @property
    def reason(self) -> str:
        return reason_text(self.code, self.detail) if self.code else ""

    @property
    def final(self) -> bool:
        """Nothing more from this device counts in this round after this answer."""
        return not (self.status == "rejected" and may_retry(self.code))


ACCEPTED = Answer(status="accepted")


def refused(code: str, detail: str = "") -> Answer:
    return Answer(status="rejected", code=code, detail=printable(detail, MAX_DETAIL))


class AttemptLedger:
    """Refused attempts per (task round, device), in memory for the last few rounds."""

    def __init__(self, *, max_judged: int = MAX_JUDGED_ATTEMPTS,
                 max_rounds: int = MAX_REMEMBERED_ROUNDS) -> None:
        self.max_judged = max_judged
        self._max_rounds = max_rounds
        self._rounds: collections.OrderedDict[int, dict[str, dict[int, Answer]]] = (
            collections.OrderedDict())

    def recall(self, task_round: int, device: str, attempt: int) -> Answer | None:
        """The first answer to this very attempt, when it was refused."""
        return self._rounds.get(task_round, {}).get(device, {}).get(attempt)

    def exhausted(self, task_round: int, device: str) -> bool:
        return len(self._rounds.get(task_round, {}).get(device, {})) >= self.max_judged

    def settled(self, task_round: int, device: str) -> bool:
        """Was an attempt of ``device`` refused for good in this round?"""
        return any(a.final for a in self._rounds.get(task_round, {}).get(device, {}).values())

    def record(self, task_round: int, device: str, attempt: int, answer: Answer) -> None:
        if answer.status != "rejected":
            return
        devices = self._rounds.get(task_round)
        if devices is None:
            devices = self._rounds[task_round] = {}
            while len(self._rounds) > self._max_rounds:
                self._rounds.popitem(last=False)
        devices.setdefault(device, {})[attempt] = answer

    def devices(self, task_round: int) -> tuple[str, ...]:
        return tuple(self._rounds.get(task_round, {}))

    # -- persistence of one round

    def to_json(self, task_round: int) -> dict[str, Any]:
        return {device: {str(attempt): [a.code, a.detail] for attempt, a in attempts.items()}
                for device, attempts in self._rounds.get(task_round, {}).items()}

    def restore(self, task_round: int, data: Any, rnd: SyncRound, *, where: str) -> None:
        """Reload a round written by ``to_json`` and put its refused devices back in the
        states the refusals left them in."""
        try:
            for device, attempts in data.items():
                for attempt, (code, detail) in attempts.items():
                    self.record(task_round, str(device), int(attempt),
                                refused(str(code), str(detail)))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"the refused updates of round {task_round} in {where} are "
                             f"malformed ({exc!r})") from exc
        for device in self.devices(task_round):
            if self.settled(task_round, device):
                rnd.rejected(device)
            else:
                rnd.refused(device)


def refused_blob(task_round: int) -> str:
    """The state blob that holds a sync round's refused attempts (``to_json``)."""
    return f"round:{task_round}:refused"


def after_round(store: Store, ledger: AttemptLedger, *, fleet: str, task_round: int,
                device: str, attempt: int, unknown: str = AckCode.STALE_ROUND,
                why: str = "") -> Answer:
    """The answer to an update of ``task_round`` when that round or task is not open
    (or, with ``unknown`` unused, when the device's update of it already counts)."""
    counted = store.accepted_attempt(fleet, task_round, device)
    if counted is not None:
        record = store.round(fleet, task_round)
        if record is not None and record.state == "abandoned":
            return refused(AckCode.ROUND_ABANDONED,
                           f"round {task_round} missed its quorum; nothing of it was applied")
        return Answer(status="duplicate", code=AckCode.ALREADY_COUNTED,
                      detail=f"attempt {counted} counts in round {task_round}")
    first = ledger.recall(task_round, device, attempt)
    if first is not None:
        return first
    return refused(unknown, why)
