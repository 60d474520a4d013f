"""The threshold policy on worked examples."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from autoscaler.fleet import Fleet
from autoscaler.plugins import PluginError, create_policy
from autoscaler.testing import ingest, sample
from autoscaler.tick import fleet_view
from policies.threshold import ThresholdPolicy

GIB = 2**30
MIB = 2**20
T0 = 1_700_000_000.0


def decide(
    first: Mapping[str, float], second: Mapping[str, float] | None = None, **params: float
) -> tuple[float, str, float]:
    fleet = Fleet()
    ingest(fleet, "h", "g", sample(T0, **first), T0)
    if second is not None:
        ingest(fleet, "h", "g", sample(T0 + 10, **second), T0 + 10)
    view = fleet_view(fleet, T0 + 11)
    decision = ThresholdPolicy(**params).decide(view)
    return (
        float(decision.target_bytes[0]),
        decision.reason_text(0),
        float(decision.pressure[0]),
    )


def test_idle_guest_inflates_toward_the_target_available_share() -> None:
    # 4 GiB guest, 3 GiB available (75%): aim where 20% would be available (the guards pace it).
    target, reason, pressure = decide({"total_memory": 4 * GIB, "available_memory": 3 * GIB})
    assert target == pytest.approx(1 * GIB / 0.8)
    assert reason == "idle: available 75% > high watermark 30%"
    assert pressure == pytest.approx(0.25)


def test_inflation_stops_at_the_target_available_share() -> None:
    # 1 GiB allocated, 350 MiB available (34%): one 5% step of 4 GiB would leave less than 20%
    # available, so the target is where available = 20%: demand / 0.8.
    guest = {
        "ram_bytes": 4 * GIB,
        "actual_pages": 3 * GIB // 4096,
        "total_memory": 4 * GIB,
        "available_memory": 350 * MIB,
    }
    target, _, _ = decide(guest)
    demand = GIB - 350 * MIB
    assert target == pytest.approx(demand / 0.8)


def test_within_watermarks_holds() -> None:
    target, reason, _ = decide({"total_memory": 4 * GIB, "available_memory": 0.2 * 4 * GIB})
    assert np.isnan(target)
    assert reason.startswith("hold")


def test_low_available_deflates_twice_as_fast() -> None:
    guest = {
        "ram_bytes": 4 * GIB,
        "actual_pages": 2 * GIB // 4096,
        "total_memory": 4 * GIB,
        "available_memory": 0.05 * 2 * GIB,
    }
    target, reason, _ = decide(guest)
    # Deflate by 10% of RAM, or to where available is back at 20%, whichever is more.
    demand = 2 * GIB - 0.1 * GIB
    assert target == pytest.approx(max(2 * GIB + 0.1 * 4 * GIB, demand / 0.8))
    assert reason.startswith("low: available 5%")


@pytest.mark.parametrize(
    ("signal", "reason"),
    [
        ({"swap_in": 100 * MIB}, "pressure: swap-in 10.0 MiB/s"),
        ({"major_faults": 10_000}, "pressure: 1000 major faults/s"),
        ({"alloc_stalls": 1}, "pressure: allocation stalls"),
        ({"oom_kills": 1}, "pressure: OOM kill"),
        ({"direct_reclaims": 50 * MIB}, "pressure: direct reclaim 5.0 MiB/s"),
    ],
)
def test_pressure_signals_override_idle_watermark(signal: dict[str, float], reason: str) -> None:
    # Plenty available (60%), yet the guest is paying for missing memory: deflate 20% of RAM.
    base = {
        "ram_bytes": 4 * GIB,
        "actual_pages": 2 * GIB // 4096,
        "total_memory": 4 * GIB,
        "available_memory": 1.2 * GIB,
        "swap_in": 0,
        "major_faults": 0,
        "alloc_stalls": 0,
        "oom_kills": 0,
        "direct_reclaims": 0,
    }
    target, text, pressure = decide(base, {**base, **signal})
    assert target == pytest.approx(2 * GIB + 0.2 * 4 * GIB)
    assert text == reason
    assert pressure >= 1.0


def test_no_stats_holds() -> None:
    target, reason, _ = decide({})
    assert np.isnan(target)
    assert reason == "hold: no memory stats"


def test_old_kernel_without_memavailable() -> None:
    target, reason, _ = decide(
        {"total_memory": 4 * GIB, "free_memory": 2 * GIB, "disk_caches": GIB}
    )
    assert reason.startswith("idle: available 75%")
    assert target < 4 * GIB


def test_watermarks_are_validated_at_start_up() -> None:
    with pytest.raises(PluginError, match="low_watermark"):
        create_policy("threshold", {"low_watermark": 0.5, "high_watermark": 0.3})
    with pytest.raises(PluginError, match="deflate_step_share"):
        create_policy("threshold", {"deflate_step_share": 0})
