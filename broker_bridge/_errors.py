"""Errors of the wire layer (see ``device_profiles._errors`` for the whole tree).

    WireError            untrusted bytes that do not decode; the message is dropped
    ├── EnvelopeError    header: magic, version, truncation, lying lengths, checksum
    ├── ChunkError       chunk reassembly: limits, inconsistent chunk sets
    ├── CodecError       update bodies: spec, sizes, indices, NaN/Inf, layout
    ├── SignatureError   a signed update's signature block (``_signing``)
    └── SecAggRejected   a secure-aggregation message or share (``code`` says why)
    TransportError       the broker or network failed (outside us; retry may help)
    └── BrokerUnavailable
    BrokerRefused        (a ConfigError) the broker refused this client for good:
                         credentials, authorisation, client id or topic, certificate
    EnrolmentError       (a ConfigError) an enrolment file that cannot be used (``_enrolment``)
"""

from __future__ import annotations

from device_profiles._errors import ConfigError, FleetlearnError


class WireError(FleetlearnError, ValueError):
    """Bytes from the wire that cannot be accepted. Drop the message, log, go on."""


class EnvelopeError(WireError):
    """The message header is truncated, of another protocol or version, or lies."""


class ChunkError(WireError):
    """A chunk cannot be reassembled (limits exceeded, inconsistent with its set)."""


class CodecError(WireError):
    """An update body cannot be decoded safely against its spec and layout."""


class SecAggRejected(WireError):
    """A secure-aggregation message or share that is refused. ``code`` says why:
    ``malformed`` (does not parse or breaks a bound), ``wrong_round`` (another round or
    session), ``replayed`` (a second, different message for a step already taken),
    ``unexpected`` (not the step the round is at, or from a device not in it),
    ``bad_share`` (a share that decrypts wrongly or does not reconstruct its commitment)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class TransportError(FleetlearnError):
    """The broker or the network failed; not caused by the data we were given."""


class BrokerUnavailable(TransportError):
    """No connection to the broker could be made (or it was lost for good)."""


class BrokerRefused(ConfigError):
    """The broker refused this client for a reason retrying will not change (bad user
    name or password, not authorised, a client id or topic it rejects, an untrusted
    certificate). A ``ConfigError``, not a ``TransportError``: fix, do not retry."""
