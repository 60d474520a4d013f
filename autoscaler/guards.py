"""Guards: the safety post-processing applied to every policy's proposal, for the whole fleet.

Recommend, then post-process, then apply (as the Kubernetes VPA does). Whatever a policy proposes:

1. stale data freezes a guest: no change on stats older than ``controller.stale_after_s``;
2. the allocation stays within [floor, ceiling]: floor = max(``floor_bytes``,
   ``floor_share`` × RAM, the guest's trouble floor), ceiling = ``ceiling_share`` × RAM;
3. **headroom**: allocation − demand ≥ the guest's headroom, for every guest, whether the policy
   moves it or holds it. The headroom covers the guest's *reaction time* — how long it takes
   to see a change and answer it: its sampling interval + the tick interval +
   ``device_latency_s`` — at the fastest demand growth seen lately, never less than
   ``prior_growth_bps``, times ``headroom_factor``; at least ``headroom_min_bytes``, at most
   ``headroom_max_share`` × RAM;
4. taking memory (inflating) is paced in time, not ticks: at most
   min(``max_inflate_bps``, ``max_inflate_share_per_s`` × RAM) per second of observed
   idleness (since the guest's last target change, first sample or last demand growth, up to a
   minute),
   and nothing during ``trouble_hold_s`` after trouble; giving memory back is limited by
   min(``max_deflate_step_bytes``, ``max_deflate_step_share`` × RAM) per move, loose by default;
5. changes smaller than the dead band, max(``dead_band_bytes``, ``dead_band_share`` × RAM),
   against the last target are skipped: each balloon move costs the guest work;
6. the result is a whole number of 4 KiB balloon pages, rounded so that the guest gets *at least*
   the allocation asked for, within the u32 range of ``num_pages``.

**Trouble** is an OOM kill, an allocation stall, heavy swap-in or major faults, available memory
under ``emergency_available_bytes``, demand growing fast enough to run out within the reaction
time, or a balloon the guest deflated itself (deflate-on-oom). Ingest sees it (fleet.py) and the
guest gets an **emergency deflate** at once, without waiting for the tick: max(
``emergency_deflate_bytes``, ``emergency_deflate_share`` × RAM, what its headroom needs), at most
once per ``emergency_min_interval_s``. Its **trouble floor** rises to its peak demand plus
headroom and holds for ``trouble_hold_s``, then decays with ``trouble_half_life_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from autoscaler.config import GuardSettings
from autoscaler.policy import FleetView
from autoscaler.stats import MAX_NUM_PAGES, PAGE_BYTES

GUARD_NAMES: Final[tuple[str, ...]] = (
    "",
    "floor",
    "ceiling",
    "max step",
    "host budget",
    "headroom",
    "trouble floor",
)
G_NONE, G_FLOOR, G_CEILING, G_STEP, G_HOST, G_HEADROOM, G_TROUBLE = range(7)
IDLE_WINDOW_S: Final = 60.0
"""Idleness paces inflation for at most a minute (or one reaction time, if longer): a guest
left alone for a day is not emptied in one move when it turns idle."""


@dataclass(frozen=True, slots=True)
class GuardedTargets:
    """Rows (indices into the view) whose balloon target changes, and the new targets."""

    rows: np.ndarray
    num_pages: np.ndarray
    guard: np.ndarray
    """Which guard shaped each target (index into :data:`GUARD_NAMES`, 0 = none)."""
    stale: int
    """Guests frozen for stale data this tick."""


def reaction_s(
    interval_s: np.ndarray, tick_interval_s: float, settings: GuardSettings
) -> np.ndarray:
    """Seconds from a change in a guest's demand to memory given back: the next sample that
    shows it (the guest's sampling interval; one tick interval while unknown), the next tick,
    and the device (its stats' age and the balloon's move)."""
    sample_s = np.where(np.isnan(interval_s), tick_interval_s, interval_s)
    return np.asarray(sample_s + tick_interval_s + settings.device_latency_s)


def headroom_bytes(
    ram_bytes: np.ndarray, growth_bps: np.ndarray, reaction_s: np.ndarray, settings: GuardSettings
) -> np.ndarray:
    """Memory a guest keeps above its demand: what its growth would use in its reaction time.

    The growth rate is the fastest seen lately, never below ``prior_growth_bps`` (a guest that
    never grew can start to: 16 MiB/s × 14 s × 1.5 = 336 MiB with the defaults), times
    ``headroom_factor``; bounded below by ``headroom_min_bytes`` and above by
    ``headroom_max_share`` × RAM, so that small guests still give memory back.
    """
    rate_bps = np.fmax(growth_bps, settings.prior_growth_bps)
    covered = rate_bps * reaction_s * settings.headroom_factor
    bounded = np.minimum(covered, settings.headroom_max_share * ram_bytes)
    return np.asarray(np.maximum(settings.headroom_min_bytes, bounded))


def trouble_floor(
    floor_bytes: np.ndarray, trouble_s: np.ndarray, now_s: float, settings: GuardSettings
) -> np.ndarray:
    """The trouble floor in force at ``now_s``: held for ``trouble_hold_s`` after the latest
    trouble, then halved every ``trouble_half_life_s`` (0 for a guest never in trouble)."""
    past_s = np.maximum(now_s - trouble_s - settings.trouble_hold_s, 0.0)
    return np.asarray(floor_bytes * np.exp2(-past_s / settings.trouble_half_life_s))


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
    known = np.isfinite(ram) & np.isfinite(alloc)
    wanted = np.isfinite(proposed_bytes) & known
    live = wanted & fresh

    ceiling = settings.ceiling_share * ram
    base_floor = np.maximum(settings.floor_bytes, settings.floor_share * ram)
    floor = np.minimum(np.fmax(base_floor, view.trouble_floor_bytes), ceiling)
    target = np.clip(proposed_bytes, floor, ceiling)
    guard = np.full(len(view), G_NONE, dtype=np.int8)
    guard[proposed_bytes < floor] = G_FLOOR
    guard[(proposed_bytes < floor) & (view.trouble_floor_bytes > base_floor)] = G_TROUBLE
    guard[proposed_bytes > ceiling] = G_CEILING

    # Headroom for every fresh guest, whether the policy moves it or holds it: the policy may
    # not know how fast the guest can grow, or may be a plugin that never thought of it.
    headroom = headroom_bytes(ram, view.growth_bps, view.reaction_s, settings)
    need = np.minimum(np.fmax(view.demand_bytes + headroom, floor), ceiling)
    base = np.where(wanted, target, alloc)
    short = fresh & known & (base < need)
    troubled = view.trouble_floor_bytes > base_floor
    guard[short] = np.where(troubled[short], G_TROUBLE, G_FLOOR)
    guard[short & (need > floor)] = G_HEADROOM
    target = np.where(short, need, base)
    live = live | short
    wanted = wanted | short

    if settings.host_budget_share > 0:
        # Guests the policy holds take part too: a host over budget reclaims from them as well.
        eligible = fresh & known
        budgeted = host_budget(view, np.where(live, target, alloc), eligible, need, settings)
        changed = budgeted < np.where(live, target, alloc)
        guard[changed] = G_HOST
        target = np.where(changed, budgeted, target)
        live = live | changed
        wanted = wanted | changed

    # Taking memory is paced per second of observed idleness, so the tick interval does not
    # change how fast a guest is squeezed; after trouble, nothing is taken for a while.
    window_s = np.maximum(view.reaction_s, IDLE_WINDOW_S)
    idle_s = np.nan_to_num(np.clip(view.now_s - view.since_s, 0.0, window_s))
    idle_s[view.now_s - view.trouble_s < settings.trouble_hold_s] = 0.0
    inflate_step = (
        np.minimum(settings.max_inflate_bps, settings.max_inflate_share_per_s * ram) * idle_s
    )
    deflate_step = np.minimum(
        settings.max_deflate_step_bytes, settings.max_deflate_step_share * ram
    )
    reference = current_pages(view)
    # Inflation steps from our own last command, which the balloon may still be moving toward:
    # a step from where the balloon is would undo it (an emergency deflate not yet applied, an
    # inflation half done). Without a command of ours, from where the balloon is.
    commanded = np.where(np.isnan(view.command_pages), alloc, ram - view.command_pages * PAGE_BYTES)
    limited = np.clip(target, commanded - inflate_step, alloc + deflate_step)
    # The step limit never pushes a guest below its floor nor above its ceiling.
    limited = np.clip(limited, np.minimum(floor, alloc), np.maximum(ceiling, alloc))
    guard[limited != target] = G_STEP
    target = limited

    pages = pages_for_allocation(ram, np.where(live, target, alloc))
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
    required: np.ndarray,
    settings: GuardSettings,
) -> np.ndarray:
    """Lower targets so that each host's committed memory stays under its budget.

    A host's projected use is what its agent reports as used (total − available) plus what
    this tick would add to its guests' allocations. Above ``host_budget_share`` × total, the
    excess is taken from the host's guests in proportion to their spare memory — allocation
    above max(floor, demand + headroom, demand × (1 + ``host_budget_headroom_share``)) —
    divided by their shares (``guards.shares``, 1000 by default: more shares, less taken).
    Nobody goes below that line: a host that cannot be brought under budget that way stays over
    it rather than starve a guest. Hosts without stats are left alone.
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
    keep = np.maximum(required, view.demand_bytes * (1.0 + settings.host_budget_headroom_share))
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
    """Balloon targets that give each guest of ``view`` its emergency memory back at once:
    max(``emergency_deflate_bytes``, ``emergency_deflate_share`` × RAM) more than it has, and
    at least its demand plus headroom (up to its ceiling)."""
    ram = view.ram_bytes
    alloc = np.maximum(view.alloc_bytes, ram - current_pages(view) * PAGE_BYTES)
    give_back = np.maximum(settings.emergency_deflate_bytes, settings.emergency_deflate_share * ram)
    headroom = headroom_bytes(ram, view.growth_bps, view.reaction_s, settings)
    wanted = np.fmax(alloc + give_back, view.demand_bytes + headroom)
    return pages_for_allocation(ram, np.minimum(wanted, settings.ceiling_share * ram))
