"""Learned-policy benchmark: what the ``regressor`` policy costs per control tick.

For fleets of 1,000 / 10,000 / 100,000 guests whose history windows are full (32 samples, five
minutes apart, as the shipped model expects), it times ``RegressorPolicy.decide(view)`` — the
whole decision: history windows, features, one ``predict`` call for the fleet, the composed
threshold rules for fallback rows, and the decision arrays — and its parts on their own:
``Fleet.ordered_history``, ``compute_features`` and ``model.predict``. Median and p99 over
``--repeats`` runs; the machine (CPU, cores, library versions, OpenMP threads) is printed first.

The bar from the learned-policy issue: 10,000 guests in under 100 ms per tick.

Run: ``.venv/bin/python -m bench.predict [--sizes 1000,10000,100000] [--repeats 20]
[--model models/NAME.skops]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

from autoscaler.fleet import Fleet
from autoscaler.learn.features import WINDOW_SAMPLES, compute_features
from autoscaler.plugins import create_policy
from autoscaler.stats import N_STATS, STAT_INDEX
from autoscaler.tick import fleet_view
from policies.regressor import RegressorPolicy

GIB: Final = 2**30
STEP_S: Final = 300.0
"""Sample interval of the shipped model's training data."""
BAR_GUESTS: Final = 10_000
BAR_MS: Final = 100.0


def machine() -> str:
    import sklearn  # type: ignore[import-untyped]
    from threadpoolctl import threadpool_info  # type: ignore[import-untyped]

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    threads = sorted({f"{i['internal_api']}={i['num_threads']}" for i in threadpool_info()})
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"scikit-learn {sklearn.__version__}; threads: {', '.join(threads) or 'n/a'}"
    )


def filled_fleet(n: int, rng: np.random.Generator) -> Fleet:
    """``n`` guests with a full window of samples: demand wandering around a per-guest level,
    with occasional bursts, RAM from 1 to 64 GiB."""
    start_s = 1_700_000_000.0
    fleet = Fleet(max_guests=n, history_len=WINDOW_SAMPLES, epoch_s=start_s, initial_capacity=n)
    slots = np.array([fleet.slot_for(f"h{i // 100}", f"g{i}", start_s) for i in range(n)])
    ram = rng.choice(np.array([1, 2, 4, 8, 16, 32, 64]) * GIB, size=n).astype(np.float64)
    level = rng.uniform(0.03, 0.6, n)
    values = np.full((n, N_STATS), np.nan)
    values[:, STAT_INDEX["total-memory"]] = ram
    for k in range(WINDOW_SAMPLES):
        share = np.clip(level + rng.normal(0, 0.02, n) + (rng.random(n) < 0.05) * 0.2, 0.01, 1)
        values[:, STAT_INDEX["available-memory"]] = ram * (1 - share)
        ts_s = start_s + k * STEP_S
        fleet.ingest_batch(
            slots,
            ts_s=np.full(n, ts_s),
            ram_bytes=ram,
            num_pages=np.zeros(n),
            actual_pages=np.zeros(n),
            values=values,
            recv_s=ts_s,
        )
    return fleet


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median, p99) wall time in milliseconds."""
    fn()  # warm-up: first calls pay for imports and OpenMP thread start
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000.0)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.99 * len(samples)))]


def bench_size(policy: RegressorPolicy, n: int, rng: np.random.Generator, repeats: int) -> float:
    """Time one fleet size, print its row; return the median decide time in ms."""
    fleet = filled_fleet(n, rng)
    now_s = float(np.nanmax(fleet.ts_s)) + 1.0
    view = fleet_view(fleet, now_s)
    decision = policy.decide(view)
    predicted = int(np.count_nonzero(decision.reason == 0))
    slots = view.slots
    windows = fleet.ordered_history(slots)
    features = compute_features(windows, view.ram_bytes)
    decide = timed(lambda: policy.decide(view), repeats)
    history = timed(lambda: fleet.ordered_history(slots), repeats)
    featurise = timed(lambda: compute_features(windows, view.ram_bytes), repeats)
    predict = timed(lambda: policy.model_.predict(features), repeats)
    print(
        f"{n:>8,}  {decide[0]:>7.1f} (p99 {decide[1]:>5.1f})  {history[0]:>10.1f}  "
        f"{featurise[0]:>11.1f}  {predict[0]:>10.1f}   ({predicted:,} guests predicted)"
    )
    return decide[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", help="model file (default: the shipped model)")
    args = parser.parse_args()
    params = {"model_path": args.model} if args.model else {}
    policy = create_policy("regressor", params)
    assert isinstance(policy, RegressorPolicy)
    rng = np.random.default_rng(0)
    print(f"machine: {machine()}")
    print(
        f"model: {policy.card_.training_data.get('path', '?')} "
        f"({policy.model_.n_iter_} trees, {policy.model_.n_features_in_} features)"
    )
    header = (
        f"{'guests':>8}  {'decide ms':>16}  {'history ms':>10}  {'features ms':>11}  "
        f"{'predict ms':>10}"
    )
    print(header)
    print("-" * len(header))
    verdicts = []
    for n in (int(size) for size in args.sizes.split(",")):
        decide_ms = bench_size(policy, n, rng, args.repeats)
        if n == BAR_GUESTS:
            ok = decide_ms < BAR_MS
            verdicts.append(
                f"{BAR_GUESTS:,} guests: {decide_ms:.1f} ms median per tick "
                f"({'under' if ok else 'OVER'} the {BAR_MS:.0f} ms bar)"
            )
    for verdict in verdicts:
        print(verdict)


if __name__ == "__main__":
    main()
