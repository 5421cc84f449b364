"""The device key: made once in the state folder, 0600, refused when it cannot be trusted;
the agent signs every update it sends with it."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from agent_rig import Rig
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from waiting import wait_for

from broker_bridge import (
    Ack,
    SignedBody,
    message_statement,
    unpack_update_body,
    verify_signature,
)
from edge_runtime import (
    KEY_FILE,
    AgentSettings,
    DeviceKey,
    DeviceKeyError,
    StateError,
    TaskStatus,
    state_key_path,
)


def test_the_key_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    path = state_key_path(tmp_path / "state")
    assert path == tmp_path / "state" / KEY_FILE
    first = DeviceKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = DeviceKey.load_or_create(path)
    assert again.public_key == first.public_key and len(first.public_key) == 32
    assert first.public_text == "ed25519:" + first.public_key.hex()
    assert DeviceKey.load_or_create(tmp_path / "other" / KEY_FILE).public_key != first.public_key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / KEY_FILE
    DeviceKey.load_or_create(path)
    os.chmod(path, mode)
    with pytest.raises(DeviceKeyError, match=f"mode {mode:04o}.*chmod 600") as info:
        DeviceKey.load_or_create(path)
    assert isinstance(info.value, StateError)


def test_a_corrupt_or_foreign_key_is_refused_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    key = DeviceKey.load_or_create(path)
    pem = path.read_bytes()
    path.write_bytes(pem[:40])  # cut short
    with pytest.raises(DeviceKeyError, match="not a usable PEM"):
        DeviceKey.load_or_create(path)
    assert path.read_bytes() == pem[:40]  # not silently replaced by a new key
    ec = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path.write_bytes(ec)
    with pytest.raises(DeviceKeyError, match="not Ed25519"):
        DeviceKey.load(path)
    path.write_bytes(key.private_pem())
    assert DeviceKey.load(path).public_key == key.public_key


def test_a_key_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).mkdir()
    with pytest.raises(DeviceKeyError, match="not a regular file"):
        DeviceKey.load_or_create(tmp_path / KEY_FILE)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DeviceKeyError, match="cannot open"):
        DeviceKey.load_or_create(link)


def test_an_agent_with_a_corrupt_key_does_not_start(rig: Rig) -> None:
    state = rig.tmp / "dev-bad"
    state.mkdir()
    (state / KEY_FILE).write_bytes(b"not a key")
    os.chmod(state / KEY_FILE, 0o600)
    with pytest.raises(DeviceKeyError, match="not a usable PEM"):
        rig.agent("dev-bad")


def test_the_agent_signs_what_it_sends_with_its_state_folders_key(rig: Rig) -> None:
    agent = rig.agent("dev-1")
    assert agent.key.public_key == DeviceKey.load(state_key_path(rig.tmp / "dev-1")).public_key
    rig.agg.send_task("dev-1", rig.agg.task())
    assert wait_for(lambda: rig.agg.updates, 30)
    sent = rig.agg.updates[0]
    block = SignedBody.from_bytes(sent.body)
    assert block is not None and block.public_key == agent.key.public_key
    assert verify_signature(agent.key.public_key, block.signature,
                            message_statement(sent, hashlib.sha256(block.body).digest()))
    meta, _ = unpack_update_body(sent.body)
    assert meta.num_samples > 0


def test_an_identity_refusal_is_no_answer_the_update_is_sent_again(rig: Rig) -> None:
    """A ``bad_signature`` (say, the answer to a forged copy) or ``unknown_device`` (not
    enrolled yet) settles nothing: the agent keeps its update and re-sends it; any other
    refusal is final."""
    rig.agg.ack_updates = False
    agent = rig.agent(settings=AgentSettings(ack_timeout_s=0.2, request_timeout_s=5))
    rig.agg.send_task("dev-1", rig.agg.task(round_=3))
    assert wait_for(lambda: rig.agg.updates, 30)
    first = rig.agg.updates[0]
    down = rig.agg.topics.down("dev-1", "ack")
    for code in ("bad_signature", "unknown_device"):
        rig.agg.channel.send(down, Ack(round=3, attempt=first.attempt, what="update",
                                       status="rejected", reason=f"{code}: x").to_message(
            fleet=rig.agg.channel.fleet, device="dev-1", round=3))
        time.sleep(0.1)
        assert agent.state.record is not None
        assert agent.state.record.status == TaskStatus.ENCODED, code
    agent.poll(time.monotonic() + 1)
    assert len(rig.agg.updates) == 2 and rig.agg.updates[1].body == first.body
    rig.agg.channel.send(down, Ack(round=3, attempt=first.attempt, what="update",
                                   status="rejected", reason="norm_above_median: x").to_message(
        fleet=rig.agg.channel.fleet, device="dev-1", round=3))
    assert wait_for(lambda: agent.state.record is not None
                    and agent.state.record.status == TaskStatus.REJECTED, 5)
    agent.poll(time.monotonic() + 100)
    assert len(rig.agg.updates) == 2
