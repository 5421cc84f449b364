"""Reading a broker password from a file, in either of the two forms users have.

``fleetlearn broker config`` writes ``credentials.toml`` (``"user" = "password"`` per
line, one per device and one for the aggregator); a device is more often handed a file
holding its password alone. ``--password-file`` accepts both: a TOML file with an
entry for the user, or a file whose one line is the password.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from device_profiles import ConfigError


def read_password_file(path: str | os.PathLike[str], *, user: str) -> str:
    """The password of ``user`` in ``path`` (credentials.toml or a bare password)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read password file {path}: {exc}") from exc
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        table = {}
    if table:
        password = table.get(user)
        if not isinstance(password, str) or not password:
            raise ConfigError(
                f"password file {path} is a credentials table with no entry for {user!r}"
                f" (it has {len(table)} entries)")
        return password
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        raise ConfigError(f"password file {path}: expected the password on one line, or a "
                          f"credentials.toml with an entry for {user!r}")
    return lines[0].strip()
