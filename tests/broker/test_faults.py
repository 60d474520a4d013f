"""Faults and bad input: fuzzed payloads, floods of new guests, a failing policy, stale data."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import aiomqtt
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.adapters.dry_run import DryRunAdapter
from autoscaler.config import Settings, load_settings
from autoscaler.policy import Decision, FleetView, Policy
from autoscaler.service.controller import Controller
from autoscaler.stats import STAT_NAMES
from autoscaler.wire import PayloadError, decode_guest_stats
from tests.helpers import Broker, broker_settings, poll_until, running
from tests.helpers.data import stats_message

GIB = 2**30
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=2000, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["ts", "ram_bytes", "num_pages", "actual", "stats", "x"]), json_values
    )
    | json_values
)
def test_parser_only_ever_raises_payload_error(document: Any) -> None:
    try:
        raw = orjson.dumps(document)
    except (TypeError, orjson.JSONEncodeError):
        return
    try:
        sample = decode_guest_stats(raw, now_s=time.time())
    except PayloadError as exc:
        assert exc.reason
        return
    assert sample.ram_bytes >= 4096
    assert not np.any(sample.values < 0)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_parser_survives_random_bytes(raw: bytes) -> None:
    with contextlib.suppress(PayloadError):
        decode_guest_stats(raw, now_s=time.time())


def mutate(rng: random.Random, valid: bytes) -> bytes:
    """One of the classic mutations: bit flips, truncation, splices, type swaps, junk."""
    choice = rng.randrange(6)
    data = bytearray(valid)
    if choice == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if choice == 1:
        return bytes(data[: rng.randrange(len(data))])
    if choice == 2:
        cut = rng.randrange(len(data))
        return bytes(data[:cut] + data[rng.randrange(len(data)) :])
    if choice == 3:
        document = orjson.loads(valid)
        key = rng.choice(["ts", "ram_bytes", "actual", "stats"])
        document[key] = rng.choice([None, "x", -1, 1e308, [], {}, True, 2**62])
        return orjson.dumps(document)
    if choice == 4:
        document = orjson.loads(valid)
        document["stats"][rng.choice(STAT_NAMES)] = rng.choice([-5, "7", 1.5, None, 2**63])
        return orjson.dumps(document)
    return rng.randbytes(rng.randint(0, 200))


def controller_settings(broker: Broker, prefix: str, **controller: Any) -> Settings:
    return broker_settings(
        broker,
        prefix,
        mqtt={"reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        controller={"interval_s": 0.2, **controller},
    )


async def test_100k_fuzzed_payloads_while_valid_guests_are_steered(mosquitto: Broker) -> None:
    prefix = f"fuzz-{uuid.uuid4().hex[:8]}"
    adapter = DryRunAdapter()
    controller = Controller(controller_settings(mosquitto, prefix), adapter=adapter)
    rng = random.Random(1234)
    now = time.time()
    valid = [stats_message(now - 10), stats_message(now - 5)]
    async with running(controller):
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            for g in range(5):  # idle guests: the flood must not change what they are given
                await pub.publish(f"{prefix}/guest/h/valid{g}/stats", valid[0], qos=1)
            for i in range(100_000):
                topic = f"{prefix}/guest/h/fuzz{i % 50}/stats"
                if i % 97 == 0:
                    topic = rng.choice(
                        [
                            f"{prefix}/guest/h/%bad/stats",
                            f"{prefix}/guest/h/x/y/stats",
                            f"{prefix}/guest/{'z' * 129}/g/stats",
                            f"{prefix}/host/h!/stats",
                        ]
                    )
                await pub.publish(topic, mutate(rng, valid[i % 2]))
                if i % 1000 == 0:
                    await asyncio.sleep(0.005)  # let the controller's reader run alongside
            for g in range(5):
                await pub.publish(f"{prefix}/guest/h/valid{g}/stats", valid[1], qos=1)
        await poll_until(
            lambda: all(("h", f"valid{g}") in adapter.targets for g in range(5)),
            20,
            what="a target for each valid guest",
        )
        # QoS 0 floods may be thinned by the broker; wait until nothing more arrives.
        seen = -1
        while seen != controller.counters["messages"]:
            seen = controller.counters["messages"]
            await asyncio.sleep(1.0)

    counters = controller.counters
    accounted = counters["ingested"] + sum(controller.rejected.values()) + counters["host_stats"]
    assert accounted == counters["messages"]
    assert counters["messages"] > 90_000
    assert len(controller.rejected) >= 5  # several distinct reasons counted
    fleet = controller.fleet
    for g in range(5):
        slot = fleet.slot_of("h", f"valid{g}")
        assert slot is not None
        # Their state is exactly what their own two samples say …
        assert fleet.ts_s[slot] == now - 5
        assert fleet.demand_bytes[slot] == 1 * GIB
        assert fleet.interval_s[slot] == 5.0
        # … and each got an inflation paced by its idleness (0.3 % of RAM a second, at most
        # a minute's worth) that keeps its demand plus headroom.
        pages = adapter.targets[("h", f"valid{g}")]
        assert 0 < pages * 4096 <= 0.003 * 4 * GIB * 60 + 4096
        assert 4 * GIB - pages * 4096 >= 1 * GIB + 64 * 2**20


class FailsOnce(Policy):
    """Raises on its first decision, then holds at full RAM."""

    name: ClassVar[str] = "fails-once"

    def __init__(self) -> None:
        self.calls_ = 0

    def decide(self, view: FleetView) -> Decision:
        self.calls_ += 1
        if self.calls_ == 1:
            raise RuntimeError("boom")
        decision = Decision.hold(len(view), "half")
        return Decision(view.ram_bytes / 2, decision.pressure, decision.reason, ("half",))


async def test_a_policy_that_raises_holds_the_tick_and_the_controller_carries_on(
    mosquitto: Broker,
) -> None:
    prefix = f"raise-{uuid.uuid4().hex[:8]}"
    adapter = DryRunAdapter()
    controller = Controller(
        controller_settings(mosquitto, prefix, interval_s=0.3), policy=FailsOnce(), adapter=adapter
    )
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        await pub.publish(
            f"{prefix}/guest/h/g/stats", stats_message(time.time()), qos=1, retain=True
        )
    async with running(controller):
        await poll_until(lambda: ("h", "g") in adapter.targets, 10, what="a target for h/g")
    assert controller.counters["policy_errors"] == 1
    assert adapter.targets[("h", "g")] > 0
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:  # clear the retained message
        await pub.publish(f"{prefix}/guest/h/g/stats", b"", retain=True)


async def test_flood_of_new_guest_ids_is_bounded_and_known_guests_are_served(
    mosquitto: Broker,
) -> None:
    prefix = f"flood-{uuid.uuid4().hex[:8]}"
    adapter = DryRunAdapter()
    controller = Controller(controller_settings(mosquitto, prefix, max_guests=50), adapter=adapter)
    now = time.time()
    async with running(controller):
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            await pub.publish(f"{prefix}/guest/h/known/stats", stats_message(now - 10))
            await poll_until(
                lambda: controller.counters["ingested"] >= 1, 10, what="the first known sample"
            )
            for i in range(5000):
                await pub.publish(f"{prefix}/guest/h/new{i}/stats", stats_message(now - 10))
            await pub.publish(f"{prefix}/guest/h/known/stats", stats_message(now - 5))
            await poll_until(
                lambda: controller.counters["messages"] >= 5002, 30, what="all 5002 messages"
            )
        await poll_until(
            lambda: ("h", "known") in adapter.targets, 10, what="a target for the known guest"
        )
    assert len(controller.fleet) == 50
    assert controller.fleet.capacity == 50
    assert controller.rejected["too_many_guests"] == 5000 - 49


class StepsEveryTick(Policy):
    """Proposes a different target on every tick: any tick acted on stale data would show."""

    name: ClassVar[str] = "steps"

    def __init__(self) -> None:
        self.ticks_ = 0

    def decide(self, view: FleetView) -> Decision:
        self.ticks_ += 1
        hold = Decision.hold(len(view))
        target = view.ram_bytes - (self.ticks_ % 4 + 1) * 64 * 2**20
        return Decision(target, hold.pressure, hold.reason, ("step",))


async def test_broker_restart_no_target_from_stale_data_then_resume(
    private_mosquitto: Broker,
) -> None:
    prefix = f"stale-{uuid.uuid4().hex[:8]}"
    adapter = DryRunAdapter()
    controller = Controller(
        controller_settings(private_mosquitto, prefix, stale_after_s=1.0, interval_s=0.2),
        policy=StepsEveryTick(),
        adapter=adapter,
    )

    async def publish_until(condition: Callable[[], bool], what: str) -> None:
        """Publish fresh stats every 0.1 s until ``condition()``."""
        async with aiomqtt.Client(private_mosquitto.host, private_mosquitto.port) as pub:

            async def published() -> bool:
                topic = f"{prefix}/guest/h/g/stats"
                await pub.publish(topic, stats_message(time.time()), qos=1)
                return condition()

            await poll_until(published, 20, what=what, interval_s=0.1)

    async with running(controller):
        await publish_until(
            lambda: controller.counters["targets_applied"] >= 2, "two targets from fresh data"
        )
        private_mosquitto.stop()
        await asyncio.sleep(1.2)  # the last sample is now older than stale_after_s
        # A tick that saw it stale: every tick before it, on fresh data, has applied its target.
        await poll_until(
            lambda: controller.last_tick is not None and controller.last_tick.stale == 1,
            10,
            what="a tick that finds the guest stale",
        )
        frozen = controller.counters["targets_applied"]
        await asyncio.sleep(1.5)  # ticks keep running on stale data: no target may come of them
        assert controller.counters["targets_applied"] == frozen
        assert controller.last_tick is not None and controller.last_tick.stale == 1

        restarted = time.monotonic()
        private_mosquitto.start()
        await asyncio.wait_for(controller.link.connected.wait(), 10)
        assert time.monotonic() - restarted < 10
        await publish_until(
            lambda: controller.counters["targets_applied"] > frozen, "a target after the restart"
        )
    assert controller.counters["targets_applied"] > frozen


def test_an_unexpected_error_in_ingest_is_counted_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    controller = Controller(load_settings(None))

    def broken(*args: object) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(controller.fleet, "slot_for", broken)
    controller.handle_message("balloon/v1/guest/h/g/stats", stats_message(time.time(), GIB))
    assert controller.rejected["internal_error"] == 1
    monkeypatch.undo()
    controller.handle_message("balloon/v1/guest/h/g/stats", stats_message(time.time(), GIB))
    assert controller.counters["ingested"] == 1


def gauges(ts: float, **values: int) -> bytes:
    stats = {name.replace("_", "-"): value for name, value in values.items()}
    return orjson.dumps({"ts": ts, "ram_bytes": 4 * GIB, "actual": 0, "stats": stats})


async def test_stats_that_contradict_their_total_are_rejected_and_never_steer(
    mosquitto: Broker,
) -> None:
    """More available, or free plus caches, than the guest's total is no guest's memory: the
    sample is rejected as bad_value, the guest is never tracked nor given a target."""
    prefix = f"contradict-{uuid.uuid4().hex[:8]}"
    adapter = DryRunAdapter()
    controller = Controller(controller_settings(mosquitto, prefix), adapter=adapter)
    now = time.time()
    bad = [
        gauges(now - 3, total_memory=2 * GIB, available_memory=4 * GIB),
        gauges(now - 2, total_memory=2 * GIB, free_memory=GIB + 1, disk_caches=GIB),
        gauges(now - 1, free_memory=3 * GIB, disk_caches=2 * GIB),  # beyond ram_bytes
    ]
    async with running(controller):
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            for payload in bad:
                await pub.publish(f"{prefix}/guest/h/liar/stats", payload, qos=1)
            for k in range(2):
                await pub.publish(f"{prefix}/guest/h/idle/stats", stats_message(now - 2 + k))
        await poll_until(lambda: ("h", "idle") in adapter.targets, 10, what="a target for idle")
    assert controller.rejected["bad_value"] == len(bad)
    assert controller.fleet.slot_of("h", "liar") is None
    assert ("h", "liar") not in adapter.targets
