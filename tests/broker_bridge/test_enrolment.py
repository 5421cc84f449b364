"""The enrolment file: parsing, its errors, writing, and what broker config makes of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker_bridge import (
    ENROLMENT_FILE,
    ConfigError,
    Enrolment,
    EnrolmentError,
    key_text,
    write_broker_config,
)


def public(seed: int) -> bytes:
    return (Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32).public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw))


def test_written_and_read_back() -> None:
    book = Enrolment(fleet="plant-7")
    book.list_devices(["dev-1", "dev-2"])
    assert book.enrol("dev-1", public(1))
    again = Enrolment.parse(book.to_toml())
    assert again == book and again.key_of("dev-1") == public(1) and again.key_of("dev-2") is None
    assert "dev-2" in again and "dev-3" not in again and len(again) == 2 and again.enrolled == 1


def test_a_key_is_replaced_only_on_purpose() -> None:
    book = Enrolment()
    assert book.enrol("dev-1", public(1)) and not book.enrol("dev-1", public(1))
    with pytest.raises(EnrolmentError, match="another key"):
        book.enrol("dev-1", public(2))
    assert book.key_of("dev-1") == public(1)
    assert book.enrol("dev-1", public(2), replace=True) and book.key_of("dev-1") == public(2)
    with pytest.raises(ConfigError, match="invalid device id"):
        book.enrol("dev.1", public(1))


@pytest.mark.parametrize("text, match", [
    ("[devices\n", "not valid TOML"),
    ('fleet = "f"\nkeys = {}\n', "unknown keys"),
    ("fleet = 3\n", "fleet must be a string"),
    ('fleet = "a.b"\n', "invalid fleet id"),
    ('devices = "dev-1"\n', "table of device id"),
    ('[devices]\n"dev.1" = ""\n', "invalid device id"),
    ('[devices]\n"dev-1" = 5\n', "must be a string"),
    ('[devices]\n"dev-1" = "rsa:00"\n', "unknown key type"),
    ('[devices]\n"dev-1" = "ed25519:1234"\n', "64 lowercase hex"),
])
def test_a_file_that_cannot_be_used_says_what_and_where(text: str, match: str) -> None:
    with pytest.raises(EnrolmentError, match=match) as info:
        Enrolment.parse(text, source="enrolment file x.toml")
    assert "x.toml" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_loading_checks_the_fleet_and_who_may_write_the_file(tmp_path: Path) -> None:
    path = tmp_path / ENROLMENT_FILE
    book = Enrolment(fleet="f1")
    book.enrol("dev-1", public(1))
    book.write(path)
    assert path.stat().st_mode & 0o777 == 0o644
    assert Enrolment.load(path, fleet="f1").key_of("dev-1") == public(1)
    with pytest.raises(EnrolmentError, match="fleet 'f1''s, not 'f2''s"):
        Enrolment.load(path, fleet="f2")
    os.chmod(path, 0o666)
    with pytest.raises(EnrolmentError, match="writable by other users"):
        Enrolment.load(path, fleet="f1")
    assert Enrolment.load(path, check_mode=False).enrolled == 1
    with pytest.raises(EnrolmentError, match="cannot read"):
        Enrolment.load(tmp_path / "missing.toml")
    fresh = Enrolment.load_or_new(tmp_path / "missing.toml", fleet="f9")
    assert fresh.fleet == "f9" and len(fresh) == 0


def test_broker_config_lists_the_devices_and_keeps_enrolled_keys(tmp_path: Path) -> None:
    files = write_broker_config(tmp_path, fleet="f", devices=["d1", "d2"])
    assert files.enrolment == tmp_path / ENROLMENT_FILE
    book = Enrolment.load(files.enrolment, fleet="f")
    assert list(book) == ["d1", "d2"] and book.enrolled == 0
    book.enrol("d1", public(1))
    book.write(files.enrolment)
    write_broker_config(tmp_path, fleet="f", devices=["d1", "d2", "d3"])
    again = Enrolment.load(files.enrolment, fleet="f")
    assert list(again) == ["d1", "d2", "d3"] and again.key_of("d1") == public(1)
    assert key_text(public(1)) in files.enrolment.read_text()
    with pytest.raises(EnrolmentError, match="fleet 'f''s"):
        write_broker_config(tmp_path, fleet="other", devices=["d1"])
