"""Device keys for the tests: every test device signs its updates, and every aggregator a
test makes knows the keys (``ENROLMENT``, consulted live, so devices made after the
aggregator are known too).

Fake devices (``aggregator_rig``, ``mqtt_rig``) use a key derived from their id (the
same id gets the same key in every test); real agents make their own key in their state
folder and are enrolled with ``enrol_agent``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from broker_bridge import Enrolment
from edge_runtime import DeviceKey

ENROLMENT = Enrolment()
"""Every test device's public key."""


def device_key(device_id: str) -> DeviceKey:
    """The key of fake device ``device_id`` (derived from its id), enrolled."""
    key = DeviceKey.from_seed(hashlib.sha256(b"fleetlearn test device " +
                                             device_id.encode()).digest())
    ENROLMENT.enrol(device_id, key.public_key, replace=True)
    return key


def enrol_agent(agent: Any) -> Any:
    """Enrol a real agent's own key (made in its state folder); returns the agent."""
    ENROLMENT.enrol(agent.device_id, agent.key.public_key, replace=True)
    return agent
