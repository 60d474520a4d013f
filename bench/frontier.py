"""What the held-out week allows: the best per-guest sizing rules, chosen with hindsight.

The learned policy's quality bar asks for one policy that, on the validation days, reclaims at
least as much memory as ``threshold`` while being under-provisioned less often than ``vpa``.
This script measures how far *any* rule of the usual kinds can get, with an advantage no real
policy has: it picks each guest's rule on the very days it is scored on.

The rules: the allocation for the next step is the guest's highest demand over the last ``W``
steps (``W`` from 5 minutes to 3 days; optionally also the demand around the same time one and
seven days before) plus a slack of ``s`` bytes (0 to 512 GiB), clipped to the guards' floor and
ceiling. That family contains what ``threshold`` (latest demand + free-memory watermarks),
``vpa`` (a high percentile of past peaks + margin) and the learned policy (latest demand + a
predicted rise + headroom) do for a steady guest. Each rule is scored open loop on the trace's
demand: no step limits, no dead band, no balloon speed, no censored demand when a guest is
short — all of which only cost a real policy.

For each price ``λ`` of memory, every guest takes the rule minimising
``under-provisioned samples + λ × allocated byte-steps``: the best split of memory between
guests for that price, fitted on the scored days. Sweeping ``λ`` traces the frontier: the
fewest under-provisioned samples for each share of memory reclaimed. It is an optimistic
reference, not a proof about every conceivable policy; a policy that beats it must foresee
bursts that neither the guest's recent level nor its history of peaks announce.

Prints the frontier, the closed-loop results of the baselines and shipped models from the
model cards in ``models/`` (``balloon-autoscaler train`` writes them there), and the two
numbers the bar turns on: the fewest under-provisioned samples at ``threshold``'s reclaim, and
the most reclaim at ``vpa``'s share of under-provisioned samples. ``--plot FILE`` draws it.

Run: ``.venv/bin/python -m bench.frontier [--trace PATH | --recording FILE]
[--validation-days 7] [--plot frontier.png]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import numpy as np

from autoscaler.config import GuardSettings
from autoscaler.recordings.recording import read_recording
from autoscaler.recordings.traces import TRACES_DIR_ENV, find_trace, import_bitbrains
from autoscaler.sim.simulate import Replay, current_metric_names, replay_from_recording

ROOT: Final = Path(__file__).resolve().parent.parent
MODELS: Final = ROOT / "models"
DAY_S: Final = 86_400.0
GIB: Final = 2**30
WINDOWS_STEPS: Final = (1, 2, 3, 6, 12, 36, 72, 288, 864)
"""Look-backs of the windowed-peak rules, in steps (5 min .. 3 days at 300 s)."""
DAILY_WINDOW_STEPS: Final = (1, 12)
"""Look-backs combined with the demand one and seven days before (daily and weekly jobs)."""
SLACKS_BYTES: Final = np.concatenate([[0.0], np.geomspace(4 * 2**20, 512 * GIB, 120)])
PRICES: Final = np.geomspace(1e-14, 1e-8, 121)


def load_replay(args: argparse.Namespace) -> Replay:
    if args.recording is not None:
        return replay_from_recording(read_recording(args.recording))
    with tempfile.TemporaryDirectory(prefix="bench-frontier-") as tmp:
        recording = Path(tmp) / "recording.parquet"
        import_bitbrains(args.trace, recording, progress=False)
        return replay_from_recording(read_recording(recording))


def shifted_peak(demand: np.ndarray, first: int, lags: range | list[int]) -> np.ndarray:
    """For each scored step k >= first: max of demand[k - lag] over ``lags`` (NaN if none)."""
    steps = demand.shape[1]
    out = np.full((demand.shape[0], steps - first), -np.inf)
    for lag in lags:
        if first - lag < 0:
            continue
        part = demand[:, first - lag : steps - lag]
        out = np.fmax(out, np.where(np.isnan(part), -np.inf, part))
    return np.where(np.isfinite(out), out, np.nan)


def rule_bases(replay: Replay, first: int) -> dict[str, np.ndarray]:
    """Each rule's base allocation (before slack) for every guest and scored step."""
    demand = replay.demand_bytes
    bases = {
        f"peak of last {w}": shifted_peak(demand, first, range(1, w + 1)) for w in WINDOWS_STEPS
    }
    day = round(DAY_S / replay.step_s)
    for w in DAILY_WINDOW_STEPS:
        # The step being sized is k; "this time yesterday" is k − day, give or take one step.
        around = [day - 1, day, day + 1, 7 * day - 1, 7 * day, 7 * day + 1]
        periodic = shifted_peak(demand, first, around)
        bases[f"peak of last {w}, 1 and 7 days ago"] = np.fmax(bases[f"peak of last {w}"], periodic)
    return bases


def per_guest_costs(
    replay: Replay, first: int, guards: GuardSettings
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(under-provisioned samples, allocated byte-steps) per guest and rule, samples, RAM-steps."""
    ram = replay.ram_bytes[:, None]
    floor = np.minimum(np.maximum(guards.floor_bytes, guards.floor_share * ram), ram)
    ceiling = guards.ceiling_share * ram
    need = replay.demand_bytes[:, first:]
    scored = ~np.isnan(need)
    under, allocated = [], []
    for base in rule_bases(replay, first).values():
        for slack in SLACKS_BYTES:
            # A guest without history is held at its whole RAM, as every policy holds it.
            alloc = np.where(np.isnan(base), ram, np.clip(base + slack, floor, ceiling))
            under.append(np.sum((alloc < need) & scored, axis=1))
            allocated.append(np.sum(np.where(scored, alloc, 0.0), axis=1))
    ram_steps = float(np.sum(np.where(scored, ram, 0.0)))
    return np.stack(under, 1), np.stack(allocated, 1), int(scored.sum()), ram_steps


def frontier(
    under: np.ndarray, allocated: np.ndarray, samples: int, ram_steps: float
) -> np.ndarray:
    """float[points, 2]: (reclaimed %, under-provisioned %) for each price, best per guest."""
    rows = np.arange(len(under))
    points = []
    for price in PRICES:
        choice = np.argmin(under + price * allocated, axis=1)
        reclaimed = 100.0 * (1.0 - allocated[rows, choice].sum() / ram_steps)
        points.append((reclaimed, 100.0 * under[rows, choice].sum() / samples))
    return np.array(sorted(set(points)))


def card_results() -> dict[str, dict[str, float]]:
    """Closed-loop validation results written by `train` into the model cards in models/."""
    results: dict[str, dict[str, float]] = {}
    for card_file in sorted(MODELS.glob("*.json")):
        try:
            card: dict[str, Any] = json.loads(card_file.read_text())
            policies = card["metrics"]["validation_simulation"]["policies"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for label, metrics in policies.items():
            name = f"{label} ({card_file.stem})" if label == "regressor" else label
            results.setdefault(name, current_metric_names(metrics))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--trace",
        type=Path,
        default=find_trace(),
        help="Bitbrains CSV [default: $BALLOON_TRACES_DIR/bitbrains-rnd-2013-08.csv.gz]",
    )
    source.add_argument("--recording", type=Path, help="a recording (Parquet file or directory)")
    parser.add_argument("--validation-days", type=float, default=7.0)
    parser.add_argument("--plot", type=Path, help="write the frontier as a PNG")
    args = parser.parse_args()
    if args.recording is None and args.trace is None:
        print(f"no trace: give --trace or set {TRACES_DIR_ENV}", file=sys.stderr)
        return 2
    if args.recording is None and not args.trace.is_file():
        print(f"no trace at {args.trace}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    replay = load_replay(args)
    # The same split as `train`: the last validation days of the recording.
    end_s = float(np.nanmax(replay.grid_s))
    first = int(np.searchsorted(replay.grid_s, end_s - args.validation_days * DAY_S))
    guests, steps = replay.demand_bytes.shape
    under, allocated, samples, ram_steps = per_guest_costs(replay, first, GuardSettings())
    points = frontier(under, allocated, samples, ram_steps)
    print(
        f"{guests} guests, {steps - first:,} scored steps of {replay.step_s:.0f} s, {samples:,} "
        f"samples; {under.shape[1]:,} rules per guest; {time.perf_counter() - started:.0f} s\n"
    )
    print("hindsight frontier (each guest's best rule for the price, chosen on the scored days)")
    print(f"{'reclaimed':>10} {'under-provisioned':>18}")
    shown = np.unique(np.round(np.interp(np.arange(65, 90), points[:, 0], np.arange(len(points)))))
    for i in shown.astype(int):
        print(f"{points[i, 0]:9.1f} % {points[i, 1]:16.3f} %")

    results = card_results()
    if results:
        print("\nclosed-loop results on the same days (model cards in models/)")
        for name, m in results.items():
            print(
                f"  {name:38s} {m['reclaimed_pct']:5.1f} % reclaimed, "
                f"{m['under_provisioned_pct']:6.3f} % under-provisioned"
            )
    if "threshold" in results and "vpa" in results:
        reclaim_bar = results["threshold"]["reclaimed_pct"]
        under_bar = results["vpa"]["under_provisioned_pct"]
        # The frontier's under-provisioned share falls as less is reclaimed: interpolate on it.
        best_under = float(np.interp(reclaim_bar, points[:, 0], points[:, 1]))
        order = np.argsort(points[:, 1])
        best_reclaim = float(np.interp(under_bar, points[order, 1], points[order, 0]))
        print(
            f"\nthe bar: at least {reclaim_bar:.1f} % reclaimed with under {under_bar:.3f} % "
            f"under-provisioned\n"
            f"  hindsight best at {reclaim_bar:.1f} % reclaimed: {best_under:.3f} % "
            f"under-provisioned ({best_under / under_bar:.1f} × the bar)\n"
            f"  hindsight best at {under_bar:.3f} % under-provisioned: {best_reclaim:.1f} % "
            f"reclaimed ({reclaim_bar - best_reclaim:.1f} points short)"
        )
    if args.plot is not None:
        plot(points, results, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


def plot(points: np.ndarray, results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(points[:, 0], points[:, 1], label="hindsight frontier (open loop)", color="black")
    for name, m in results.items():
        ax.scatter(m["reclaimed_pct"], m["under_provisioned_pct"], zorder=3)
        ax.annotate(name, (m["reclaimed_pct"], m["under_provisioned_pct"]), fontsize=8)
    if "threshold" in results and "vpa" in results:
        # The bar's region: at least threshold's reclaim and fewer shortfalls than vpa.
        reclaim_bar = results["threshold"]["reclaimed_pct"]
        under_bar = results["vpa"]["under_provisioned_pct"]
        ax.fill_between([reclaim_bar, 90], 0.005, under_bar, alpha=0.15, color="green")
        ax.text(reclaim_bar, under_bar * 0.55, " the bar", fontsize=8, color="green")
    ax.set_yscale("log")
    ax.set_xlim(50, 90)
    ax.set_ylim(0.005, 10)
    ax.set_xlabel("memory reclaimed (% of provisioned)")
    ax.set_ylabel("under-provisioned samples (%)")
    ax.set_title("Held-out week: reclaimed vs under-provisioned")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
