"""The host agent's target handling: repeated and cleared commands, adapter call timeouts.

A recording device adapter stands in for the hypervisor; the broker, where one is used, is a
real mosquitto (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import aiomqtt
import numpy as np
import orjson
import pytest

from autoscaler.adapters.base import (
    AdapterError,
    AdapterTimeout,
    DeviceAdapter,
    GuestReading,
    Target,
    call_adapter,
    safety_timeout_s,
)
from autoscaler.config import Settings, load_settings
from autoscaler.service.agent import HostAgent
from autoscaler.stats import N_STATS
from autoscaler.wire import Topics
from tests.helpers import Broker

MIB = 2**20
HOST = "h1"
GUEST = "g1"


class Recording(DeviceAdapter):
    """One 1 GiB guest; remembers every target it is given."""

    kind = "recording"

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.applied: list[tuple[float, int]] = []
        self.delay_s = delay_s

    async def discover(self) -> list[str]:
        return [GUEST]

    async def read(self, guest_id: str) -> GuestReading:
        num_pages = self.applied[-1][1] if self.applied else None
        return GuestReading(
            guest_id, time.time(), 1024 * MIB, num_pages, num_pages, np.full(N_STATS, np.nan)
        )

    async def set_target(self, change: Target) -> None:
        await asyncio.sleep(self.delay_s)
        self.applied.append((change.ts_s, change.num_pages))


def settings(prefix: str = "balloon/v1", broker: Broker | None = None, **mqtt: object) -> Settings:
    if broker is not None:
        mqtt |= {"host": broker.host, "port": broker.port}
    return load_settings(
        None,
        mqtt={"topic_prefix": prefix, **mqtt},
        agent={"mode": "host", "host_id": HOST, "interval_s": 0.2, "adapter_timeout_s": 0.2},
    )


def command(ts_s: float, num_pages: int) -> bytes:
    return orjson.dumps({"ts": ts_s, "num_pages": num_pages, "policy": "p", "reason": "r"})


async def until(what: str, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        await asyncio.sleep(0.02)


async def settle(agent: HostAgent) -> None:
    await asyncio.gather(*agent._appliers.values())


async def test_a_repeated_command_is_applied_once(caplog: pytest.LogCaptureFixture) -> None:
    adapter = Recording()
    agent = HostAgent(settings(), adapter)
    await agent.poll(publish=False)
    topic = Topics("balloon/v1").target(HOST, GUEST)
    ts_s = time.time()
    with caplog.at_level(logging.WARNING, logger="autoscaler.service.agent"):
        agent.handle_message(topic, command(ts_s, 1000))
        await settle(agent)
        # The retained command again (a reconnect), then cleared on the broker.
        agent.handle_message(topic, command(ts_s, 1000))
        agent.handle_message(topic, b"")
        await settle(agent)
        # Same time stamp, another value: a new command.
        agent.handle_message(topic, command(ts_s, 2000))
        await settle(agent)
        agent.handle_message(topic, command(ts_s + 1, 2000))
        await settle(agent)
    assert adapter.applied == [(ts_s, 1000), (ts_s, 2000), (ts_s + 1, 2000)]
    assert agent.counters["targets_received"] == 5
    assert agent.counters["targets_repeated"] == 1
    assert agent.counters["targets_cleared"] == 1
    assert agent.counters["targets_applied"] == 3
    assert agent.rejected.total() == 0
    assert caplog.text == ""


async def test_topics_not_for_this_host_are_rejected() -> None:
    agent = HostAgent(settings(), Recording())
    await agent.poll(publish=False)
    for topic in (
        Topics("balloon/v1").target("other", GUEST),
        Topics("other/v1").target(HOST, GUEST),
        f"balloon/v1/guest/{HOST}/{GUEST}/stats",
        "target",
    ):
        agent.handle_message(topic, command(time.time(), 1))
    agent.handle_message(Topics("balloon/v1").target(HOST, "g!"), command(time.time(), 1))
    assert agent.rejected == {"bad_topic": 5}


async def test_the_retained_target_is_not_reapplied_after_a_broker_restart(
    private_mosquitto: Broker,
) -> None:
    prefix = f"targets-{uuid.uuid4().hex[:8]}"
    adapter = Recording()
    agent = HostAgent(
        settings(prefix, private_mosquitto, reconnect_min_s=0.1, reconnect_max_s=0.2), adapter
    )
    topic = Topics(prefix).target(HOST, GUEST)
    payload = command(time.time(), 4096)

    async def retain() -> None:
        async with aiomqtt.Client(private_mosquitto.host, private_mosquitto.port) as client:
            await client.publish(topic, payload, qos=1, retain=True)

    await retain()
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until("the retained target applied", lambda: len(adapter.applied) == 1)
        private_mosquitto.stop()
        await until("the agent sees the broker gone", lambda: not agent.link.connected.is_set())
        # The broker keeps no state across restarts here; publishing the same retained command
        # again is what a persistent broker would deliver on the new subscription.
        private_mosquitto.start()
        await retain()
        await asyncio.wait_for(agent.link.connected.wait(), 10)
        await until("the command redelivered", lambda: agent.counters["targets_received"] == 2)
        await asyncio.sleep(0.3)  # a few polls: nothing re-applies it either
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert adapter.applied == [(orjson.loads(payload)["ts"], 4096)]
    assert agent.counters["targets_repeated"] == 1
    assert agent.rejected.total() == 0


# -- timeouts ----------------------------------------------------------------------------------


async def test_the_safety_timeout_leaves_room_for_the_adapters_own() -> None:
    assert safety_timeout_s(0.2) > 0.2 + 0.5
    # An adapter that bounds itself by adapter_timeout_s reports its own timeout...
    with pytest.raises(AdapterTimeout, match="own") as raised:

        async def bounded() -> None:
            try:
                async with asyncio.timeout(0.2):
                    await asyncio.sleep(10)
            except TimeoutError:
                await asyncio.sleep(0.1)  # cleaning up, e.g. dropping the connection
                raise AdapterTimeout("own timeout") from None

        await call_adapter(bounded(), adapter_timeout_s=0.2, what="read", guest_id="g")
    assert raised.value.guest_id == "g"
    # ... one that does not is stopped by the safety bound.
    began = time.monotonic()
    with pytest.raises(AdapterTimeout, match="read: no answer"):
        await call_adapter(asyncio.sleep(10), adapter_timeout_s=0.05, what="read", guest_id="g")
    assert time.monotonic() - began < safety_timeout_s(0.05) + 0.5


async def test_adapter_errors_are_mapped_consistently() -> None:
    async def buggy() -> None:
        raise KeyError("bug")

    with pytest.raises(AdapterError) as raised:
        await call_adapter(buggy(), adapter_timeout_s=1, what="set_target", guest_id="g")
    assert type(raised.value) is AdapterError
    assert raised.value.guest_id == "g"
    assert "KeyError" in str(raised.value)

    async def anonymous() -> None:
        raise AdapterError("no guest id")

    with pytest.raises(AdapterError) as raised:
        await call_adapter(anonymous(), adapter_timeout_s=1, what="set_target", guest_id="g")
    assert raised.value.guest_id == "g"


async def test_a_slow_set_target_is_counted_and_retried() -> None:
    adapter = Recording(delay_s=10)
    agent = HostAgent(settings(), adapter)
    await agent.poll(publish=False)
    agent.handle_message(Topics("balloon/v1").target(HOST, GUEST), command(time.time(), 1000))
    await settle(agent)
    assert agent.counters["targets_failed"] == 1
    assert agent.errors == {"AdapterTimeout": 1}
    adapter.delay_s = 0
    await agent.poll(publish=False)  # the guest reads fine: its target is tried again
    await settle(agent)
    assert [pages for _, pages in adapter.applied] == [1000]
