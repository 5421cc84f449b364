"""Private RabbitMQ (MQTT plugin) and NATS (MQTT gateway) instances for the broker matrix.

Each instance is started by the tests themselves, from Debian's packages
(``rabbitmq-server``, ``nats-server``), on free ports, with its own data directory,
and for RabbitMQ its own Erlang node name, cookie (``HOME``) and port mapper (``epmd``
on a free port, killed on stop): a service already running on this machine is never
used or touched. ``scripts/test.sh`` installs both packages with apt-get when run as
root (CI); elsewhere a missing binary fails the test with the command that installs it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from waiting import wait_for

from broker_bridge import BrokerRefused, BrokerUnavailable, MqttTransport, free_port
from broker_bridge._ports import wait_for_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the script, not the su wrapper


def _install_hint(package: str) -> str:
    return (f"{package} is not installed; scripts/test.sh installs it as root "
            f"(apt-get install {package})")


class _Child:
    """A broker child process in its own session, stopped by SIGTERM to its group."""

    name = "broker"

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"fleetlearn-{self.name}-"))
        self.port = free_port()
        self.log_path = self.workdir / "broker.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self, *, timeout: float = 120.0) -> _Child:
        argv, env = self._command()
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                          env=env, cwd=self.workdir, start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, timeout=timeout)
        except BrokerUnavailable as exc:
            self.stop()
            raise BrokerUnavailable(f"{self.name} did not start; log:\n{self.log_text()}") from exc
        if self._proc.poll() is not None:
            raise BrokerUnavailable(f"{self.name} exited; log:\n{self.log_text()}")
        return self

    def stop(self, *, timeout: float = 60.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20_000:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


TEST_USERS = ("dev-1", "dev-2", "dev-3", "dev-4", "aggregator")
"""User names the tests' RabbitMQ knows (password: ``password_for(name)``); clients
without a user name connect anonymously. Mosquitto and NATS, as the tests start them,
accept any user name and password."""


def password_for(user: str) -> str:
    return f"pw-{user}"


def _rabbit_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class RabbitMq(_Child):
    """RabbitMQ with its MQTT plugin on 127.0.0.1: anonymous MQTT (as guest) and the
    users of ``TEST_USERS``, loaded as definitions at boot."""

    name = "rabbitmq"

    @staticmethod
    def available() -> str | None:
        """None when the binaries exist, else why not."""
        if not os.access(RABBITMQ_SERVER, os.X_OK) or shutil.which("epmd") is None:
            return _install_hint("rabbitmq-server")
        return None

    def __init__(self) -> None:
        super().__init__()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"fleetlearn-test-{secrets.token_hex(4)}@localhost"

    def start(self, *, timeout: float = 120.0) -> _Child:
        """Ready once an anonymous MQTT client is let in: the MQTT listener may open
        before the boot-time definitions (the guest user among them) are imported, and
        a client in between is refused as an unknown user."""
        super().start(timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            probe = MqttTransport(url=self.url, client_id=f"probe-{secrets.token_hex(3)}")
            try:
                probe.connect(timeout=5.0)
                return self
            except (BrokerRefused, BrokerUnavailable):
                if time.monotonic() >= deadline:
                    self.stop()
                    raise BrokerUnavailable(f"{self.name} never let a client in; log:\n"
                                            f"{self.log_text()}") from None
                time.sleep(0.5)
            finally:
                probe.close()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        d = self.workdir
        (d / "home").mkdir(exist_ok=True)
        (d / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}",
            "mqtt.allow_anonymous = true",
            "mqtt.default_user = guest",
            "mqtt.default_pass = guest",
            f"load_definitions = {d / 'definitions.json'}",
            "log.console = true",
            "log.console.level = warning",
            "log.file = false",
            "",
        ]))
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        users = {"guest": "guest", **{u: password_for(u) for u in TEST_USERS}}
        (d / "definitions.json").write_text(json.dumps({
            "vhosts": [{"name": "/"}],
            "users": [{"name": u, "password_hash": _rabbit_hash(pw), "tags": "",
                       "hashing_algorithm": "rabbit_password_hashing_sha256"}
                      for u, pw in users.items()],
            "permissions": [{"user": u, "vhost": "/", "configure": ".*", "write": ".*",
                             "read": ".*"} for u in users],
        }))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(d / "home"),  # its own Erlang cookie
            "LANG": "C.UTF-8",
            "ERL_EPMD_PORT": str(self.epmd_port),  # its own port mapper, not the machine's
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_LOGS": "-",
        }
        return [RABBITMQ_SERVER], env

    def stop(self, *, timeout: float = 60.0) -> None:
        super().stop(timeout=timeout)
        epmd = shutil.which("epmd")
        if epmd is not None:  # the port mapper our node started (a daemon of its own)
            subprocess.run([epmd, "-kill"], env={"ERL_EPMD_PORT": str(self.epmd_port)},
                           capture_output=True, timeout=10, check=False)


class Nats(_Child):
    """nats-server with JetStream (MQTT sessions need it) and its MQTT gateway."""

    name = "nats"

    @staticmethod
    def available() -> str | None:
        if shutil.which("nats-server") is None and not os.access("/usr/sbin/nats-server",
                                                                  os.X_OK):
            return _install_hint("nats-server")
        return None

    def __init__(self) -> None:
        super().__init__()
        self.client_port = free_port()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        d = self.workdir
        (d / "nats.conf").write_text("\n".join([
            f'server_name: "fleetlearn-test-{self.port}"',
            f"listen: 127.0.0.1:{self.client_port}",
            f'jetstream {{ store_dir: "{d / "jetstream"}", max_memory_store: 268435456 }}',
            f"mqtt {{ listen: 127.0.0.1:{self.port} }}",
            "",
        ]))
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        return [binary, "-c", str(d / "nats.conf")], dict(os.environ)


wait_until = wait_for
"""The brokers' tests wait with the suite's one ``waiting.wait_for``."""
