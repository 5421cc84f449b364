"""The enrolment file: which public key each device of a fleet signs its updates with.

``fleetlearn broker config`` writes it beside the broker's files (``enrolment.toml``),
listing every device it made credentials for; ``fleetlearn devices enroll`` adds a
device's key (printed on the device by ``fleetlearn devices key``); the aggregator reads
it (``--enrolment``) and refuses an update that is not signed by its device's key::

    # fleetlearn enrolment: each device's Ed25519 public key
    fleet = "plant-7"

    [devices]
    "dev-1" = "ed25519:3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
    "dev-2" = ""    # listed, no key yet: its updates are refused until one is enrolled

The file holds no secret (public keys only) but decides who is who: whoever can write it
can speak for any device, so the aggregator refuses one that users other than its owner
may write. Writes are atomic (``atomic_write``); keys already there are kept.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from broker_bridge._files import atomic_write
from broker_bridge._signing import key_text, parse_key_text
from broker_bridge._topics import check_id
from device_profiles import ConfigError

ENROLMENT_FILE = "enrolment.toml"
"""The enrolment file's name in ``fleetlearn broker config``'s output folder."""


class EnrolmentError(ConfigError):
    """An enrolment file that cannot be used: unreadable, not TOML, a bad device id or
    key, another fleet's, writable by other users; or a key that would replace another."""


@dataclass
class Enrolment:
    """Device id -> Ed25519 public key (32 bytes; ``None``: listed, not enrolled yet).

    Mutable on purpose: a simulator enrols its agents as it makes them, and an
    aggregator given this object sees every key added later.
    """

    fleet: str | None = None
    keys: dict[str, bytes | None] = field(default_factory=dict)

    def key_of(self, device: str) -> bytes | None:
        return self.keys.get(device)

    def __contains__(self, device: object) -> bool:
        return device in self.keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def enrolled(self) -> int:
        """How many devices have a key."""
        return sum(k is not None for k in self.keys.values())

    def list_devices(self, devices: Iterable[str]) -> None:
        """List ``devices`` (without keys) unless they are there already."""
        for device in devices:
            self.keys.setdefault(check_id(device, what="device id"), None)

    def enrol(self, device: str, public_key: bytes, *, replace: bool = False) -> bool:
        """Give ``device`` the key ``public_key``; False when it had that key already.
        Another key already enrolled is kept (``EnrolmentError``) unless ``replace``:
        re-keying a device is a decision, never a side effect."""
        check_id(device, what="device id")
        key = parse_key_text(key_text(public_key))  # checks the length and the point
        held = self.keys.get(device)
        if held == key:
            return False
        if held is not None and not replace:
            raise EnrolmentError(
                f"device {device!r} is enrolled with another key ({key_text(held)}); "
                "replace it on purpose (--replace) if the device was re-keyed")
        self.keys[device] = key
        return True

    # -- the file

    def to_toml(self) -> str:
        lines = ["# fleetlearn enrolment: each device's Ed25519 public key",
                 "# (fleetlearn devices enroll DEVICE KEY --enrolment FILE; \"\": no key yet)"]
        if self.fleet is not None:
            lines.append(f'fleet = "{self.fleet}"')
        lines += ["", "[devices]"]
        lines += [f'"{d}" = "{key_text(k) if k is not None else ""}"'
                  for d, k in self.keys.items()]
        return "\n".join(lines) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the file atomically, mode 0644 (public keys; only its owner writes it)."""
        atomic_write(Path(path), self.to_toml().encode(), mode=0o644)

    @classmethod
    def parse(cls, text: str, *, source: str = "enrolment") -> Enrolment:
        """Parse the file's text; ``EnrolmentError`` naming what is wrong and where."""
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise EnrolmentError(f"{source} is not valid TOML: {exc}") from exc
        unknown = sorted(set(table) - {"fleet", "devices"})
        if unknown:
            raise EnrolmentError(f"{source}: unknown keys {unknown} (expected fleet and "
                                 "[devices])")
        fleet = table.get("fleet")
        if fleet is not None:
            if not isinstance(fleet, str):
                raise EnrolmentError(f"{source}: fleet must be a string, got {fleet!r}")
            try:
                check_id(fleet, what="fleet id")
            except ConfigError as exc:
                raise EnrolmentError(f"{source}: {exc}") from exc
        devices = table.get("devices", {})
        if not isinstance(devices, dict):
            raise EnrolmentError(f"{source}: devices must be a table of device id = key")
        keys: dict[str, bytes | None] = {}
        for device, value in devices.items():
            try:
                check_id(device, what="device id")
            except ConfigError as exc:
                raise EnrolmentError(f"{source}: {exc}") from exc
            if not isinstance(value, str):
                raise EnrolmentError(f"{source}: device {device!r}: the key must be a "
                                     f"string 'ed25519:<hex>' or \"\", got {value!r}")
            if not value:
                keys[device] = None
                continue
            try:
                keys[device] = parse_key_text(value)
            except ValueError as exc:
                raise EnrolmentError(f"{source}: device {device!r}: {exc}") from exc
        return cls(fleet=fleet, keys=keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, fleet: str | None = None,
             check_mode: bool = True) -> Enrolment:
        """Read ``path``. With ``fleet``, a file naming another fleet is refused; with
        ``check_mode``, so is a file that group or others may write."""
        p = Path(path)
        try:
            st = p.stat()
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EnrolmentError(f"cannot read enrolment file {p}: {exc}") from exc
        if check_mode and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise EnrolmentError(
                f"enrolment file {p} is writable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): whoever writes it can speak for any device; "
                f"chmod go-w {p}")
        enrolment = cls.parse(text, source=f"enrolment file {p}")
        if fleet is not None and enrolment.fleet is not None and enrolment.fleet != fleet:
            raise EnrolmentError(f"enrolment file {p} is fleet {enrolment.fleet!r}'s, not "
                                 f"{fleet!r}'s")
        return enrolment

    @classmethod
    def load_or_new(cls, path: str | os.PathLike[str], *, fleet: str | None = None) -> Enrolment:
        """``load`` the file, or an empty enrolment of ``fleet`` when there is none."""
        if not Path(path).exists():
            return cls(fleet=fleet)
        enrolment = cls.load(path, fleet=fleet, check_mode=False)
        if enrolment.fleet is None:
            enrolment.fleet = fleet
        return enrolment
