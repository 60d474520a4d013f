"""Agents whose clocks are wrong for a while: a real controller on a real mosquitto."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import aiomqtt
import orjson
import pytest

from autoscaler.adapters.dry_run import DryRunAdapter
from autoscaler.config import Settings, load_settings
from autoscaler.service.controller import Controller
from tests.helpers import Broker, poll_until, running

GIB = 2**30
BALLOON_PAGES = GIB // 4096


def guest_stats(ts_s: float, *, oom_kills: int = 0, available_share: float = 0.75) -> bytes:
    return orjson.dumps(
        {
            "ts": ts_s,
            "ram_bytes": 4 * GIB,
            "actual": BALLOON_PAGES,
            "stats": {
                "total-memory": 4 * GIB,
                "available-memory": int(available_share * 3 * GIB),
                "oom-kills": oom_kills,
            },
        }
    )


def host_stats(ts_s: float) -> bytes:
    return orjson.dumps({"ts": ts_s, "mem_total_bytes": 64 * GIB, "mem_available_bytes": GIB})


def make_settings(broker: Broker, prefix: str, **controller: Any) -> Settings:
    return load_settings(
        None,
        mqtt={"host": broker.host, "port": broker.port, "topic_prefix": prefix},
        controller={"max_clock_skew_s": 30.0, **controller},
    )


async def test_a_day_ahead_sample_is_rejected_and_the_guest_keeps_its_emergencies(
    mosquitto: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"skew-{uuid.uuid4().hex[:8]}"
    adapter = DryRunAdapter()
    # One tick at start-up and none after: only the emergency path can deflate.
    controller = Controller(make_settings(mosquitto, prefix, interval_s=3600.0), adapter=adapter)
    topic = f"{prefix}/guest/h/g/stats"
    caplog.set_level(logging.WARNING, logger="autoscaler.service.controller")
    async with running(controller), aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        now = time.time()
        await pub.publish(topic, guest_stats(now - 10), qos=1)
        await pub.publish(topic, guest_stats(now + 23 * 3600), qos=1)  # a clock gone wrong
        await pub.publish(topic, guest_stats(now + 20), qos=1)  # wrong, but within the bound
        await poll_until(
            lambda: controller.counters["ingested"] == 2 and controller.rejected["clock_skew"] == 1,
            10,
            what="the day-ahead sample rejected, the others stored",
            last_seen=lambda: (dict(controller.counters), dict(controller.rejected)),
        )
        # The clock is right again, and the guest is in trouble.
        await pub.publish(topic, guest_stats(now, oom_kills=1, available_share=0.03), qos=1)
        await poll_until(
            lambda: adapter.targets.get(("h", "g"), BALLOON_PAGES) < BALLOON_PAGES,
            10,
            what="an emergency deflate of h/g",
            last_seen=lambda: (dict(controller.rejected), adapter.targets),
        )
    assert controller.rejected["out_of_order"] == 0
    assert controller.counters["clock_resets"] == 1
    assert any("h/g" in r.getMessage() and "clock_skew" in str(r.__dict__) for r in caplog.records)


async def test_a_sample_dated_ahead_still_goes_stale_on_time(mosquitto: Broker) -> None:
    prefix = f"skew-{uuid.uuid4().hex[:8]}"
    controller = Controller(
        make_settings(mosquitto, prefix, interval_s=0.2, stale_after_s=1.0), adapter=DryRunAdapter()
    )
    async with running(controller), aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        sent_s = time.monotonic()
        await pub.publish(f"{prefix}/guest/h/g/stats", guest_stats(time.time() + 25), qos=1)
        await pub.publish(f"{prefix}/host/h/stats", host_stats(time.time() + 25), qos=1)
        await poll_until(
            lambda: controller.last_tick is not None and controller.last_tick.stale == 1,
            10,
            what="a tick that finds the silent guest stale",
        )
        # By its ts it would stay fresh for 26 s; by its arrival it is stale after 1 s.
        assert time.monotonic() - sent_s < 15
        fleet = controller.fleet
        host_fresh = fleet.host_stats_fresh(time.time(), 1.0)[
            fleet.host_idx[fleet.slot_of("h", "g")]
        ]
        assert not host_fresh
