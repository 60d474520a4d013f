"""The controller end to end over a real mosquitto: stats in, target commands out."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiomqtt
import orjson
import pytest

from autoscaler.config import Settings, load_settings
from autoscaler.service.controller import Controller
from tests.helpers import Broker, broker_settings, cancel_and_wait, poll_until, running

GIB = 2**30
PAGE = 4096


def stats_payload(
    ts: float,
    *,
    ram: int = 4 * GIB,
    actual: int = 0,
    available: int,
    swap_in: int = 0,
    oom_kills: int = 0,
    alloc_stalls: int = 0,
) -> bytes:
    alloc = ram - actual * PAGE
    return orjson.dumps(
        {
            "ts": ts,
            "ram_bytes": ram,
            "num_pages": actual,
            "actual": actual,
            "stats": {
                # deflate-on-oom: MemTotal stays at boot RAM while the balloon is inflated
                "total-memory": ram,
                "available-memory": available,
                "free-memory": available // 2,
                "disk-caches": available // 2,
                "swap-in": swap_in,
                "major-faults": 100,
                "oom-kills": oom_kills,
                "alloc-stalls": alloc_stalls,
            },
            "note": f"alloc {alloc}",
        }
    )


def make_settings(broker: Broker, prefix: str, **controller: Any) -> Settings:
    return broker_settings(
        broker,
        prefix,
        controller={"interval_s": 0.3, "stale_after_s": 30.0, **controller},
        adapter={"kind": "mqtt"},
    )


class Targets:
    """Collects target commands from the broker, keyed by guest."""

    def __init__(self) -> None:
        self.by_guest: dict[str, list[dict[str, Any]]] = {}
        self.changed = asyncio.Event()

    async def wait_for(self, guest: str, timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self.by_guest.get(guest):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no target for {guest} within {timeout_s} s")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue
        return self.by_guest[guest][-1]


@asynccontextmanager
async def serving(
    broker: Broker, prefix: str, **controller_options: Any
) -> AsyncIterator[tuple[Controller, Targets, aiomqtt.Client]]:
    """Runs a controller on the broker with a target collector and a publishing client."""
    controller = Controller(make_settings(broker, prefix, **controller_options))
    targets = Targets()
    ready = asyncio.Event()
    collector = asyncio.create_task(collect(broker, prefix, targets, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with running(controller), aiomqtt.Client(broker.host, broker.port) as pub:
            yield controller, targets, pub
    finally:
        await cancel_and_wait(collector)


@pytest.fixture
async def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}/v1"


async def collect(broker: Broker, prefix: str, targets: Targets, ready: asyncio.Event) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(f"{prefix}/guest/+/+/target", qos=1)
        ready.set()
        async for message in client.messages:
            guest = str(message.topic).split("/")[-2]
            assert isinstance(message.payload, bytes)
            payload = orjson.loads(message.payload)
            payload["retain"] = message.retain
            targets.by_guest.setdefault(guest, []).append(payload)
            targets.changed.set()


async def test_idle_inflates_pressure_deflates_stale_frozen_garbage_counted(
    mosquitto: Broker, prefix: str
) -> None:
    async with serving(mosquitto, prefix) as (controller, targets, pub):
        now = time.time()
        topic = f"{prefix}/guest/host-a/{{}}/stats"
        balloon = GIB // PAGE  # 1 GiB ballooned: 3 GiB allocated
        garbage: list[tuple[str, bytes]] = [
            (topic.format("idle"), b"{not json"),
            (topic.format("idle"), b"[1, 2, 3]"),
            (topic.format("idle"), orjson.dumps({"ts": now, "stats": {}})),
            (topic.format("idle"), orjson.dumps({"ts": "x", "ram_bytes": 1, "stats": {}})),
            (topic.format("idle"), orjson.dumps({"ts": now, "ram_bytes": -5, "stats": {}})),
            (
                topic.format("idle"),
                orjson.dumps({"ts": now, "ram_bytes": GIB, "stats": {"free-memory": 8 * GIB}}),
            ),
            (topic.format("idle"), b" " * (65 * 1024)),
            (f"{prefix}/guest/bad host!/g/stats", stats_payload(now, available=GIB)),
            (f"{prefix}/guest/{'x' * 200}/g/stats", stats_payload(now, available=GIB)),
        ]
        for round_ in range(2):
            ts = now - 10 + round_ * 5
            await pub.publish(topic.format("idle"), stats_payload(ts, available=3 * GIB))
            for t, p in garbage:
                await pub.publish(t, p)
            await pub.publish(
                topic.format("pressured"),
                stats_payload(
                    ts,
                    actual=balloon,
                    available=int(0.05 * 3 * GIB),
                    swap_in=round_ * 400 * 2**20,  # 80 MiB/s: an emergency
                ),
            )
            await pub.publish(topic.format("stale"), stats_payload(ts - 600, available=3 * GIB))

        idle = await targets.wait_for("idle")
        pressured = await targets.wait_for("pressured")
        # Give the stale guest a few more ticks to (wrongly) get a target.
        await asyncio.sleep(1.0)

    assert idle["num_pages"] > 0, idle
    assert idle["reason"].startswith("idle"), idle
    assert idle["policy"] == "threshold"
    # Inflation is paced: 0.3 % of RAM per second of idleness (a few seconds here); whole 4 KiB
    # pages.
    assert idle["num_pages"] * PAGE <= 0.003 * 4 * GIB * 20 + PAGE

    # Heavy swap-in is an emergency: the balloon shrinks at once, then the tick keeps deflating.
    first = targets.by_guest["pressured"][0]
    assert first["num_pages"] < balloon, first
    assert pressured["num_pages"] < balloon

    assert "stale" not in targets.by_guest
    assert controller.counters["emergency_deflates"] == 1

    # Targets are retained: an agent that (re)starts reads its current target at once.
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as late:
        await late.subscribe(f"{prefix}/guest/host-a/idle/target", qos=1)
        message = await asyncio.wait_for(anext(aiter(late.messages)), 5)
    assert message.retain
    assert isinstance(message.payload, bytes)
    assert orjson.loads(message.payload)["num_pages"] == idle["num_pages"]

    rejected = controller.rejected
    for reason in ("invalid_json", "wrong_type", "missing_field", "bad_value", "too_large"):
        assert rejected[reason] >= 2, (reason, dict(rejected))
    assert rejected["bad_topic"] == 4, dict(rejected)
    assert controller.counters["ingested"] == 6


async def test_emergency_deflate_does_not_wait_for_the_tick(mosquitto: Broker, prefix: str) -> None:
    # One tick at start-up, then none for an hour: only the emergency path can react.
    async with serving(mosquitto, prefix, interval_s=3600.0) as (controller, targets, pub):
        topic = f"{prefix}/guest/host-a/oomy/stats"
        balloon = 2 * GIB // PAGE
        now = time.time()
        await pub.publish(topic, stats_payload(now - 2, actual=balloon, available=GIB))
        await asyncio.sleep(0.3)
        assert "oomy" not in targets.by_guest
        sent_s = time.monotonic()
        await pub.publish(topic, stats_payload(now - 1, actual=balloon, available=GIB, oom_kills=1))
        target = await targets.wait_for("oomy", timeout_s=5)
        latency_s = time.monotonic() - sent_s
    assert target["policy"] == "emergency"
    # 25% of 4 GiB given back at once.
    assert target["num_pages"] == balloon - GIB // PAGE
    assert latency_s < 2.0
    assert controller.counters["emergency_deflates"] == 1


async def test_reconnects_after_broker_restart(private_mosquitto: Broker, prefix: str) -> None:
    settings = load_settings(
        None,
        mqtt={
            "host": private_mosquitto.host,
            "port": private_mosquitto.port,
            "topic_prefix": prefix,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
        },
        controller={"interval_s": 0.3},
        adapter={"kind": "dry-run"},
    )
    controller = Controller(settings)
    async with running(controller):
        private_mosquitto.stop()
        await poll_until(
            lambda: not controller.link.connected.is_set(),
            10,
            what="the controller to see the broker gone",
        )
        private_mosquitto.start()
        await asyncio.wait_for(controller.link.connected.wait(), 10)
        async with aiomqtt.Client(private_mosquitto.host, private_mosquitto.port) as pub:
            await pub.publish(
                f"{prefix}/guest/h/g/stats", stats_payload(time.time(), available=GIB), qos=1
            )
        await poll_until(lambda: controller.counters["ingested"] >= 1, 10, what="the sample")
    assert controller.link.connects == 2
    assert controller.counters["ingested"] == 1


async def test_host_batches_carry_many_guests_in_one_message(
    mosquitto: Broker, prefix: str
) -> None:
    async with serving(mosquitto, prefix) as (controller, targets, pub):
        now = time.time()
        for ts in (now - 10, now - 5):
            samples = {
                f"vm{i}": orjson.loads(stats_payload(ts, available=3 * GIB)) for i in range(3)
            }
            samples["broken"] = {"ts": ts, "ram_bytes": "lots", "stats": {}}
            samples["bad/id"] = {"ts": ts, "ram_bytes": GIB, "stats": {}}
            await pub.publish(
                f"{prefix}/host/host-b/batch", orjson.dumps({"samples": samples}), qos=1
            )
        await pub.publish(f"{prefix}/host/host-b/batch", b'{"samples": []}', qos=1)
        for i in range(3):
            await targets.wait_for(f"vm{i}")
    assert controller.counters["ingested"] == 6
    assert controller.rejected["wrong_type"] == 3  # "broken" twice, the list once
    assert controller.rejected["bad_topic"] == 2
    assert controller.fleet.slot_of("host-b", "vm0") is not None
