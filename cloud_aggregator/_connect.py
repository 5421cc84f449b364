"""How ``fleetlearn aggregator`` reaches its broker: URL, user, password, TLS.

``AggregatorConnection`` holds these settings (the "broker connection" part of the
``[aggregator]`` section: flags, ``FLEETLEARN_AGGREGATOR_*``, the file) and checks them
once at start-up into a ``BrokerSettings``. The password is ``password_file`` (the
password alone, or the ``credentials.toml`` written by ``fleetlearn broker config``) or
``password`` (``$FLEETLEARN_AGGREGATOR_PASSWORD`` or ``$FLEETLEARN_PASSWORD``, or the
file; never a flag: ``ps`` shows every process's arguments to every user); given both,
the stronger source wins (flag > environment > file), and from one source they are
refused. Else the URL's password, which is visible in ``ps`` too, so it draws a warning.
The user name is the URL's, else the client id (``aggregator``, the user the generated
broker configuration creates). ``mqtts://`` verifies the broker's certificate against
``tls_ca`` (or the system's CAs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker_bridge import BrokerUrl, MqttTransport, TlsConfig, read_password_file
from device_profiles import ConfigError, setting

log = logging.getLogger(__name__)

PASSWORD_ENV = "FLEETLEARN_PASSWORD"
_BROKER = "broker connection"


@dataclass(frozen=True, kw_only=True)
class AggregatorConnection:
    """The broker settings of ``fleetlearn aggregator`` (checked here, used by ``connect``)."""

    broker: str = setting(
        help="mqtt://[user@]host[:port] or mqtts://... (a password in the URL is visible "
        "in ps: use password_file or $FLEETLEARN_PASSWORD)", metavar="URL",
        example="mqtts://broker.example:8883", group=_BROKER)
    client_id: str = setting("aggregator", help="MQTT client id, and user name unless the "
                             "URL names one", example="agg-2", group=_BROKER)
    password: str | None = setting(
        None, secret=True, no_flag=True, env=(PASSWORD_ENV,), alternative_to="password_file",
        help="the MQTT password", example="s3cret", group=_BROKER)
    password_file: Path | None = setting(
        None, help="file with the MQTT password alone, or the credentials.toml of "
        "`fleetlearn broker config` (its entry for the user name)", example="creds.toml",
        group=_BROKER)
    tls_ca: Path | None = setting(None, help="CA bundle (PEM) to verify the broker "
                                  "(mqtts://)", example="ca.pem", group=_BROKER)
    tls_cert: Path | None = setting(None, help="client certificate (PEM)",
                                    example="client.pem", group=_BROKER)
    tls_key: Path | None = setting(None, help="client private key (PEM)",
                                   example="client.key", group=_BROKER)

    def __post_init__(self) -> None:
        _check_tls(BrokerUrl.parse(self.broker), tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                   tls_key=self.tls_key)

    def settings(self) -> BrokerSettings:
        """The checked connection (reads the password file)."""
        return broker_settings(
            broker=self.broker, client_id=self.client_id,
            password_file=None if self.password_file is None else str(self.password_file),
            password=self.password,
            tls_ca=None if self.tls_ca is None else str(self.tls_ca),
            tls_cert=None if self.tls_cert is None else str(self.tls_cert),
            tls_key=None if self.tls_key is None else str(self.tls_key), env={})


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
    password: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    env: Mapping[str, str] | None = None,
) -> BrokerSettings:
    env = os.environ if env is None else env
    url = BrokerUrl.parse(broker)
    username = url.username or client_id
    if password_file is not None:
        password = read_password_file(password_file, user=username)
    elif password is not None:
        pass
    elif env.get(PASSWORD_ENV):
        password = env[PASSWORD_ENV]
    else:
        password = url.password
        if password is not None:
            log.warning("the broker password is in the --broker URL, where any user of this "
                        "machine can read it (ps); use --password-file or $%s", PASSWORD_ENV)
    _check_tls(url, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    tls = None
    if tls_ca or tls_cert:
        tls = TlsConfig(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)
    return BrokerSettings(url=url, client_id=client_id, username=username, password=password,
                          tls=tls)


def _check_tls(url: BrokerUrl, *, tls_ca: str | Path | None, tls_cert: str | Path | None,
               tls_key: str | Path | None) -> None:
    """The TLS files exist, come as cert and key together, and go with mqtts://."""
    for name, value in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{name} file not found: {value}")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("tls_cert and tls_key go together")
    if (tls_ca or tls_cert) and not url.tls:
        raise ConfigError(f"TLS files given (tls_ca, tls_cert) but the broker URL {url} "
                          "is not mqtts://")
