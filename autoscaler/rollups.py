"""Demand history by wall-clock time: per-guest rollups on fixed periods, as numpy columns.

Counting samples makes history depend on how often a guest reports: 32 samples are 2 h 40 min
at 300 s and 2 min 40 s at 5 s. Rollups do not: whatever the sampling interval, a guest's
history is the peak (and mean) demand of each 5-minute window of the last 24 hours and the peak
of each hour of the last 8 days, the way Google's Autopilot keeps memory usage. A recording at
300 s and the same demand reported every second fill the same windows with the same peaks.

Values are shares of the guest's RAM, stored as ``uint16`` (share × 65534 + 1; 0 = no sample in
that window, so a window's peak is a plain ``maximum``): a resolution of 1/65534 of RAM (16 KiB
of a 1 GiB guest) at 2 bytes a window, which keeps 100,000 guests' eight days in about 150 MiB.
Peaks round up and means to nearest, so a stored peak is never below the demand seen.

Windows are ring buffers indexed by ``period % windows`` (period = ``floor(ts / period_s)``, on
the guest's own clock, which the controller keeps within ``max_clock_skew_s`` of ours); each
guest remembers the newest period it wrote, and a sample in a later period first clears the
windows it skipped, so a silent spell reads as missing, not as stale peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

MISSING: Final = 0
"""A window with no sample."""
SCALE: Final = 65534.0
"""Share of RAM 1.0 is stored as 65534 + 1."""


@dataclass(frozen=True, slots=True)
class Ring:
    """One rollup resolution: ``windows`` windows of ``period_s`` seconds each."""

    period_s: float
    windows: int

    @property
    def span_s(self) -> float:
        return self.period_s * self.windows


FINE: Final = Ring(period_s=300.0, windows=288)
"""5-minute windows for 24 hours: peaks and means."""
COARSE: Final = Ring(period_s=3600.0, windows=192)
"""Hourly windows for 8 days: peaks."""


def _to_share_units(share: np.ndarray, *, round_up: bool) -> np.ndarray:
    scaled = np.clip(share, 0.0, 1.0) * SCALE
    scaled = np.ceil(scaled) if round_up else np.rint(scaled)
    units: np.ndarray = (scaled + 1.0).astype(np.uint16)
    return units


def _from_share_units(units: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.where(
        units == MISSING, np.float32(np.nan), (units - np.float32(1.0)) / np.float32(SCALE)
    )
    return out


class Rollups:
    """Rollups of every guest slot of a :class:`~autoscaler.fleet.Fleet` (rows = slots).

    ``observe`` takes one sample per row (rows unique within a call), ``forget`` clears rows
    given to a new guest, and the readers return windows oldest first, ending with the window
    that holds ``now_s``.
    """

    def __init__(self, capacity: int, fine: Ring = FINE, coarse: Ring = COARSE) -> None:
        self.fine = fine
        self.coarse = coarse
        self.capacity = 0
        self.fine_peak = np.empty((0, fine.windows), dtype=np.uint16)
        self.fine_mean = np.empty((0, fine.windows), dtype=np.uint16)
        self.coarse_peak = np.empty((0, coarse.windows), dtype=np.uint16)
        self.fine_period = np.empty(0, dtype=np.int64)
        """Newest fine period each row wrote (−1: none)."""
        self.coarse_period = np.empty(0, dtype=np.int64)
        self.mean_sum = np.empty(0, dtype=np.float64)
        """Sum and count of the shares in the newest fine window, for its mean."""
        self.mean_n = np.empty(0, dtype=np.int32)
        self.first_s = np.empty(0, dtype=np.float64)
        """Timestamp of each row's first sample (NaN: none): how much history it has."""
        self.grow(capacity)

    @staticmethod
    def bytes_per_guest(fine: Ring = FINE, coarse: Ring = COARSE) -> int:
        return 2 * (2 * fine.windows + coarse.windows) + 8 * 4 + 4

    def grow(self, capacity: int) -> None:
        old = self.capacity

        def extend(array: np.ndarray, fill: float | int) -> np.ndarray:
            new = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
            new[:old] = array[:old]
            return new

        self.fine_peak = extend(self.fine_peak, MISSING)
        self.fine_mean = extend(self.fine_mean, MISSING)
        self.coarse_peak = extend(self.coarse_peak, MISSING)
        self.fine_period = extend(self.fine_period, -1)
        self.coarse_period = extend(self.coarse_period, -1)
        self.mean_sum = extend(self.mean_sum, 0.0)
        self.mean_n = extend(self.mean_n, 0)
        self.first_s = extend(self.first_s, np.nan)
        self.capacity = capacity

    def forget(self, rows: np.ndarray) -> None:
        self.fine_peak[rows] = MISSING
        self.fine_mean[rows] = MISSING
        self.coarse_peak[rows] = MISSING
        self.fine_period[rows] = -1
        self.coarse_period[rows] = -1
        self.mean_sum[rows] = 0.0
        self.mean_n[rows] = 0
        self.first_s[rows] = np.nan

    def observe(self, rows: np.ndarray, ts_s: np.ndarray, share: np.ndarray) -> None:
        """Fold one sample per row (``share`` = demand / RAM; NaN is skipped) into its windows.

        A sample older than the row's newest window still raises the peak of its own window
        while that window is in the ring; older ones are dropped.
        """
        known = ~np.isnan(share) & np.isfinite(ts_s)
        rows, ts_s, share = rows[known], ts_s[known], share[known]
        if rows.size == 0:
            return
        first = np.isnan(self.first_s[rows])
        self.first_s[rows[first]] = ts_s[first]
        peak_units = _to_share_units(share, round_up=True)

        fine_p = np.floor(ts_s / self.fine.period_s).astype(np.int64)
        new_window = self._advance(self.fine_period, (self.fine_peak, self.fine_mean), rows, fine_p)
        self.mean_sum[rows[new_window]] = 0.0
        self.mean_n[rows[new_window]] = 0
        fine_in = self._in_ring(self.fine_period[rows], fine_p, self.fine.windows)
        r, col = rows[fine_in], fine_p[fine_in] % self.fine.windows
        np.maximum.at(self.fine_peak, (r, col), peak_units[fine_in])
        # The mean covers the newest window only; a late sample for an older one adds no mean.
        newest = fine_in & (fine_p == self.fine_period[rows])
        rn, sn = rows[newest], share[newest]
        self.mean_sum[rn] += sn
        self.mean_n[rn] += 1
        self.fine_mean[rn, fine_p[newest] % self.fine.windows] = _to_share_units(
            self.mean_sum[rn] / self.mean_n[rn], round_up=False
        )

        coarse_p = np.floor(ts_s / self.coarse.period_s).astype(np.int64)
        self._advance(self.coarse_period, (self.coarse_peak,), rows, coarse_p)
        coarse_in = self._in_ring(self.coarse_period[rows], coarse_p, self.coarse.windows)
        r, col = rows[coarse_in], coarse_p[coarse_in] % self.coarse.windows
        np.maximum.at(self.coarse_peak, (r, col), peak_units[coarse_in])

    @staticmethod
    def _in_ring(newest: np.ndarray, period: np.ndarray, windows: int) -> np.ndarray:
        inside: np.ndarray = (period <= newest) & (period > newest - windows)
        return inside

    @staticmethod
    def _advance(
        newest: np.ndarray, rings: tuple[np.ndarray, ...], rows: np.ndarray, period: np.ndarray
    ) -> np.ndarray:
        """Move rows whose sample opens a later period forward, clearing the skipped windows.

        Returns the mask (over ``rows``) of rows that moved."""
        moved: np.ndarray = period > newest[rows]
        if not moved.any():
            return moved
        r, p, last = rows[moved], period[moved], newest[rows[moved]]
        windows = rings[0].shape[1]
        # Windows last+1 … p (mod windows) now belong to new periods: clear them. A row seen
        # for the first time (last = −1) or silent for a whole ring clears all of it. Nearly
        # always a guest just moved on to the next window: one column each.
        gap = p - last
        step = gap == 1
        whole = gap >= windows
        some = ~step & ~whole
        for ring in rings:
            ring[r[step], p[step] % windows] = MISSING
            ring[r[whole]] = MISSING
        if some.any():
            rs, ls, gs = r[some], last[some], gap[some]
            offset = (np.arange(windows)[None, :] - (ls[:, None] + 1)) % windows
            stale = offset < gs[:, None]
            for ring in rings:
                block = ring[rs]
                block[stale] = MISSING
                ring[rs] = block
        newest[r] = p
        return moved

    # -- readers -------------------------------------------------------------------------------

    def _units(
        self,
        ring: np.ndarray,
        newest: np.ndarray,
        spec: Ring,
        rows: np.ndarray,
        now_s: float,
        last: int | None,
    ) -> np.ndarray:
        """The newest ``last`` windows of ``rows`` (all by default) as stored units, oldest
        first, the last one holding ``now_s``; windows the row has not written are
        :data:`MISSING`.

        Units keep aggregates cheap: MISSING is 0, so a row's peak is a plain ``max``."""
        k = spec.windows if last is None else min(max(last, 1), spec.windows)
        now_p = int(np.floor(now_s / spec.period_s))
        cols = (now_p - k + 1 + np.arange(k)) % spec.windows
        units: np.ndarray = ring[rows[:, None], cols[None, :]]
        # A row that has not written since now_p − b holds older periods in the newest b
        # columns' places; one whose clock runs a period or more ahead of ours has overwritten
        # the oldest: mask both (column j holds period now_p − k + 1 + j).
        behind = (now_p - newest[rows])[:, None]
        column = np.arange(k)[None, :]
        stale = (column > k - 1 - behind) | (column < k - spec.windows - behind)
        units[stale] = MISSING
        return units

    def fine_peaks(self, rows: np.ndarray, now_s: float, last: int | None = None) -> np.ndarray:
        """Peak demand of each 5-minute window, share of RAM (float32[n, last]; NaN: none)."""
        units = self._units(self.fine_peak, self.fine_period, self.fine, rows, now_s, last)
        return _from_share_units(units)

    def fine_means(self, rows: np.ndarray, now_s: float, last: int | None = None) -> np.ndarray:
        """Mean demand of each 5-minute window, share of RAM (float32[n, last]; NaN: none)."""
        units = self._units(self.fine_mean, self.fine_period, self.fine, rows, now_s, last)
        return _from_share_units(units)

    def coarse_peaks(self, rows: np.ndarray, now_s: float, last: int | None = None) -> np.ndarray:
        """Peak demand of each hour, share of RAM (float32[n, last]; NaN: none)."""
        units = self._units(self.coarse_peak, self.coarse_period, self.coarse, rows, now_s, last)
        return _from_share_units(units)

    def history_s(self, rows: np.ndarray, now_s: float) -> np.ndarray:
        """Seconds of history each row has (0 for none), capped at the coarse ring's span."""
        seen = np.nan_to_num(now_s - self.first_s[rows], nan=0.0)
        capped: np.ndarray = np.clip(seen, 0.0, self.coarse.span_s)
        return capped
