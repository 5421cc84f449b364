"""How ``fleetlearn aggregator`` reaches its broker: URL, user, password, TLS.

Checked once at start-up into a ``BrokerSettings``. The password comes from, in this
order, ``--password-file`` (the password alone, or the ``credentials.toml`` written by
``fleetlearn broker config``), ``$FLEETLEARN_PASSWORD``, or the URL; a password in the
URL is visible to every user of the machine (``ps``), so it draws a warning. The user
name is the URL's, else the client id (``aggregator``, the user the generated broker
configuration creates). ``mqtts://`` verifies the broker's certificate against
``--tls-ca`` (or the system's CAs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker_bridge import BrokerUrl, MqttTransport, TlsConfig, read_password_file
from device_profiles import ConfigError

log = logging.getLogger(__name__)

PASSWORD_ENV = "FLEETLEARN_PASSWORD"


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    url: BrokerUrl
    client_id: str
    username: str
    password: str | None = None
    tls: TlsConfig | None = None

    def __repr__(self) -> str:  # never print the password
        return f"BrokerSettings(url={self.url}, client_id={self.client_id!r}, ...)"

    def transport(self) -> MqttTransport:
        """The aggregator's MQTT client: a persistent session, so what devices send
        while it restarts waits for it at the broker."""
        return MqttTransport(url=self.url, client_id=self.client_id, username=self.username,
                             password=self.password, tls=self.tls, clean_session=False)


def broker_settings(
    *,
    broker: str,
    client_id: str = "aggregator",
    password_file: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    env: Mapping[str, str] | None = None,
) -> BrokerSettings:
    env = os.environ if env is None else env
    url = BrokerUrl.parse(broker)
    username = url.username or client_id
    if password_file is not None:
        password: str | None = read_password_file(password_file, user=username)
    elif env.get(PASSWORD_ENV):
        password = env[PASSWORD_ENV]
    else:
        password = url.password
        if password is not None:
            log.warning("the broker password is in the --broker URL, where any user of this "
                        "machine can read it (ps); use --password-file or $%s", PASSWORD_ENV)
    for flag, value in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{flag} file not found: {value}")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    tls = None
    if tls_ca or tls_cert:
        if not url.tls:
            raise ConfigError(f"TLS files given but the broker URL {url} is not mqtts://")
        tls = TlsConfig(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)
    return BrokerSettings(url=url, client_id=client_id, username=username, password=password,
                          tls=tls)
