"""Features of the learned policy, shared by training and inference so that they never drift.

Both sides go through :func:`compute_features`, on history windows shaped as the fleet keeps them
(``float32[n, window, len(HISTORY_CHANNELS)]``, oldest first, NaN rows at the front of a window
the guest has not filled yet):

- at inference, the windows are :meth:`Fleet.ordered_history` of the guests in the view;
- for training, :func:`recording_history` turns a recording into the same per-sample rows (demand
  as the fleet estimates it, allocation, per-second rates of the cumulative counters, restarting
  after a reboot) and :func:`gather_windows` cuts windows out of them, vectorised.

Every memory feature is a share of the guest's RAM, so one model serves guests of any size and a
fleet of 2 GiB guests looks like a fleet of 64 GiB ones. Features are NaN where the data does not
say (a trace without swap or fault counters, a window that is not full yet):
``HistGradientBoostingRegressor`` learns where missing values go, so a model trained on a trace
without pressure counters still works on guests that report them, and the other way round.

Changing a feature, its order or its meaning changes :data:`FEATURE_VERSION`; a model card whose
version or names differ is refused at start-up (:mod:`policies.regressor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa

from autoscaler.fleet import H_ALLOC, H_DEMAND, H_TS
from autoscaler.recordings.recording import GuestSeries, median_step_s
from autoscaler.stats import CUMULATIVE_STATS, HISTORY_CHANNELS, counter_rates

FEATURE_VERSION: Final = 1
"""Bump whenever a feature is added, removed, reordered or computed differently."""

WINDOW_SAMPLES: Final = 32
"""Samples the features look back over: the fleet's default ``controller.history_len``.

With the 5-minute steps of public traces that is 2 h 40 min, long enough to see the last burst.
"""
RECENT_SAMPLES: Final = 6
"""The short look-back for the recent level, spread and trend (30 minutes at 5-minute steps)."""
PERIOD_SAMPLES: Final = (3, 6, 12)
"""Periods of 15, 30 and 60 minutes at 5-minute steps, for the periodic-burst features."""
MIN_SAMPLES: Final = RECENT_SAMPLES
"""A guest with fewer demand samples than this in its window is in cold start: its recent level
and trend are not known yet, and the policy falls back to the threshold rules for it."""

FEATURE_NAMES: Final[tuple[str, ...]] = (
    "demand_share",  # latest demand / RAM
    "demand_change_1",  # latest − previous (share of RAM)
    "demand_change_3",  # latest − three samples ago
    "recent_mean",  # over the last RECENT_SAMPLES samples
    "recent_max",
    "recent_min",
    "recent_std",
    "recent_slope",  # least-squares slope over the recent samples, share of RAM per sample
    "window_mean",  # over the whole window
    "window_p50",
    "window_p90",
    "window_max",
    "window_std",
    "window_max_above_now",  # window_max − demand_share: how far the last burst went
    "window_samples",  # demand samples in the window (a partly filled window is less certain)
    "window_max_rise",  # the largest one-sample rise in the window: how this guest bursts
    "window_mean_abs_change",  # mean |one-sample change|: how restless its demand is
    "rise_15min_before_next",  # the rise into the sample 15, 30, 60 minutes before the next one:
    "rise_30min_before_next",  # periodic jobs (cron every quarter or half hour, hourly) burst
    "rise_60min_before_next",  # again one period later
    "level_60min_before_next",  # demand then, relative to demand now
    "swap_in_share_ps",  # latest rates: bytes/s as a share of RAM, events/s as counts
    "swap_out_share_ps",
    "major_faults_ps",
    "alloc_stalls_ps",
    "scans_share_ps",  # async + direct scans
    "reclaims_share_ps",  # async + direct reclaims
    "pressure_events_window",  # alloc stalls + OOM kills per second, highest in the window
)
N_FEATURES: Final = len(FEATURE_NAMES)

_CHANNEL: Final[dict[str, int]] = {name: i for i, name in enumerate(HISTORY_CHANNELS)}
_HISTORY_COUNTERS: Final = np.array([CUMULATIVE_STATS.index(name) for name in HISTORY_CHANNELS[3:]])
"""Columns of the history's rate channels among :data:`CUMULATIVE_STATS`."""


def _nan_sum(values: np.ndarray, axis: int) -> np.ndarray:
    """Sum over ``axis`` that is NaN where every value is NaN (np.nansum would say 0)."""
    missing = np.isnan(values)
    total = np.where(missing, 0.0, values).sum(axis=axis)
    return np.where(missing.all(axis=axis), np.nan, total)


def _sorted_quantile(
    values: np.ndarray, count: np.ndarray, q: float, *, ordered: np.ndarray | None = None
) -> np.ndarray:
    """Per-row quantile (nearest rank below) of a 2-D array whose NaNs sort to the end.

    ``np.nanpercentile`` over an axis falls back to a Python loop per row when NaNs are present;
    sorting once and picking by each row's count stays vectorised for 100k guests. ``ordered``
    is ``np.sort(values, axis=1)`` if the caller has it already.
    """
    if ordered is None:
        ordered = np.sort(values, axis=1)
    rank = np.floor(q * np.maximum(count - 1, 0)).astype(np.int64)
    picked = np.take_along_axis(ordered, rank[:, None], axis=1)[:, 0]
    return np.where(count > 0, picked, np.nan)


def compute_features(windows: np.ndarray, ram_bytes: np.ndarray) -> np.ndarray:
    """Features of each guest's window: float32[n, N_FEATURES], columns in FEATURE_NAMES order.

    ``windows`` is float32[n, w, len(HISTORY_CHANNELS)] with ``w >= 4``, oldest first; only the
    last :data:`WINDOW_SAMPLES` samples are used. A window shorter than that reads as one the
    guest has not filled yet. ``ram_bytes`` is float[n], the guests' boot RAM.
    """
    if windows.ndim != 3 or windows.shape[2] != len(HISTORY_CHANNELS):
        raise ValueError(
            f"windows must be [n, samples, {len(HISTORY_CHANNELS)}], got {windows.shape}"
        )
    n = windows.shape[0]
    if windows.shape[1] < WINDOW_SAMPLES:
        pad = np.full((n, WINDOW_SAMPLES - windows.shape[1], windows.shape[2]), np.nan, "float32")
        windows = np.concatenate([pad, windows], axis=1)
    # Only the channels the features read, and only those in float64: at 100k guests a whole
    # window in float64 is 300 MB of memory traffic per tick for nothing.
    w = windows[:, -WINDOW_SAMPLES:, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = 1.0 / np.asarray(ram_bytes, dtype=np.float64)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, np.nan)

    demand = w[:, :, H_DEMAND].astype(np.float64) * scale[:, None]
    out = np.full((n, N_FEATURES), np.nan)
    if n == 0:
        return out.astype(np.float32)
    valid = ~np.isnan(demand)
    count = valid.sum(axis=1)
    last = demand[:, -1]
    recent = demand[:, -RECENT_SAMPLES:]
    recent_count = valid[:, -RECENT_SAMPLES:].sum(axis=1)

    with np.errstate(invalid="ignore", divide="ignore"):
        # Means and spreads by hand: the nan-aware numpy reductions warn on all-NaN rows.
        recent_mean = _nan_sum(recent, 1) / recent_count
        window_mean = _nan_sum(demand, 1) / count
        recent_var = _nan_sum((recent - recent_mean[:, None]) ** 2, 1) / recent_count
        window_var = _nan_sum((demand - window_mean[:, None]) ** 2, 1) / count
        # Least-squares slope over the recent samples that exist (x = sample position).
        x = np.arange(RECENT_SAMPLES, dtype=np.float64)[None, :]
        x = np.where(np.isnan(recent), np.nan, x)
        x_mean = _nan_sum(x, 1) / recent_count
        covariance = _nan_sum((x - x_mean[:, None]) * (recent - recent_mean[:, None]), 1)
        spread = _nan_sum((x - x_mean[:, None]) ** 2, 1)
        slope = np.where(spread > 0, covariance / spread, np.nan)
    low = np.where(valid, demand, np.inf)
    high = np.where(valid, demand, -np.inf)
    recent_low = low[:, -RECENT_SAMPLES:].min(axis=1)
    recent_high = high[:, -RECENT_SAMPLES:].max(axis=1)
    window_high = high.max(axis=1)

    out[:, 0] = last
    out[:, 1] = last - demand[:, -2]
    out[:, 2] = last - demand[:, -4]
    out[:, 3] = recent_mean
    out[:, 4] = np.where(recent_count > 0, recent_high, np.nan)
    out[:, 5] = np.where(recent_count > 0, recent_low, np.nan)
    out[:, 6] = np.sqrt(recent_var)
    out[:, 7] = slope
    out[:, 8] = window_mean
    ordered = np.sort(demand, axis=1)
    out[:, 9] = _sorted_quantile(demand, count, 0.5, ordered=ordered)
    out[:, 10] = _sorted_quantile(demand, count, 0.9, ordered=ordered)
    out[:, 11] = np.where(count > 0, window_high, np.nan)
    out[:, 12] = np.sqrt(window_var)
    out[:, 13] = out[:, 11] - last
    out[:, 14] = count
    change = np.diff(demand, axis=1)
    changes = (~np.isnan(change)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, 15] = np.where(
            changes > 0, np.where(np.isnan(change), -np.inf, change).max(1), np.nan
        )
        out[:, 16] = _nan_sum(np.abs(change), 1) / changes
    # The next sample is one step after the last: the sample P steps before it is demand[-P].
    for column, period in (
        (17, PERIOD_SAMPLES[0]),
        (18, PERIOD_SAMPLES[1]),
        (19, PERIOD_SAMPLES[2]),
    ):
        out[:, column] = demand[:, -period] - demand[:, -period - 1]
    out[:, 20] = demand[:, -PERIOD_SAMPLES[2]] - last

    rates = w[:, -1, :].astype(np.float64)
    out[:, 21] = rates[:, _CHANNEL["swap-in"]] * scale
    out[:, 22] = rates[:, _CHANNEL["swap-out"]] * scale
    out[:, 23] = rates[:, _CHANNEL["major-faults"]]
    out[:, 24] = rates[:, _CHANNEL["alloc-stalls"]]
    scans = rates[:, [_CHANNEL["async-scans"], _CHANNEL["direct-scans"]]]
    reclaims = rates[:, [_CHANNEL["async-reclaims"], _CHANNEL["direct-reclaims"]]]
    out[:, 25] = _nan_sum(scans, 1) * scale
    out[:, 26] = _nan_sum(reclaims, 1) * scale
    events = _nan_sum(
        w[:, :, [_CHANNEL["alloc-stalls"], _CHANNEL["oom-kills"]]].astype(np.float64), 2
    )
    events_seen = ~np.isnan(events)
    out[:, 27] = np.where(
        events_seen.any(axis=1), np.where(events_seen, events, -np.inf).max(axis=1), np.nan
    )
    return out.astype(np.float32)


def demand_samples(windows: np.ndarray) -> np.ndarray:
    """Demand samples in the part of each window the features read (int64[n])."""
    tail = windows[:, -WINDOW_SAMPLES:, H_DEMAND]
    return np.asarray((~np.isnan(tail)).sum(axis=1), dtype=np.int64)


def sample_interval_s(windows: np.ndarray) -> np.ndarray:
    """Median time between consecutive samples of each window, seconds (NaN if under 2)."""
    ts = windows[:, -WINDOW_SAMPLES:, H_TS].astype(np.float64)
    gaps = np.diff(ts, axis=1)
    count = (~np.isnan(gaps)).sum(axis=1)
    return _sorted_quantile(gaps, count, 0.5)


# -- training side: the fleet's history rows, built from a recording -------------------------------


@dataclass(frozen=True)
class RecordingHistory:
    """Every sample of a recording as a fleet history row, grouped by guest and in time order.

    ``rows`` is float32[samples, len(HISTORY_CHANNELS)] exactly as :class:`Fleet` stores history
    (ts relative to ``epoch_s``); guest ``g`` owns ``rows[starts[g]:starts[g + 1]]``.
    """

    rows: np.ndarray
    ram_bytes: np.ndarray
    """float64[samples]: the guest's boot RAM at each sample."""
    ts_s: np.ndarray
    """float64[samples]: absolute sample times (Unix seconds)."""
    starts: np.ndarray
    hosts: list[str]
    guests: list[str]
    epoch_s: float

    @property
    def guest_of_row(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.guests)), np.diff(self.starts))

    @property
    def step_s(self) -> float:
        """Median time between a guest's consecutive samples (see :func:`median_step_s`)."""
        guest = self.guest_of_row
        return median_step_s(self.ts_s, np.r_[True, guest[1:] != guest[:-1]])


def recording_history(table: pa.Table) -> RecordingHistory:
    """The fleet's history rows for every sample of a recording (see :class:`RecordingHistory`).

    Demand and allocation come from :func:`estimate_demand` as at ingest, the trace's own
    ``demand_bytes`` taking precedence where present (as in the simulator); rates are deltas of
    the cumulative counters over the time between samples, NaN for a guest's first sample and
    after any cumulative counter goes down (a reboot), by :func:`~autoscaler.stats.counter_rates`
    as :meth:`Fleet.ingest_batch` computes them.
    Samples with the same timestamp as the guest's previous one are dropped, as the fleet drops
    them (out of order).
    """
    series = GuestSeries(table)
    ts, first, column = series.ts_s, series.first, series.column
    ram, alloc, demand = series.ram_bytes, series.alloc_bytes, series.demand_bytes
    n = len(series)

    epoch_s = float(ts.min()) if n else 0.0
    rows = np.full((n, len(HISTORY_CHANNELS)), np.nan, dtype=np.float32)
    rows[:, H_TS] = ts - epoch_s
    rows[:, H_DEMAND] = demand
    rows[:, H_ALLOC] = alloc
    dt = np.r_[np.nan, np.diff(ts)]
    counters = np.column_stack([column(name) for name in CUMULATIVE_STATS])
    delta = np.vstack([np.full((1, counters.shape[1]), np.nan), np.diff(counters, axis=0)])
    rates, _ = counter_rates(delta, dt)
    rates[first] = np.nan
    rows[:, 3:] = rates[:, _HISTORY_COUNTERS]

    return RecordingHistory(rows, ram, ts, series.boundaries, series.hosts, series.guests, epoch_s)


def gather_windows(history: RecordingHistory, positions: np.ndarray) -> np.ndarray:
    """The window the fleet would hold right after sample ``positions`` (float32[m, W, C]).

    Samples before the guest's first are NaN, as in a window the fleet has not filled yet.
    """
    guest = history.guest_of_row[positions]
    start = history.starts[guest]
    index = positions[:, None] + np.arange(-WINDOW_SAMPLES + 1, 1)[None, :]
    inside = index >= start[:, None]
    out = history.rows[np.maximum(index, 0)]
    out[~inside] = np.nan
    return np.asarray(out)


def future_peak_share(history: RecordingHistory, horizon_s: float) -> np.ndarray:
    """Each sample's label: the guest's highest demand over the next ``horizon_s``, share of RAM.

    The samples that count are the guest's next ``round(horizon_s / step)`` ones, as long as they
    fall within ``horizon_s`` plus half a step; NaN where the guest has none (its last sample, or
    a gap in the recording).
    """
    step_s = history.step_s
    steps = max(1, round(horizon_s / step_s))
    guest = history.guest_of_row
    n = len(guest)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = history.rows[:, H_DEMAND].astype(np.float64) / history.ram_bytes
    peak = np.full(n, np.nan)
    for h in range(1, steps + 1):
        ahead = np.full(n, np.nan)
        if h < n:
            same = guest[h:] == guest[:-h]
            close = history.ts_s[h:] - history.ts_s[:-h] <= horizon_s + step_s / 2
            ahead[:-h] = np.where(same & close, share[h:], np.nan)
        peak = np.fmax(peak, ahead)
    return peak


__all__ = [
    "FEATURE_NAMES",
    "FEATURE_VERSION",
    "MIN_SAMPLES",
    "N_FEATURES",
    "RECENT_SAMPLES",
    "WINDOW_SAMPLES",
    "RecordingHistory",
    "compute_features",
    "demand_samples",
    "future_peak_share",
    "gather_windows",
    "recording_history",
    "sample_interval_s",
]
