"""Reason codes of update acknowledgements, and what a device does after each.

The aggregator answers every update it receives with an ``Ack`` (``what = "update"``)
whose ``status`` is ``accepted``, ``duplicate`` or ``rejected`` and whose ``reason`` is
``"<code>"`` or ``"<code>: <detail>"``: the code is machine-readable (lower case and
``_``), the detail is for people. docs/PROTOCOL.md section 5.1 is the state machine.

- ``accepted`` (code ``""``): this update is durably held and counts (unless its round
  is later abandoned, which the device learns from a ``cancel``).
- ``duplicate`` (code ``already_counted``): an update of this device is already counted
  for this round or task (this attempt or another one; the detail says which), whether
  the round is still open or closed since. The device stops sending for that round.
- ``rejected`` with a code in ``IDENTITY`` (``unsigned``, ``unknown_device``,
  ``wrong_key``, ``bad_signature``): the update does not prove it is the device's; it
  is not judged, and nothing of the device's round changes.
- ``rejected`` otherwise: not counted. When ``may_retry(code)`` the fault is in the update itself
  (it does not decode, its weight or values are unusable, it answers another model
  version) and a corrected update with a *new* attempt number is judged while the
  round is open; otherwise nothing more from this device counts in that round.

An update sent again with the same attempt number (a QoS 1 redelivery, a re-send after
a lost ack) gets the answer its first copy got: an attempt is judged once.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker_bridge._protocol import Ack


class AckCode(StrEnum):
    """The ``<code>`` at the start of an update ack's ``reason``."""

    ALREADY_COUNTED = "already_counted"
    """duplicate: an update of this device already counts for this round or task."""

    # rejected, and a corrected update (a new attempt) may still count
    BAD_BODY = "bad_body"
    """the body's ``u32 meta_len | meta JSON`` prefix or its metadata is malformed."""
    CODEC = "codec"
    """the codec body does not decode against the round's layout."""
    BAD_WEIGHT = "bad_weight"
    """``num_samples`` is not positive."""
    NON_FINITE = "non_finite"
    """the update holds NaN or infinity."""
    WRONG_SHAPE = "wrong_shape"
    WRONG_SIZE = "wrong_size"
    WRONG_DTYPE = "wrong_dtype"
    WRONG_MODEL_VERSION = "wrong_model_version"
    """the envelope's ``model_version`` is not the one the task named."""
    WRONG_NONCE = "wrong_nonce"
    """the metadata's ``nonce`` is not the task's: not an answer to this device's task
    (a copy of another update); it changes nothing, the device's own answer may count."""

    # rejected, not judged: the device's identity is not proven (docs/PROTOCOL.md 5.2).
    # Nothing of the device's round changes (a forger cannot use up its attempts); the
    # same update, once its key is enrolled, is judged when sent again.
    UNSIGNED = "unsigned"
    """the update carries no signature (an agent older than signed updates)."""
    UNKNOWN_DEVICE = "unknown_device"
    """no public key is enrolled (or, with trust on first use, first seen) for the device."""
    WRONG_KEY = "wrong_key"
    """the update is signed with a key that is not the device's enrolled (or first-seen)
    one: another device's update presented under this device's name."""
    BAD_SIGNATURE = "bad_signature"
    """the signature does not verify over the update's statement (fleet, device, round,
    model version, attempt, codec, body hash): altered, or made for another round,
    attempt or fleet; or its signature block is malformed."""

    # rejected, and nothing more from this device counts in that round or task
    STALE_ROUND = "stale_round"
    """the update's round is not open, and the aggregator holds nothing of this device
    for it: not counted."""
    ROUND_ABANDONED = "round_abandoned"
    """the update was held, but its round missed its quorum and nothing of it was
    applied."""
    NOT_SELECTED = "not_selected"
    UNKNOWN_TASK = "unknown_task"
    """asynchronous mode: no task of that number is in flight for this device."""
    RESOLVED = "resolved"
    """the device's part in this round is settled (it declined, missed the deadline or
    had an update refused for good)."""
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    NORM_ABOVE_CAP = "norm_above_cap"
    NORM_ABOVE_MEDIAN = "norm_above_median"
    NORM_ABOVE_MODEL = "norm_above_model"
    MISSED_DEADLINE = "missed_deadline"
    BUFFER_FULL = "buffer_full"
    TOO_STALE = "too_stale"
    FROM_FUTURE = "from_future"


RETRYABLE: frozenset[str] = frozenset({
    AckCode.BAD_BODY, AckCode.CODEC, AckCode.BAD_WEIGHT, AckCode.NON_FINITE,
    AckCode.WRONG_SHAPE, AckCode.WRONG_SIZE, AckCode.WRONG_DTYPE,
    AckCode.WRONG_MODEL_VERSION, AckCode.WRONG_NONCE,
})
"""Rejections after which a corrected update, with a new attempt number, is judged.
None of them reaches the norm screen (they are refused before it), so a retry cannot
be used to probe the screen's threshold."""

IDENTITY: frozenset[str] = frozenset({
    AckCode.UNSIGNED, AckCode.UNKNOWN_DEVICE, AckCode.WRONG_KEY, AckCode.BAD_SIGNATURE,
})
"""Rejections of an update whose signature does not prove its device: nothing of the
device's round is settled by them (whoever sent it may not be the device). The reference
agent keeps such an update and sends it again after its ack timeout (bounded), so a
device enrolled late is heard, and a forged copy's answer cannot end its own update."""

_CODE = re.compile(r"^[a-z][a-z0-9_]*")


def ack_code(ack: Ack | str) -> str:
    """The machine-readable code of an ack (or of its ``reason``); ``""`` when none."""
    reason = ack if isinstance(ack, str) else ack.reason
    found = _CODE.match(reason)
    return found.group(0) if found else ""


def may_retry(code: str) -> bool:
    """After a rejection with ``code``, may a corrected update (new attempt) count?
    Unknown codes are final: a device never retries on a guess."""
    return code in RETRYABLE


def reason_text(code: str, detail: str = "") -> str:
    """The ``reason`` of an ack: ``code`` alone or ``"code: detail"``."""
    if not _CODE.fullmatch(code):
        raise ValueError(f"ack code {code!r} is not lower case and '_'")
    return f"{code}: {detail}" if detail else code
