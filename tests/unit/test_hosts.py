"""Host state: bounded and forgotten like guests, validated host stats, staleness, and reload."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest

from autoscaler.config import load_settings
from autoscaler.fleet import Fleet, HostsFull
from autoscaler.service.cluster import Membership
from autoscaler.service.controller import Controller
from autoscaler.testing import ingest, sample
from tests.helpers.data import stats_message

GIB = 2**30
T0 = 1_700_000_000.0


def host_stats(ts: float, total: float = 16 * GIB, available: float = 8 * GIB) -> bytes:
    return orjson.dumps({"ts": ts, "mem_total_bytes": total, "mem_available_bytes": available})


# -- fleet ---------------------------------------------------------------------------------------


def test_host_columns_grow_by_doubling_not_per_host() -> None:
    fleet = Fleet(max_guests=100_000)
    arrays = set()
    for h in range(20_000):
        fleet.ingest_host(f"h{h}", ts_s=T0, total_bytes=GIB, available_bytes=GIB)
        arrays.add(id(fleet.host_total_bytes))
    assert fleet.host_count == 20_000
    assert len(arrays) <= 10  # 64 → 32768 in 9 doublings; np.append made one per host
    index = fleet._host_index["h19999"]
    assert fleet.hosts[index] == "h19999" and fleet.host_total_bytes[index] == GIB


def test_hosts_are_bounded_and_guests_win_over_hosts_without_guests() -> None:
    fleet = Fleet(max_guests=8, ttl_s=600.0)
    for h in range(8):
        fleet.ingest_host(f"stats-only{h}", ts_s=T0, total_bytes=GIB, available_bytes=GIB)
    with pytest.raises(HostsFull):
        fleet.ingest_host("one-more", ts_s=T0 + 1, total_bytes=GIB, available_bytes=GIB)
    assert fleet.host_count == 8
    # A guest on a new host evicts hosts that only have stats (they come back with the next).
    slot = fleet.slot_for("real", "g", T0 + 2)
    assert fleet.host_id(slot) == "real"
    assert fleet.host_count <= 8


def test_hosts_without_guests_are_forgotten_with_their_last_guest() -> None:
    fleet = Fleet(ttl_s=100.0)
    ingest(fleet, "h1", "g", sample(T0), T0)
    ingest(fleet, "h2", "g", sample(T0), T0)
    fleet.ingest_host("h2", ts_s=T0 + 50, total_bytes=GIB, available_bytes=GIB)
    ingest(fleet, "h3", "g", sample(T0 + 90), T0 + 90)
    gone = fleet.expire(T0 + 120)
    assert sorted(gone) == [("h1", "g"), ("h2", "g")]
    # h1 had no stats: gone with its guest; h2's stats are recent: kept until they expire too.
    assert "h1" not in fleet.hosts and "h2" in fleet.hosts and "h3" in fleet.hosts
    fleet.expire(T0 + 151)
    assert "h2" not in fleet.hosts and fleet.host_count == 1
    # A freed host index is reused, with nothing left over from its former host.
    ingest(fleet, "h4", "g", sample(T0 + 160), T0 + 160)
    assert fleet.host_capacity == 64
    slot = fleet.slot_of("h4", "g")
    assert slot is not None and np.isnan(fleet.host_total_bytes[fleet.host_idx[slot]])


def test_host_stats_fresh_marks_stale_and_missing_host_stats() -> None:
    fleet = Fleet()
    fleet.ingest_host("old", ts_s=T0 - 120, total_bytes=GIB, available_bytes=GIB)
    fleet.ingest_host("new", ts_s=T0 - 5, total_bytes=GIB, available_bytes=GIB)
    ingest(fleet, "none", "g", sample(T0), T0)
    fresh = fleet.host_stats_fresh(T0, 60.0)
    assert fresh.shape == fleet.host_total_bytes.shape and fresh.dtype == np.bool_
    index = fleet._host_index
    assert not fresh[index["old"]] and fresh[index["new"]] and not fresh[index["none"]]
    assert np.count_nonzero(fresh) == 1


def test_membership_owner_cache_is_bounded() -> None:
    membership = Membership("a", "p", cache_size=100)
    membership.handle("p/controller/b/alive", b"online")
    owners = {f"h{i}": membership.owner(f"h{i}") for i in range(1000)}
    assert len(membership._owner) <= 100
    assert all(membership.owner(h) == owner for h, owner in owners.items())


# -- controller ----------------------------------------------------------------------------------


def test_made_up_host_ids_are_bounded_and_counted() -> None:
    controller = Controller(load_settings(None, controller={"max_guests": 100}))
    now = time.time()
    for h in range(150):
        controller.handle_message(f"balloon/v1/host/fake{h}/stats", host_stats(now))
    assert controller.counters["host_stats"] == 100
    assert controller.rejected["too_many_hosts"] == 50
    assert controller.fleet.host_count == 100
    # Guests still get in: hosts with stats only make room for them.
    controller.handle_message("balloon/v1/guest/real/g/stats", stats_message(now))
    assert controller.counters["ingested"] == 1


@pytest.mark.parametrize(
    ("total", "available"),
    [(0, 0), (16 * GIB, 17 * GIB), (16 * GIB, -1)],
)
def test_bad_host_totals_are_rejected(total: float, available: float) -> None:
    controller = Controller(load_settings(None))
    controller.handle_message("balloon/v1/host/h/stats", host_stats(time.time(), total, available))
    assert controller.rejected["bad_value"] == 1
    assert controller.counters["host_stats"] == 0
    assert controller.fleet.host_count == 0


def test_host_stats_from_the_future_are_rejected() -> None:
    controller = Controller(load_settings(None, controller={"max_clock_skew_s": 30.0}))
    controller.handle_message("balloon/v1/host/h/stats", host_stats(time.time() + 23 * 3600))
    controller.handle_message("balloon/v1/host/h/stats", host_stats(time.time() + 10))
    assert controller.rejected["clock_skew"] == 1
    assert controller.counters["host_stats"] == 1


def test_host_stats_of_hosts_owned_by_another_replica_are_dropped() -> None:
    controller = Controller(load_settings(None, controller={"replica_id": "a"}))
    assert controller.membership is not None
    presence = {"state": "online", "ts": time.time(), "ttl_s": 30.0}
    controller.handle_message("balloon/v1/controller/b/alive", orjson.dumps(presence))
    hosts = [f"host{i:02d}" for i in range(24)]
    mine = [h for h in hosts if controller.membership.owns(h)]
    assert 0 < len(mine) < len(hosts)
    now = time.time()
    for host in hosts:
        controller.handle_message(f"balloon/v1/host/{host}/stats", host_stats(now))
    assert controller.counters["host_stats"] == len(mine)
    assert controller.counters["not_owned"] == len(hosts) - len(mine)
    assert sorted(h for h in controller.fleet.hosts if h) == sorted(mine)


def test_reload_applies_emergency_threshold_shares_and_interval() -> None:
    settings = load_settings(None, guards={"shares": {"db": 2000.0}})
    controller = Controller(settings)
    now = time.time()
    for guest in ("db", "web"):
        controller.handle_message(f"balloon/v1/guest/h/{guest}/stats", stats_message(now))
    fleet = controller.fleet
    db, web = fleet.slot_of("h", "db"), fleet.slot_of("h", "web")
    assert db is not None and web is not None
    assert (fleet.shares[db], fleet.shares[web]) == (2000.0, 1000.0)

    controller.reload(
        load_settings(
            None,
            guards={"emergency_swap_in_bps": 2**20, "shares": {"web": 500.0}},
            controller={"interval_s": 3.0},
        )
    )
    assert fleet.guards.emergency_swap_in_bps == 2**20
    assert fleet.tick_interval_s == 3.0
    assert (fleet.shares[db], fleet.shares[web]) == (1000.0, 500.0)
    assert controller.settings.controller.interval_s == 3.0
    controller.handle_message("balloon/v1/guest/h/web2/stats", stats_message(now))
    web2 = fleet.slot_of("h", "web2")
    assert web2 is not None and fleet.shares[web2] == 1000.0
    # The new emergency threshold is the one ingest uses: 2 MiB/s of swap-in is now an emergency.
    first = sample(now, swap_in=0, actual_pages=1000)
    ingest(fleet, "h", "swapper", first, now)
    later = sample(now + 10, swap_in=20 * 2**20, actual_pages=1000)
    assert ingest(fleet, "h", "swapper", later, now + 10).emergency


async def test_tick_loop_follows_a_reloaded_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    controller = Controller(load_settings(None, controller={"interval_s": 3600.0}))
    controller.link.connected.set()
    ticks: list[float] = []

    async def tick_once() -> None:
        ticks.append(time.monotonic())
        if len(ticks) == 1:
            controller.reload(load_settings(None, controller={"interval_s": 0.01}))

    monkeypatch.setattr(controller, "tick_once", tick_once)
    task = asyncio.create_task(controller._tick_loop())
    try:
        for _ in range(200):
            if len(ticks) >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert len(ticks) >= 3  # the second tick came after 0.01 s, not after an hour
