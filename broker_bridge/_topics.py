"""Topic layout: one tree per fleet, one subtree per device.

::

    fl/<fleet>/devices/<device>/presence      device -> all     retained status, last will
    fl/<fleet>/devices/<device>/up/<kind>     device -> cloud   hello, update, ack, error, eval,
                                                                secagg
    fl/<fleet>/devices/<device>/down/<kind>   cloud -> device   task, cancel, ack, artifacts,
                                                                secagg
    fl/<fleet>/broadcast/<kind>               cloud -> fleet    model, artifacts, control

A device writes only under its own ``devices/<device>/`` subtree and reads only its
own ``down/`` subtree plus ``broadcast/``; a broker ACL pattern on the MQTT username
(``pattern write fl/<fleet>/devices/%u/up/#``) therefore confines it. The global model
goes out once on ``broadcast/model`` and the broker fans it out.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from device_profiles import ConfigError

ROOT = "fl"

# Identifiers must be usable as single MQTT topic levels and as broker user names on
# every broker: no '/', no wildcards, no '%' (ACL pattern escapes), no whitespace or
# NUL, and no '.' (NATS' MQTT gateway refuses it in any topic, a last will included,
# and RabbitMQ's MQTT plugin turns it into a level separator, hiding the device).
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:-]{0,63}$")


@functools.lru_cache(maxsize=65536)
def _valid_id(value: str) -> bool:
    # Ids repeat on every message of a fleet: cache the verdict, not just the regex.
    return _ID_RE.match(value) is not None


def check_id(value: str, *, what: str) -> str:
    """Return ``value`` if it is a valid fleet or device id, else raise ConfigError."""
    if not isinstance(value, str) or not _valid_id(value):
        raise ConfigError(
            f"invalid {what} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ : -, "
            "starting with a letter or digit ('.' is not allowed: some MQTT brokers refuse "
            "it in topics, others turn it into '/')"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class Topics:
    """The topics of one fleet."""

    fleet: str

    def __post_init__(self) -> None:
        check_id(self.fleet, what="fleet id")

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.fleet}"

    def device(self, device: str) -> str:
        return f"{self.base}/devices/{check_id(device, what='device id')}"

    def presence(self, device: str) -> str:
        return f"{self.device(device)}/presence"

    def up(self, device: str, kind: str) -> str:
        return f"{self.device(device)}/up/{kind}"

    def down(self, device: str, kind: str) -> str:
        return f"{self.device(device)}/down/{kind}"

    def broadcast(self, kind: str) -> str:
        return f"{self.base}/broadcast/{kind}"

    # Subscription filters -------------------------------------------------------------
    @property
    def all_presence(self) -> str:
        return f"{self.base}/devices/+/presence"

    @property
    def all_up(self) -> str:
        return f"{self.base}/devices/+/up/#"

    def device_down(self, device: str) -> str:
        return f"{self.device(device)}/down/#"

    @property
    def all_broadcast(self) -> str:
        return f"{self.base}/broadcast/#"

    def device_of(self, topic: str) -> str | None:
        """The device id a topic belongs to, or None for non-device topics."""
        parts = topic.split("/")
        if len(parts) >= 5 and parts[:3] == [ROOT, self.fleet, "devices"]:
            return parts[3]
        return None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 topic-filter matching (``+`` one level, ``#`` the rest)."""
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)
