"""What a device says about itself: its retained presence, its hello, its eligibility.

The hello (docs/PROTOCOL.md section 4) goes out after each connect, on the aggregator's
roll call and when the device's eligibility changes; the ``transform_hello`` hook may
change it (the simulator's Byzantine devices inflate their sample count there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker_bridge import (
    Channel,
    Eligibility,
    Hello,
    MqttTransport,
    TlsConfig,
    WireError,
    presence_message,
    presence_will,
)
from device_profiles import DeviceProfile
from edge_runtime._artifact_cache import ArtifactCache, ModelCache
from edge_runtime._data import LocalData
from edge_runtime._eligibility import DeviceStatus, EligibilityRules, StatusProbe, check_eligibility
from edge_runtime._errors import HookError
from edge_runtime._hooks import AgentHooks
from edge_runtime._state import AgentState

AGENT_NAME = "fleetlearn/0.1.0"


class Presence:
    """Builds and sends a device's presence and hello; tracks its eligibility."""

    def __init__(
        self, *, channel: Channel, device_id: str, profile: DeviceProfile | None,
        data: LocalData, rules: EligibilityRules, probe: StatusProbe, artifacts: ArtifactCache,
        models: ModelCache, state: AgentState, hooks: AgentHooks,
        busy_round: Callable[[], int | None], log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self._channel = channel
        self._device_id = device_id
        self._profile = profile
        self._data = data
        self._rules = rules
        self._probe = probe
        self._artifacts = artifacts
        self._models = models
        self._state = state
        self._hooks = hooks
        self._busy_round = busy_round
        self._log = log
        self.last_eligible: bool | None = None

    def eligibility(self) -> Eligibility:
        """The device's eligibility now (a failing probe counts as eligible, logged)."""
        try:
            status = self._probe()
        except Exception:
            self._log.exception("eligibility probe failed; assuming eligible")
            status = DeviceStatus()
        result = check_eligibility(status, self._rules)
        self.last_eligible = result.eligible
        return result

    def eligibility_changed(self) -> bool:
        """Check again; True when it differs from the last check."""
        before = self.last_eligible
        now = self.eligibility().eligible
        return before is not None and now != before

    def hello(self) -> Hello:
        record = self._state.record
        cached = self._artifacts.hashes()
        artifacts_hash = None
        if record is not None and record.task.artifacts_hash in cached:
            artifacts_hash = record.task.artifacts_hash
        elif cached:
            artifacts_hash = cached[0]
        hello = Hello(
            agent=AGENT_NAME,
            profile=self._profile.to_dict() if self._profile is not None else {},
            eligibility=self.eligibility().to_dict(),
            num_samples=self._data.num_samples,
            artifacts_hash=artifacts_hash,
            model_versions=self._models.versions(),
            busy_round=self._busy_round(),
        )
        transform = self._hooks.transform_hello
        if transform is None:
            return hello
        try:
            changed = transform(hello)
        except Exception:
            self._log.exception("transform_hello hook failed; sending the hello as it is")
            return hello
        if not isinstance(changed, Hello):
            error = HookError(f"transform_hello returned {type(changed).__name__}, not a "
                              "Hello; sending the hello as it is")
            self._log.error("%s: %s", type(error).__name__, error)
            return hello
        try:  # a hello the wire refuses (e.g. over MAX_JSON_BYTES) would never go out
            changed.to_message(fleet=self._channel.fleet, device=self._device_id)
        except WireError as exc:
            error = HookError(f"transform_hello made a hello that cannot be sent ({exc}); "
                              "sending the hello as it is")
            self._log.error("%s: %s", type(error).__name__, error)
            return hello
        return changed

    def send_presence(self, status: str) -> None:
        """The retained ``online``/``offline`` presence (the last will says ``offline``)."""
        fleet, topics = self._channel.fleet, self._channel.topics
        self._channel.send(topics.presence(self._device_id),
                           presence_message(fleet=fleet, device=self._device_id, status=status),
                           retain=True)

    def send_hello(self) -> None:
        fleet, topics = self._channel.fleet, self._channel.topics
        self._channel.send(topics.up(self._device_id, "hello"),
                           self.hello().to_message(fleet=fleet, device=self._device_id))

    def greet(self) -> None:
        """What a device says after each connect and on a roll call."""
        self.send_presence("online")
        self.send_hello()


def make_agent_transport(
    url: str,
    *,
    fleet: str,
    device_id: str,
    password: str | None = None,
    username: str | None = None,
    tls: TlsConfig | None = None,
    **kwargs: Any,
) -> MqttTransport:
    """The MQTT transport of a device: client id and user name = device id, persistent
    session, and the ``offline`` presence as its last will."""
    return MqttTransport(
        url=url,
        client_id=device_id,
        username=username if username is not None else device_id,
        password=password,
        tls=tls,
        will=presence_will(fleet=fleet, device=device_id),
        clean_session=False,
        **kwargs,
    )
