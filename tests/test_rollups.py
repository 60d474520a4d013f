"""Rollups: history by wall-clock windows, the same whatever the sampling interval."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from autoscaler.rollups import COARSE, FINE, Rollups

DAY_S = 86_400.0
T0_S = 1_700_000_400.0  # a 5-minute and hourly boundary


def feed(rollups: Rollups, row: int, ts_s: np.ndarray, share: np.ndarray) -> None:
    for t, s in zip(ts_s, share, strict=True):
        rollups.observe(np.array([row]), np.array([t]), np.array([s]))


def step_demand(ts_s: np.ndarray) -> np.ndarray:
    """A demand share that changes once per 5-minute window (a different level each)."""
    window = np.floor((ts_s - T0_S) / FINE.period_s)
    return 0.2 + 0.6 * ((window * 0.37) % 1.0)


def test_the_same_demand_at_300_s_and_at_1_s_fills_the_same_windows() -> None:
    rollups = Rollups(2)
    span_s = 6 * 3600.0
    slow = T0_S + np.arange(0.0, span_s, 300.0)
    fast = T0_S + np.arange(0.0, span_s, 1.0)
    feed(rollups, 0, slow, step_demand(slow))
    # One row per call is the slow path; the fast guest goes in chunks as ingest would.
    for chunk in np.array_split(fast, 120):
        for t in chunk:
            rollups.observe(np.array([1]), np.array([t]), step_demand(np.array([t])))
    now_s = T0_S + span_s - 1.0
    rows = np.array([0, 1])
    np.testing.assert_array_equal(
        rollups.fine_peaks(rows, now_s)[0], rollups.fine_peaks(rows, now_s)[1]
    )
    np.testing.assert_array_equal(
        rollups.fine_means(rows, now_s)[0], rollups.fine_means(rows, now_s)[1]
    )
    np.testing.assert_array_equal(
        rollups.coarse_peaks(rows, now_s)[0], rollups.coarse_peaks(rows, now_s)[1]
    )
    peaks = rollups.fine_peaks(rows, now_s)[0]
    assert np.isnan(peaks[: FINE.windows - 72]).all()  # 6 h of a 24 h ring
    np.testing.assert_allclose(peaks[-72:], step_demand(slow), atol=2 / 65534)


def test_a_window_holds_the_peak_and_the_mean_of_its_samples() -> None:
    rollups = Rollups(1)
    ts = T0_S + np.array([10.0, 100.0, 200.0, 290.0])
    share = np.array([0.25, 0.75, 0.5, 0.5])
    feed(rollups, 0, ts, share)
    now_s = T0_S + 299.0
    assert rollups.fine_peaks(np.array([0]), now_s)[0, -1] >= 0.75
    assert abs(rollups.fine_peaks(np.array([0]), now_s)[0, -1] - 0.75) < 2 / 65534
    assert abs(rollups.fine_means(np.array([0]), now_s)[0, -1] - 0.5) < 1 / 65534
    assert abs(rollups.coarse_peaks(np.array([0]), now_s)[0, -1] - 0.75) < 2 / 65534


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0, allow_nan=False))
def test_a_stored_peak_is_never_below_the_demand_seen(share: float) -> None:
    rollups = Rollups(1)
    rollups.observe(np.array([0]), np.array([T0_S]), np.array([share]))
    assert rollups.fine_peaks(np.array([0]), T0_S)[0, -1] >= np.float32(share)
    assert rollups.coarse_peaks(np.array([0]), T0_S)[0, -1] >= np.float32(share)


def test_a_silent_spell_reads_as_missing_not_as_old_peaks() -> None:
    rollups = Rollups(1)
    row = np.array([0])
    feed(rollups, 0, T0_S + np.array([0.0, 300.0]), np.array([0.9, 0.9]))
    # A full day later the ring has gone round: the old windows must not come back as peaks.
    later = T0_S + DAY_S + 600.0
    feed(rollups, 0, np.array([later]), np.array([0.1]))
    peaks = rollups.fine_peaks(row, later)[0]
    assert np.nanmax(peaks) < 0.2
    assert np.count_nonzero(~np.isnan(peaks)) == 1
    # Hourly windows still hold the first day's peak (8 days of them), with a gap between.
    hourly = rollups.coarse_peaks(row, later)[0]
    assert np.nanmax(hourly) > 0.89
    assert np.isnan(hourly[-24:-1]).all()


def test_a_guest_gone_quiet_has_no_window_for_now() -> None:
    rollups = Rollups(1)
    feed(rollups, 0, np.array([T0_S]), np.array([0.5]))
    peaks = rollups.fine_peaks(np.array([0]), T0_S + 3 * 300.0)[0]
    assert np.isnan(peaks[-3:]).all() and abs(peaks[-4] - 0.5) < 2 / 65534


def test_a_late_sample_raises_its_own_window_but_not_the_mean_of_the_newest() -> None:
    rollups = Rollups(1)
    feed(rollups, 0, T0_S + np.array([0.0, 400.0]), np.array([0.2, 0.3]))
    feed(rollups, 0, T0_S + np.array([100.0]), np.array([0.8]))
    now_s = T0_S + 500.0
    peaks = rollups.fine_peaks(np.array([0]), now_s)[0]
    means = rollups.fine_means(np.array([0]), now_s)[0]
    assert abs(peaks[-2] - 0.8) < 2 / 65534 and abs(peaks[-1] - 0.3) < 2 / 65534
    assert abs(means[-1] - 0.3) < 1 / 65534


def test_a_sample_older_than_the_ring_is_dropped() -> None:
    rollups = Rollups(1)
    feed(rollups, 0, np.array([T0_S + 9 * DAY_S]), np.array([0.2]))
    feed(rollups, 0, np.array([T0_S]), np.array([0.9]))
    now_s = T0_S + 9 * DAY_S
    assert np.nanmax(rollups.coarse_peaks(np.array([0]), now_s)) < 0.3
    assert np.nanmax(rollups.fine_peaks(np.array([0]), now_s)) < 0.3


def test_forget_gives_a_reused_row_no_history() -> None:
    rollups = Rollups(2)
    feed(rollups, 1, np.array([T0_S]), np.array([0.5]))
    assert rollups.history_s(np.array([1]), T0_S + 60.0)[0] == 60.0
    rollups.forget(np.array([1]))
    assert rollups.history_s(np.array([1]), T0_S + 60.0)[0] == 0.0
    assert np.isnan(rollups.fine_peaks(np.array([1]), T0_S)).all()
    assert np.isnan(rollups.coarse_peaks(np.array([1]), T0_S)).all()


def test_growing_keeps_what_was_there() -> None:
    rollups = Rollups(1)
    feed(rollups, 0, np.array([T0_S]), np.array([0.5]))
    rollups.grow(4)
    assert abs(rollups.fine_peaks(np.array([0]), T0_S)[0, -1] - 0.5) < 2 / 65534
    assert np.isnan(rollups.fine_peaks(np.array([3]), T0_S)).all()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3), st.floats(0.0, 3 * DAY_S), st.floats(0.0, 1.0, allow_nan=False)
        ),
        min_size=1,
        max_size=60,
    )
)
def test_a_vectorised_batch_equals_one_sample_at_a_time(
    samples: list[tuple[int, float, float]],
) -> None:
    """Ingest hands over unique rows per call; order within a row is kept across calls."""
    one_by_one, batched = Rollups(4), Rollups(4)
    for row, t, s in samples:
        one_by_one.observe(np.array([row]), np.array([T0_S + t]), np.array([s]))
    pending = list(samples)
    while pending:
        seen: set[int] = set()
        batch: list[tuple[int, float, float]] = []
        rest: list[tuple[int, float, float]] = []
        for sample in pending:
            (rest if sample[0] in seen else batch).append(sample)
            seen.add(sample[0])
        batched.observe(
            np.array([r for r, _, _ in batch]),
            np.array([T0_S + t for _, t, _ in batch]),
            np.array([s for _, _, s in batch]),
        )
        pending = rest
    now_s = T0_S + 3 * DAY_S
    rows = np.arange(4)
    for read in ("fine_peaks", "fine_means", "coarse_peaks"):
        np.testing.assert_array_equal(
            getattr(one_by_one, read)(rows, now_s), getattr(batched, read)(rows, now_s)
        )


def test_nan_demand_and_bad_timestamps_are_skipped() -> None:
    rollups = Rollups(1)
    rollups.observe(np.array([0]), np.array([np.inf]), np.array([0.5]))
    rollups.observe(np.array([0]), np.array([T0_S]), np.array([np.nan]))
    assert rollups.history_s(np.array([0]), T0_S)[0] == 0.0
    assert np.isnan(rollups.fine_peaks(np.array([0]), T0_S)).all()


def test_the_footprint_is_what_the_budget_assumes() -> None:
    rollups = Rollups(1000)
    arrays = [value for value in vars(rollups).values() if isinstance(value, np.ndarray)]
    assert sum(a.nbytes for a in arrays) == 1000 * Rollups.bytes_per_guest()
    assert FINE.span_s >= DAY_S and COARSE.span_s >= 8 * DAY_S


def test_the_newest_windows_alone_are_the_tail_of_all_of_them() -> None:
    rollups = Rollups(3)
    ts = T0_S + np.arange(0.0, 10 * 3600.0, 60.0)
    for row in range(3):
        feed(rollups, row, ts, step_demand(ts + row * 300.0))
    now_s = float(ts[-1])
    rows = np.arange(3)
    for last in (1, 12, 288):
        np.testing.assert_array_equal(
            rollups.fine_peaks(rows, now_s, last), rollups.fine_peaks(rows, now_s)[:, -last:]
        )
    np.testing.assert_array_equal(
        rollups.coarse_peaks(rows, now_s, 5), rollups.coarse_peaks(rows, now_s)[:, -5:]
    )


def test_a_guest_whose_clock_runs_ahead_keeps_its_windows() -> None:
    """Its newest window is one of ours still to come: the others read as usual."""
    rollups = Rollups(1)
    feed(rollups, 0, T0_S + np.array([0.0, 300.0, 610.0]), np.array([0.1, 0.2, 0.3]))
    peaks = rollups.fine_peaks(np.array([0]), T0_S + 599.0)[0]  # our clock: window 1
    np.testing.assert_allclose(peaks[-2:], [0.1, 0.2], atol=2 / 65534)
