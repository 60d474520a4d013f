"""Threshold policy: watermarks on available memory plus kernel pressure signals.

Per guest, with ``available`` = MemAvailable (or MemFree + page cache on kernels without it) as a
share of the current allocation:

- **pressure** — any signal below over its threshold: deflate by ``pressure_step_share`` of RAM.
  Signals are rates between the last two samples: swap-in, major faults, allocation stalls,
  OOM kills, direct reclaim. They mean the guest is already paying for missing memory, so they
  override the watermarks.
- **low** — available below ``low_watermark``: deflate by ``deflate_step_share`` of RAM.
- **idle** — available above ``high_watermark`` and no signal: inflate toward the allocation at
  which available would fall to ``target_available``. How fast is the guards' business: they
  pace inflation per second of observed idleness and keep a headroom for the guest's growth.
- otherwise hold.

A deflate always gives at least enough to bring available back to ``target_available``.
Deflating is faster than inflating on purpose: taking memory too slowly costs some idle memory
for a while; giving it back too slowly costs the guest swap storms or an OOM kill.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final, overload

import numpy as np

from autoscaler.policy import Decision, FleetView, Policy
from autoscaler.stats import available_memory_bytes

MIB: Final = 2**20

REASONS: Final = (
    "hold: available {available_pct:.0f}% within watermarks",
    "idle: available {available_pct:.0f}% > high watermark {high_pct:.0f}%",
    "low: available {available_pct:.0f}% < low watermark {low_pct:.0f}%",
    "pressure: swap-in {swap_in_mibps:.1f} MiB/s",
    "pressure: {major_faults_ps:.0f} major faults/s",
    "pressure: allocation stalls",
    "pressure: OOM kill",
    "pressure: direct reclaim {direct_reclaim_mibps:.1f} MiB/s",
    "hold: no memory stats",
)
R_HOLD, R_IDLE, R_LOW, R_SWAP, R_FAULTS, R_STALLS, R_OOM, R_RECLAIM, R_NO_STATS = range(9)


@overload
def under_pressure(reason: int) -> bool: ...
@overload
def under_pressure(reason: np.ndarray) -> np.ndarray: ...
def under_pressure(reason: Any) -> Any:
    """Whether a :data:`REASONS` code (or each of an array) is a pressure signal: swap-in, major
    faults, allocation stalls, an OOM kill or direct reclaim."""
    return (reason >= R_SWAP) & (reason != R_NO_STATS)


class ThresholdPolicy(Policy):
    """Watermarks on available memory with pressure-signal overrides (see module docstring).

    Defaults, and why:

    - ``target_available=0.20``: oVirt MOM's ``min_guest_free_percent`` — the guest keeps a
      fifth of its allocation available for page cache and bursts.
    - ``high_watermark=0.30`` / ``low_watermark=0.10``: a band around the target wide enough
      that one step (5% of RAM) in either direction cannot cross it, so the policy does not
      oscillate.
    - ``deflate_step_share=0.10`` and ``pressure_step_share=0.20``: give memory back two and four
      times faster than it is taken.
    - ``swap_in_bps=1 MiB/s``: a guest reading back 256 pages a second from swap has a working
      set that no longer fits; occasional single pages are noise.
    - ``major_faults_ps=500``: major faults also come from plain file reads, so the bar is high;
      it catches thrashing on the page cache after the swap-less guest ran out of room.
    - ``direct_reclaim_bps=1 MiB/s``: kswapd could not keep up and allocating tasks reclaim
      themselves; any sustained amount is latency the guest's workload feels.
    - allocation stalls and OOM kills: any at all.
    """

    name: ClassVar[str] = "threshold"
    param_docs: ClassVar[Mapping[str, str]] = {
        "high_watermark": "available share of the allocation above which an idle guest is inflated",
        "low_watermark": "available share of the allocation below which the guest is deflated",
        "target_available": "available share that inflating and deflating steer the guest to",
        "deflate_step_share": "share of RAM given back per decision when available is low",
        "pressure_step_share": "share of RAM given back per decision under a pressure signal",
        "swap_in_bps": "swap-in rate (bytes/s) above which the guest is under pressure",
        "major_faults_ps": "major page faults per second above which the guest is under pressure",
        "direct_reclaim_bps": "direct reclaim (bytes/s) above which the guest is under pressure",
    }

    def __init__(
        self,
        *,
        high_watermark: float = 0.30,
        low_watermark: float = 0.10,
        target_available: float = 0.20,
        deflate_step_share: float = 0.10,
        pressure_step_share: float = 0.20,
        swap_in_bps: float = 1 * MIB,
        major_faults_ps: float = 500.0,
        direct_reclaim_bps: float = 1 * MIB,
    ) -> None:
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.target_available = target_available
        self.deflate_step_share = deflate_step_share
        self.pressure_step_share = pressure_step_share
        self.swap_in_bps = swap_in_bps
        self.major_faults_ps = major_faults_ps
        self.direct_reclaim_bps = direct_reclaim_bps

    def validate(self) -> None:
        if not 0 <= self.low_watermark <= self.target_available <= self.high_watermark < 1:
            raise ValueError(
                "need 0 <= low_watermark <= target_available <= high_watermark < 1, got "
                f"{self.low_watermark}, {self.target_available}, {self.high_watermark}"
            )
        for name in ("deflate_step_share", "pressure_step_share"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for name in ("swap_in_bps", "major_faults_ps", "direct_reclaim_bps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def decide(self, view: FleetView) -> Decision:
        ram = view.ram_bytes
        alloc = view.alloc_bytes
        available = available_memory_bytes(
            view.stat("available-memory"), view.stat("free-memory"), view.stat("disk-caches")
        )
        demand = view.demand_bytes
        with np.errstate(invalid="ignore", divide="ignore"):
            available_share = available / alloc
        known = np.isfinite(available_share) & np.isfinite(demand)

        # Signals compare False when a rate is NaN (unknown): no data is no pressure signal.
        swap_in = view.rate("swap-in")
        faults = view.rate("major-faults")
        reclaim = view.rate("direct-reclaims")
        reason = np.full(len(view), R_HOLD, dtype=np.int16)
        reason[available_share > self.high_watermark] = R_IDLE
        reason[available_share < self.low_watermark] = R_LOW
        # Later assignments win: the most severe signal names the reason.
        reason[reclaim > self.direct_reclaim_bps] = R_RECLAIM
        reason[faults > self.major_faults_ps] = R_FAULTS
        reason[swap_in > self.swap_in_bps] = R_SWAP
        reason[view.rate("alloc-stalls") > 0] = R_STALLS
        reason[view.rate("oom-kills") > 0] = R_OOM
        reason[~known] = R_NO_STATS

        # Allocation at which available would be exactly target_available of the allocation.
        settle = demand / (1.0 - self.target_available)
        target = np.full(len(view), np.nan)
        idle = reason == R_IDLE
        target[idle] = settle[idle]
        low = reason == R_LOW
        target[low] = np.maximum(alloc + self.deflate_step_share * ram, settle)[low]
        signal = under_pressure(reason)
        target[signal] = np.maximum(alloc + self.pressure_step_share * ram, settle)[signal]
        # Only move toward the settle point: an idle guest already below it holds.
        target[idle & (target >= alloc)] = np.nan

        with np.errstate(invalid="ignore", divide="ignore"):
            predicted = demand / alloc
        predicted = np.where(signal, np.maximum(predicted, 1.0), predicted)
        detail = {
            "available_pct": available_share * 100.0,
            "high_pct": np.full(len(view), self.high_watermark * 100.0),
            "low_pct": np.full(len(view), self.low_watermark * 100.0),
            "swap_in_mibps": swap_in / MIB,
            "major_faults_ps": faults,
            "direct_reclaim_mibps": reclaim / MIB,
        }
        return Decision(target, predicted, reason, REASONS, detail)
