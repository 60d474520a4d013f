"""Fleet state: the latest sample and a bounded history window of every guest, as numpy columns.

One row ("slot") per tracked guest. Ingest finds a guest's slot per message (a dict lookup,
:meth:`Fleet.slot_for`) and stores the samples gathered since the last store in one vectorised
call (:meth:`Fleet.ingest_batch`); the control tick reads whole columns at once, so a policy
decides for the whole fleet in one vectorised call. Memory is bounded by ``max_guests``: a
flood of made-up guest ids is rejected once the table is full and nothing has expired, and
known guests keep being served.
Hosts have a table of their own (their guests' host and the host agent's stats), bounded by
``max_hosts`` (``max_guests`` by default) the same way; a host is forgotten once no guest refers
to it and its agent has been silent for ``ttl_s``.

Demand — the memory a guest needs — is ``total − available`` minus the part of the balloon that
the guest still counts in ``total``. Without VIRTIO_BALLOON_F_DEFLATE_ON_OOM the driver removes
ballooned pages from MemTotal (``adjust_managed_page_count``), so ``ram − total`` already covers
the balloon; with it, MemTotal stays put and ballooned pages look used. Counting
``balloon_in_total = clip(balloon − (ram − total), 0, balloon)`` handles both without being
told which mode a guest uses. It over-estimates demand by the kernel's own reservations
(``ram − MemTotal`` at boot, typically tens of MiB), which errs on the guest's side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np

from autoscaler.config import GuardSettings
from autoscaler.guards import headroom_bytes, reaction_s, trouble_floor
from autoscaler.stats import (
    CUMULATIVE_MASK,
    HISTORY_CHANNELS,
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
    STAT_INDEX,
    available_memory_bytes,
    counter_rates,
)

H_TS: Final = 0
CLOCK_SLACK_S: Final = 1.0
"""How far ahead of our clock a stored ts may be and still count as our clock's (NTP-synced
clocks agree far better; see :func:`_clock_went_back`)."""
H_DEMAND: Final = 1
H_ALLOC: Final = 2
_HISTORY_RATE_TAGS: Final = np.array([STAT_INDEX[name] for name in HISTORY_CHANNELS[3:]])

URGENT_REASONS: Final[tuple[str, ...]] = (
    "",
    "major faults above the emergency rate",
    "swap-in above the emergency rate",
    "allocation stall",
    "available memory below the critical level",
    "demand grows fast enough to run out within the reaction time",
    "the guest deflated its balloon itself (deflate-on-oom)",
    "OOM kill",
)
"""Why ingest flagged a guest for an emergency deflate (``Fleet.urgent``; 0 = not urgent).

A later code wins when several apply: the most telling one names the emergency."""
U_NONE, U_FAULTS, U_SWAP, U_STALL, U_CRITICAL, U_EXHAUSTING, U_SELF_DEFLATE, U_OOM = range(8)
NOISE_GROWTH_BPS: Final = 2**20
"""Demand growth below 1 MiB/s is noise (page cache, allocator churn), never an emergency."""
SELF_DEFLATE_PAGES: Final = 256
"""A balloon 1 MiB below its target and shrinking is the guest deflating it, not rounding."""
MAX_INTERVAL_S: Final = 3600.0
"""Longer gaps between samples are outages, not the guest's sampling interval."""


def estimate_demand(
    ram_bytes: np.ndarray,
    actual_pages: np.ndarray,
    *,
    total_bytes: np.ndarray,
    available_bytes: np.ndarray,
    free_bytes: np.ndarray,
    caches_bytes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Demand and allocation in bytes from samples (see the module docstring); NaN if unknown.

    A missing ``actual`` counts as an empty balloon; a missing total as the allocation.
    """
    balloon = np.nan_to_num(actual_pages, nan=0.0) * PAGE_BYTES
    alloc = ram_bytes - balloon
    total = np.where(np.isnan(total_bytes), alloc, total_bytes)
    available = available_memory_bytes(available_bytes, free_bytes, caches_bytes)
    balloon_in_total = np.clip(balloon - (ram_bytes - total), 0.0, balloon)
    demand = np.maximum(total - available - balloon_in_total, 0.0)  # NaN stays NaN
    return demand, alloc


class FleetFull(Exception):
    """A new guest arrived while ``max_guests`` guests are tracked and none has expired.

    The root of the fleet's exceptions::

        FleetFull       a new guest, with ``max_guests`` tracked (``too_many_guests``)
        └── HostsFull   a new host, with ``max_hosts`` tracked (``too_many_hosts``)"""

    reason: str = "too_many_guests"
    """The rejection reason the controller counts."""


class HostsFull(FleetFull):
    """A new host arrived while ``max_hosts`` hosts are tracked and none could be forgotten."""

    reason = "too_many_hosts"


@dataclass(frozen=True, slots=True)
class BatchResult:
    stored: int
    out_of_order: int
    reboots: int
    emergency: np.ndarray
    """Slots whose sample shows trouble (:data:`URGENT_REASONS`) and that have a balloon to give:
    they need an emergency deflate."""
    out_of_order_slot: int = -1
    """The slot of one sample dropped as out of order (for the log line), or -1."""
    clock_resets: int = 0
    """Samples stored although older than the stored one, whose ts was ahead of our clock."""


class Fleet:
    """Columnar state of every tracked guest.

    Arrays are sized by ``capacity`` (grown by doubling up to ``max_guests``); ``active`` marks
    slots in use. A slot's ``uid`` changes whenever the slot is given to a new guest, so a
    stateful policy can tell a new guest from an old one in a reused slot.

    Host columns (``host_*``, indexed by ``host_idx``) are sized by ``host_capacity`` and grown
    by doubling up to ``max_hosts``; ``hosts[i]`` is ``""`` for an unused host index. A host
    index is reused only after no guest refers to it.
    """

    # Per-slot columns (length = capacity).
    active: np.ndarray
    uid: np.ndarray
    host_idx: np.ndarray
    ts_s: np.ndarray
    recv_s: np.ndarray
    sample_recv_s: np.ndarray
    ram_bytes: np.ndarray
    num_pages: np.ndarray
    actual_pages: np.ndarray
    demand_bytes: np.ndarray
    target_pages: np.ndarray
    target_s: np.ndarray
    emergency_s: np.ndarray
    interval_s: np.ndarray
    growth_bps: np.ndarray
    since_s: np.ndarray
    trouble_s: np.ndarray
    trouble_floor_bytes: np.ndarray
    urgent: np.ndarray
    stats: np.ndarray
    rates: np.ndarray
    history: np.ndarray
    hist_count: np.ndarray
    shares: np.ndarray

    def __init__(
        self,
        *,
        max_guests: int = 100_000,
        history_len: int = 32,
        ttl_s: float = 600.0,
        guards: GuardSettings | None = None,
        tick_interval_s: float = 10.0,
        epoch_s: float = 0.0,
        initial_capacity: int = 1024,
        shares: dict[str, float] | None = None,
        default_shares: float = 1000.0,
        max_hosts: int | None = None,
    ) -> None:
        if max_guests < 1 or history_len < 2 or (max_hosts is not None and max_hosts < 1):
            raise ValueError("max_guests and max_hosts must be >= 1 and history_len >= 2")
        self.max_guests = max_guests
        self.max_hosts = max_guests if max_hosts is None else max_hosts
        self.history_len = history_len
        self.ttl_s = ttl_s
        self.guards = guards or GuardSettings()
        """The guard settings that ingest needs: emergency thresholds, headroom, trouble."""
        self.tick_interval_s = tick_interval_s
        """How often the tick runs: part of every guest's reaction time."""
        self.epoch_s = epoch_s
        self.shares_by_guest = dict(shares or {})
        self.default_shares = default_shares
        self.capacity = 0
        self._slots: dict[tuple[str, str], int] = {}
        self._free: list[int] = []
        self._next_uid = 1
        self._last_full_expire_s = -math.inf
        self.guest_ids: list[str] = []
        self.hosts: list[str] = []
        self._host_index: dict[str, int] = {}
        self._host_free: list[int] = []
        self._last_hosts_sweep_s = [-math.inf, -math.inf]  # for host stats, for a guest
        self.host_capacity = 0
        self.host_total_bytes = np.empty(0)
        self.host_available_bytes = np.empty(0)
        self.host_ts_s = np.empty(0)
        """Timestamp of the host's latest stats (the agent's clock); NaN if none yet."""
        self.host_recv_s = np.empty(0)
        """When the host's latest stats arrived (our clock): host entries expire by it."""
        self.host_guests = np.empty(0, dtype=np.int64)
        """Active guests on each host; a host with none can be forgotten."""
        self.host_active = np.empty(0, dtype=bool)
        self._grow(min(initial_capacity, max_guests))
        self._grow_hosts(min(64, self.max_hosts))

    # -- storage -------------------------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        old = self.capacity

        def extend(array: np.ndarray | None, fill: float | int | bool, dtype: str) -> np.ndarray:
            shape = (capacity, *(array.shape[1:] if array is not None else ()))
            new = np.full(shape, fill, dtype=dtype)
            if array is not None:
                new[:old] = array[:old]
            return new

        first = old == 0
        self.active = extend(None if first else self.active, False, "bool")
        self.uid = extend(None if first else self.uid, 0, "int64")
        self.host_idx = extend(None if first else self.host_idx, -1, "int32")
        self.ts_s = extend(None if first else self.ts_s, np.nan, "float64")
        self.recv_s = extend(None if first else self.recv_s, np.nan, "float64")
        self.sample_recv_s = extend(None if first else self.sample_recv_s, np.nan, "float64")
        self.ram_bytes = extend(None if first else self.ram_bytes, np.nan, "float64")
        self.num_pages = extend(None if first else self.num_pages, np.nan, "float64")
        self.actual_pages = extend(None if first else self.actual_pages, np.nan, "float64")
        self.demand_bytes = extend(None if first else self.demand_bytes, np.nan, "float64")
        self.target_pages = extend(None if first else self.target_pages, np.nan, "float64")
        self.target_s = extend(None if first else self.target_s, np.nan, "float64")
        self.emergency_s = extend(None if first else self.emergency_s, -math.inf, "float64")
        self.interval_s = extend(None if first else self.interval_s, np.nan, "float64")
        self.growth_bps = extend(None if first else self.growth_bps, np.nan, "float64")
        self.since_s = extend(None if first else self.since_s, np.nan, "float64")
        self.trouble_s = extend(None if first else self.trouble_s, -math.inf, "float64")
        self.trouble_floor_bytes = extend(
            None if first else self.trouble_floor_bytes, 0.0, "float64"
        )
        self.urgent = extend(None if first else self.urgent, U_NONE, "int8")
        if first:
            self.stats = np.full((capacity, N_STATS), np.nan)
            self.rates = np.full((capacity, N_STATS), np.nan)
            self.history = np.full(
                (capacity, self.history_len, len(HISTORY_CHANNELS)), np.nan, dtype=np.float32
            )
        else:
            self.stats = extend(self.stats, np.nan, "float64")
            self.rates = extend(self.rates, np.nan, "float64")
            self.history = extend(self.history, np.nan, "float32")
        self.hist_count = extend(None if first else self.hist_count, 0, "int64")
        self.shares = extend(None if first else self.shares, self.default_shares, "float64")
        self.guest_ids.extend([""] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    def _grow_hosts(self, capacity: int) -> None:
        old = self.host_capacity

        def extend(array: np.ndarray, fill: float | int | bool) -> np.ndarray:
            new = np.full(capacity, fill, dtype=array.dtype)
            new[:old] = array[:old]
            return new

        self.host_total_bytes = extend(self.host_total_bytes, np.nan)
        self.host_available_bytes = extend(self.host_available_bytes, np.nan)
        self.host_ts_s = extend(self.host_ts_s, np.nan)
        self.host_recv_s = extend(self.host_recv_s, np.nan)
        self.host_guests = extend(self.host_guests, 0)
        self.host_active = extend(self.host_active, False)
        self.hosts.extend([""] * (capacity - old))
        self._host_free.extend(range(capacity - 1, old - 1, -1))
        self.host_capacity = capacity

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def host_count(self) -> int:
        """Hosts tracked: those of active guests and those whose stats arrived lately."""
        return len(self._host_index)

    def slot_of(self, host: str, guest: str) -> int | None:
        return self._slots.get((host, guest))

    def host_id(self, slot: int) -> str:
        return self.hosts[int(self.host_idx[slot])]

    def _host(self, host: str, now_s: float, *, for_guest: bool) -> int:
        """The host's index, allocated on first sight. Raises :class:`HostsFull`."""
        index = self._host_index.get(host)
        if index is not None:
            return index
        if not self._host_free and now_s - self._last_hosts_sweep_s[for_guest] >= 1.0:
            # As for guests: a flood of new ids at capacity must not sweep once per message.
            self._last_hosts_sweep_s[for_guest] = now_s
            # A guest's host matters more than the stats of a host without guests, which
            # come back with that host agent's next report.
            self.expire_hosts(math.inf if for_guest else now_s)
        if not self._host_free:
            if self.host_capacity >= self.max_hosts:
                raise HostsFull(f"tracking {self.max_hosts} hosts (controller.max_guests)")
            self._grow_hosts(min(self.host_capacity * 2, self.max_hosts))
        index = self._host_free.pop()
        self.hosts[index] = host
        self._host_index[host] = index
        self.host_total_bytes[index] = np.nan
        self.host_available_bytes[index] = np.nan
        self.host_ts_s[index] = np.nan
        self.host_recv_s[index] = np.nan
        self.host_guests[index] = 0
        self.host_active[index] = True
        return index

    def expire_hosts(self, now_s: float) -> list[str]:
        """Forget hosts without guests whose stats are older than ``ttl_s`` (receive time)."""
        idle = (
            self.host_active & (self.host_guests == 0) & ~(self.host_recv_s >= now_s - self.ttl_s)
        )
        gone: list[str] = []
        for index in np.flatnonzero(idle).tolist():
            host = self.hosts[index]
            del self._host_index[host]
            self.hosts[index] = ""
            self.host_active[index] = False
            self.host_total_bytes[index] = np.nan
            self.host_available_bytes[index] = np.nan
            self.host_ts_s[index] = np.nan
            self.host_recv_s[index] = np.nan
            self._host_free.append(index)
            gone.append(host)
        return gone

    def host_stats_fresh(self, now_s: float, stale_after_s: float) -> np.ndarray:
        """Per host index: whether its stats are at most ``stale_after_s`` old, both by the
        agent's clock and by their arrival (a ts ahead of our clock must not keep them fresh).

        False for a host without stats or an unused index; aligned with ``host_total_bytes``.
        """
        cutoff_s = now_s - stale_after_s
        return np.asarray((self.host_ts_s >= cutoff_s) & (self.host_recv_s >= cutoff_s))

    def sample_age_s(self, slots: np.ndarray, now_s: float) -> np.ndarray:
        """Age of each slot's stored sample: by its ts or by its arrival, whichever is older.

        The guest's clock alone could make a sample look younger than it is, even of negative
        age; its arrival alone would hide a sample that was old when sent. NaN without one.
        """
        by_ts = now_s - self.ts_s[slots]
        by_arrival = now_s - self.sample_recv_s[slots]
        return np.asarray(np.maximum(by_ts, by_arrival))

    def slot_for(self, host: str, guest: str, now_s: float) -> int:
        """The guest's slot, allocated on first sight. Raises :class:`FleetFull`."""
        slot = self._slots.get((host, guest))
        if slot is not None:
            self.recv_s[slot] = now_s  # heard from: not to be expired before its sample lands
            return slot
        if not self._free and now_s - self._last_full_expire_s >= 1.0:
            # A flood of new ids at capacity would otherwise sweep the table once per message.
            self._last_full_expire_s = now_s
            self.expire(now_s)
        if not self._free:
            if self.capacity >= self.max_guests:
                raise FleetFull(f"tracking {self.max_guests} guests (controller.max_guests)")
            self._grow(min(self.capacity * 2, self.max_guests))
        host_index = self._host(host, now_s, for_guest=True)
        slot = self._free.pop()
        self._slots[(host, guest)] = slot
        self.guest_ids[slot] = guest
        self.active[slot] = True
        self.uid[slot] = self._next_uid
        self._next_uid += 1
        self.host_idx[slot] = host_index
        self.host_guests[host_index] += 1
        self.ts_s[slot] = np.nan
        self.recv_s[slot] = now_s
        self.sample_recv_s[slot] = np.nan
        self.stats[slot] = np.nan
        self.rates[slot] = np.nan
        self.demand_bytes[slot] = np.nan
        self.target_pages[slot] = np.nan
        self.target_s[slot] = np.nan
        self.emergency_s[slot] = -math.inf
        self.interval_s[slot] = np.nan
        self.growth_bps[slot] = np.nan
        # Idleness is observed from the first sight on: nothing is taken before that.
        self.since_s[slot] = now_s
        self.trouble_s[slot] = -math.inf
        self.trouble_floor_bytes[slot] = 0.0
        self.urgent[slot] = U_NONE
        self.hist_count[slot] = 0
        self.history[slot] = np.nan  # the trouble memory reads the window's peak
        self.shares[slot] = self.shares_by_guest.get(guest, self.default_shares)
        return slot

    def admits(self, host: str, guest: str) -> bool:
        """Whether a sample of this guest can be stored without expiring anyone: a known guest,
        or room for a new one. A dict lookup: for turning samples away before validating them.
        """
        return (host, guest) in self._slots or bool(self._free) or self.capacity < self.max_guests

    def expire(self, now_s: float) -> list[tuple[str, str]]:
        """Forget guests that sent nothing for ``ttl_s`` (receive time); return their keys.

        Hosts left without guests whose stats are as old are forgotten too.
        """
        idle = self.active & ~(self.recv_s >= now_s - self.ttl_s)
        gone = self.forget(np.flatnonzero(idle))
        self.expire_hosts(now_s)
        return gone

    def forget(self, slots: np.ndarray) -> list[tuple[str, str]]:
        """Stop tracking the guests in ``slots``; return their keys."""
        gone: list[tuple[str, str]] = []
        for slot in slots.tolist():
            if not self.active[slot]:
                continue
            key = (self.host_id(slot), self.guest_ids[slot])
            del self._slots[key]
            self.host_guests[self.host_idx[slot]] -= 1
            self.active[slot] = False
            self.guest_ids[slot] = ""
            self._free.append(slot)
            gone.append(key)
        return gone

    # -- ingest --------------------------------------------------------------------------------

    def ingest_batch(
        self,
        slots: np.ndarray,
        *,
        ts_s: np.ndarray,
        ram_bytes: np.ndarray,
        num_pages: np.ndarray,
        actual_pages: np.ndarray,
        values: np.ndarray,
        recv_s: float,
    ) -> BatchResult:
        """Store many validated samples at once (one row each; slots from :meth:`slot_for`).

        Rows for the same guest are applied in order. Samples not newer than the guest's last
        one are dropped and counted as out of order.
        """
        n = len(slots)
        if n == 0:
            return BatchResult(0, 0, 0, np.empty(0, dtype=np.int64))
        # Split into rounds in which each slot appears at most once; almost always one round.
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        starts = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
        group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - group_start
        stored = out_of_order = reboots = clock_resets = 0
        out_of_order_slot = -1
        emergency: list[np.ndarray] = []
        for r in range(int(rank.max()) + 1):
            rows = np.flatnonzero(rank == r) if r or rank.any() else np.arange(n)
            result = self._ingest_unique(
                slots[rows],
                ts_s[rows],
                ram_bytes[rows],
                num_pages[rows],
                actual_pages[rows],
                values[rows],
                recv_s,
            )
            stored += result.stored
            out_of_order += result.out_of_order
            reboots += result.reboots
            clock_resets += result.clock_resets
            out_of_order_slot = max(out_of_order_slot, result.out_of_order_slot)
            emergency.append(result.emergency)
        return BatchResult(
            stored,
            out_of_order,
            reboots,
            np.unique(np.concatenate(emergency)),
            out_of_order_slot,
            clock_resets,
        )

    def _ingest_unique(
        self,
        slots: np.ndarray,
        ts_s: np.ndarray,
        ram: np.ndarray,
        num_pages: np.ndarray,
        actual: np.ndarray,
        values: np.ndarray,
        recv_s: float,
    ) -> BatchResult:
        prev_ts = self.ts_s[slots]
        clock_back = _clock_went_back(prev_ts, ts_s, recv_s)
        newer = ~(ts_s <= prev_ts) | clock_back  # NaN (no previous sample) counts as newer
        out_of_order = int(np.count_nonzero(~newer))
        dropped_slot = int(slots[~newer][0]) if out_of_order else -1
        if out_of_order:
            slots, ts_s, ram, num_pages, actual, values, prev_ts, clock_back = (
                a[newer] for a in (slots, ts_s, ram, num_pages, actual, values, prev_ts, clock_back)
            )

        has_prev = ~np.isnan(prev_ts)
        delta = values - self.stats[slots]
        counter_ps, rebooted = counter_rates(delta[:, CUMULATIVE_MASK], ts_s - prev_ts)
        rebooted &= has_prev
        rates = np.full_like(delta, np.nan)
        rates[:, CUMULATIVE_MASK] = counter_ps
        rates[~has_prev | clock_back] = np.nan  # no time base across a clock jump
        self.rates[slots] = rates
        self.stats[slots] = values

        demand, alloc = estimate_demand(
            ram,
            actual,
            total_bytes=values[:, S_TOTAL],
            available_bytes=values[:, S_AVAILABLE],
            free_bytes=values[:, S_FREE],
            caches_bytes=values[:, S_CACHES],
        )
        code = self._watch(
            slots,
            np.where(clock_back, np.nan, ts_s - prev_ts),  # no interval across a clock jump
            ram,
            alloc,
            demand,
            actual,
            num_pages,
            delta,
            recv_s,
            counted=has_prev & ~rebooted,
        )
        self.demand_bytes[slots] = demand
        # Only a guest with a balloon (or one on its way) has memory to be given back at once.
        ballooned = (np.nan_to_num(actual) > 0) | (np.nan_to_num(self.target_pages[slots]) > 0)
        emergency = (code != U_NONE) & ballooned

        self.ts_s[slots] = ts_s
        self.recv_s[slots] = recv_s
        self.sample_recv_s[slots] = recv_s
        self.ram_bytes[slots] = ram
        self.num_pages[slots] = num_pages
        self.actual_pages[slots] = actual

        count = self.hist_count[slots]
        rows = np.empty((len(slots), len(HISTORY_CHANNELS)), dtype=np.float32)
        rows[:, H_TS] = ts_s - self.epoch_s
        rows[:, H_DEMAND] = demand
        rows[:, H_ALLOC] = alloc
        rows[:, 3:] = rates[:, _HISTORY_RATE_TAGS]
        self.history[slots, count % self.history_len] = rows
        self.hist_count[slots] = count + 1
        return BatchResult(
            len(slots),
            out_of_order,
            int(np.count_nonzero(rebooted)),
            slots[emergency],
            dropped_slot,
            int(np.count_nonzero(clock_back)),
        )

    def _watch(
        self,
        slots: np.ndarray,
        dt_s: np.ndarray,
        ram: np.ndarray,
        alloc: np.ndarray,
        demand: np.ndarray,
        actual: np.ndarray,
        num_pages: np.ndarray,
        delta: np.ndarray,
        recv_s: float,
        *,
        counted: np.ndarray,
    ) -> np.ndarray:
        """Track each guest's sampling interval, demand growth and trouble; return the urgent
        code of each new sample (:data:`URGENT_REASONS`). Called before ``demand_bytes``,
        ``actual_pages`` and ``history`` take the new samples."""
        g = self.guards
        step_s = np.minimum(dt_s, MAX_INTERVAL_S)  # NaN on a guest's first sample
        previous = self.interval_s[slots]
        # Smoothed, so that one late sample does not make a guest look slow for long; a run of
        # missed samples does raise it, and with it the guest's reaction time.
        interval = np.where(np.isnan(previous), step_s, 0.75 * previous + 0.25 * step_s)
        interval = np.where(np.isnan(step_s), previous, interval)
        self.interval_s[slots] = interval

        with np.errstate(invalid="ignore", divide="ignore"):
            rising = np.maximum((demand - self.demand_bytes[slots]) / dt_s, 0.0)
        # The fastest recent growth, forgotten with a half-life: a guest that once grew fast
        # keeps the headroom for it for a while. NaN (no growth seen yet) reads as the prior.
        decayed = self.growth_bps[slots] * np.exp2(-np.nan_to_num(dt_s) / g.growth_half_life_s)
        growth = np.fmax(rising, decayed)
        self.growth_bps[slots] = growth
        # A growing guest is not idle: its idleness, which paces inflation, starts again.
        growing = rising > NOISE_GROWTH_BPS
        self.since_s[slots[growing]] = recv_s

        reaction = reaction_s(interval, self.tick_interval_s, g)
        left = alloc - demand
        target = np.where(np.isnan(num_pages), self.target_pages[slots], num_pages)
        self_deflating = (actual < self.actual_pages[slots] - SELF_DEFLATE_PAGES) & (
            actual < target - SELF_DEFLATE_PAGES
        )
        code = np.zeros(len(slots), dtype=np.int8)
        rates = self.rates[slots]
        code[counted & (rates[:, S_MAJOR_FAULTS] > g.emergency_major_faults_ps)] = U_FAULTS
        code[counted & (rates[:, S_SWAP_IN] > g.emergency_swap_in_bps)] = U_SWAP
        code[counted & (delta[:, S_ALLOC_STALLS] > 0)] = U_STALL
        code[left < g.emergency_available_bytes] = U_CRITICAL
        # Out of memory before the next tick could answer: do not wait for it.
        code[(rising > NOISE_GROWTH_BPS) & (left < rising * reaction)] = U_EXHAUSTING
        code[self_deflating] = U_SELF_DEFLATE
        code[counted & (delta[:, S_OOM_KILLS] > 0)] = U_OOM
        self.urgent[slots] = code
        self._remember_trouble(slots, code != U_NONE, ram, alloc, demand, growth, reaction, recv_s)
        return code

    def _remember_trouble(
        self,
        slots: np.ndarray,
        trouble: np.ndarray,
        ram: np.ndarray,
        alloc: np.ndarray,
        demand: np.ndarray,
        growth: np.ndarray,
        reaction: np.ndarray,
        recv_s: float,
    ) -> None:
        """Raise the trouble floor of guests in trouble, and of guests still in their hold, to
        their peak demand (this sample and the history window) plus headroom.

        The floor holds for ``trouble_hold_s`` after the latest trouble, then decays with
        ``trouble_half_life_s`` (:func:`~autoscaler.guards.trouble_floor`): a rescued guest is
        never taken straight back down to where it ran out.
        """
        g = self.guards
        holding = recv_s - self.trouble_s[slots] < g.trouble_hold_s
        rows = np.flatnonzero(trouble | holding)
        if rows.size == 0:
            return
        watched = slots[rows]
        window_peak = np.fmax.reduce(self.history[watched, :, H_DEMAND], axis=1)
        peak = np.fmax(demand[rows], window_peak)
        # A guest that deflated its balloon itself took what it needed: at least that.
        wanted = np.fmax(peak + headroom_bytes(ram[rows], growth[rows], reaction[rows], g), 0.0)
        wanted = np.where(trouble[rows], np.fmax(wanted, alloc[rows]), wanted)
        wanted = np.minimum(wanted, ram[rows])
        current = trouble_floor(
            self.trouble_floor_bytes[watched], self.trouble_s[watched], recv_s, g
        )
        self.trouble_floor_bytes[watched] = np.fmax(current, wanted)
        new = watched[trouble[rows]]
        self.trouble_s[new] = recv_s

    def ingest_host(
        self,
        host: str,
        *,
        ts_s: float,
        total_bytes: float,
        available_bytes: float,
        recv_s: float | None = None,
    ) -> None:
        """Store a host agent's stats (``recv_s`` defaults to ``ts_s``).

        Raises :class:`HostsFull`.
        """
        now_s = ts_s if recv_s is None else recv_s
        index = self._host(host, now_s, for_guest=False)
        self.host_recv_s[index] = now_s
        self.host_ts_s[index] = ts_s
        self.host_total_bytes[index] = total_bytes
        self.host_available_bytes[index] = available_bytes

    def set_shares(self, shares: dict[str, float]) -> None:
        """Replace the shares per guest id and apply them to the tracked guests."""
        self.shares_by_guest = dict(shares)
        for slot in np.flatnonzero(self.active).tolist():
            self.shares[slot] = self.shares_by_guest.get(self.guest_ids[slot], self.default_shares)

    # -- control -------------------------------------------------------------------------------

    def commit_target(self, slot: int, uid: int, num_pages: int, now_s: float) -> None:
        """Remember a target the adapter accepted (unless the slot went to another guest)."""
        if self.uid[slot] == uid:
            self.target_pages[slot] = num_pages
            self.target_s[slot] = now_s
            # Any move restarts the observed idleness that paces the next inflation.
            self.since_s[slot] = now_s

    def ordered_history(self, slots: np.ndarray) -> np.ndarray:
        """History windows of ``slots``, oldest first: float32[n, history_len, channels].

        Rows a guest has not filled yet are NaN (at the front).
        """
        length = self.history_len
        count = self.hist_count[slots]
        # Position j (0 = oldest) of a full ring starts at count % length.
        offsets = (count[:, None] + np.arange(length)[None, :]) % length
        out = self.history[slots[:, None], offsets]
        missing = np.arange(length)[None, :] < (length - np.minimum(count, length))[:, None]
        out[missing] = np.nan
        return np.asarray(out)


def _clock_went_back(prev_ts: np.ndarray, ts_s: np.ndarray, recv_s: float) -> np.ndarray:
    """Rows whose stored ts is ahead of our clock and whose new sample is older than it.

    The stored sample came from a clock that was wrong for a while (within
    ``controller.max_clock_skew_s``); dropping the corrected clock's samples as out of order
    would lock the guest out until real time caught up, its OOM kills unseen. An exact
    duplicate (same ts) is still a duplicate, and so is a reordered sample of a clock within
    :data:`CLOCK_SLACK_S` of ours.
    """
    return np.asarray((prev_ts > recv_s + CLOCK_SLACK_S) & (ts_s < prev_ts))
