"""The tick driver: fleet state → policy → guards → target changes. No I/O.

The daemon and the simulator both run the control loop as :meth:`TickDriver.step`: emergency
deflates for the guests ingest flagged, then the tick; each batch of :class:`TargetChange` goes
out to be applied (by the daemon's adapter, asynchronously, or to the simulated guests), and
whatever was accepted goes back into the fleet (:meth:`TickDriver.commit`) before the next batch
is decided. A policy that raises, or returns a decision that fails
:meth:`~autoscaler.policy.Decision.validate`, holds every target for that tick: the error is
reported in the result, and the next tick tries again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from autoscaler.adapters.base import Target
from autoscaler.config import GuardSettings
from autoscaler.fleet import URGENT_REASONS, Fleet
from autoscaler.guards import (
    G_HEADROOM,
    G_TROUBLE,
    GUARD_NAMES,
    apply_guards,
    current_pages,
    emergency_pages,
    headroom_bytes,
    reaction_s,
    trouble_floor,
)
from autoscaler.policy import Decision, FleetView, Policy, PolicyError
from autoscaler.stats import PAGE_BYTES

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TargetChange(Target):
    """A :class:`~autoscaler.adapters.base.Target` as the tick decided it, with what the
    controller keeps track of: the target it replaces and the fleet slot to commit it to."""

    previous_pages: int
    emergency: bool = False
    slot: int = -1
    uid: int = 0


@dataclass(slots=True)
class TickResult:
    changes: list[TargetChange]
    guests: int
    stale: int = 0
    duration_s: float = 0.0
    """Time to decide: fleet view, policy and guards."""
    build_s: float = 0.0
    """Time to turn the decision into :class:`TargetChange` objects for the adapter."""
    error: str | None = None
    decision: Decision | None = field(default=None, repr=False)
    view: FleetView | None = field(default=None, repr=False)


@dataclass(slots=True)
class StepResult:
    """What one control step (:meth:`TickDriver.step`) did."""

    emergencies: list[TargetChange]
    """The emergency deflates decided (applied or not)."""
    tick: TickResult | None
    """The tick, unless the step handled emergencies only."""
    applied: list[TargetChange] = field(default_factory=list)
    """The changes that were accepted and committed, emergencies first."""


ControlStep = Generator[list[TargetChange], Sequence[TargetChange], StepResult]
"""A step in progress: yields each batch of changes to apply, takes back the accepted ones."""


def fleet_view(
    fleet: Fleet,
    now_s: float,
    rows: np.ndarray | None = None,
    *,
    host_stale_after_s: float = math.inf,
) -> FleetView:
    """Snapshot the active guests (or the given slots) of ``fleet`` as policy input.

    Host stats older than ``host_stale_after_s`` read as unknown (NaN): a dead host agent's last
    numbers must not keep steering host-aware policies and the host budget guard.
    """
    slots = np.flatnonzero(fleet.active) if rows is None else rows
    host_index = fleet.host_idx[slots]
    host_total = fleet.host_total_bytes[host_index]
    host_available = fleet.host_available_bytes[host_index]
    if math.isfinite(host_stale_after_s):
        fresh = fleet.host_stats_fresh(now_s, host_stale_after_s)[host_index]
        host_total = np.where(fresh, host_total, np.nan)
        host_available = np.where(fresh, host_available, np.nan)
    ram = fleet.ram_bytes[slots]
    actual = fleet.actual_pages[slots]
    guards = fleet.guards
    reaction = reaction_s(fleet.interval_s[slots], fleet.tick_interval_s, guards)
    growth = fleet.growth_bps[slots]
    trouble = fleet.trouble_s[slots]
    return FleetView(
        now_s=now_s,
        slots=slots,
        uid=fleet.uid[slots],
        host_index=host_index,
        ts_s=fleet.ts_s[slots],
        age_s=fleet.sample_age_s(slots, now_s),
        ram_bytes=ram,
        alloc_bytes=ram - np.nan_to_num(actual, nan=0.0) * PAGE_BYTES,
        demand_bytes=fleet.demand_bytes[slots],
        target_pages=_target_in_force(fleet, slots),
        command_pages=fleet.target_pages[slots],
        stats=fleet.stats[slots],
        rates=fleet.rates[slots],
        host_total_bytes=host_total,
        host_available_bytes=host_available,
        shares=fleet.shares[slots],
        reaction_s=reaction,
        growth_bps=growth,
        headroom_bytes=headroom_bytes(ram, growth, reaction, guards),
        trouble_floor_bytes=trouble_floor(fleet.trouble_floor_bytes[slots], trouble, now_s, guards),
        trouble_s=trouble,
        since_s=fleet.since_s[slots],
        fleet=fleet,
    )


def _target_in_force(fleet: Fleet, slots: np.ndarray) -> np.ndarray:
    """The balloon target each guest is under: the device's own report (``num_pages``) when it
    was sampled after our last command, else our last command.

    Trusting only our own memory would miss a target lost on the way (a restarted VM, an agent
    that did not know the guest yet): the guards would compare against a target the device
    never got, and never send it again. Right after a command the device may still report the
    old one for a sample or two; those samples predate the command and are not believed.
    """
    committed = fleet.target_pages[slots]
    reported = fleet.num_pages[slots]
    newer = fleet.ts_s[slots] > fleet.target_s[slots]  # False while either is NaN
    use_reported = ~np.isnan(reported) & (newer | np.isnan(committed))
    return np.asarray(np.where(use_reported, reported, committed))


def _checked(decision: object, n: int) -> Decision:
    if not isinstance(decision, Decision):
        raise PolicyError(f"decide() returned {type(decision).__name__}, not a Decision")
    decision.validate(n)
    return decision


class TickDriver:
    """Runs one policy with the guards over a fleet."""

    def __init__(
        self,
        fleet: Fleet,
        policy: Policy,
        guards: GuardSettings,
        *,
        stale_after_s: float,
        explain: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.explain = explain
        """Format each change's reason text; the simulator turns it off (nobody reads them)."""
        self.clock = clock
        """When applied targets took effect, for :meth:`commit`: the daemon's wall clock, read
        once the adapter is done; ``None`` commits at the step's own time (simulated time)."""
        self.fleet = fleet
        self.policy = policy
        self.guards = guards
        self.stale_after_s = stale_after_s
        self.policy_name = policy.name or type(policy).__name__

    def step(self, now_s: float, urgent: Iterable[int] = (), *, tick: bool = True) -> ControlStep:
        """One turn of the control loop at ``now_s``: emergency deflates for the ``urgent``
        slots, then (if ``tick``) the tick.

        Each non-empty batch of changes is yielded to be applied; the caller sends back the ones
        that were accepted, and they are committed before the next batch is decided (the tick
        must see the emergency targets in force). Run it with :func:`run_step` or
        :func:`drive_step`.
        """
        result = StepResult(self.emergency(urgent, now_s), None)
        if result.emergencies:
            self._commit_applied((yield result.emergencies), now_s, result)
        if tick:
            result.tick = self.tick(now_s)
            if result.tick.changes:
                self._commit_applied((yield result.tick.changes), now_s, result)
        return result

    def _commit_applied(
        self, applied: Sequence[TargetChange], now_s: float, result: StepResult
    ) -> None:
        self.commit(applied, now_s if self.clock is None else self.clock())
        result.applied.extend(applied)

    def tick(self, now_s: float) -> TickResult:
        started = time.perf_counter()
        view = fleet_view(self.fleet, now_s, host_stale_after_s=self.stale_after_s)
        n = len(view)
        try:
            decision = _checked(self.policy.decide(view), n)
            return self._changes(view, decision, now_s, started)
        except Exception as exc:
            # A broken policy (or a decision that passed the checks but breaks the guards or
            # the reason texts) must not stop the controller: hold everything, say why, go on.
            return TickResult([], n, duration_s=time.perf_counter() - started, error=repr(exc))

    def _changes(
        self, view: FleetView, decision: Decision, now_s: float, started: float
    ) -> TickResult:
        """The guarded target changes of one decision."""
        n = len(view)
        guarded = apply_guards(
            view, decision.target_bytes, self.guards, stale_after_s=self.stale_after_s
        )
        decided_s = time.perf_counter() - started
        rows = guarded.rows
        previous = current_pages(view)[rows]
        reasons = [
            _with_guard(reason, guard, view, row)
            for reason, guard, row in zip(
                decision.reason_texts(rows, fill=self.explain),
                guarded.guard.tolist(),
                rows.tolist(),
                strict=True,
            )
        ]
        guest_ids = self.fleet.guest_ids
        hosts = self.fleet.hosts
        # One list conversion per column, then plain Python: scalar numpy indexing per change
        # would cost several times more at tens of thousands of changes.
        changes = [
            TargetChange(
                host_id=hosts[host],
                guest_id=guest_ids[slot],
                num_pages=pages,
                ram_bytes=ram,
                previous_pages=before,
                policy=self.policy_name,
                reason=reason,
                ts_s=now_s,
                slot=slot,
                uid=uid,
            )
            for slot, uid, host, ram, before, pages, reason in zip(
                view.slots[rows].tolist(),
                view.uid[rows].tolist(),
                view.host_index[rows].tolist(),
                view.ram_bytes[rows].astype(np.int64).tolist(),
                previous.astype(np.int64).tolist(),
                guarded.num_pages.tolist(),
                reasons,
                strict=True,
            )
        ]
        return TickResult(
            changes,
            n,
            stale=guarded.stale,
            duration_s=decided_s,
            build_s=time.perf_counter() - started - decided_s,
            decision=decision,
            view=view,
        )

    def emergency(self, slots: Iterable[int], now_s: float) -> list[TargetChange]:
        """Immediate deflate targets for ``slots`` (rate-limited per guest), each with the
        reason ingest flagged it for (:data:`~autoscaler.fleet.URGENT_REASONS`)."""
        fleet = self.fleet
        min_interval_s = self.guards.emergency_min_interval_s
        due = [
            s
            for s in set(slots)
            if fleet.active[s] and now_s - fleet.emergency_s[s] >= min_interval_s
        ]
        if not due:
            return []
        view = fleet_view(
            fleet,
            now_s,
            np.array(sorted(due), dtype=np.int64),
            host_stale_after_s=self.stale_after_s,
        )
        pages = emergency_pages(view, self.guards)
        previous = current_pages(view)
        changes = []
        for row in np.flatnonzero(pages < previous).tolist():
            slot = int(view.slots[row])
            fleet.emergency_s[slot] = now_s
            changes.append(
                TargetChange(
                    host_id=view.host_id(row),
                    guest_id=view.guest_id(row),
                    num_pages=int(pages[row]),
                    ram_bytes=int(view.ram_bytes[row]),
                    previous_pages=int(previous[row]),
                    policy="emergency",
                    reason=_emergency_text(view, row),
                    ts_s=now_s,
                    emergency=True,
                    slot=slot,
                    uid=int(view.uid[row]),
                )
            )
        return changes

    def commit(self, changes: Sequence[TargetChange], now_s: float) -> None:
        """Record targets that the adapter accepted."""
        for change in changes:
            self.fleet.commit_target(change.slot, change.uid, change.num_pages, now_s)


def run_step(
    step: ControlStep, apply: Callable[[list[TargetChange]], Sequence[TargetChange]]
) -> StepResult:
    """Run ``step`` to its end; ``apply`` takes a batch of changes and returns the accepted."""
    try:
        changes = next(step)
        while True:
            changes = step.send(apply(changes))
    except StopIteration as done:
        result: StepResult = done.value
        return result


async def drive_step(
    step: ControlStep, apply: Callable[[list[TargetChange]], Awaitable[Sequence[TargetChange]]]
) -> StepResult:
    """:func:`run_step` with an asynchronous ``apply`` (the daemon's adapter)."""
    try:
        changes = next(step)
        while True:
            changes = step.send(await apply(changes))
    except StopIteration as done:
        result: StepResult = done.value
        return result


MIB = 2**20


def _with_guard(reason: str, guard: int, view: FleetView, row: int) -> str:
    """The policy's reason, and the guard that changed its proposal."""
    if guard == G_HEADROOM:
        return f"{reason}; raised to keep headroom: {_headroom_text(view, row)}"
    if guard == G_TROUBLE:
        floor_mib = view.trouble_floor_bytes[row] / MIB
        return f"{reason}; raised to the trouble floor {floor_mib:.0f} MiB"
    return f"{reason} (limited by {GUARD_NAMES[guard]})" if guard else reason


def _headroom_text(view: FleetView, row: int) -> str:
    """How the guest's headroom came about, e.g. ``demand 310 MiB + 336 MiB (16.0 MiB/s × 14 s
    × 1.5)``; the bounds are named when they apply."""
    settings = view.fleet.guards if view.fleet is not None else None
    headroom_mib = view.headroom_bytes[row] / MIB
    text = f"demand {view.demand_bytes[row] / MIB:.0f} MiB + {headroom_mib:.0f} MiB"
    if settings is None:
        return text
    rate_mibps = max(np.nan_to_num(view.growth_bps[row]), settings.prior_growth_bps) / MIB
    covered_mib = rate_mibps * view.reaction_s[row] * settings.headroom_factor
    bound = ""
    if headroom_mib > covered_mib + 0.5:
        bound = ", the minimum"
    elif headroom_mib < covered_mib - 0.5:
        bound = ", at most a share of RAM"
    return (
        f"{text} ({rate_mibps:.1f} MiB/s × {view.reaction_s[row]:.0f} s × "
        f"{settings.headroom_factor:g}{bound})"
    )


def _emergency_text(view: FleetView, row: int) -> str:
    fleet = view.fleet
    code = int(fleet.urgent[int(view.slots[row])]) if fleet is not None else 0
    why = URGENT_REASONS[code] if code else "pressure"
    left_mib = (view.alloc_bytes[row] - view.demand_bytes[row]) / MIB
    return f"emergency: {why} ({left_mib:.0f} MiB left; {_headroom_text(view, row)})"


def describe(change: TargetChange) -> str:
    ram = change.ram_bytes
    old_gib = (ram - change.previous_pages * PAGE_BYTES) / 2**30
    new_gib = change.target_bytes / 2**30
    return (
        f"{change.host_id}/{change.guest_id}: num_pages {change.previous_pages} → "
        f"{change.num_pages} (allocation {old_gib:.2f} → {new_gib:.2f} GiB) "
        f"[{change.policy}] {change.reason}"
    )


__all__ = [
    "ControlStep",
    "StepResult",
    "TargetChange",
    "TickDriver",
    "TickResult",
    "describe",
    "drive_step",
    "fleet_view",
    "run_step",
]
