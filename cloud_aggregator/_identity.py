"""Device identity on the aggregator: whose key is whose, and the ingest stage that checks.

``KeyBook`` answers "which key does this device sign with": the operator's enrolment
(``--enrolment FILE``, or an ``Enrolment`` object given to the ``Aggregator``), then, only
with ``trust_on_first_use``, the key the store recorded from the device's first verified
update (``_store_keys``). An enrolment file is read again when it changed on disk (looked
at, at most once a second, when a device has no key or signs with another), so a device
enrolled or re-keyed while the aggregator runs is heard without a restart.

``VerifySignature`` is the first ingest stage (``verify``, before ``unpack`` and
``decode``): an update that is not signed, whose device has no key, that is signed by
another key than its device's, or whose signature does not verify over its statement
(fleet, device, round, model version, attempt, codec spec, SHA-256 of the body: see
``broker_bridge._signing``) is refused with ``unsigned``, ``unknown_device``,
``wrong_key`` or ``bad_signature``. These refusals are ``Rejection.copy``: whoever sent
the update may not be the device, so nothing of the device's round changes (a forger
cannot use up its attempts or settle its round), and the model is never touched. An
update that passes carries its ``signature`` and ``body_sha256`` on (``UpdateItem``).

The default (no enrolment, no trust on first use) refuses every update as
``unknown_device``: a device proves who it is with a key the operator enrolled, so one
compromised device, even holding another's broker password, cannot speak for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker_bridge import (
    AckCode,
    Enrolment,
    EnrolmentError,
    SignatureError,
    SignedBody,
    key_text,
    message_statement,
    verify_signature,
)
from cloud_aggregator._store import Store

if TYPE_CHECKING:
    from cloud_aggregator._ingest import Rejection, UpdateItem

log = logging.getLogger(__name__)

RELOAD_EVERY_S = 1.0
"""How often, at most, a missing key makes the enrolment file be looked at again."""


class KeyBook:
    """The key each device signs with (see the module doc)."""

    def __init__(self, *, store: Store, fleet: str, enrolment: Enrolment | None = None,
                 path: str | os.PathLike[str] | None = None, trust_on_first_use: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._fleet = fleet
        self._path = Path(path) if path is not None else None
        self.trust_on_first_use = trust_on_first_use
        self._clock = clock
        self._stamp: tuple[int, int] | None = None
        self._looked = -float("inf")
        if enrolment is not None:
            self.enrolment = enrolment
        elif self._path is not None:
            self.enrolment = Enrolment.load(self._path, fleet=fleet)  # EnrolmentError
            self._stamp = self._file_stamp()
        else:
            self.enrolment = Enrolment(fleet=fleet)

    @property
    def empty(self) -> bool:
        """No device can be verified now: no key enrolled and no trust on first use."""
        return self.enrolment.enrolled == 0 and not self.trust_on_first_use

    def key_of(self, device: str, *, presented: bytes | None = None) -> bytes | None:
        """The key ``device`` must sign with: enrolled, else first seen; None: none yet.
        An enrolment file is read again (if it changed) when it has no key for the device
        or another key than the one ``presented`` (a device re-keyed on purpose)."""
        key = self.enrolment.key_of(device)
        if (key is None or (presented is not None and key != presented)) and \
                self._path is not None and self._reload():
            key = self.enrolment.key_of(device)
        if key is None and self.trust_on_first_use:
            key = self._store.device_key(device)
        return key

    def first_use(self, device: str, public_key: bytes) -> bytes:
        """Trust ``public_key`` for ``device`` (it signed a verified update) unless a key
        was recorded first; the key the device now holds."""
        held = self._store.first_key(device, public_key)
        if held == public_key:
            log.warning("device %s: trusted on first use with key %s (recorded for good)",
                        device, key_text(public_key))
        return held

    def _file_stamp(self) -> tuple[int, int] | None:
        assert self._path is not None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _reload(self) -> bool:
        """Read the enrolment file again if it changed; True when it was read."""
        now = self._clock()
        if now - self._looked < RELOAD_EVERY_S:
            return False
        self._looked = now
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        assert self._path is not None
        try:
            fresh = Enrolment.load(self._path, fleet=self._fleet)
        except EnrolmentError as exc:
            log.error("enrolment file changed but cannot be used; keeping the keys read "
                      "before: %s", exc)
            self._stamp = stamp
            return False
        self._stamp = stamp
        self.enrolment = fresh
        log.info("enrolment file %s read again: %d devices, %d with a key", self._path,
                 len(fresh), fresh.enrolled)
        return True


@dataclass
class VerifySignature:
    """The ``verify`` ingest stage: the update is signed by its device's key over its own
    statement (see the module doc)."""

    keys: KeyBook
    name: str = "verify"

    def process(self, item: UpdateItem) -> Rejection | None:
        from cloud_aggregator._ingest import Rejection

        message = item.message
        try:
            signed = SignedBody.from_bytes(message.body, copy=False)
        except SignatureError as exc:
            return Rejection(AckCode.BAD_SIGNATURE, str(exc), copy=True)
        if signed is None:
            return Rejection(AckCode.UNSIGNED, "updates must be signed with the device's key "
                             "(an agent older than signed updates?)", copy=True)
        digest = signed.body_sha256
        good = verify_signature(signed.public_key, signed.signature,
                                message_statement(message, digest))
        key = self.keys.key_of(item.device, presented=signed.public_key)
        if key is None:
            if not self.keys.trust_on_first_use:
                return Rejection(AckCode.UNKNOWN_DEVICE, f"no key is enrolled for device "
                                 f"{item.device!r}", copy=True)
            if not good:  # a key is learned only from an update it signed
                return Rejection(AckCode.BAD_SIGNATURE, "the signature does not verify",
                                 copy=True)
            key = self.keys.first_use(item.device, signed.public_key)
        if signed.public_key != key:
            return Rejection(AckCode.WRONG_KEY, f"signed by {key_text(signed.public_key)}, "
                             f"not by the key of device {item.device!r}", copy=True)
        if not good:
            return Rejection(AckCode.BAD_SIGNATURE, "the signature does not verify over this "
                             "update's fleet, device, round, model version, attempt, codec "
                             "and body", copy=True)
        item.signature = signed.signature
        item.body_sha256 = digest
        return None
