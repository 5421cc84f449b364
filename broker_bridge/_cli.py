"""Subcommands owned by this package (registered by ``fleetlearn.cli``)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add this package's subcommands to the ``fleetlearn`` parser (none yet)."""
    del sub
