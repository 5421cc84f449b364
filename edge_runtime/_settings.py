"""The agent's timing knobs (``AgentSettings``) and counters (``AgentStats``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from device_profiles import ConfigError


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """Timing knobs of the protocol side (all seconds)."""

    ack_timeout_s: float = 30.0
    """Re-send an unacknowledged update (same bytes, same attempt) after this long."""
    max_resends: int = 20
    request_timeout_s: float = 60.0
    """How long to wait for requested artifacts or a model (never past the deadline)."""
    deadline_margin_s: float = 0.2
    """Budget kept back from ``deadline_s`` for encoding and sending."""
    poll_interval_s: float = 0.5
    eligibility_interval_s: float = 30.0
    status_interval_s: float | None = 15.0
    """Say what the agent waits for (``Agent.status_line``) this often while it waits;
    None: never (a simulator with thousands of agents)."""
    ledger_public_key: str | None = None
    """The aggregator's Ed25519 public key (64 hex digits), pinned: inclusion proofs of
    the training ledger are checked against it (``_ledger_check``)."""

    def __post_init__(self) -> None:
        for name in ("ack_timeout_s", "request_timeout_s", "poll_interval_s",
                     "eligibility_interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.status_interval_s is not None and not self.status_interval_s > 0:
            raise ConfigError("status_interval_s must be positive (or None)")
        key = self.ledger_public_key
        if key is not None and not re.fullmatch(r"[0-9a-f]{64}", key):
            raise ConfigError("ledger_public_key must be 64 lowercase hex digits (the output "
                              "of `fleetlearn ledger key STATE_DIR`)")
        if self.deadline_margin_s < 0 or self.max_resends < 0:
            raise ConfigError("deadline_margin_s and max_resends must be >= 0")


@dataclass
class AgentStats:
    """Counters for tests, benchmarks and logs."""

    tasks: int = 0
    declined: int = 0
    updates_sent: int = 0
    resends: int = 0
    acked: int = 0
    cancelled: int = 0
    withdrawn: int = 0
    errors: int = 0
    malformed: int = 0
    last_train_s: float = 0.0
    last_samples: int = 0
