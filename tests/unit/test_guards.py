"""Guards: every proposal is clamped, given headroom, paced, dead-banded, page-aligned, and stale
data frozen.

The guards run with the shipped defaults; only the host-budget tests, which isolate that rule
(off by default), switch the headroom (``NO_HEADROOM``) and the inflation pace (``UNPACED``) off.
The defaults as a whole are tested on real guests in ``test_safe_defaults.py``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from autoscaler.config import GuardSettings
from autoscaler.fleet import Fleet
from autoscaler.guards import GuardedTargets, apply_guards, emergency_pages, pages_for_allocation
from autoscaler.policy import FleetView
from autoscaler.stats import MAX_NUM_PAGES
from autoscaler.testing import ingest, sample
from autoscaler.tick import TickDriver, fleet_view
from policies.threshold import ThresholdPolicy

GIB = 2**30
MIB = 2**20
PAGE = 4096
T0 = 1_700_000_000.0
NO_HEADROOM = {"headroom_min_bytes": 0, "prior_growth_bps": 0.0, "headroom_max_share": 0.0}
UNPACED = {"max_inflate_bps": 64.0 * GIB, "max_inflate_share_per_s": 1.0}


def view_of(*guests: Mapping[str, float], now_s: float = T0 + 1, **guards: float) -> FleetView:
    fleet = Fleet(epoch_s=T0, guards=GuardSettings(**guards))
    for i, guest in enumerate(guests):
        guest = dict(guest)
        ts = guest.pop("ts", T0)
        target = guest.pop("target_pages", None)
        slot = ingest(fleet, "h", f"g{i}", sample(ts, **guest), ts).slot
        if target is not None:
            fleet.target_pages[slot] = target
    return fleet_view(fleet, now_s)


def guard(view: FleetView, proposed: Sequence[float], **settings: float) -> GuardedTargets:
    return apply_guards(
        view, np.asarray(proposed, dtype=float), GuardSettings(**settings), stale_after_s=60
    )


def test_hold_is_no_change() -> None:
    result = guard(view_of({}), [np.nan])
    assert result.rows.size == 0


def test_floor_and_ceiling() -> None:
    # Three guests squeezed to 400-600 MiB asking for nothing (within a minute's pace of their
    # floor), and one asking for twice its RAM.
    squeezed = [
        {"ram_bytes": ram, "actual_pages": (ram - alloc) // PAGE}
        for ram, alloc in ((1 * GIB, 400 * MIB), (4 * GIB, 600 * MIB), (16 * GIB, 600 * MIB))
    ]
    view = view_of(*squeezed, {"ram_bytes": 4 * GIB}, now_s=T0 + 60)
    result = guard(view, [0.0, 0.0, 0.0, 8 * GIB])
    # The floor is max(256 MiB, 10 % of RAM): 256 MiB, 410 MiB; the 16 GiB guest is already
    # below its 1.6 GiB floor and is raised to it; the last guest cannot exceed its RAM.
    assert result.rows.tolist() == [0, 1, 2]
    floors = [256 * MIB, 0.1 * 4 * GIB, 0.1 * 16 * GIB]
    rams = [1 * GIB, 4 * GIB, 16 * GIB]
    assert result.num_pages.tolist() == [
        int((ram - floor) // PAGE) for ram, floor in zip(rams, floors, strict=True)
    ]


@pytest.mark.parametrize("idle_s", [5.0, 10.0])
def test_inflation_is_paced_per_second_of_idleness_and_deflation_is_not(idle_s: float) -> None:
    guests = ({"ram_bytes": 4 * GIB}, {"ram_bytes": 4 * GIB, "actual_pages": 3 * GIB // PAGE})
    # The guests were first seen at T0: idleness is observed from then.
    view = view_of(*guests, now_s=T0 + idle_s)
    result = guard(view, [1 * GIB, 4 * GIB])
    # Inflate: min(32 MiB/s, 0.3 % of RAM per second) for each second of idleness, whatever
    # the tick interval; twice the idleness, twice the step.
    assert result.num_pages[0] == int(0.003 * 4 * GIB * idle_s) // PAGE
    # Deflate: straight back to full RAM.
    assert result.num_pages[1] == 0


def test_idleness_counts_at_most_a_minute_and_restarts_at_each_move() -> None:
    fleet = Fleet(epoch_s=T0)
    slot = ingest(fleet, "h", "g", sample(T0, ram_bytes=4 * GIB), T0).slot
    settings = GuardSettings()
    # An hour of idleness is worth a minute (the reaction time, 10 + 10 + 2 s, is shorter).
    view = fleet_view(fleet, T0 + 3600)
    assert view.reaction_s.tolist() == [22.0]
    pages = apply_guards(view, np.array([1.0 * GIB]), settings, stale_after_s=1e9).num_pages
    assert pages.tolist() == [int(0.003 * 4 * GIB * 60) // PAGE]
    fleet.commit_target(slot, int(fleet.uid[slot]), int(pages[0]), T0 + 3600)
    assert (
        apply_guards(
            fleet_view(fleet, T0 + 3600), np.array([1.0 * GIB]), settings, stale_after_s=1e9
        ).rows.size
        == 0
    )


def test_dead_band_skips_tiny_moves_against_the_last_target() -> None:
    view = view_of({"ram_bytes": 4 * GIB, "target_pages": 1000}, now_s=T0 + 60)
    # 4 MiB away from the current target: inside the 16 MiB / 1% dead band.
    target_now = 4 * GIB - 1000 * PAGE
    assert guard(view, [target_now - 4 * MIB]).rows.size == 0
    assert guard(view, [target_now - 100 * MIB]).rows.size == 1


def test_stale_guests_are_frozen() -> None:
    view = view_of({"ts": T0 - 3600}, {}, now_s=T0 + 30)
    result = guard(view, [2 * GIB, 2 * GIB])
    assert result.rows.tolist() == [1]
    assert result.stale == 1


def test_allocation_rounds_in_the_guests_favour() -> None:
    ram = np.array([4 * GIB], dtype=float)
    # 100 bytes short of a whole page: the balloon gets one page less, the guest a bit more.
    pages = pages_for_allocation(ram, np.array([4 * GIB - 10 * PAGE - 100], dtype=float))
    assert pages.tolist() == [10]


def test_num_pages_is_bounded_to_u32() -> None:
    ram = np.array([2**50], dtype=float)
    assert pages_for_allocation(ram, np.array([0.0])).tolist() == [MAX_NUM_PAGES]
    assert pages_for_allocation(ram, np.array([2.0**51])).tolist() == [0]


def test_emergency_gives_a_share_back_capped_at_ram() -> None:
    view = view_of(
        {"ram_bytes": 8 * GIB, "actual_pages": 4 * GIB // PAGE},
        {"ram_bytes": 8 * GIB, "actual_pages": 1 * GIB // PAGE},
    )
    pages = emergency_pages(view, GuardSettings())  # a quarter of RAM
    assert pages.tolist() == [2 * GIB // PAGE, 0]


def test_emergency_gives_at_least_demand_plus_headroom() -> None:
    # 8 GiB guest squeezed to 2 GiB with 1.9 GiB of demand that grew 64 MiB/s.
    fleet = Fleet(epoch_s=T0)
    values = {"ram_bytes": 8 * GIB, "actual_pages": 6 * GIB // PAGE, "total_memory": 2 * GIB}
    ingest(fleet, "h", "g", sample(T0, available_memory=2 * GIB - 1.6 * GIB, **values), T0)
    ingest(fleet, "h", "g", sample(T0 + 5, available_memory=0.1 * GIB, **values), T0 + 5)
    view = fleet_view(fleet, T0 + 5)
    assert view.growth_bps[0] == pytest.approx(0.3 * GIB / 5)
    pages = emergency_pages(
        view, GuardSettings(emergency_deflate_share=0.05, emergency_deflate_bytes=0)
    )
    alloc = 8 * GIB - pages[0] * PAGE
    # 0.4 GiB more is the share asked for here; the headroom asks for more: 61 MiB/s ×
    # (5 s sampling + 10 s tick + 2 s device) × 1.5.
    headroom = 0.3 * GIB / 5 * 17 * 1.5
    assert view.headroom_bytes[0] == pytest.approx(headroom)
    assert alloc == pytest.approx(1.9 * GIB + headroom, abs=PAGE)


def test_any_proposal_lands_within_bounds() -> None:
    rng = np.random.default_rng(1)
    guests = [
        {
            "ram_bytes": float(rng.choice([1, 4, 64])) * GIB,
            "actual_pages": float(rng.integers(0, 1000)),
        }
        for _ in range(200)
    ]
    view = view_of(*guests, now_s=T0 + 30)
    proposed = rng.uniform(-10 * GIB, 100 * GIB, size=200)
    proposed[::7] = np.nan
    settings = GuardSettings()
    result = apply_guards(view, proposed, settings, stale_after_s=60)
    rows = result.rows
    ram = view.ram_bytes[rows]
    alloc = ram - result.num_pages * PAGE
    floor = np.maximum(settings.floor_bytes, settings.floor_share * ram)
    need = np.minimum(view.demand_bytes[rows] + view.headroom_bytes[rows], ram)
    assert np.all(alloc <= ram)
    assert np.all(alloc >= np.minimum(np.fmax(floor, need), view.alloc_bytes[rows]) - PAGE)
    step = np.minimum(settings.max_inflate_bps, settings.max_inflate_share_per_s * ram) * 30
    assert np.all(view.alloc_bytes[rows] - alloc <= step + PAGE)
    # A held guest moves only to keep its headroom or floor: never down.
    held = np.isin(rows, np.arange(0, 200, 7))
    assert np.all(alloc[held] >= view.alloc_bytes[rows][held])


def budget_view(shares: dict[str, float] | None = None):  # type: ignore[no-untyped-def]
    """Host h: 16 GiB, 15 GiB used; three 4 GiB guests with 1, 2 and 3.9 GiB of demand."""
    fleet = Fleet(epoch_s=T0, shares=shares)
    for name, demand in (("a", 1 * GIB), ("b", 2 * GIB), ("c", 3.9 * GIB)):
        ingest(
            fleet,
            "h",
            name,
            sample(T0, total_memory=4 * GIB, available_memory=4 * GIB - demand),
            T0,
        )
    ingest(fleet, "other", "d", sample(T0, total_memory=4 * GIB, available_memory=3 * GIB), T0)
    fleet.ingest_host("h", ts_s=T0, total_bytes=16 * GIB, available_bytes=1 * GIB)
    return fleet_view(fleet, T0 + 1)


def budget_settings(**extra: float) -> GuardSettings:
    options: dict[str, float] = {
        "host_budget_share": 0.8,
        "host_budget_headroom_share": 0.1,
        "floor_bytes": 0,
        "floor_share": 0.0,
        **UNPACED,
        **NO_HEADROOM,
    }
    return GuardSettings(**{**options, **extra})


def test_host_budget_reclaims_spare_memory_in_proportion() -> None:
    view = budget_view()
    result = apply_guards(view, np.full(4, np.nan), budget_settings(), stale_after_s=60)
    # Used 15 GiB > 0.8 × 16 = 12.8 GiB: 2.2 GiB to take back from host h only.
    taken = {
        view.guest_id(r): (4 * GIB - (4 * GIB - p * PAGE))
        for r, p in zip(result.rows.tolist(), result.num_pages.tolist(), strict=True)
    }
    assert set(taken) == {"a", "b"}  # "c" has no spare above 3.9 × 1.1; "d" has no host stats
    assert sum(taken.values()) == pytest.approx(2.2 * GIB, abs=2 * PAGE)
    # Spare: a = 4 − 1.1 = 2.9 GiB, b = 4 − 2.2 = 1.8 GiB: taken in that ratio.
    assert taken["a"] / taken["b"] == pytest.approx(2.9 / 1.8, rel=1e-3)
    assert result.guard.tolist() == [4, 4]


def test_host_budget_honours_shares_and_never_starves() -> None:
    view = budget_view(shares={"a": 4000})
    result = apply_guards(view, np.full(4, np.nan), budget_settings(), stale_after_s=60)
    alloc = {
        view.guest_id(r): 4 * GIB - p * PAGE
        for r, p in zip(result.rows.tolist(), result.num_pages.tolist(), strict=True)
    }
    # b has a quarter of a's shares: it gives up more, but never below 2.2 GiB.
    assert 4 * GIB - alloc["b"] > 4 * GIB - alloc["a"]
    assert alloc["b"] >= 2.2 * GIB - PAGE
    # Even a huge overshoot leaves every guest at demand + headroom at least.
    tight = apply_guards(
        view, np.full(4, np.nan), budget_settings(host_budget_share=0.1), stale_after_s=60
    )
    for r, p in zip(tight.rows.tolist(), tight.num_pages.tolist(), strict=True):
        assert 4 * GIB - p * PAGE >= 1.1 * view.demand_bytes[r] - PAGE


def test_host_budget_off_by_default() -> None:
    view = budget_view()
    assert apply_guards(view, np.full(4, np.nan), GuardSettings(), stale_after_s=60).rows.size == 0


def test_a_target_lost_on_the_way_is_sent_again() -> None:
    """The device reports (after our command) a target other than ours: ours did not arrive."""
    fleet = Fleet(epoch_s=T0)
    slot = ingest(fleet, "h", "g", sample(T0, total_memory=4 * GIB, available_memory=3 * GIB), T0)
    unpaced = GuardSettings(**UNPACED)

    fleet.commit_target(slot.slot, int(fleet.uid[slot.slot]), 52428, T0 + 1)
    proposed = np.array([4 * GIB - 52428 * PAGE], dtype=float)
    # A sample from before the command still shows the old target: not believed, nothing to do.
    assert (
        apply_guards(fleet_view(fleet, T0 + 1.5), proposed, unpaced, stale_after_s=60).rows.size
        == 0
    )
    # A sample taken after it still says 0 (a restarted VM): the target goes out again.
    restarted = sample(T0 + 2, total_memory=4 * GIB, available_memory=3 * GIB)
    restarted.num_pages = 0.0
    ingest(fleet, "h", "g", restarted, T0 + 2)
    again = apply_guards(fleet_view(fleet, T0 + 3), proposed, unpaced, stale_after_s=60)
    assert again.num_pages.tolist() == [52428]


def test_an_emergency_deflate_the_balloon_has_not_reached_yet_is_not_undone() -> None:
    fleet = Fleet(epoch_s=T0)
    squeezed = {"ram_bytes": GIB, "actual_pages": 768 * MIB // PAGE, "total_memory": 256 * MIB}
    s = sample(T0, available_memory=200 * MIB, **squeezed)
    s.num_pages = 768 * MIB // PAGE
    slot = ingest(fleet, "h", "g", s, T0).slot
    # Demand jumps: the emergency path gives 512 MiB back …
    ingest(fleet, "h", "g", sample(T0 + 2, available_memory=40 * MIB, **squeezed), T0 + 2)
    emergency = TickDriver(fleet, ThresholdPolicy(), GuardSettings(), stale_after_s=60).emergency(
        [slot], T0 + 2
    )
    assert emergency and emergency[0].target_bytes >= 768 * MIB
    fleet.commit_target(slot, int(fleet.uid[slot]), emergency[0].num_pages, T0 + 2)
    # … and a sample taken before the agent applied it still shows the old balloon and target,
    # with memory to spare: the tick must not take the emergency back (nor anything, in the hold).
    s = sample(T0 + 3, available_memory=120 * MIB, **squeezed)
    s.num_pages = 768 * MIB // PAGE
    ingest(fleet, "h", "g", s, T0 + 3)
    proposed = np.array([200.0 * MIB])
    result = apply_guards(fleet_view(fleet, T0 + 30), proposed, GuardSettings(), stale_after_s=60)
    assert all(pages <= emergency[0].num_pages for pages in result.num_pages.tolist())
