"""The baseline policies (static, oVirt MOM, Proxmox VE, Kubernetes VPA) on worked examples.

Every expected number is worked out by hand in a comment next to it, from the formulas in each
policy's module docstring (which cites the original source).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from autoscaler.fleet import Fleet
from autoscaler.policy import Decision, Policy
from autoscaler.stats import StatsSample
from autoscaler.testing import ingest, parametrize_policy_checks, sample
from autoscaler.tick import fleet_view
from policies.mom import MomPolicy
from policies.proxmox import ProxmoxPolicy
from policies.static import StaticPolicy
from policies.vpa import VpaPolicy

GIB = 2**30
MIB = 2**20
HOUR = 3600.0
DAY = 86_400.0
T0 = 1_700_006_400.0  # 19676 × 86400: midnight UTC, so VPA's daily windows start at T0


def guest(
    ts: float, *, ram: float, alloc: float, available: float | None = None, **stats: float
) -> StatsSample:
    """A sample of a guest with ``alloc`` bytes of its ``ram`` (balloon removed from MemTotal)."""
    if available is not None:
        stats["available_memory"] = available
    return sample(ts, ram_bytes=ram, actual_pages=(ram - alloc) / 4096, total_memory=alloc, **stats)


def decide(
    policy: Policy,
    guests: dict[str, StatsSample],
    hosts: dict[str, tuple[float, float]],
    shares: dict[str, float] | None = None,
) -> tuple[Decision, list[str]]:
    """One tick over guests ``"host/guest"``; ``hosts`` maps a host to (total, available)."""
    fleet = Fleet(epoch_s=T0, shares=shares)
    for host, (total, available) in hosts.items():
        fleet.ingest_host(host, ts_s=T0, total_bytes=total, available_bytes=available)
    for key, stats in guests.items():
        host, _, name = key.partition("/")
        ingest(fleet, host, name, stats, stats.ts_s)
    decision = policy.decide(fleet_view(fleet, T0 + 1))
    return decision, [decision.reason_text(i) for i in range(len(guests))]


@parametrize_policy_checks([StaticPolicy, MomPolicy, ProxmoxPolicy, VpaPolicy])
def test_conformance(check: Callable[[], None]) -> None:
    check()


@pytest.mark.parametrize(
    ("policy", "params", "name"),
    [
        (MomPolicy, {"pressure_critical": 0.3}, "pressure_critical"),
        (MomPolicy, {"max_balloon_change_percent": 0}, "max_balloon_change_percent"),
        (ProxmoxPolicy, {"min_share": 0}, "min_share"),
        (VpaPolicy, {"target_percentile": 0.99, "upper_percentile": 0.95}, "upper_percentile"),
        (VpaPolicy, {"half_life_s": 0}, "half_life_s"),
    ],
)
def test_bad_parameters_are_named(policy: type[Policy], params: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        policy(**params).validate()


# -- static ------------------------------------------------------------------------------------


def test_static_gives_every_guest_its_full_ram() -> None:
    decision, reasons = decide(
        StaticPolicy(),
        {
            # 4 GiB guest with 3 GiB ballooned away, using 512 MiB: deflate fully.
            "h/a": guest(T0, ram=4 * GIB, alloc=GIB, available=512 * MIB),
            "h/b": sample(T0, ram_bytes=2 * GIB),  # no memory stats: still its full RAM
        },
        {},
    )
    np.testing.assert_array_equal(decision.target_bytes, [4 * GIB, 2 * GIB])
    assert reasons == ["static: full allocation"] * 2
    # Predicted pressure = demand / RAM = (1 GiB − 512 MiB) / 4 GiB = 0.125.
    assert decision.pressure[0] == pytest.approx(0.125)


# -- oVirt MOM ---------------------------------------------------------------------------------


def test_mom_shrinks_by_five_percent_when_the_host_is_under_pressure() -> None:
    decision, reasons = decide(
        MomPolicy(),
        {
            "h/a": guest(T0, ram=8 * GIB, alloc=8 * GIB, available=6 * GIB),
            "h/b": guest(T0, ram=4 * GIB, alloc=3 * GIB, available=256 * MIB),
        },
        {"h": (100 * GIB, 10 * GIB)},
    )
    # Host free 10 GiB / 100 GiB = 0.10 < pressure_threshold 0.20: shrink every guest.
    # guest_free_percent = 0.20 × 0.10 / 0.20 = 0.10.
    # a: used = 8 − 6 = 2 GiB; balloon_min = 2 + 0.10 × 8 = 2.8 GiB;
    #    one step: 8 GiB × (1 − 0.05) = 7.6 GiB >= 2.8 GiB → 7.6 GiB.
    assert decision.target_bytes[0] == pytest.approx(7.6 * GIB)
    assert reasons[0] == "mom: host free 10% < 20%: shrink"
    # b: used = 3072 − 256 = 2816 MiB; balloon_min = 2816 + 0.10 × 3072 = 3123.2 MiB, above its
    #    3072 MiB allocation: MOM never shrinks upward, so it holds.
    assert np.isnan(decision.target_bytes[1])
    assert reasons[1] == "hold: at its free-memory target"


def test_mom_critical_host_pushes_guests_into_swap() -> None:
    decision, reasons = decide(
        MomPolicy(),
        {"h/a": guest(T0, ram=4 * GIB, alloc=2 * GIB, available=0)},
        {"h": (100 * GIB, 4 * GIB)},
    )
    # Host free 4% <= pressure_critical 5%: guest_free_percent = 0.04 − 0.05 = −0.01.
    # used = 2048 MiB; balloon_min = 2048 − 0.01 × 2048 = 2027.52 MiB (below what it uses);
    # step: 2048 × 0.95 = 1945.6 MiB < balloon_min → 2027.52 MiB; the 20.48 MiB change is above
    # 0.25% of 2048 MiB (5.12 MiB).
    assert decision.target_bytes[0] == pytest.approx(2027.52 * MIB)
    assert reasons[0] == "mom: host free 4% critical (<= 5%): shrink into swap"
    # Predicted pressure = demand / target = 2048 / 2027.52 > 1: the guest will swap.
    assert decision.pressure[0] == pytest.approx(2048 / 2027.52)


def test_mom_grows_guests_back_when_the_host_has_room() -> None:
    decision, reasons = decide(
        MomPolicy(),
        {
            "h/c": guest(T0, ram=8 * GIB, alloc=4 * GIB, available=3 * GIB),
            "h/d": guest(T0, ram=8 * GIB, alloc=4 * GIB, available=512 * MIB),
            "h/e": guest(T0, ram=8 * GIB, alloc=8 * GIB, available=6 * GIB),
            "h/f": guest(T0, ram=8 * GIB, alloc=8 * GIB - 5 * MIB, available=6 * GIB),
        },
        {"h": (100 * GIB, 50 * GIB)},
    )
    # Host free 50% >= 20%: grow. guest_free_percent = 0.20 × 0.50 / 0.20 = 0.50.
    # c: used = 1 GiB; balloon_min = 1 + 0.5 × 4 = 3 GiB; step 4 × 1.05 = 4.2 GiB >= 3 → 4.2 GiB.
    assert decision.target_bytes[0] == pytest.approx(4.2 * GIB)
    assert reasons[0] == "mom: host free 50%: grow toward 50% guest free"
    # d: used = 3.5 GiB; balloon_min = 3.5 + 0.5 × 4 = 5.5 GiB > 4.2: straight to 5.5 GiB.
    assert decision.target_bytes[1] == pytest.approx(5.5 * GIB)
    # e: already at balloon_max.
    assert np.isnan(decision.target_bytes[2])
    assert reasons[2] == "hold: at full allocation"
    # f: capped at 8 GiB, a 5 MiB change: not above 0.25% × 8187 MiB = 20.5 MiB.
    assert np.isnan(decision.target_bytes[3])
    assert reasons[3] == "hold: change below 0.25% of the allocation"


def test_mom_uses_memfree_without_memavailable_and_holds_without_stats() -> None:
    decision, reasons = decide(
        MomPolicy(),
        {
            "h/a": guest(T0, ram=8 * GIB, alloc=4 * GIB, free_memory=3 * GIB),
            "h/b": sample(T0, ram_bytes=8 * GIB),
            "other/c": guest(T0, ram=8 * GIB, alloc=4 * GIB, available=3 * GIB),
        },
        {"h": (100 * GIB, 50 * GIB)},  # no stats for host "other"
    )
    # a: mem_unused = MemFree 3 GiB → used 1 GiB, as guest c of the grow example: 4.2 GiB.
    assert decision.target_bytes[0] == pytest.approx(4.2 * GIB)
    assert reasons[1:] == ["hold: no memory stats", "hold: no host memory stats"]
    assert np.isnan(decision.target_bytes[1:]).all()


# -- Proxmox VE --------------------------------------------------------------------------------


def test_proxmox_reclaims_at_most_100_mib_per_guest_per_cycle() -> None:
    decision, reasons = decide(
        ProxmoxPolicy(),
        {
            "h/a": guest(T0, ram=8 * GIB, alloc=8 * GIB, free_memory=4 * GIB),
            "h/b": guest(T0, ram=8 * GIB, alloc=8 * GIB, free_memory=4 * GIB),
        },
        {"h": (100 * GIB, 10 * GIB)},
    )
    # goal = 80% × 100 GiB − 90 GiB used = −10 GiB: shrink. Both have free 4 GiB > 25% of their
    # 4 GiB minimum, so both are in the "enough free memory" list.
    # Pool above the minima: (8 − 4) + (8 − 4) − 10 = −2 GiB → desired = 4 + (−1) = 3 GiB, clamped
    # to the 4 GiB minimum; each moves one 100 MiB step: 8 GiB − 100 MiB. Round 2 asks the same
    # step again, changes nothing, and the loop ends.
    np.testing.assert_array_equal(decision.target_bytes, [8 * GIB - 100 * MIB] * 2)
    assert reasons == ["proxmox: host 90% used > 80% target: shrink by shares"] * 2


def test_proxmox_divides_the_pool_above_the_minima_by_shares() -> None:
    decision, _ = decide(
        ProxmoxPolicy(min_share=0.25, max_change_bytes=64 * GIB),
        {
            "h/a": guest(T0, ram=8 * GIB, alloc=8 * GIB, free_memory=2 * GIB),
            "h/b": guest(T0, ram=16 * GIB, alloc=10 * GIB, free_memory=2 * GIB),
        },
        {"h": (100 * GIB, 14 * GIB)},
    )
    # goal = 80 − 86 = −6 GiB. Minima: a 2 GiB, b 4 GiB. Pool = (8 − 2) + (10 − 4) − 6 = 6 GiB,
    # 1000 shares each of 2000: 3 GiB each → a 2 + 3 = 5 GiB, b 4 + 3 = 7 GiB. With no step limit
    # both get there at once; the changes (−3 −3) meet the goal.
    np.testing.assert_array_equal(decision.target_bytes, [5 * GIB, 7 * GIB])


def test_proxmox_divides_by_each_guests_shares() -> None:
    """The same host as above with ``[guards.shares]`` giving b three times a's shares."""
    decision, _ = decide(
        ProxmoxPolicy(min_share=0.25, max_change_bytes=64 * GIB),
        {
            "h/a": guest(T0, ram=8 * GIB, alloc=8 * GIB, free_memory=2 * GIB),
            "h/b": guest(T0, ram=16 * GIB, alloc=10 * GIB, free_memory=2 * GIB),
        },
        {"h": (100 * GIB, 14 * GIB)},
        shares={"b": 3000},
    )
    # Pool 6 GiB over 1000 + 3000 shares: a gets 1.5 GiB above its 2 GiB minimum, b 4.5 above
    # its 4 GiB: 3.5 and 8.5 GiB. The changes (−4.5, −1.5) again meet the −6 GiB goal.
    np.testing.assert_array_equal(decision.target_bytes, [3.5 * GIB, 8.5 * GIB])


def test_proxmox_grows_guests_under_pressure_first_and_falls_back_to_all() -> None:
    decision, reasons = decide(
        ProxmoxPolicy(min_share=0.25),
        {
            # Host h1: the guest under pressure is already at its RAM.
            "h1/a": guest(T0, ram=4 * GIB, alloc=4 * GIB, free_memory=128 * MIB),
            "h1/b": guest(T0, ram=8 * GIB, alloc=6 * GIB, free_memory=3 * GIB),
            # Host h2: the guest under pressure can grow.
            "h2/c": guest(T0, ram=8 * GIB, alloc=4 * GIB, free_memory=128 * MIB),
            "h2/d": guest(T0, ram=8 * GIB, alloc=6 * GIB, free_memory=3 * GIB),
        },
        {"h1": (100 * GIB, 30 * GIB), "h2": (100 * GIB, 30 * GIB)},
    )
    # Both hosts: goal = 80 − 70 = +10 GiB. Under pressure: free <= 25% of the minimum
    # (a: 128 MiB <= 256 MiB, c: 128 MiB <= 512 MiB).
    # h1: a alone: desired 1 + (3 + 10) GiB, clamped to its 4 GiB RAM = where it is: no
    #     progress, so the request goes to every VM: pool (4 − 1) + (6 − 2) + 10 = 17 GiB, 8.5
    #     each; b desired 2 + 8.5 → 8 GiB (RAM), one step: 6 GiB + 100 MiB.
    assert np.isnan(decision.target_bytes[0])
    assert reasons[0] == "hold: at its share of the host"
    assert decision.target_bytes[1] == 6 * GIB + 100 * MIB
    # h2: c alone: desired 2 + (2 + 10) → 8 GiB, one step: 4 GiB + 100 MiB. That is progress,
    #     so d, with free memory to spare, is not asked.
    assert decision.target_bytes[2] == 4 * GIB + 100 * MIB
    assert np.isnan(decision.target_bytes[3])
    assert reasons[2] == "proxmox: host 70% used < 80% target: grow by shares"


def test_proxmox_rebalances_toward_equal_shares() -> None:
    decision, reasons = decide(
        ProxmoxPolicy(),
        {
            "h/a": guest(T0, ram=8 * GIB, alloc=8 * GIB, free_memory=4 * GIB),
            "h/b": guest(T0, ram=8 * GIB, alloc=4 * GIB, free_memory=2 * GIB),
        },
        {"h": (100 * GIB, 21 * GIB)},
    )
    # goal = 80 − 79 = +1 GiB; nobody is under pressure, so every VM: pool (8 − 4) + (4 − 4) + 1
    # = 5 GiB, 2.5 each → desired 6.5 GiB for both. a is above it and shrinks one step even on
    # a grow request; b grows one step. Round 2 repeats the same steps: no change, done.
    np.testing.assert_array_equal(decision.target_bytes, [8 * GIB - 100 * MIB, 4 * GIB + 100 * MIB])
    assert reasons == [
        "proxmox: rebalance by shares: shrink",
        "proxmox: host 79% used < 80% target: grow by shares",
    ]


def test_proxmox_dead_band_and_missing_stats_hold() -> None:
    decision, reasons = decide(
        ProxmoxPolicy(),
        {
            "h/a": guest(T0, ram=8 * GIB, alloc=4 * GIB, free_memory=128 * MIB),
            "h/b": sample(T0, ram_bytes=8 * GIB),
            "other/c": guest(T0, ram=8 * GIB, alloc=4 * GIB, free_memory=128 * MIB),
        },
        # goal = 80 GiB − (80 GiB − 5 MiB) = +5 MiB: inside the ±10 MiB dead band.
        {"h": (100 * GIB, 20 * GIB + 5 * MIB)},
    )
    assert np.isnan(decision.target_bytes).all()
    assert reasons == [
        "hold: host 80.0% used, within 10 MiB of the 80% target",
        "hold: no memory stats (balloon driver not reporting)",
        "hold: no host memory stats",
    ]


# -- Kubernetes VPA ----------------------------------------------------------------------------


def bucket_end(bucket: int) -> float:
    """End of VPA memory histogram bucket ``bucket``: 1e7 × (1.05^(bucket + 1) − 1) / 0.05."""
    return 1e7 * (1.05 ** (bucket + 1) - 1) / 0.05


# Buckets: index = floor(ln(v × 0.05 / 1e7 + 1) / ln 1.05).
# 1 GiB:   ln(5.3687 + 1) / 0.048790 = 1.85140 / 0.048790 = 37.95 → bucket 37.
# 3 GiB:   ln(16.1061 + 1) / 0.048790 = 2.83944 / 0.048790 = 58.20 → bucket 58.
END_1_GIB = bucket_end(37)  # 1 077 095 458 bytes
END_3_GIB = bucket_end(58)  # 3 357 940 170 bytes


class Ticks:
    """One guest fed sample by sample to one VPA instance, deciding after each sample."""

    def __init__(self, policy: VpaPolicy, *, ram: float, alloc: float) -> None:
        self.fleet = Fleet(epoch_s=T0)
        self.policy = policy
        self.ram = ram
        self.alloc = alloc

    def feed(self, ts: float, demand: float, **stats: float) -> tuple[float, str, Decision]:
        sample_ = guest(ts, ram=self.ram, alloc=self.alloc, available=self.alloc - demand, **stats)
        ingest(self.fleet, "h", "g", sample_, ts)
        decision = self.policy.decide(fleet_view(self.fleet, ts))
        return float(decision.target_bytes[0]), decision.reason_text(0), decision


def test_vpa_tracks_the_decayed_p90_of_daily_peaks() -> None:
    ticks = Ticks(VpaPolicy(), ram=8 * GIB, alloc=8 * GIB)
    # Day 0, samples every 6 h: 1 GiB, 3 GiB, 1 GiB, 1 GiB → one peak of 3 GiB for the day.
    target, reason, _ = ticks.feed(T0, GIB)
    # First sample, no history yet: 8 GiB is inside [250 MiB, 8 GiB] (the bounds are wide open
    # with zero confidence) and the guest is younger than 12 h: hold.
    assert np.isnan(target)
    assert reason.startswith("hold: history shorter than 12 h")
    target, _, decision = ticks.feed(T0 + 6 * HOUR, 3 * GIB)
    assert np.isnan(target)
    # The 3 GiB sample replaced the window's 1 GiB peak: p90 = end of the 3 GiB bucket.
    assert decision.detail["target_mib"][0] == pytest.approx(END_3_GIB * 1.15 / MIB)
    # At 12 h the guest is old enough and 3.6 GiB is more than 10% off its 8 GiB: update.
    target, reason, _ = ticks.feed(T0 + 12 * HOUR, GIB)
    assert target == pytest.approx(END_3_GIB * 1.15)  # 3 861 631 196 bytes
    assert reason == "vpa: p90 of usage peaks 3202 MiB + 15% margin"
    ticks.feed(T0 + 18 * HOUR, GIB)

    # Days 1 and 2: 1 GiB all day. Peaks are stamped at each window's end and weighted
    # 2^((end − T0 − 24 h) / 24 h): day 0 (3 GiB) weight 1, day 1 (1 GiB) 2, day 2 (1 GiB) 4.
    for day in (1, 2):
        for hour in (0, 6, 12, 18):
            target, _, _ = ticks.feed(T0 + day * DAY + hour * HOUR, GIB)
    # Total 7; p90 needs 0.9 × 7 = 6.3; the 1 GiB bucket holds 6 < 6.3, so p90 is still the 3 GiB
    # bucket. (Without decay it would be 3 GiB too: 1 of 3 peaks.)
    assert target == pytest.approx(END_3_GIB * 1.15)

    # Day 3: 1 GiB again, weight 8. Total 15; 0.9 × 15 = 13.5 <= 14 in the 1 GiB bucket: the
    # 3 GiB peak of day 0 is forgotten. Without decay, 1 of 4 peaks = 25% > 10%: still 3 GiB.
    for hour in (0, 6, 12, 18):
        target, reason, _ = ticks.feed(T0 + 3 * DAY + hour * HOUR, GIB)
    assert target == pytest.approx(END_1_GIB * 1.15)  # 1 238 659 777 bytes
    assert reason == "vpa: p90 of usage peaks 1027 MiB + 15% margin"


def test_vpa_never_recommends_less_than_250_mib() -> None:
    # 4 GiB guest ballooned down to 200 MiB, using 100 MiB.
    # 100 MiB: ln(0.524288 + 1) / 0.048790 = 0.421527 / 0.048790 = 8.64 → bucket 8, ending at
    # 1e7 × (1.05^9 − 1) / 0.05 = 110 265 643 bytes; + 15% = 126 805 490 < 250 MiB.
    ticks = Ticks(VpaPolicy(), ram=4 * GIB, alloc=200 * MIB)
    target, reason, _ = ticks.feed(T0, 100 * MIB)
    # The lower bound is the 250 MiB minimum too, and 200 MiB is below it: outside the
    # recommended range, so VPA updates at once, young guest or not.
    assert target == 250 * MIB
    assert reason == "vpa: 250 MiB minimum"


@pytest.mark.parametrize(
    ("alloc_mib", "bumped_mib", "bucket"),
    [
        # used = max(allocation 1024, peak 1000) = 1024 MiB; max(1024 + 100, 1024 × 1.2 = 1228.8)
        # = 1228.8 MiB: ln(6.44245 + 1) / 0.048790 = 2.00720 / 0.048790 = 41.14 → bucket 41.
        (1024, 1228.8, 41),
        # used = max(400, peak 390) = 400 MiB; max(400 + 100 = 500, 400 × 1.2 = 480) = 500 MiB:
        # ln(2.62144 + 1) / 0.048790 = 1.28687 / 0.048790 = 26.38 → bucket 26.
        (400, 500.0, 26),
    ],
)
def test_vpa_bumps_the_peak_after_an_oom_kill(
    alloc_mib: int, bumped_mib: float, bucket: int
) -> None:
    ticks = Ticks(VpaPolicy(), ram=4 * GIB, alloc=alloc_mib * MIB)
    target, _, _ = ticks.feed(T0, (alloc_mib - 24) * MIB, oom_kills=0)
    assert np.isnan(target)  # young and within range
    target, reason, _ = ticks.feed(T0 + 60, (alloc_mib - 10) * MIB, oom_kills=1)
    # The OOM sample replaces the window's peak; right after an OOM VPA updates at once.
    assert target == pytest.approx(bucket_end(bucket) * 1.15)
    assert reason == f"vpa: OOM kill, peak bumped to {bumped_mib:.0f} MiB"


def test_vpa_counts_each_sample_once_and_forgets_a_reused_slot() -> None:
    policy = VpaPolicy()
    ticks = Ticks(policy, ram=8 * GIB, alloc=8 * GIB)
    ticks.feed(T0, 3 * GIB)
    # A second tick without a new sample adds nothing: one peak of weight 2^0 = 1.
    policy.decide(fleet_view(ticks.fleet, T0 + 10))
    assert policy.state_.hist.sum() == pytest.approx(1.0)

    # The guest goes away; a new guest gets its slot and starts from an empty history.
    fleet = ticks.fleet
    slot = fleet.slot_of("h", "g")
    fleet.expire(T0 + 10 * fleet.ttl_s)
    ingest(fleet, "h", "new", guest(T0 + HOUR, ram=8 * GIB, alloc=8 * GIB, available=7 * GIB), T0)
    assert fleet.slot_of("h", "new") == slot
    decision = policy.decide(fleet_view(fleet, T0 + HOUR))
    # Only the new guest's 1 GiB peak: the old 3 GiB one is gone.
    assert decision.detail["target_mib"][0] == pytest.approx(END_1_GIB * 1.15 / MIB)
