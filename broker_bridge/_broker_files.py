"""The files of a generated broker configuration, readable by the user Mosquitto runs as.

Mosquitto started as root drops to an unprivileged user (``mosquitto`` on Debian)
before it reads its password file and ACL and writes its persistence, so files that
only root can read stop it at start (``Unable to open pwfile``). The generator
therefore copies the TLS certificate and key into the configuration folder (every
path written absolute), and, when it runs as root, gives the password file, ACL,
TLS files and persistence folder to that user, keeping their modes (0600 for
secrets). It also warns when that user cannot reach the folder at all.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from device_profiles import ConfigError

DEFAULT_BROKER_USER = "mosquitto"


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    certfile: str
    keyfile: str
    cafile: str | None = None
    require_certificate: bool = False


def _account(user: str) -> tuple[int, int] | None:
    try:
        import pwd
    except ImportError:  # not a POSIX system
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def default_run_as() -> str | None:
    """The user a root-started Mosquitto drops to, when that account exists here."""
    return DEFAULT_BROKER_USER if _account(DEFAULT_BROKER_USER) is not None else None


def install_tls(out_dir: Path, tls: TlsFiles) -> TlsFiles:
    """Copy the TLS files into ``out_dir/tls`` (key 0600) and return their absolute paths."""
    target = out_dir / "tls"
    target.mkdir(parents=True, exist_ok=True)
    copies: dict[str, str | None] = {}
    for field, name, mode in (("certfile", "server.pem", 0o644), ("keyfile", "server.key", 0o600),
                              ("cafile", "ca.pem", 0o644)):
        source = getattr(tls, field)
        if source is None:
            copies[field] = None
            continue
        src = Path(source).expanduser().resolve()
        if not src.is_file():
            raise ConfigError(f"TLS file not found: {source}")
        dst = target / name
        if src != dst:
            shutil.copyfile(src, dst)
        os.chmod(dst, mode)
        copies[field] = str(dst)
    return replace(tls, certfile=str(copies["certfile"]), keyfile=str(copies["keyfile"]),
                   cafile=copies["cafile"])


def hand_over(paths: list[Path], user: str | None) -> list[str]:
    """Give ``paths`` to ``user`` when running as root; notes for the operator."""
    if user is None or user == "root":
        return []
    account = _account(user)
    if account is None:
        return [f"user {user!r} does not exist here: create it, or pass --run-as"]
    if os.geteuid() != 0:
        return [f"not root, so the files stay yours: if root starts mosquitto it becomes "
                f"user {user!r}; then run: chown -R {user} {paths[0].parent}"]
    uid, gid = account
    for path in paths:
        os.chown(path, uid, gid)
    return _unreachable(paths[0].parent, uid, gid, user)


def _unreachable(folder: Path, uid: int, gid: int, user: str) -> list[str]:
    for parent in [folder, *folder.parents]:
        st = parent.stat()
        if st.st_uid == uid:
            can = st.st_mode & stat.S_IXUSR
        elif st.st_gid == gid:
            can = st.st_mode & stat.S_IXGRP
        else:
            can = st.st_mode & stat.S_IXOTH
        if not can:
            return [f"user {user!r} cannot enter {parent} (mode {stat.filemode(st.st_mode)}), "
                    f"so mosquitto cannot read its files: choose an --out folder it can "
                    f"reach (e.g. under /etc/mosquitto) or chmod o+x {parent}"]
    return []
