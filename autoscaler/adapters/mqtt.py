"""MQTT adapter: publish each target as a retained command for the guest's host agent.

Topic ``{prefix}/guest/{host}/{guest}/target``, QoS 1, retained, so an agent that restarts
reads the current target at once. Payload: :func:`autoscaler.wire.encode_target`.
"""

from __future__ import annotations

from typing import ClassVar

from autoscaler.adapters.base import Adapter, AdapterContext, GuestUnavailable, Target
from autoscaler.service.mqtt import MqttLink, MqttUnavailable
from autoscaler.wire import Topics, encode_target


class MqttAdapter(Adapter):
    """Publishes target commands on the controller's own broker connection."""

    kind: ClassVar[str] = "mqtt"

    def __init__(self) -> None:
        self._link: MqttLink | None = None
        self._topics = Topics("")
        self._qos = 1
        self._retain = True

    async def start(self, context: AdapterContext) -> None:
        if context.mqtt is None:
            raise RuntimeError("the mqtt adapter needs the controller's MQTT connection")
        self._link = context.mqtt
        self._topics = Topics(context.settings.mqtt.topic_prefix)
        self._qos = context.settings.adapter.mqtt.qos
        self._retain = context.settings.adapter.mqtt.retain

    async def set_target(self, change: Target) -> None:
        if self._link is None:
            raise GuestUnavailable("adapter not started", guest_id=change.guest_id)
        topic = self._topics.target(change.host_id, change.guest_id)
        payload = encode_target(change.ts_s, change.num_pages, change.policy, change.reason)
        try:
            await self._link.publish(topic, payload, qos=self._qos, retain=self._retain)
        except MqttUnavailable as exc:
            raise GuestUnavailable(str(exc), guest_id=change.guest_id) from exc
