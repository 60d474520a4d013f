"""Test data: a small recording, a fleet with history and host-agent samples, shared by several
test and bench modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from autoscaler.fleet import Fleet
from autoscaler.learn.features import WINDOW_SAMPLES
from autoscaler.recordings.recording import write_recording
from autoscaler.testing import ingest, sample

GIB = 2**30
T0 = 1_700_000_000.0
STEP_S = 300.0


def guest_sample(ts_s: float, *, oom_kills: int = 0, balloon_pages: int = 0) -> dict[str, Any]:
    """One calm 4 GiB guest's stats message, as a host agent sends it."""
    return {
        "ts": ts_s,
        "ram_bytes": 4 * GIB,
        "actual": balloon_pages,
        "stats": {
            "total-memory": 4 * GIB,
            "available-memory": 3 * GIB,
            "free-memory": 2 * GIB,
            "swap-in": 0,
            "major-faults": 120,
            "oom-kills": oom_kills,
        },
    }


def stats_message(ts_s: float, available_bytes: float = 3 * GIB) -> bytes:
    """The smallest stats message of a 4 GiB guest with no balloon."""
    return orjson.dumps(
        {
            "ts": ts_s,
            "ram_bytes": 4 * GIB,
            "actual": 0,
            "stats": {"total-memory": 4 * GIB, "available-memory": int(available_bytes)},
        }
    )


def host_batch(guests: int, ts_s: float) -> bytes:
    """A host-agent batch message of ``guests`` calm guests ``g0`` … at ``ts_s``."""
    return orjson.dumps({"samples": {f"g{i}": guest_sample(ts_s) for i in range(guests)}})


def small_recording(path: Path, guests: int = 6, steps: int = 400) -> Path:
    """Guests with a daily-ish wave of demand and a burst, sampled every 60 s."""
    rng = np.random.default_rng(7)
    rows: dict[str, list[object]] = {
        "host": [],
        "guest": [],
        "ts": [],
        "ram_bytes": [],
        "demand_bytes": [],
    }
    for g in range(guests):
        ram = 4 * GIB
        phase = rng.uniform(0, 2 * np.pi)
        for k in range(steps):
            demand = GIB * (1.2 + 0.8 * np.sin(phase + k / 40)) + (
                1.5 * GIB if 200 <= k < 220 else 0
            )
            rows["host"].append("h")
            rows["guest"].append(f"g{g}")
            rows["ts"].append(T0 + 60 * k + rng.uniform(0, 5))
            rows["ram_bytes"].append(ram)
            rows["demand_bytes"].append(min(demand, ram))
    write_recording(rows, path, source="test")
    return path


def fleet_with_history(
    samples: int, *, interval_s: float = STEP_S, n: int = 4, swap_last: bool = False
) -> Fleet:
    ts0 = 1_700_000_000.0
    fleet = Fleet(max_guests=n, history_len=WINDOW_SAMPLES, epoch_s=ts0)
    for k in range(samples):
        for g in range(n):
            ram = 8 * GIB
            used = (0.1 + 0.05 * g + 0.02 * np.sin(k)) * ram
            ts = ts0 + k * interval_s
            swap = 0.0 if not (swap_last and k == samples - 1) else 50.0 * 2**20 * interval_s
            ingest(
                fleet,
                "h",
                f"g{g}",
                sample(
                    ts,
                    ram_bytes=ram,
                    total_memory=ram,
                    available_memory=ram - used,
                    swap_in=swap,
                ),
                ts,
            )
    return fleet
