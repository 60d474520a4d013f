"""The shipped defaults keep real guests alive when their workload grows after an idle spell.

Four 1 GiB QEMU guests (TCG) behind the real host agent over QMP and the real controller with
the mqtt adapter, over a real mosquitto. **No policy or guard setting is changed**: only the
broker, the sockets and the ids. Every guest idles until the controller has taken what it will
take; then three of them grow their workload (memhog) to 45 % of their RAM:

- ``slow`` (no deflate-on-oom) at 16 MiB/s and ``fast`` (no deflate-on-oom) at 48 MiB/s: an
  OOM kill would be the controller's fault;
- ``doo`` (deflate-on-oom) at 32 MiB/s: the guest deflates its own balloon, and the controller
  must follow it, never inflate it back;
- ``idle`` stays idle.

Then the grown guests drop their workload: their raised trouble floor must keep them from being
squeezed again within the hold.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiomqtt
import orjson
import pytest

from autoscaler.adapters.qmp import QmpAdapter
from autoscaler.config import Settings, load_settings
from autoscaler.service.agent import HostAgent
from autoscaler.service.controller import Controller
from tests.helpers import Broker, cancel_and_wait, poll_until, running
from tests.helpers.guest.vm import GuestSet, GuestSpec, Memhog, parse_status

pytestmark = pytest.mark.slow

MIB = 2**20
PAGE = 4096
RAM_MIB = 1024
HOST = "safe-host"
RAMPS_MIB_PER_S = {"slow": 16, "fast": 48, "doo": 32}
PEAK_MIB = int(0.45 * RAM_MIB)


@pytest.fixture(scope="module")
def guests() -> Iterator[GuestSet]:
    specs = [
        GuestSpec("slow", RAM_MIB, deflate_on_oom=False),
        GuestSpec("fast", RAM_MIB, deflate_on_oom=False),
        GuestSpec("doo", RAM_MIB, deflate_on_oom=True),
        GuestSpec("idle", RAM_MIB, deflate_on_oom=False),
    ]
    with GuestSet(specs) as booted:
        yield booted


def settings(broker: Broker, prefix: str, guests: GuestSet) -> Settings:
    """The shipped defaults; only where the broker, the sockets and this host are."""
    return load_settings(
        None,
        mqtt={"host": broker.host, "port": broker.port, "topic_prefix": prefix},
        agent={"mode": "host", "host_id": HOST},
        adapter={"kind": "mqtt", "qmp": {"socket_glob": guests.socket_glob}},
    )


@dataclass
class Targets:
    """Target commands on the broker: (monotonic time, num_pages, reason) per guest."""

    seen: dict[str, list[tuple[float, int, str]]] = field(default_factory=dict)

    def allocation_mib(self, guest: str) -> float:
        pages = self.seen[guest][-1][1] if self.seen.get(guest) else 0
        return RAM_MIB - pages * PAGE / MIB

    def since(self, guest: str, start_s: float) -> list[tuple[float, int, str]]:
        return [t for t in self.seen.get(guest, []) if t[0] >= start_s]

    async def collect(self, broker: Broker, prefix: str, ready: asyncio.Event) -> None:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.subscribe(f"{prefix}/guest/{HOST}/+/target", qos=1)
            ready.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if not message.payload:
                    continue
                command = orjson.loads(message.payload)
                guest = str(message.topic).split("/")[-2]
                self.seen.setdefault(guest, []).append(
                    (time.monotonic(), int(command["num_pages"]), str(command["reason"]))
                )


async def ramp(hog: Memhog, rate_mib_per_s: int) -> float:
    """Grow memhog to PEAK_MIB at ``rate_mib_per_s`` in half-second slices; return when it
    started."""
    started = time.monotonic()
    held = 0.0
    while held < PEAK_MIB:
        held = min(held + rate_mib_per_s / 2, PEAK_MIB)
        await hog.send(int(held))
        await asyncio.sleep(0.5)
    return started


async def test_defaults_keep_growing_guests_alive_and_idle_ones_small(
    mosquitto: Broker, guests: GuestSet
) -> None:
    prefix = f"safe-{uuid.uuid4().hex[:8]}"
    config = settings(mosquitto, prefix, guests)
    controller = Controller(config)
    agent = HostAgent(config.model_copy(), QmpAdapter())
    targets = Targets()
    ready = asyncio.Event()
    collector = asyncio.create_task(targets.collect(mosquitto, prefix, ready))
    names = list(RAMPS_MIB_PER_S)
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with running(controller, timeout_s=30), running(agent, timeout_s=30):
            started = time.monotonic()

            # 1. Idle: at least a quarter of RAM back within five minutes, then settled.
            async def quarter_back() -> bool:
                readings = [await agent.adapter.read(g) for g in (*names, "idle")]
                return all((r.actual_pages or 0) * PAGE >= RAM_MIB * MIB / 4 for r in readings)

            quarter_s = await poll_until(
                quarter_back, 300, what="a quarter of every idle guest's RAM back", interval_s=1
            )

            def settled() -> bool:
                quiet = time.monotonic() - 25
                return all(targets.seen.get(g) and targets.seen[g][-1][0] < quiet for g in names)

            await poll_until(settled, 420, what="the idle guests settled", interval_s=1)
            idle_mib = {g: targets.allocation_mib(g) for g in (*names, "idle")}
            settled_s = time.monotonic() - started

            # 2. Three workloads grow at once, from their idle allocation.
            async with (
                Memhog(guests["slow"]) as slow,
                Memhog(guests["fast"]) as fast,
                Memhog(guests["doo"]) as doo,
            ):
                hogs = {"slow": slow, "fast": fast, "doo": doo}
                starts = await asyncio.gather(*(ramp(hogs[g], RAMPS_MIB_PER_S[g]) for g in names))
                ramp_start = dict(zip(names, starts, strict=True))
                outcomes = await asyncio.gather(
                    *(hogs[g].wait_for(rf"^memhog (reached {PEAK_MIB}|died)", 60) for g in names)
                )
                await asyncio.sleep(3)
                status = {g: await hogs[g].status() for g in names}
                least_available_mib = {
                    g: min(
                        parse_status(line)["MemAvailable_kb"] / 1024
                        for t, line in hogs[g].lines
                        if t >= ramp_start[g] and line.startswith("memhog held_mib=")
                    )
                    for g in names
                }

                # 3. The workloads end: the rescued guests are not squeezed again.
                for hog in hogs.values():
                    await hog.send(0)
                dropped = time.monotonic()
                await asyncio.sleep(45)
            fleet = controller.fleet
            trouble_floor_mib = {}
            for g in names:
                slot = fleet.slot_of(HOST, g)
                assert slot is not None
                trouble_floor_mib[g] = fleet.trouble_floor_bytes[slot] / MIB
            doo_reading = await agent.adapter.read("doo")
    finally:
        await cancel_and_wait(collector)

    first_deflate_s = {}
    for g in names:
        grown = [t for t, pages, _ in targets.since(g, ramp_start[g])]
        first_deflate_s[g] = grown[0] - ramp_start[g] if grown else float("nan")
    print(
        f"quarter of RAM back after {quarter_s:.0f} s, settled after {settled_s:.0f} s at "
        f"{idle_mib} MiB; first deflate after {first_deflate_s} s of ramp; least "
        f"MemAvailable {least_available_mib} MiB; trouble floors {trouble_floor_mib} MiB"
    )
    for g in names:
        print(g, [(round(t - started, 1), p, r) for t, p, r in targets.seen.get(g, [])][-8:])

    for g in names:
        assert outcomes[names.index(g)] == f"memhog reached {PEAK_MIB}", (g, hogs[g].lines[-10:])
        assert status[g]["oom_kill"] == 0, (g, status[g])
        assert not hogs[g].died(), g
        assert "Out of memory" not in guests[g].console(), g
        # The controller answered the growth, and no later than the memory ran out.
        assert targets.since(g, ramp_start[g]), g
        # A rescued guest keeps a floor of its peak at least, and is not inflated within the
        # hold although its workload is gone.
        assert trouble_floor_mib[g] >= PEAK_MIB, (g, trouble_floor_mib)
        after_drop = targets.since(g, dropped)
        before = targets.since(g, ramp_start[g])
        peak_pages = min(pages for _, pages, _ in before)
        assert all(pages <= peak_pages for _, pages, _ in after_drop), (g, after_drop)
    # Idle guests kept what they were given the whole time, well below their RAM.
    assert idle_mib["idle"] <= 0.75 * RAM_MIB
    # deflate-on-oom: every target after the guest grew leaves it at least what it took.
    doo_targets = targets.since("doo", ramp_start["doo"])
    assert all(
        later <= earlier for (_, earlier, _), (_, later, _) in itertools.pairwise(doo_targets)
    ), doo_targets
    assert doo_reading.actual_pages is not None
    assert doo_reading.actual_pages <= doo_targets[-1][1] + 256
