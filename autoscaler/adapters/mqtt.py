"""MQTT adapter: publish each target as a retained command for the guest's host agent.

Topic ``{prefix}/guest/{host}/{guest}/target``, QoS 1, retained, so an agent that restarts
reads the current target at once. Payload (design.md)::

    {"ts": 1764150005.0, "num_pages": 131072, "policy": "threshold", "reason": "..."}
"""

from __future__ import annotations

from typing import ClassVar

import orjson

from autoscaler.adapters.base import Adapter, AdapterContext, GuestUnavailable, Target
from autoscaler.service.mqtt import MqttLink, MqttUnavailable


def target_topic(prefix: str, host_id: str, guest_id: str) -> str:
    return f"{prefix}/guest/{host_id}/{guest_id}/target"


def target_payload(change: Target) -> bytes:
    return orjson.dumps(
        {
            "ts": change.ts_s,
            "num_pages": change.num_pages,
            "policy": change.policy,
            "reason": change.reason,
        }
    )


class MqttAdapter(Adapter):
    """Publishes target commands on the controller's own broker connection."""

    kind: ClassVar[str] = "mqtt"

    def __init__(self) -> None:
        self._link: MqttLink | None = None
        self._prefix = ""
        self._qos = 1
        self._retain = True

    async def start(self, context: AdapterContext) -> None:
        if context.mqtt is None:
            raise RuntimeError("the mqtt adapter needs the controller's MQTT connection")
        self._link = context.mqtt
        self._prefix = context.settings.mqtt.topic_prefix
        self._qos = context.settings.adapter.mqtt.qos
        self._retain = context.settings.adapter.mqtt.retain

    async def set_target(self, change: Target) -> None:
        if self._link is None:
            raise GuestUnavailable("adapter not started", guest_id=change.guest_id)
        topic = target_topic(self._prefix, change.host_id, change.guest_id)
        try:
            await self._link.publish(
                topic, target_payload(change), qos=self._qos, retain=self._retain
            )
        except MqttUnavailable as exc:
            raise GuestUnavailable(str(exc), guest_id=change.guest_id) from exc
