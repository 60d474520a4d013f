"""The broker connection's own messages: what failed, and what to check."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from autoscaler.config import MqttSettings
from autoscaler.service.mqtt import MqttLink
from tests.helpers import free_port


async def test_a_broker_never_reached_is_cannot_connect_not_connection_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    settings = MqttSettings(port=port, reconnect_min_s=0.01, reconnect_max_s=0.02)
    link = MqttLink(settings)
    with caplog.at_level(logging.WARNING, logger="autoscaler.service.mqtt"):
        task = asyncio.create_task(link.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(caplog.records) >= 2:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) >= 2, messages
    for message in messages:
        assert message.startswith(f"cannot connect to MQTT broker 127.0.0.1:{port}: "), message
        assert ", retrying in " in message
        assert "connection lost" not in message
