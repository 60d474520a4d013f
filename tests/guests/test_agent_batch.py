"""A host agent in batch mode: one message per round, the controller steers every guest.

Four 512 MiB QEMU guests (tests/helpers/guest, TCG), the host agent with the QMP adapter and
``agent.batch``, a real :class:`Controller` (adapter kind ``mqtt``) and mosquitto in between:
nothing is faked. The controller inflates the idle guests from the batches alone; the targets it
publishes must be what the agent applied and what QEMU's query-balloon reports.

QEMU refreshes a guest's stats once per ``stats_interval_s`` (1 s) and the agent sends a guest's
sample only when it is new, so the agent's round (1.5 s) is longer than that refresh: every
round has a new sample of every guest, and a round is one message with all four.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import aiomqtt
import orjson
import pytest

from autoscaler.adapters.qmp import QmpAdapter
from autoscaler.config import load_settings
from autoscaler.service.agent import HostAgent
from autoscaler.service.controller import Controller
from autoscaler.stats import StatsSample
from autoscaler.wire import decode_batch
from tests.helpers import Broker
from tests.helpers.guest.vm import GuestSet, GuestSpec, boot_guests

pytestmark = pytest.mark.slow

MIB = 2**20
PAGE = 4096
HOST = "qemu-host"
NAMES = ("g0", "g1", "g2", "g3")
RAM_MIB = 512
FLOOR_MIB = 256  # the default floor_bytes
DEAD_BAND_MIB = 16  # the default dead_band_bytes


@pytest.fixture(scope="module")
def guests() -> Iterator[GuestSet]:
    yield from boot_guests([GuestSpec(name, RAM_MIB) for name in NAMES])


class Seen:
    """What the broker carried: batch messages, per-guest stats topics, the latest targets."""

    def __init__(self) -> None:
        self.batches: list[bytes] = []
        self.guest_stats: list[str] = []
        self.targets: dict[str, int] = {}


async def watch(broker: Broker, prefix: str, seen: Seen, ready: asyncio.Event) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(f"{prefix}/host/{HOST}/batch", qos=1)
        await client.subscribe(f"{prefix}/guest/{HOST}/+/stats", qos=1)
        await client.subscribe(f"{prefix}/guest/{HOST}/+/target", qos=1)
        ready.set()
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            topic = str(message.topic)
            if topic.endswith("/batch"):
                seen.batches.append(message.payload)
            elif topic.endswith("/stats"):
                seen.guest_stats.append(topic)
            elif message.payload:
                seen.targets[topic.split("/")[-2]] = orjson.loads(message.payload)["num_pages"]


async def test_batched_host_agent_and_controller(mosquitto: Broker, guests: GuestSet) -> None:
    prefix = f"batch-{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        None,
        mqtt={"host": mosquitto.host, "port": mosquitto.port, "topic_prefix": prefix},
        controller={"interval_s": 0.3, "adapter_timeout_s": 2.0},
        adapter={"kind": "qmp", "qmp": {"socket_glob": guests.socket_glob, "stats_interval_s": 1}},
        agent={
            "mode": "host",
            "host_id": HOST,
            "interval_s": 1.5,
            "batch": True,
            "adapter_timeout_s": 2.0,
        },
    )
    agent = HostAgent(settings, QmpAdapter())
    adapter = agent.adapter
    controller_settings = settings.model_copy(
        update={"adapter": settings.adapter.model_copy(update={"kind": "mqtt"})}
    )
    controller = Controller(controller_settings)
    seen = Seen()
    ready = asyncio.Event()
    watcher = asyncio.create_task(watch(mosquitto, prefix, seen, ready))
    await asyncio.wait_for(ready.wait(), 10)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(controller.run(stop)), asyncio.create_task(agent.run(stop))]
    settled: dict[str, tuple[int, int | None, int | None]] = {}
    try:
        await asyncio.wait_for(agent.link.connected.wait(), 10)
        started_s = time.monotonic()

        async def inflated() -> bool:
            readings = await asyncio.gather(*(adapter.read(g) for g in NAMES))
            return all((r.actual_pages or 0) > 0 for r in readings)

        while not await inflated():
            assert time.monotonic() - started_s < 40, "the idle guests were never inflated"
            await asyncio.sleep(0.2)
        inflated_s = time.monotonic() - started_s

        # Until the controller's targets and the balloons agree: for two rounds its last target
        # per guest is the one the agent applied (the adapter's num_pages) and the balloon QEMU
        # reports (query-balloon).
        stable_since_s = time.monotonic()
        while True:
            readings = await asyncio.gather(*(adapter.read(g) for g in NAMES))
            now = {
                g: (seen.targets.get(g, -1), r.num_pages, r.actual_pages)
                for g, r in zip(NAMES, readings, strict=True)
            }
            agreed = all(target == applied == actual for target, applied, actual in now.values())
            if not agreed or now != settled:
                settled, stable_since_s = now, time.monotonic()
            elif time.monotonic() - stable_since_s >= 3.0:
                break
            assert time.monotonic() - started_s < 60, f"targets never settled: {settled}"
            await asyncio.sleep(0.2)
        print(
            f"inflated in {inflated_s:.1f} s, settled in {time.monotonic() - started_s:.1f} s "
            f"with balloons of { {g: t * PAGE // MIB for g, (t, _, _) in settled.items()} } MiB"
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        await asyncio.sleep(0.2)  # the last batch reaches the watcher
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
            for name in NAMES:  # clear the controller's retained targets
                topic = f"{prefix}/guest/{HOST}/{name}/target"
                await client.publish(topic, b"", qos=1, retain=True)

    batches = agent.counters["batches_published"]
    samples = agent.counters["stats_published"]
    assert batches >= 2
    assert samples >= 4 * batches - 4  # four guests a round, but for a round cut by the stop
    assert samples - 4 <= controller.counters["ingested"] <= samples  # a last batch may be cut
    assert sum(controller.rejected.values()) == 0

    # Batch mode: everything came on the host's batch topic, nothing on the per-guest ones.
    assert seen.guest_stats == []
    assert batches - 1 <= len(seen.batches) <= batches
    parsed = [decode_batch(raw, now_s=time.time()) for raw in seen.batches]
    assert sum(len(batch) for batch in parsed) >= samples - 4
    for batch in parsed:
        assert {guest for guest, _ in batch} <= set(NAMES)
        for _, sample in batch:
            assert isinstance(sample, StatsSample), sample
            assert sample.ram_bytes == RAM_MIB * MIB
    # The last round reported the balloons QEMU showed once settled (nothing moved since).
    last = orjson.loads(seen.batches[-1])["samples"]
    for guest, document in last.items():
        target, applied, actual = settled[guest]
        assert document.get("num_pages") == applied
        assert document.get("actual") == actual
    # The controller inflated every idle guest, from the batches alone, and never past the floor
    # guard.
    to_floor = (RAM_MIB - FLOOR_MIB) * MIB // PAGE
    for target, _, _ in settled.values():
        assert DEAD_BAND_MIB * MIB // PAGE <= target <= to_floor
