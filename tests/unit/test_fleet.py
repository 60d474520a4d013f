"""Fleet state: rates, reboots, demand under both balloon modes, bounds and history."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoscaler.fleet import (
    H_DEMAND,
    H_TS,
    U_CRITICAL,
    U_EXHAUSTING,
    U_SELF_DEFLATE,
    Fleet,
    FleetFull,
)
from autoscaler.guards import trouble_floor
from autoscaler.testing import OutOfOrder, ingest, sample

GIB = 2**30
MIB = 2**20
T0 = 1_700_000_000.0


def test_rates_from_deltas_and_gauges_have_none() -> None:
    fleet = Fleet(epoch_s=T0)
    ingest(fleet, "h", "g", sample(T0, swap_in=0, major_faults=100, free_memory=GIB), T0)
    result = ingest(
        fleet,
        "h",
        "g",
        sample(T0 + 10, swap_in=10 * 2**20, major_faults=600, free_memory=GIB),
        T0 + 10,
    )
    slot = result.slot
    assert fleet.rates[slot, 0] == pytest.approx(2**20)  # swap-in bytes/s
    assert fleet.rates[slot, 2] == pytest.approx(50.0)  # major faults/s
    assert math.isnan(fleet.rates[slot, 4])  # free-memory is a gauge
    assert not result.emergency and not result.rebooted


def test_counter_going_down_is_a_reboot_not_a_negative_rate() -> None:
    fleet = Fleet()
    ingest(fleet, "h", "g", sample(T0, major_faults=1000, oom_kills=3), T0)
    result = ingest(fleet, "h", "g", sample(T0 + 5, major_faults=10, oom_kills=0), T0 + 5)
    assert result.rebooted
    assert not result.emergency
    assert np.isnan(fleet.rates[result.slot]).all()


@pytest.mark.parametrize(
    ("later", "emergency"),
    [
        ({"oom_kills": 1}, True),
        ({"alloc_stalls": 4}, True),
        ({"swap_in": 100 * 64 * 2**20}, True),  # 100 s × 64 MiB/s … over 10 s
        ({"swap_in": 10 * 2**20}, False),
        ({}, False),
    ],
)
def test_emergency_signals(later: dict[str, float], emergency: bool) -> None:
    fleet = Fleet()  # emergency swap-in: the default 64 MiB/s
    base = {"oom_kills": 0, "alloc_stalls": 0, "swap_in": 0, "actual_pages": 1000}
    ingest(fleet, "h", "g", sample(T0, **base), T0)
    result = ingest(fleet, "h", "g", sample(T0 + 10, **{**base, **later}), T0 + 10)
    assert result.emergency is emergency


def test_a_guest_without_a_balloon_has_no_emergency_but_remembers_the_trouble() -> None:
    fleet = Fleet()
    ingest(fleet, "h", "g", sample(T0, oom_kills=0, total_memory=GIB, available_memory=GIB), T0)
    result = ingest(
        fleet, "h", "g", sample(T0 + 2, oom_kills=1, total_memory=GIB, available_memory=GIB), T0 + 2
    )
    assert not result.emergency
    assert fleet.trouble_s[result.slot] == T0 + 2


def ramp(fleet: Fleet, available_mib: list[float], *, interval_s: float = 2.0) -> list[bool]:
    """A 1 GiB guest squeezed to 512 MiB (no deflate-on-oom), sampled every ``interval_s``."""
    flags = []
    for i, available in enumerate(available_mib):
        values = {"ram_bytes": GIB, "actual_pages": 512 * MIB // 4096, "total_memory": 512 * MIB}
        s = sample(T0 + i * interval_s, available_memory=available * MIB, **values)
        flags.append(ingest(fleet, "h", "g", s, T0 + i * interval_s).emergency)
    return flags


def test_memory_running_out_before_the_next_tick_is_an_emergency() -> None:
    fleet = Fleet()
    # Demand grows 32 MiB/s: 336 MiB left lasts 10.5 s, less than the 14 s the controller takes
    # to answer (2 s sampling + 10 s tick + 2 s device).
    assert ramp(fleet, [400, 400, 336, 264, 200]) == [False, False, True, True, True]
    slot = fleet.slot_of("h", "g")
    assert slot is not None
    assert fleet.urgent[slot] == U_EXHAUSTING
    assert fleet.interval_s[slot] == pytest.approx(2.0)
    assert fleet.growth_bps[slot] == pytest.approx(36 * MIB, rel=1e-3)


def test_slow_growth_and_noise_are_not_emergencies() -> None:
    assert not any(ramp(Fleet(), [400, 399, 401, 396, 394, 390]))


def test_available_memory_under_the_critical_level_is_an_emergency() -> None:
    fleet = Fleet()
    assert ramp(fleet, [30], interval_s=2.0) == [True]
    slot = fleet.slot_of("h", "g")
    assert slot is not None and fleet.urgent[slot] == U_CRITICAL


def test_trouble_raises_the_floor_to_the_peak_plus_headroom_and_it_decays() -> None:
    fleet = Fleet()
    ramp(fleet, [400, 400, 336, 264, 200])
    slot = fleet.slot_of("h", "g")
    assert slot is not None
    settings = fleet.guards
    floor = fleet.trouble_floor_bytes[slot]
    demand = fleet.demand_bytes[slot]
    assert floor == pytest.approx(min(demand + settings.headroom_max_share * GIB, GIB))
    now = float(fleet.trouble_s[slot])
    held = trouble_floor(np.array([floor]), np.array([now]), now + 899, settings)
    assert held.tolist() == [floor]
    later = now + settings.trouble_hold_s + settings.trouble_half_life_s
    assert trouble_floor(np.array([floor]), np.array([now]), later, settings)[0] == floor / 2


def test_a_guest_deflating_its_own_balloon_is_in_trouble() -> None:
    fleet = Fleet()
    pages = 512 * MIB // 4096
    values = {"ram_bytes": GIB, "total_memory": GIB, "available_memory": 100 * MIB}
    s = sample(T0, actual_pages=pages, **values)
    s.num_pages = float(pages)
    ingest(fleet, "h", "g", s, T0)
    # deflate-on-oom: the guest took 100 MiB back from the balloon; the target is unchanged.
    s = sample(T0 + 2, actual_pages=pages - 100 * MIB // 4096, **values)
    s.num_pages = float(pages)
    result = ingest(fleet, "h", "g", s, T0 + 2)
    assert result.emergency
    assert fleet.urgent[result.slot] == U_SELF_DEFLATE
    # The floor is at least what the guest took.
    assert fleet.trouble_floor_bytes[result.slot] >= 612 * MIB


def test_demand_excludes_balloon_with_and_without_deflate_on_oom() -> None:
    fleet = Fleet()
    balloon_pages = GIB // 4096
    # deflate-on-oom: MemTotal stays 4 GiB; 1 GiB ballooned counts as used; 1 GiB really used.
    doo = ingest(
        fleet,
        "h",
        "doo",
        sample(T0, actual_pages=balloon_pages, total_memory=4 * GIB, available_memory=2 * GIB),
        T0,
    ).slot
    # without it: MemTotal shrinks to 3 GiB (minus 50 MiB the kernel reserved at boot).
    reserved = 50 * 2**20
    plain = ingest(
        fleet,
        "h",
        "plain",
        sample(
            T0,
            actual_pages=balloon_pages,
            total_memory=3 * GIB - reserved,
            available_memory=2 * GIB - reserved,
        ),
        T0,
    ).slot
    assert fleet.demand_bytes[doo] == pytest.approx(GIB)
    assert fleet.demand_bytes[plain] == pytest.approx(GIB)


def test_demand_without_memavailable_uses_free_plus_cache() -> None:
    fleet = Fleet()
    slot = ingest(
        fleet,
        "h",
        "old-kernel",
        sample(T0, total_memory=4 * GIB, free_memory=GIB, disk_caches=GIB),
        T0,
    ).slot
    assert fleet.demand_bytes[slot] == pytest.approx(2 * GIB)


def test_out_of_order_samples_are_refused() -> None:
    fleet = Fleet()
    ingest(fleet, "h", "g", sample(T0 + 10), T0 + 10)
    with pytest.raises(OutOfOrder):
        ingest(fleet, "h", "g", sample(T0 + 10), T0 + 11)
    with pytest.raises(OutOfOrder):
        ingest(fleet, "h", "g", sample(T0), T0 + 11)


def test_a_stored_ts_ahead_of_the_clock_gives_way_to_the_corrected_clock() -> None:
    fleet = Fleet()
    ingest(fleet, "h", "g", sample(T0, oom_kills=0, actual_pages=1000), T0)
    # A clock 20 s fast, once.
    ingest(fleet, "h", "g", sample(T0 + 25, oom_kills=0, actual_pages=1000), T0 + 5)
    result = ingest(fleet, "h", "g", sample(T0 + 10, oom_kills=1, actual_pages=1000), T0 + 10)
    assert fleet.ts_s[result.slot] == T0 + 10
    assert result.emergency  # the OOM kill in the corrected sample is seen at once
    assert np.all(np.isnan(fleet.rates[result.slot]))  # no time base across the jump
    with pytest.raises(OutOfOrder):  # a duplicate is still a duplicate
        ingest(fleet, "h", "g", sample(T0 + 10, oom_kills=1), T0 + 10)
    assert fleet.sample_age_s(np.array([result.slot]), T0 + 70)[0] == pytest.approx(60)


def test_a_sample_ages_by_its_arrival_too() -> None:
    fleet = Fleet()
    slot = ingest(fleet, "h", "g", sample(T0 + 25), T0).slot
    assert fleet.sample_age_s(np.array([slot]), T0 + 60)[0] == pytest.approx(60)


def test_max_guests_bounds_memory_and_keeps_known_guests() -> None:
    fleet = Fleet(max_guests=8, initial_capacity=2, ttl_s=600)
    for i in range(8):
        ingest(fleet, "h", f"g{i}", sample(T0), T0)
    capacity = fleet.capacity
    with pytest.raises(FleetFull):
        ingest(fleet, "h", "newcomer", sample(T0), T0 + 1)
    assert fleet.capacity == capacity == 8
    ingest(fleet, "h", "g3", sample(T0 + 5), T0 + 5)  # known guests are still served
    assert len(fleet) == 8


def test_silent_guests_expire_and_slots_are_reused_with_a_new_uid() -> None:
    fleet = Fleet(max_guests=2, ttl_s=60)
    old = ingest(fleet, "h", "old", sample(T0), T0).slot
    old_uid = fleet.uid[old]
    ingest(fleet, "h", "other", sample(T0 + 100), T0 + 100)
    # "old" has been silent for 100 s > ttl: the newcomer takes its slot.
    slot = ingest(fleet, "h", "new", sample(T0 + 100), T0 + 100).slot
    assert slot == old
    assert fleet.uid[slot] != old_uid
    assert fleet.slot_of("h", "old") is None
    assert np.isnan(fleet.ordered_history(np.array([slot]))[0, :-1]).all()


def test_history_is_a_bounded_window_oldest_first() -> None:
    fleet = Fleet(history_len=4, epoch_s=T0)
    for k in range(6):
        slot = ingest(
            fleet,
            "h",
            "g",
            sample(T0 + k, total_memory=4 * GIB, available_memory=4 * GIB - k),
            T0 + k,
        ).slot
    window = fleet.ordered_history(np.array([slot]))[0]
    assert window[:, H_TS].tolist() == [2, 3, 4, 5]
    assert window[:, H_DEMAND].tolist() == [2, 3, 4, 5]
    ingest(fleet, "h", "young", sample(T0), T0)
    young = fleet.ordered_history(np.array([fleet.slot_of("h", "young")]))[0]
    assert np.isnan(young[:3]).all() and young[3, H_TS] == 0


def test_batch_applies_repeated_guests_in_order_and_drops_older_samples() -> None:
    fleet = Fleet()
    a = fleet.slot_for("h", "a", T0)
    b = fleet.slot_for("h", "b", T0)
    swap = np.full((4, 16), np.nan)
    swap[:, 0] = [0, 0, 10 * 2**20, 5]  # a: 0 → 10 MiB in 10 s; b: 0 then an older sample
    result = fleet.ingest_batch(
        np.array([a, b, a, b]),
        ts_s=np.array([T0, T0 + 10, T0 + 10, T0 + 5]),
        ram_bytes=np.full(4, 4.0 * GIB),
        num_pages=np.full(4, np.nan),
        actual_pages=np.zeros(4),
        values=swap,
        recv_s=T0 + 10,
    )
    assert (result.stored, result.out_of_order) == (3, 1)
    assert fleet.rates[a, 0] == pytest.approx(2**20)
    assert fleet.ts_s[b] == T0 + 10
    assert fleet.hist_count[a] == 2 and fleet.hist_count[b] == 1


def test_a_growing_guest_is_not_idle() -> None:
    idle, growing = Fleet(), Fleet()
    ramp(idle, [400, 400, 399, 399])
    ramp(growing, [400, 400, 399, 370])  # 29 MiB in 2 s
    for fleet, since_s in ((idle, T0), (growing, T0 + 6)):
        slot = fleet.slot_of("h", "g")
        assert slot is not None
        assert fleet.since_s[slot] == since_s  # idleness, which paces inflation, restarts
