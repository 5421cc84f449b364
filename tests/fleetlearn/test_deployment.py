"""The README's deployment walkthrough, followed command by command, closes a round.

The commands are read from the README (between ``<!-- deployment:begin -->`` and
``<!-- deployment:end -->``), not copied here, so the README cannot drift from what
works. The only changes: free ports for 8883 and 9100, ``localhost`` for the broker's
host name, a scratch folder for ``/etc/fleetlearn``, and the install commands skipped
(this environment already has what they install). The long-running commands
(``mosquitto``, ``fleetlearn aggregator``, ``fleetlearn agent``) run in the background,
each a separate process; everything runs from one bash script, as root in CI, so
Mosquitto really drops to user ``mosquitto`` and must read the files it was given.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from brokers import wait_until

from broker_bridge import free_port
from broker_bridge._broker_files import default_run_as

REPO = Path(__file__).resolve().parents[2]
INSTALL_STEPS = ("apt-get install", "python3 -m venv", "pip install")
BACKGROUND = ("mosquitto ", "fleetlearn aggregator ", "fleetlearn agent ")


def walkthrough() -> list[str]:
    """The README's deployment commands, one string per command, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("<!-- deployment:begin -->", 1)[1].split("<!-- deployment:end -->")[0]
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_the_walkthrough_is_what_this_test_expects() -> None:
    """Every README command is run below, but the install steps; nothing is added."""
    commands = walkthrough()
    skipped = [c for c in commands if c.startswith(INSTALL_STEPS)]
    assert len(skipped) == 3, skipped
    assert any(c.startswith("openssl req -x509") for c in commands)
    assert any(c.startswith("fleetlearn broker config") and "--tls-cert" in c for c in commands)
    assert sum(c.startswith(BACKGROUND) for c in commands) == 4  # broker, aggregator, 2 agents
    assert all("mqtts://" in c for c in commands if c.startswith(BACKGROUND[1:]))


@pytest.mark.slow
@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0),
                    reason="the walkthrough runs as root (CI does)")
def test_the_readme_deployment_gives_a_round_over_tls(open_dir: Path) -> None:
    scratch = open_dir
    assert default_run_as() == "mosquitto", "the mosquitto package creates this account"
    mqtt_port, metrics_port = free_port(), free_port()
    etc = scratch / "etc" / "fleetlearn"
    lines = ["set -euo pipefail", f"cd {scratch}"]
    for command in walkthrough():
        if command.startswith(INSTALL_STEPS):
            continue
        command = (command.replace("8883", str(mqtt_port)).replace("9100", str(metrics_port))
                   .replace("broker.example.com", "localhost")
                   .replace("/etc/fleetlearn", str(etc)))
        if command.startswith(BACKGROUND):
            name = command.split()[1] if command.startswith("fleetlearn") else "mosquitto"
            if name == "agent":
                name += "-" + command.split("--device-id ", 1)[1].split()[0]
            lines.append(f"{command} > {scratch}/{name}.log 2>&1 &")
            lines.append("sleep 0.5")  # the broker listens before the others connect
        else:
            lines.append(command)
    (scratch / "walkthrough.sh").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", XDG_STATE_HOME=str(scratch / "xdg-state"),
               FLEETLEARN_CACHE_DIR=str(scratch / "cache"))
    env.pop("FLEETLEARN_PASSWORD", None)
    script = subprocess.Popen(["bash", str(scratch / "walkthrough.sh")], cwd=scratch, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    metrics = scratch / "agg" / "metrics.jsonl"

    def closed_round() -> dict[str, object] | None:
        if not metrics.exists():
            return None
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return next((r for r in rows if r.get("outcome") == "closed"), None)

    try:
        out, _ = script.communicate(timeout=300)  # returns once the background ones run
        assert script.returncode == 0, out.decode(errors="replace")
        assert wait_until(lambda: closed_round() is not None, 240, step=0.5), _logs(scratch)
        row = closed_round()
        assert row is not None and row["devices_reported"] == 2 and row["accuracy"] is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
            assert "fleetlearn_model_version" in resp.read().decode()
        conf = (etc / "broker" / "mosquitto.conf").read_text()
        assert f"listener {mqtt_port} 0.0.0.0" in conf and "certfile /" in conf  # TLS only
        assert "Error" not in (scratch / "mosquitto.log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(script.pid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(folder.glob("*.log")))
