"""The fixed-rate loop and counted warnings, on a fake clock."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from types import SimpleNamespace

import pytest

from autoscaler.service import lifecycle, logs


class FakeClock:
    """``time.monotonic`` and ``asyncio.sleep`` that only move when told to."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def monotonic(self) -> float:
        return self.now_s

    async def sleep(self, delay_s: float) -> None:
        self.now_s += max(delay_s, 0.0)


class Enough(Exception):
    pass


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A fake clock for :func:`lifecycle.every` (the event loop itself keeps the real one)."""
    fake = FakeClock()
    monkeypatch.setattr(lifecycle, "time", fake)
    monkeypatch.setattr(lifecycle, "asyncio", SimpleNamespace(sleep=fake.sleep))
    return fake


def run_every(clock: FakeClock, durations_s: list[float], **kwargs: bool) -> list[float]:
    """When each call of a step taking ``durations_s`` started, with a 1 s interval."""
    started: list[float] = []

    async def step() -> None:
        if len(started) == len(durations_s):
            raise Enough
        started.append(clock.now_s)
        await clock.sleep(durations_s[len(started) - 1])

    with pytest.raises(Enough):
        asyncio.run(lifecycle.every(1.0, step, **kwargs))
    return started


def test_every_keeps_its_rate_and_skips_what_a_stall_missed(clock: FakeClock) -> None:
    # The time a step takes does not add up; after a 2.5 s step the next one runs at once.
    started = run_every(clock, [0.3, 0.3, 2.5, 0.3, 0.3])
    assert started == pytest.approx([100.0, 101.0, 102.0, 104.5, 105.5])


def test_every_may_wait_one_interval_first(clock: FakeClock) -> None:
    assert run_every(clock, [0.1, 0.1], delay_first=True) == pytest.approx([101.0, 102.0])


def test_every_takes_plain_functions_and_an_interval_read_each_time(clock: FakeClock) -> None:
    started: list[float] = []
    intervals_s = iter([1.0, 2.0, 4.0, 8.0])

    def step() -> None:
        if len(started) == 4:
            raise Enough
        started.append(clock.now_s)

    with pytest.raises(Enough):
        asyncio.run(lifecycle.every(lambda: next(intervals_s), step))
    assert started == pytest.approx([100.0, 101.0, 103.0, 107.0])


def test_counted_warnings_count_everything_and_log_once_per_period(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(logs, "time", clock)
    counts: Counter[str] = Counter()
    warnings = logs.CountedWarnings(logging.getLogger("t"), counts, period_s=10.0)
    with caplog.at_level(logging.WARNING, logger="t"):
        warnings.warn("bad", "bad thing %d", 1)
        warnings.warn("bad", "bad thing %d", 2, count=3)
        warnings.warn("other", "other thing")
        clock.now_s += 10.0
        warnings.warn("bad", "bad thing %d", 3)
    assert counts == {"bad": 5, "other": 1}
    logged = [(r.getMessage(), r.__dict__["suppressed"]) for r in caplog.records]
    assert logged == [("bad thing 1", 0), ("other thing", 0), ("bad thing 3", 1)]


def test_counted_warnings_may_share_a_count_across_limits() -> None:
    warnings = logs.CountedWarnings(logging.getLogger("t"))
    warnings.warn("GuestUnavailable", "read failed", limit_key="read:GuestUnavailable")
    warnings.warn("GuestUnavailable", "set failed", limit_key="set:GuestUnavailable")
    assert warnings.counts == {"GuestUnavailable": 2}
