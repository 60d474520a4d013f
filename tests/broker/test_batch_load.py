"""Large host-agent batches must not stall control: a real controller on a real mosquitto."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiomqtt
import orjson

from autoscaler.adapters.dry_run import DryRunAdapter
from autoscaler.config import Settings, load_settings
from autoscaler.service.controller import Controller
from tests.helpers import Broker, broker_settings, cancel_and_wait, poll_until, running
from tests.helpers.data import guest_sample, host_batch

GIB = 2**30
BALLOON_PAGES = GIB // 4096


def make_settings(broker: Broker, prefix: str, **controller: Any) -> Settings:
    return broker_settings(broker, prefix, controller=controller)


async def longest_stall(stalls_s: list[float]) -> None:
    """Record how late a 1 ms sleep wakes up, for as long as it runs."""
    while True:
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        stalls_s.append(time.perf_counter() - started - 0.001)


async def test_a_burst_of_batches_neither_stalls_the_loop_nor_delays_an_emergency(
    mosquitto: Broker,
) -> None:
    prefix = f"batchload-{uuid.uuid4().hex[:8]}"
    adapter = DryRunAdapter()
    # One tick at start-up and none after: the target can only come from the emergency path.
    controller = Controller(make_settings(mosquitto, prefix, interval_s=3600.0), adapter=adapter)
    now = time.time()
    victim = f"{prefix}/guest/victim/g/stats"
    oversized = host_batch(
        20_000, now
    )  # about 4 MiB: far more guests than controller.max_batch_guests
    stalls_s: list[float] = []
    async with running(controller), aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        await pub.publish(
            victim, orjson.dumps(guest_sample(now - 5, balloon_pages=BALLOON_PAGES)), qos=1
        )
        await poll_until(lambda: controller.counters["ingested"] == 1, 10, what="the victim")
        for k in range(8):  # the fleet's tables grow once, before the measurement
            await pub.publish(f"{prefix}/host/h{k}/batch", host_batch(1000, now - 5), qos=1)
        await poll_until(lambda: controller.counters["ingested"] == 8001, 30, what="a warm-up")
        watcher = asyncio.create_task(longest_stall(stalls_s))
        try:
            for k in range(8):
                await pub.publish(f"{prefix}/host/big{k}/batch", oversized, qos=1)
                await pub.publish(f"{prefix}/host/h{k}/batch", host_batch(1000, now), qos=1)
            sent_s = time.monotonic()
            oom = guest_sample(now, oom_kills=1, balloon_pages=BALLOON_PAGES)
            await pub.publish(victim, orjson.dumps(oom), qos=1)
            await poll_until(
                lambda: ("victim", "g") in adapter.targets, 30, what="the emergency deflate"
            )
            emergency_s = time.monotonic() - sent_s
            await poll_until(
                lambda: controller.counters["messages"] == 1 + 8 + 17, 60, what="every message"
            )
        finally:
            await cancel_and_wait(watcher)
        # Each oversized batch held the loop for seconds before; now none holds it for long
        # (this machine is shared and noisy, hence the margin).
        assert max(stalls_s) < 0.25, f"longest stall {max(stalls_s):.3f} s"
        assert emergency_s < 5.0
        await poll_until(
            lambda: controller.counters["ingested"] == 16_002,
            30,
            what="every admissible sample",
            last_seen=lambda: (dict(controller.counters), dict(controller.rejected)),
        )
    assert controller.rejected["too_large"] == 8


def test_guests_that_cannot_be_admitted_are_turned_away_before_they_are_validated() -> None:
    controller = Controller(load_settings(None, controller={"max_guests": 10}))
    samples: dict[str, object] = {f"g{i}": guest_sample(time.time()) for i in range(10)}
    samples |= {f"junk{i}": {"ts": "not even a number"} for i in range(500)}
    controller.handle_message("balloon/v1/host/h/batch", orjson.dumps({"samples": samples}))
    assert controller.counters["ingested"] == 10
    assert dict(controller.rejected) == {"too_many_guests": 500}


def test_a_batch_of_more_guests_than_max_batch_guests_is_rejected_whole() -> None:
    controller = Controller(load_settings(None, controller={"max_batch_guests": 100}))
    controller.handle_message("balloon/v1/host/h/batch", host_batch(101, time.time()))
    controller.handle_message("balloon/v1/host/h/batch", host_batch(100, time.time()))
    assert controller.rejected["too_large"] == 1
    assert controller.counters["ingested"] == 100
