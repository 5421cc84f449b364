"""Errors of the wire layer (see ``device_profiles._errors`` for the whole tree).

    WireError            untrusted bytes that do not decode; the message is dropped
    ├── EnvelopeError    header: magic, version, truncation, lying lengths, checksum
    ├── ChunkError       chunk reassembly: limits, inconsistent chunk sets
    └── CodecError       update bodies: spec, sizes, indices, NaN/Inf, layout
    TransportError       the broker or network failed (outside us; retry may help)
    └── BrokerUnavailable
"""

from __future__ import annotations

from device_profiles._errors import FleetlearnError


class WireError(FleetlearnError, ValueError):
    """Bytes from the wire that cannot be accepted. Drop the message, log, go on."""


class EnvelopeError(WireError):
    """The message header is truncated, of another protocol or version, or lies."""


class ChunkError(WireError):
    """A chunk cannot be reassembled (limits exceeded, inconsistent with its set)."""


class CodecError(WireError):
    """An update body cannot be decoded safely against its spec and layout."""


class TransportError(FleetlearnError):
    """The broker or the network failed; not caused by the data we were given."""


class BrokerUnavailable(TransportError):
    """No connection to the broker could be made (or it was lost for good)."""
