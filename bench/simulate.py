"""Simulator benchmark: the Bitbrains month through the threshold policy, closed loop.

1. Imports the Bitbrains month (``--trace``, by default ``bitbrains-rnd-2013-08.csv.gz`` in
   ``$BALLOON_TRACES_DIR``; 500 VMs × 30 days of 300 s samples) into a temporary recording
   with ``import_bitbrains`` and puts it on the simulator's grid (``replay_from_recording``);
   both are timed.
2. ``simulate_policy`` with :class:`~policies.threshold.ThresholdPolicy` over every guest and
   step (500 × 8,640): the wall time, against a target of 30 s on the 2-core machine.
3. For comparison, the same policy written one guest at a time (:class:`PerGuestThreshold`, a
   :class:`~autoscaler.policy.PerGuestPolicy` with ThresholdPolicy's formulas in scalar Python)
   through the same simulator, so the loop runs over steps and over guests in Python, on the
   first ``--subset`` guests (50 by default: the whole fleet would take minutes); extrapolated
   linearly to the full fleet, since its cost is per guest-step. The vectorised policy runs on
   the same subset too, to check that both give identical allocations (the same policy, step
   for step) and to split the per-guest version's time into the part it shares with the
   vectorised run (ingest, guards, the guest model: vectorised in both) and the decisions.

Prints the machine (CPUs, CPU model, Python, numpy, load average), then the numbers. Not a
test: nothing is checked but the equality of the two policies' allocations (exit status 1 if
they differ).

Run: ``.venv/bin/python -m bench.simulate [--trace PATH] [--subset 50]``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar, Final

import numpy as np

from autoscaler.config import GuardSettings
from autoscaler.policy import GuestDecision, GuestView, PerGuestPolicy, Policy
from autoscaler.recordings.recording import read_recording
from autoscaler.recordings.traces import TRACES_DIR_ENV, find_trace, import_bitbrains
from autoscaler.sim.simulate import PolicyRun, Replay, replay_from_recording, simulate_policy
from policies.threshold import (
    R_FAULTS,
    R_HOLD,
    R_IDLE,
    R_LOW,
    R_NO_STATS,
    R_OOM,
    R_RECLAIM,
    R_STALLS,
    R_SWAP,
    REASONS,
    ThresholdPolicy,
    under_pressure,
)

TARGET_S: Final = 30.0
"""The full month must simulate in under this on the 2-core reference machine."""


class PerGuestThreshold(ThresholdPolicy, PerGuestPolicy):
    """ThresholdPolicy's decision for one guest at a time, in plain Python (same formulas).

    Kept line for line with :meth:`ThresholdPolicy.decide`: the benchmark checks that both
    produce the same allocations at every step. Parameters are ThresholdPolicy's, plus
    ``inflate_step_share``, the share of RAM an idle guest gives up per decision at most.
    """

    name: ClassVar[str] = "threshold-per-guest"
    decide = PerGuestPolicy.decide

    def __init__(self, *, inflate_step_share: float = 0.05, **params: float) -> None:
        super().__init__(**params)
        self.inflate_step_share = inflate_step_share

    def decide_guest(self, guest: GuestView) -> GuestDecision:
        ram, alloc, demand = guest.ram_bytes, guest.alloc_bytes, guest.demand_bytes
        available = guest.stats["available-memory"]
        if math.isnan(available):
            available = guest.stats["free-memory"] + guest.stats["disk-caches"]
        share = available / alloc if alloc else math.nan
        known = math.isfinite(share) and math.isfinite(demand)

        # Comparisons with NaN are False, as in numpy: an unknown rate is no signal.
        rates = guest.rates
        reason = R_HOLD
        if share > self.high_watermark:
            reason = R_IDLE
        if share < self.low_watermark:
            reason = R_LOW
        if rates["direct-reclaims"] > self.direct_reclaim_bps:
            reason = R_RECLAIM
        if rates["major-faults"] > self.major_faults_ps:
            reason = R_FAULTS
        if rates["swap-in"] > self.swap_in_bps:
            reason = R_SWAP
        if rates["alloc-stalls"] > 0:
            reason = R_STALLS
        if rates["oom-kills"] > 0:
            reason = R_OOM
        if not known:
            reason = R_NO_STATS

        settle = demand / (1.0 - self.target_available)
        signal = under_pressure(reason)
        target: float | None = None
        if reason == R_IDLE:
            target = max(alloc - self.inflate_step_share * ram, settle)
            if target >= alloc:
                target = None
        elif reason == R_LOW:
            target = max(alloc + self.deflate_step_share * ram, settle)
        elif signal:
            target = max(alloc + self.pressure_step_share * ram, settle)
        predicted = demand / alloc if alloc else math.nan
        if signal:
            predicted = max(predicted, 1.0)
        return GuestDecision(target, REASONS[reason], predicted)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
            "unknown",
        )
    except (OSError, subprocess.CalledProcessError):
        model = "unknown (no lscpu)"
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"numpy {np.__version__}, {platform.system()} {platform.release()}; {load()}"
    )


def load() -> str:
    """The 1-minute load average: numbers taken on a busy machine are slower, and say so."""
    one_minute = os.getloadavg()[0]
    busy = "  <- busy: rerun on a quiet machine" if one_minute > 0.5 else ""
    return f"load average {one_minute:.2f}{busy}"


def timed_run(replay: Replay, policy: Policy) -> tuple[PolicyRun, float]:
    started = time.perf_counter()
    run = simulate_policy(replay, policy, GuardSettings())
    return run, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trace",
        type=Path,
        default=find_trace(),
        help="Bitbrains CSV [default: $BALLOON_TRACES_DIR/bitbrains-rnd-2013-08.csv.gz]",
    )
    parser.add_argument(
        "--subset", type=int, default=50, help="guests for the per-guest comparison"
    )
    args = parser.parse_args()
    if args.trace is None:
        print(f"no trace: give --trace or set {TRACES_DIR_ENV}", file=sys.stderr)
        return 2
    if not args.trace.is_file():
        print(f"no trace at {args.trace}", file=sys.stderr)
        return 2

    print(f"== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-simulate-") as tmp:
        recording = Path(tmp) / "bitbrains.parquet"
        started = time.perf_counter()
        summary = import_bitbrains(args.trace, recording, progress=False)
        import_s = time.perf_counter() - started
        started = time.perf_counter()
        replay = replay_from_recording(read_recording(recording))
        replay_s = time.perf_counter() - started
    guests, steps = replay.demand_bytes.shape
    print(
        f"import_bitbrains        {import_s:7.2f} s  ({summary.rows_in:,} rows → {guests} guests)"
    )
    print(
        f"replay_from_recording   {replay_s:7.2f} s  "
        f"({guests} × {steps:,} steps of {replay.step_s:.0f} s)"
    )

    full, full_s = timed_run(replay, ThresholdPolicy())
    per_step_ms = 1000 * full_s / steps
    verdict = "under" if full_s < TARGET_S else "OVER"
    print(
        f"\nvectorised threshold, all {guests} guests: {full_s:.1f} s "
        f"({per_step_ms:.2f} ms a step, {guests * steps / full_s / 1e6:.2f} M guest-steps/s; "
        f"{verdict} the {TARGET_S:.0f} s target)"
    )
    m = full.metrics
    print(
        f"  reclaimed {m['reclaimed_pct']:.1f} % ({m['reclaimed_gib_per_guest']:.2f} GiB/guest), "
        f"under-provisioned {m['under_provisioned_pct']:.2f} % of samples, "
        f"{m['changes_per_guest_day']:.1f} changes/guest-day"
    )

    n = min(args.subset, guests)
    part = replay.first_guests(n)
    vec, vec_s = timed_run(part, ThresholdPolicy())
    loop, loop_s = timed_run(part, PerGuestThreshold())
    same = np.array_equal(vec.alloc_bytes, loop.alloc_bytes)
    scale = guests / n
    naive_s = loop_s * scale
    # The simulator's own per-step work (ingest, guards, guest model) is vectorised in both
    # runs and grows far less than linearly with guests: only the decisions scale by guest.
    decisions_s = max(loop_s - vec_s, 0.0)
    split_s = full_s + decisions_s * scale
    print(f"\nfirst {n} guests, same simulator, same guards:")
    print(f"  vectorised ThresholdPolicy.decide       {vec_s:7.1f} s")
    print(
        f"  per-guest Python (PerGuestThreshold)    {loop_s:7.1f} s  "
        f"({1e6 * decisions_s / (n * steps):.1f} µs more per guest-step)"
    )
    print(f"  identical allocations at every step     {'yes' if same else 'NO'}")
    print(f"\nper-guest Python extrapolated to {guests} guests:")
    print(
        f"  its {n}-guest time × {scale:g}                       {naive_s:7.0f} s"
        f"  → vectorised {naive_s / full_s:.1f}× faster"
    )
    print(
        f"  vectorised {guests}-guest time + its extra × {scale:g}   {split_s:7.0f} s"
        f"  → vectorised {split_s / full_s:.1f}× faster"
    )
    print(f"\n{load()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
