"""The MQTT connection: the one module that imports aiomqtt.

:class:`MqttLink` keeps one broker connection up — one reconnect loop with jittered exponential
backoff, catching one error type (``aiomqtt.MqttError``) — subscribes on every (re)connect, and
hands each incoming message to a plain synchronous callback. Publishing goes through the same
connection and raises :class:`MqttUnavailable` while it is down, so callers fail fast and retry
on their own schedule.

Incoming messages skip aiomqtt's queue-and-iterate path: the client accepts a ``queue_type``,
and ours calls the handler directly from ``put_nowait``. That saves a task and a wait per message,
which is most of the per-message cost at 10,000 messages a second; the messages iterator is
still drained, to learn of disconnections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt

from autoscaler.config import MqttSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
"""Called with (topic, payload) for every message, on the event loop: keep it short."""


@dataclass(frozen=True)
class Presence:
    """A retained presence on ``topic``: ``online()`` is published on every connect (and by
    :meth:`MqttLink.refresh_presence`), ``offline`` by the broker as the will if the connection
    dies and by :meth:`MqttLink.say_goodbye` on a clean shutdown."""

    topic: str
    online: Callable[[], bytes]
    offline: bytes


class MqttUnavailable(Exception):
    """Not connected to the broker (or the publish failed); try again later."""


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    if settings.tls_ca is None and settings.tls_cert is None:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca) if settings.tls_ca is not None else None
    )
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


def make_client(
    settings: MqttSettings, *, identifier: str | None = None, **kwargs: Any
) -> aiomqtt.Client:
    """An aiomqtt client configured from ``settings`` (auth, TLS, keepalive)."""
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password.get_secret_value() if settings.password else None,
        identifier=identifier or settings.client_id,
        keepalive=settings.keepalive_s,
        tls_context=tls_context(settings),
        **kwargs,
    )
    # aiomqtt warns beyond 10 publishes in flight; the controller sends a tick's targets
    # concurrently (controller.adapter_concurrency) on purpose.
    client.pending_calls_threshold = 1000
    return client


class _DirectQueue(asyncio.Queue[aiomqtt.Message]):
    """An aiomqtt message "queue" that hands each message straight to a handler."""

    handler: MessageHandler

    def put_nowait(self, item: aiomqtt.Message) -> None:
        payload = item.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode() if payload is not None else b""
        self.handler(item.topic.value, bytes(payload))


MAX_BACKOFF_DOUBLINGS = 32
"""Doublings of ``reconnect_min_s`` past which the delay stays at ``reconnect_max_s``: keeps
``2**attempt`` a small number through an outage of any length (2**1024 overflows a float)."""


def reconnect_delay_s(min_s: float, max_s: float, attempt: int) -> float:
    """Exponential backoff with jitter: replicas must not reconnect in step."""
    delay = min(max_s, min_s * (1 << min(attempt, MAX_BACKOFF_DOUBLINGS)))
    return delay * random.uniform(0.5, 1.0)


class MqttLink:
    """One broker connection, kept up by :meth:`run`; see the module docstring."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: MessageHandler | None = None,
        identifier: str | None = None,
        name: str = "mqtt",
        presence: Presence | None = None,
    ) -> None:
        self.presence = presence
        self.settings = settings
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.identifier = identifier
        self.name = name
        self.connected = asyncio.Event()
        self.connects = 0
        self.disconnects = 0
        self._client: aiomqtt.Client | None = None

    def _make_queue_type(self) -> type[asyncio.Queue[aiomqtt.Message]]:
        handler = self.on_message or (lambda topic, payload: None)

        class Queue(_DirectQueue):
            pass

        Queue.handler = staticmethod(handler)
        return Queue

    async def run(self) -> None:
        """Connect, subscribe, receive; on any broker error wait (with jitter) and start over."""
        attempt = 0
        settings = self.settings
        while True:
            will = None
            if self.presence is not None:
                will = aiomqtt.Will(self.presence.topic, self.presence.offline, qos=1, retain=True)
            client = make_client(
                settings,
                identifier=self.identifier,
                queue_type=self._make_queue_type(),
                will=will,
            )
            try:
                async with client:
                    self._client = client
                    for topic, qos in self.subscriptions:
                        await client.subscribe(topic, qos=qos)
                    if self.presence is not None:
                        presence = self.presence
                        await client.publish(presence.topic, presence.online(), qos=1, retain=True)
                    attempt = 0
                    self.connects += 1
                    self.connected.set()
                    log.info(
                        "connected to MQTT broker",
                        extra={"link": self.name, "broker": f"{settings.host}:{settings.port}"},
                    )
                    async for _ in client.messages:  # pragma: no cover - the queue stays empty
                        pass
            except aiomqtt.MqttError as exc:
                was_connected = self.connected.is_set()
                self.connected.clear()
                self._client = None
                self.disconnects += 1
                delay = reconnect_delay_s(
                    settings.reconnect_min_s, settings.reconnect_max_s, attempt
                )
                attempt += 1
                broker = f"{settings.host}:{settings.port}"
                extra = {"link": self.name, "broker": broker}
                if was_connected:
                    log.warning(
                        "MQTT connection lost, reconnecting in %.1f s: %s", delay, exc, extra=extra
                    )
                else:
                    # This attempt never got through: nothing was lost, the broker is not there
                    # (or refuses us), and saying so names what to check.
                    log.warning(
                        "cannot connect to MQTT broker %s: %s, retrying in %.1f s",
                        broker,
                        exc,
                        delay,
                        extra=extra,
                    )
                await asyncio.sleep(delay)
            finally:
                self.connected.clear()
                self._client = None

    async def refresh_presence(self) -> None:
        """Publish the ``online`` presence again; :class:`MqttUnavailable` while disconnected."""
        if self.presence is not None:
            presence = self.presence
            await self.publish(presence.topic, presence.online(), qos=1, retain=True)

    async def say_goodbye(self) -> None:
        """Publish the ``offline`` presence now (a clean shutdown fires no will)."""
        # If the broker is gone it has no presence of ours to correct either.
        if self.presence is not None:
            with contextlib.suppress(MqttUnavailable):
                await self.publish(self.presence.topic, self.presence.offline, qos=1, retain=True)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout_s: float = 5.0,
    ) -> None:
        client = self._client
        if client is None or not self.connected.is_set():
            raise MqttUnavailable("not connected to the MQTT broker")
        try:
            # Our own timeout, not aiomqtt's: on Python 3.11 its asyncio.wait_for can swallow a
            # cancellation that lands as the publish completes, and shutdown would then hang.
            async with asyncio.timeout(timeout_s):
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=math.inf)
        except TimeoutError as exc:
            raise MqttUnavailable(f"publish to {topic!r} timed out after {timeout_s} s") from exc
        except aiomqtt.MqttError as exc:
            raise MqttUnavailable(f"publish to {topic!r} failed: {exc}") from exc
