"""Closed-loop simulation: replay recorded demand through the daemon's own policy and guards.

A recording is replayed as *demand*: the memory each guest needed at each sample (the trace's
``demand_bytes`` where present, else ``total − available`` without the ballooned pages). Time
advances on a fixed grid (``step_s``, by default the recording's median sample interval); at
each step every guest's demand is the latest sample at or before that time (a guest silent for
more than ``max_gap_steps`` steps reports nothing).

Each step, for every policy under test:

1. the simulated guests (:class:`SimulatedGuests`) move their balloons toward the targets set
   so far, at ``inflate_rate_bps`` / ``deflate_rate_bps``;
2. they report the stats they would report at that allocation — available and free memory, and,
   when demand exceeds the allocation, the pressure a real guest would show (swap-in of the
   deficit, major faults, an allocation stall, an OOM kill when the deficit is severe);
3. those stats go through :meth:`Fleet.ingest_batch`, host stats through
   :meth:`Fleet.ingest_host` (guests are placed on simulated hosts, so host-aware policies see
   host memory as they would live);
4. a step of the :class:`~autoscaler.tick.TickDriver` — the very control loop the daemon runs —
   handles emergencies at once and ticks, and the changes are applied to the simulated guests.

So a policy sees the consequences of its own moves. Results are deterministic for the same
inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from autoscaler.config import GuardSettings
from autoscaler.fleet import Fleet
from autoscaler.policy import Policy
from autoscaler.recordings.recording import GuestSeries
from autoscaler.stats import (
    N_STATS,
    PAGE_BYTES,
    S_ALLOC_STALLS,
    S_AVAILABLE,
    S_CACHES,
    S_FREE,
    S_MAJOR_FAULTS,
    S_OOM_KILLS,
    S_SWAP_IN,
    S_TOTAL,
)
from autoscaler.tick import TargetChange, TickDriver, run_step

GIB = 2**30


@dataclass(frozen=True)
class SimulationSettings:
    step_s: float | None = None
    """Time step; ``None`` uses the recording's median sample interval."""
    max_gap_steps: int = 3
    """A guest silent for longer than this many steps reports nothing (and is not scored)."""
    inflate_rate_bps: float = 256 * 2**20
    """How fast a balloon inflates (takes memory): the guest has to free pages first."""
    deflate_rate_bps: float = 1024 * 2**20
    """How fast a balloon deflates (gives memory back)."""
    host_bytes: float = 256 * GIB
    """Memory of each simulated host."""
    overcommit: float = 1.5
    """Guests are placed on a host until their RAM adds up to ``host_bytes × overcommit``."""
    severe_share: float = 0.10
    """A deficit beyond this share of demand is a severe event (a real guest would OOM)."""
    history_len: int = 32
    stale_after_s: float | None = None
    """Defaults to three steps."""


@dataclass(frozen=True)
class Replay:
    """Demand of every guest on a common time grid (bytes; NaN where the guest reported nothing)."""

    hosts: list[str]
    guests: list[str]
    ram_bytes: np.ndarray
    grid_s: np.ndarray
    demand_bytes: np.ndarray
    """float64[guests, steps]."""

    @property
    def step_s(self) -> float:
        return float(self.grid_s[1] - self.grid_s[0]) if len(self.grid_s) > 1 else 0.0

    def first_guests(self, n: int) -> Replay:
        """The first ``n`` guests, over the whole grid."""
        return Replay(
            self.hosts[:n], self.guests[:n], self.ram_bytes[:n], self.grid_s, self.demand_bytes[:n]
        )

    def first_steps(self, n: int) -> Replay:
        """Every guest over the first ``n`` grid steps."""
        return Replay(
            self.hosts, self.guests, self.ram_bytes, self.grid_s[:n], self.demand_bytes[:, :n]
        )

    def from_step(self, first: int) -> Replay:
        """Every guest from grid step ``first`` on."""
        return Replay(
            self.hosts,
            self.guests,
            self.ram_bytes,
            self.grid_s[first:],
            self.demand_bytes[:, first:],
        )


def replay_from_recording(
    table: pa.Table, settings: SimulationSettings = SimulationSettings()
) -> Replay:
    """Put a recording's demand on a common grid (see the module docstring)."""
    series = GuestSeries(table)
    ts, boundaries = series.ts_s, series.boundaries
    ram, demand = series.ram_bytes, series.demand_bytes
    step_s = settings.step_s if settings.step_s is not None else series.step_s
    start, end = float(ts.min()), float(ts.max())
    grid = start + step_s * np.arange(int((end - start) // step_s) + 1)
    guests_n = len(boundaries) - 1
    matrix = np.full((guests_n, len(grid)), np.nan)
    ram_per_guest = np.empty(guests_n)
    for g in range(guests_n):
        a, b = boundaries[g], boundaries[g + 1]
        t = ts[a:b]
        index = np.searchsorted(t, grid, side="right") - 1
        seen = index >= 0
        fresh = seen & (grid - t[np.maximum(index, 0)] <= settings.max_gap_steps * step_s)
        # Capacity in traces jitters by a few hundred KiB: the largest value is the boot RAM.
        ram_per_guest[g] = ram[a:b].max()
        row = np.where(fresh, demand[a:b][np.maximum(index, 0)], np.nan)
        matrix[g] = np.minimum(row, ram_per_guest[g])
    return Replay(series.hosts, series.guests, ram_per_guest, grid, matrix)


class SimulatedGuests:
    """Guests that follow balloon targets at a finite rate and report what they would report.

    Row ``g`` is guest ``g`` of the replay.
    """

    def __init__(self, *, ram_bytes: np.ndarray, settings: SimulationSettings) -> None:
        self.settings = settings
        self.ram_bytes = np.asarray(ram_bytes, dtype=np.float64)
        n = len(self.ram_bytes)
        self.alloc_bytes = self.ram_bytes.copy()
        self.target_bytes = self.ram_bytes.copy()
        self.counters = np.zeros((n, N_STATS))

    def steer(self, row: int, target_bytes: int) -> None:
        """Set the allocation guest ``row`` moves toward from the next :meth:`advance` on."""
        self.target_bytes[row] = target_bytes

    def advance(self, dt_s: float, demand_bytes: np.ndarray) -> None:
        """Move balloons for ``dt_s``, then account the pressure of ``demand_bytes``."""
        gap = self.target_bytes - self.alloc_bytes
        move = np.clip(
            gap, -self.settings.inflate_rate_bps * dt_s, self.settings.deflate_rate_bps * dt_s
        )
        self.alloc_bytes += move
        deficit = np.nan_to_num(np.maximum(demand_bytes - self.alloc_bytes, 0.0))
        short = deficit > 0
        # A guest short of memory pages the deficit in from swap once per step: swap-in and
        # major faults grow with it; each short step stalls an allocation at least once.
        self.counters[:, S_SWAP_IN] += deficit
        self.counters[:, S_MAJOR_FAULTS] += np.floor(deficit / PAGE_BYTES)
        self.counters[:, S_ALLOC_STALLS] += short
        severe = deficit > self.settings.severe_share * np.nan_to_num(demand_bytes)
        self.counters[:, S_OOM_KILLS] += short & severe

    def stats(self, demand_bytes: np.ndarray) -> np.ndarray:
        """float64[n, 16]: what each guest reports at its allocation (balloon leaves MemTotal)."""
        values = self.counters.copy()
        available = np.maximum(self.alloc_bytes - demand_bytes, 0.0)
        values[:, S_TOTAL] = self.alloc_bytes
        values[:, S_AVAILABLE] = available
        values[:, S_FREE] = np.floor(available / 2)
        values[:, S_CACHES] = available - values[:, S_FREE]
        return values


def place_on_hosts(ram_bytes: np.ndarray, settings: SimulationSettings) -> np.ndarray:
    """Host index of each guest: first fit in guest order up to host size × overcommit."""
    capacity = settings.host_bytes * settings.overcommit
    host = np.zeros(len(ram_bytes), dtype=np.int64)
    current, used = 0, 0.0
    for i, ram in enumerate(ram_bytes.tolist()):
        if used and used + ram > capacity:
            current, used = current + 1, 0.0
        host[i] = current
        used += ram
    return host


@dataclass
class PolicyRun:
    """The outcome of one policy over a replay."""

    label: str
    alloc_bytes: np.ndarray
    """float64[guests, steps]: the allocation each guest had at each step."""
    changes: np.ndarray
    """int64[guests]: target changes per guest."""
    emergencies: int = 0
    policy_errors: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


RENAMED_METRICS: dict[str, str] = {"reclaimed_gib": "reclaimed_gib_per_guest"}
"""Metric keys of earlier versions (in model cards written then) → their names now."""


def current_metric_names(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with keys of earlier versions renamed, so that old summaries and cards read
    as new ones; a key present under both names keeps the new one's value."""
    renamed = {RENAMED_METRICS.get(key, key): value for key, value in metrics.items()}
    renamed.update({key: value for key, value in metrics.items() if key not in RENAMED_METRICS})
    return renamed


def compute_metrics(
    replay: Replay, alloc_bytes: np.ndarray, changes: int, settings: SimulationSettings
) -> dict[str, float]:
    """Fleet-wide metrics: memory reclaimed, slack, under-provisioning and its deficit, severe
    events (a deficit above ``severe_share`` of demand) and target changes per guest-day; all
    recomputable from allocations.parquet."""
    demand = replay.demand_bytes
    valid = ~np.isnan(demand)
    samples = int(valid.sum())
    if samples == 0:
        return {}
    ram = np.broadcast_to(replay.ram_bytes[:, None], demand.shape)[valid]
    alloc = alloc_bytes[valid]
    need = demand[valid]
    step_h = replay.step_s / 3600.0
    deficit = np.maximum(need - alloc, 0.0)
    guest_days = samples * replay.step_s / 86_400.0
    return {
        "reclaimed_gib_per_guest": float(np.mean(ram - alloc) / GIB),
        "reclaimed_pct": float(100.0 * np.sum(ram - alloc) / np.sum(ram)),
        "relative_slack": float(np.mean((alloc - need) / alloc)),
        "under_provisioned_pct": float(100.0 * np.mean(alloc < need)),
        "deficit_gib_h": float(np.sum(deficit) * step_h / GIB),
        "severe_events": int(np.sum(deficit > settings.severe_share * need)),
        "changes_per_guest_day": float(changes / guest_days) if guest_days else 0.0,
        "samples": samples,
    }


def simulate_policy(
    replay: Replay,
    policy: Policy,
    guards: GuardSettings,
    settings: SimulationSettings = SimulationSettings(),
    *,
    label: str | None = None,
    progress: Callable[[int], object] | None = None,
) -> PolicyRun:
    """Run one policy over ``replay``, closed loop (see the module docstring)."""
    n, steps = replay.demand_bytes.shape
    step_s = replay.step_s or 1.0
    stale_after_s = settings.stale_after_s or 3 * step_s
    start = float(replay.grid_s[0]) if steps else 0.0
    fleet = Fleet(
        max_guests=max(n, 1),
        history_len=settings.history_len,
        ttl_s=math.inf,
        guards=guards,
        tick_interval_s=step_s,
        epoch_s=start,
        initial_capacity=max(n, 1),
        shares=guards.shares,
    )
    host_of = place_on_hosts(replay.ram_bytes, settings)
    host_names = [f"simhost{h}" for h in range(int(host_of.max()) + 1 if n else 0)]
    slots = np.array(
        [fleet.slot_for(host_names[host_of[g]], replay.guests[g], start) for g in range(n)],
        dtype=np.int64,
    )
    guests = SimulatedGuests(ram_bytes=replay.ram_bytes, settings=settings)
    row_of = {slot: g for g, slot in enumerate(slots.tolist())}
    driver = TickDriver(fleet, policy, guards, stale_after_s=stale_after_s, explain=False)
    alloc_out = np.empty((n, steps))
    changes = np.zeros(n, dtype=np.int64)
    emergencies = errors = 0
    num_pages = np.full(n, np.nan)

    def apply(batch: list[TargetChange]) -> list[TargetChange]:
        """Every target reaches its simulated guest."""
        for change in batch:
            row = row_of[change.slot]
            guests.steer(row, change.target_bytes)
            changes[row] += 1
        return batch

    for k in range(steps):
        now_s = float(replay.grid_s[k])
        demand = replay.demand_bytes[:, k]
        guests.advance(step_s, demand)
        alloc_out[:, k] = guests.alloc_bytes
        present = ~np.isnan(demand)
        values = guests.stats(demand)
        actual = np.round((guests.ram_bytes - guests.alloc_bytes) / PAGE_BYTES)
        result = fleet.ingest_batch(
            slots[present],
            ts_s=np.full(int(present.sum()), now_s),
            ram_bytes=guests.ram_bytes[present],
            num_pages=num_pages[present],
            actual_pages=actual[present],
            values=values[present],
            recv_s=now_s,
        )
        used = np.bincount(host_of, weights=guests.alloc_bytes, minlength=len(host_names))
        for h, name in enumerate(host_names):
            fleet.ingest_host(
                name,
                ts_s=now_s,
                total_bytes=settings.host_bytes,
                available_bytes=max(settings.host_bytes - used[h], 0.0),
            )
        step = run_step(driver.step(now_s, result.emergency.tolist()), apply)
        emergencies += len(step.emergencies)
        errors += step.tick is not None and step.tick.error is not None
        if progress is not None:
            progress(1)
    run = PolicyRun(label or driver.policy_name, alloc_out, changes, emergencies, errors)
    run.metrics = compute_metrics(replay, alloc_out, int(changes.sum()), settings)
    run.metrics["emergency_deflates"] = emergencies
    return run


def allocations_table(replay: Replay, runs: Sequence[PolicyRun]) -> pa.Table:
    """One row per policy, guest and step with demand and allocation (only scored samples)."""
    valid = ~np.isnan(replay.demand_bytes)
    g_idx, k_idx = np.nonzero(valid)
    hosts = np.array(replay.hosts, dtype=object)[g_idx]
    names = np.array(replay.guests, dtype=object)[g_idx]
    parts = []
    for run in runs:
        parts.append(
            pa.table(
                {
                    "policy": pa.array([run.label] * len(g_idx), pa.string()),
                    "host": pa.array(hosts, pa.string()),
                    "guest": pa.array(names, pa.string()),
                    "ts": pa.array(replay.grid_s[k_idx], pa.float64()),
                    "ram_bytes": pa.array(replay.ram_bytes[g_idx], pa.float64()),
                    "demand_bytes": pa.array(replay.demand_bytes[valid], pa.float64()),
                    "alloc_bytes": pa.array(run.alloc_bytes[valid], pa.float64()),
                }
            )
        )
    return pa.concat_tables(parts) if parts else pa.table({})


def settings_dict(settings: SimulationSettings) -> dict[str, Any]:
    return asdict(settings)
