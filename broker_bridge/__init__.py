"""Everything on the wire: topics, envelope, chunking, the update codec, MQTT, brokers.

Where things live:

- ``_errors``: ``WireError`` and its kinds, ``TransportError``, ``BrokerUnavailable``.
"""

from broker_bridge._errors import (
    BrokerUnavailable,
    ChunkError,
    CodecError,
    EnvelopeError,
    TransportError,
    WireError,
)
from device_profiles import ConfigError, FleetlearnError

__all__ = [
    "BrokerUnavailable",
    "ChunkError",
    "CodecError",
    "ConfigError",
    "EnvelopeError",
    "FleetlearnError",
    "TransportError",
    "WireError",
]
