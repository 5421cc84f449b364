"""A Mosquitto bridge from an edge site's broker to its parent's: ``render_edge_bridge``.

With a bridge, an edge's device side talks to the site's own broker only (its parent
link is ``PARENT_FLEET@mqtt://<site broker>``) and the site's broker carries exactly the
edge's topics of the parent's fleet across, under the edge's own credentials at the
parent (so the parent's ACL confines the bridge as it confines a device):

- out: ``fl/<parent fleet>/devices/<edge id>/up/#`` and its ``presence``;
- in: ``fl/<parent fleet>/devices/<edge id>/down/#`` and ``fl/<parent fleet>/broadcast/#``.

The site's children keep their own fleet's topics, which never cross.
"""

from __future__ import annotations

from pathlib import Path

from broker_bridge._mqtt import BrokerUrl
from broker_bridge._topics import Topics, check_id
from device_profiles import ConfigError


def render_edge_bridge(*, parent: str, parent_fleet: str, edge_id: str,
                       password: str | None = None, cafile: Path | None = None,
                       qos: int = 1) -> str:
    """The bridge section of the site broker's ``mosquitto.conf`` (append it to the
    site's configuration). ``parent`` is the parent broker's ``mqtt://`` or ``mqtts://``
    URL; ``password`` (with the user ``edge_id``) and ``cafile`` as the parent needs."""
    url = BrokerUrl.parse(parent)
    if url.password is not None:
        raise ConfigError("give the parent's password apart (password=...), not in the URL")
    if qos not in (0, 1):
        raise ConfigError(f"bridge qos must be 0 or 1, got {qos}")
    if url.tls and cafile is None:
        raise ConfigError("an mqtts:// parent needs the CA bundle that verifies it (cafile)")
    if any(c in (password or "") for c in "\n\r"):
        raise ConfigError("the bridge password cannot hold a line break")
    check_id(edge_id, what="edge id")
    topics = Topics(fleet=parent_fleet)
    mine = topics.device(edge_id)
    lines = [
        f"# fleetlearn: bridge of edge {edge_id} to fleet {parent_fleet} at {url.host}",
        f"connection fleetlearn-{edge_id}",
        f"address {url.host}:{url.port}",
        f"remote_clientid {edge_id}",
        f"remote_username {url.username or edge_id}",
        *([f"remote_password {password}"] if password is not None else []),
        *([f"bridge_cafile {cafile}", "bridge_insecure false"] if url.tls else []),
        "cleansession false",
        "try_private true",
        "notifications false",
        "restart_timeout 1 10",
        f"topic {mine}/up/# out {qos}",
        f"topic {mine}/presence out {qos}",
        f"topic {mine}/down/# in {qos}",
        f"topic {topics.base}/broadcast/# in {qos}",
        "",
    ]
    return "\n".join(lines)
