"""The device's identity: an Ed25519 key pair kept in its state folder.

The agent makes the key at its first start (``DeviceKey.load_or_create``) in
``<state dir>/device_key.pem`` (PKCS#8 PEM, unencrypted, mode 0600, created with
``O_EXCL`` so two processes never write two keys) and signs every update with it
(``broker_bridge._signing``; docs/PROTOCOL.md section 5.2). The private key never leaves
the device: only the public key is printed (``fleetlearn devices key``), for the operator
to enrol (``fleetlearn devices enroll``).

The agent refuses to start (``DeviceKeyError``) when the file is unreadable, is not an
Ed25519 private key, or may be read by other users (group or other permission bits): a
key others may have read is no proof of identity, and making a new one silently would
orphan the enrolled key. Fix the mode (``chmod 600``) or, for a lost key, remove the file
and enrol the new public key.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker_bridge import Message, key_text, sign_update
from edge_runtime._state import StateError

KEY_FILE = "device_key.pem"
"""The key's file name in the agent's state folder."""


class DeviceKeyError(StateError):
    """The device's key file cannot be used: unreadable, corrupt, not Ed25519, or
    readable by other users."""


class DeviceKey:
    """A device's Ed25519 key pair: signs its updates; exports its public key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        """The 32 raw bytes of the public key."""

    @classmethod
    def generate(cls) -> DeviceKey:
        """A fresh key held in memory only (tests, simulations that keep no state)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceKey:
        """The key whose 32-byte RFC 8032 private seed is ``seed`` (test vectors and
        reproducible fake devices; never for a real device)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_text(self) -> str:
        """``ed25519:<64 hex>``, as the enrolment file holds it."""
        return key_text(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def sign_update(self, message: Message) -> Message:
        """``message`` (an unsigned update) signed with this key."""
        return sign_update(message, public_key=self.public_key, sign=self.sign)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    # -- the file

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceKey:
        """The key in ``path``; ``DeviceKeyError`` when it cannot be trusted or read."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise DeviceKeyError(f"cannot open the device key {p}: {exc}") from exc
        try:
            st = os.fstat(fd)
            data = os.read(fd, 64 * 1024) if stat.S_ISREG(st.st_mode) else b""
        except OSError as exc:
            raise DeviceKeyError(f"cannot read the device key {p}: {exc}") from exc
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeviceKeyError(f"the device key {p} is not a regular file")
        if st.st_mode & 0o077:
            raise DeviceKeyError(
                f"the device key {p} may be read by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): it no longer proves this device; "
                f"chmod 600 {p} if no one else read it, else remove it and enrol the "
                "new key the agent makes")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise DeviceKeyError(f"the device key {p} is not a usable PEM private key "
                                 f"({exc}); restore it, or remove it and enrol the new key "
                                 "the agent makes") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise DeviceKeyError(f"the device key {p} is a {type(key).__name__}, not Ed25519")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> DeviceKey:
        """The key in ``path``; a new one written there (mode 0600) when there is none."""
        p = Path(path)
        if p.exists() or p.is_symlink():
            return cls.load(p)
        key = cls.generate()
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile: use that one
            return cls.load(p)
        except OSError as exc:
            raise DeviceKeyError(f"cannot create the device key {p}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(key.private_pem())
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                p.unlink()
            raise DeviceKeyError(f"cannot write the device key {p}: {exc}") from exc
        with contextlib.suppress(OSError):
            dir_fd = os.open(p.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return key


def state_key_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where the agent whose state folder is ``state_dir`` keeps its key."""
    return Path(state_dir) / KEY_FILE
