"""Guards: the safety post-processing applied to every policy's proposal, for the whole fleet.

Recommend, then post-process, then apply (as the Kubernetes VPA does). Whatever a policy proposes:

1. stale data freezes a guest: no change on stats older than ``controller.stale_after_s``;
2. the allocation stays within [floor, ceiling]: floor = max(``floor_bytes``,
   ``floor_share`` × RAM), ceiling = ``ceiling_share`` × RAM (boot RAM at most);
3. one tick moves the allocation by at most a step: inflating (taking memory) by
   min(``max_inflate_step_bytes``, ``max_inflate_step_share`` × RAM), deflating (giving it back)
   by min(``max_deflate_step_bytes``, ``max_deflate_step_share`` × RAM) — giving back is the
   safe direction, so its default limit is loose;
4. changes smaller than the dead band, max(``dead_band_bytes``, ``dead_band_share`` × RAM),
   against the last target are skipped: each balloon move costs the guest work;
5. the result is a whole number of 4 KiB balloon pages, rounded so that the guest gets *at least*
   the allocation asked for, within the u32 range of ``num_pages``.

Emergency deflate (an oom-kill or alloc-stall increase, or heavy swap-in, seen at ingest) skips
the tick: the guest gets max(``emergency_deflate_bytes``, ``emergency_deflate_share`` × RAM) back
at once, at most once per ``emergency_min_interval_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from autoscaler.config import GuardSettings
from autoscaler.policy import FleetView
from autoscaler.stats import MAX_NUM_PAGES, PAGE_BYTES

GUARD_NAMES: Final[tuple[str, ...]] = ("", "floor", "ceiling", "max step", "host budget")
G_NONE, G_FLOOR, G_CEILING, G_STEP, G_HOST = range(5)


@dataclass(frozen=True, slots=True)
class GuardedTargets:
    """Rows (indices into the view) whose balloon target changes, and the new targets."""

    rows: np.ndarray
    num_pages: np.ndarray
    guard: np.ndarray
    """Which guard shaped each target (index into :data:`GUARD_NAMES`, 0 = none)."""
    stale: int
    """Guests frozen for stale data this tick."""


def pages_for_allocation(ram_bytes: np.ndarray, alloc_bytes: np.ndarray) -> np.ndarray:
    """Balloon pages that leave at least ``alloc_bytes`` to the guest (int64, u32-bounded)."""
    pages = np.floor((ram_bytes - alloc_bytes) / PAGE_BYTES)
    limit = np.minimum(MAX_NUM_PAGES, ram_bytes // PAGE_BYTES)
    # Unknown RAM or allocation (NaN) becomes 0 pages; callers only use rows they can move.
    return np.asarray(np.nan_to_num(np.clip(pages, 0, limit)), dtype=np.int64)


def current_pages(view: FleetView) -> np.ndarray:
    """The balloon target in force: ours if we set one, else the balloon's actual size."""
    actual_pages = (view.ram_bytes - view.alloc_bytes) / PAGE_BYTES
    pages = np.where(np.isnan(view.target_pages), actual_pages, view.target_pages)
    return np.asarray(np.nan_to_num(pages, nan=0.0))


def apply_guards(
    view: FleetView, proposed_bytes: np.ndarray, settings: GuardSettings, *, stale_after_s: float
) -> GuardedTargets:
    ram = view.ram_bytes
    alloc = view.alloc_bytes
    fresh = view.age_s <= stale_after_s  # NaN age compares False: unknown age is stale
    wanted = np.isfinite(proposed_bytes) & np.isfinite(ram) & np.isfinite(alloc)
    live = wanted & fresh

    ceiling = settings.ceiling_share * ram
    floor = np.minimum(np.maximum(settings.floor_bytes, settings.floor_share * ram), ceiling)
    target = np.clip(proposed_bytes, floor, ceiling)
    guard = np.full(len(view), G_NONE, dtype=np.int8)
    guard[proposed_bytes < floor] = G_FLOOR
    guard[proposed_bytes > ceiling] = G_CEILING

    if settings.host_budget_share > 0:
        # Guests the policy holds take part too: a host over budget reclaims from them as well.
        eligible = fresh & np.isfinite(ram) & np.isfinite(alloc)
        budgeted = host_budget(view, np.where(live, target, alloc), eligible, floor, settings)
        changed = budgeted < np.where(live, target, alloc)
        guard[changed] = G_HOST
        target = np.where(changed, budgeted, target)
        live = live | changed
        wanted = wanted | changed

    inflate_step = np.minimum(
        settings.max_inflate_step_bytes, settings.max_inflate_step_share * ram
    )
    deflate_step = np.minimum(
        settings.max_deflate_step_bytes, settings.max_deflate_step_share * ram
    )
    limited = np.clip(target, alloc - inflate_step, alloc + deflate_step)
    # The step limit never pushes a guest below its floor nor above its ceiling.
    limited = np.clip(limited, np.minimum(floor, alloc), np.maximum(ceiling, alloc))
    guard[limited != target] = G_STEP
    target = limited

    pages = pages_for_allocation(ram, np.where(live, target, alloc))
    reference = current_pages(view)
    dead_band_pages = (
        np.maximum(settings.dead_band_bytes, settings.dead_band_share * ram) / PAGE_BYTES
    )
    moves = live & (np.abs(pages - reference) >= np.maximum(dead_band_pages, 1.0))
    rows = np.flatnonzero(moves)
    return GuardedTargets(rows, pages[rows], guard[rows], int(np.count_nonzero(wanted & ~fresh)))


def host_budget(
    view: FleetView,
    target: np.ndarray,
    eligible: np.ndarray,
    floor: np.ndarray,
    settings: GuardSettings,
) -> np.ndarray:
    """Lower targets so that each host's committed memory stays under its budget.

    A host's projected use is what its agent reports as used (total − available) plus what
    this tick would add to its guests' allocations. Above ``host_budget_share`` × total, the
    excess is taken from the host's guests in proportion to their spare memory — allocation
    above max(floor, demand × (1 + ``host_budget_headroom_share``)) — divided by their shares
    (``guards.shares``, 1000 by default: more shares, less taken). Nobody goes below that
    line: a host that cannot be brought under budget that way stays over it rather than starve
    a guest. Hosts without stats are left alone.
    """
    n = len(view)
    if n == 0:
        return target
    hosts = int(view.host_index.max()) + 1
    h = view.host_index
    total = np.full(hosts, np.nan)
    total[h] = view.host_total_bytes
    used = np.full(hosts, np.nan)
    used[h] = view.host_total_bytes - view.host_available_bytes
    growth = np.bincount(
        h, weights=np.where(eligible, target - view.alloc_bytes, 0.0), minlength=hosts
    )
    need = np.nan_to_num(used + growth - settings.host_budget_share * total, nan=0.0)
    need = np.maximum(need, 0.0)
    if not need.any():
        return target
    keep = np.maximum(floor, view.demand_bytes * (1.0 + settings.host_budget_headroom_share))
    spare = np.where(eligible & np.isfinite(keep), np.maximum(target - keep, 0.0), 0.0)
    target = target.copy()
    # Proportional shares saturate when a guest runs out of spare memory; a few rounds hand the
    # rest to the others.
    for _ in range(4):
        weight = spare / view.shares
        per_host = np.bincount(h, weights=weight, minlength=hosts)
        with np.errstate(invalid="ignore", divide="ignore"):
            take = np.nan_to_num(need[h] * weight / per_host[h])
        take = np.minimum(take, spare)
        target -= take
        spare -= take
        need = np.maximum(need - np.bincount(h, weights=take, minlength=hosts), 0.0)
        if not np.any(need > PAGE_BYTES):
            break
    return target


def emergency_pages(view: FleetView, settings: GuardSettings) -> np.ndarray:
    """Balloon targets that give each guest of ``view`` its emergency share of memory back."""
    ram = view.ram_bytes
    alloc = np.maximum(view.alloc_bytes, ram - current_pages(view) * PAGE_BYTES)
    give_back = np.maximum(settings.emergency_deflate_bytes, settings.emergency_deflate_share * ram)
    return pages_for_allocation(ram, np.minimum(alloc + give_back, settings.ceiling_share * ram))
