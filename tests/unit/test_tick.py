"""A decision that breaks anything after ``decide()`` holds the tick instead of stopping the
controller; the MQTT reconnect backoff stays finite through an outage of any length."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest

from autoscaler.config import GuardSettings
from autoscaler.policy import Decision, FleetView, Policy
from autoscaler.service.mqtt import reconnect_delay_s
from autoscaler.testing import synthetic_fleet
from autoscaler.tick import TickDriver, run_step

NOW_S = 1_700_000_000.0


class Returns(Policy):
    """Returns whatever decision ``make(view)`` builds."""

    name: ClassVar[str] = "returns"

    def __init__(self, make: Any) -> None:
        self.make = make

    def decide(self, view: FleetView) -> Decision:
        decision: Decision = self.make(view)
        return decision


def _halve(view: FleetView, **changes: Any) -> Decision:
    n = len(view)
    fields: dict[str, Any] = {
        "target_bytes": view.ram_bytes / 2,
        "pressure": np.zeros(n),
        "reason": np.zeros(n, dtype=np.int16),
        "reasons": ("halve {pct:.0f}%",),
        "detail": {"pct": np.full(n, 50.0)},
    }
    fields.update(changes)
    return Decision(**fields)


def tick(make: Any) -> Any:
    fleet = synthetic_fleet(64, now_s=NOW_S)
    return TickDriver(fleet, Returns(make), GuardSettings(), stale_after_s=60.0).tick(NOW_S + 1)


def test_a_sound_decision_changes_targets() -> None:
    result = tick(_halve)
    assert result.error is None and result.changes
    assert result.changes[0].reason.startswith("halve 50%")


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"reason": lambda n: np.zeros(n)}, "Decision.reason must hold integers"),
        ({"reason": lambda n: np.full(n, np.nan)}, "Decision.reason must hold integers"),
        ({"target_bytes": lambda n: np.array(["1"] * n)}, "Decision.target_bytes must hold real"),
        ({"target_bytes": lambda n: np.full(n, None)}, "Decision.target_bytes must hold real"),
        ({"pressure": lambda n: np.ones(n, dtype=bool)}, "Decision.pressure must hold real"),
        ({"target_bytes": lambda n: np.full(n, np.inf)}, "must be finite and >= 0"),
        ({"target_bytes": lambda n: np.full(n, -1.0)}, "-1.0 for guest 0 (and 63 more)"),
        ({"reason": lambda n: np.full(n, 3)}, "Decision.reason code 3 of guest 0"),
        ({"detail": lambda n: {"pct": np.zeros(n + 1)}}, "Decision.detail['pct'] must have"),
    ],
)
def test_wrong_array_types_hold_the_tick(changes: dict[str, Any], says: str) -> None:
    result = tick(lambda view: _halve(view, **{k: f(len(view)) for k, f in changes.items()}))
    assert result.changes == [] and result.error is not None and says in result.error


@pytest.mark.parametrize(
    "detail",
    [
        {"pct": [None] * 64},  # formats as TypeError
        {"pct": 5.0},  # not per guest: cannot be indexed by row
    ],
)
def test_detail_that_breaks_the_reasons_never_escapes_the_tick(detail: dict[str, Any]) -> None:
    result = tick(lambda view: _halve(view, detail=detail))
    # Either the bare template is used or the tick is held with the reason; never an exception.
    assert result.error is not None or all(c.reason for c in result.changes)


def test_a_template_the_detail_cannot_fill_gives_the_bare_template() -> None:
    result = tick(lambda view: _halve(view, reasons=("halve {pct.real.x}",)))
    assert result.error is None and result.changes
    assert result.changes[0].reason.startswith("halve {pct.real.x}")


def test_a_step_commits_only_what_apply_accepted() -> None:
    fleet = synthetic_fleet(64, now_s=NOW_S)
    driver = TickDriver(fleet, Returns(_halve), GuardSettings(), stale_after_s=60.0)
    before = fleet.target_pages.copy()
    refused = run_step(driver.step(NOW_S + 1), lambda changes: [])
    assert refused.tick is not None and refused.tick.changes and not refused.applied
    np.testing.assert_array_equal(fleet.target_pages, before)
    taken = run_step(driver.step(NOW_S + 2), lambda changes: changes[:1])
    assert taken.tick is not None and taken.applied == taken.tick.changes[:1]
    change = taken.applied[0]
    assert fleet.target_pages[change.slot] == change.num_pages
    assert fleet.target_s[change.slot] == NOW_S + 2


def test_reconnect_backoff_grows_to_the_cap_and_stays_finite() -> None:
    delays = [reconnect_delay_s(0.5, 30.0, attempt) for attempt in (0, 1, 6, 2000, 10**6)]
    assert 0.25 <= delays[0] <= 0.5 and 0.5 <= delays[1] <= 1.0
    assert all(15.0 <= d <= 30.0 for d in delays[2:])


def test_host_stats_older_than_stale_after_read_as_unknown() -> None:
    """A dead host agent's last numbers must not steer host-aware policies or the host budget."""
    from autoscaler.fleet import Fleet
    from autoscaler.testing import ingest, sample

    fleet = Fleet(epoch_s=NOW_S)
    fleet.ingest_host("h", ts_s=NOW_S, total_bytes=64 * 2**30, available_bytes=32 * 2**30)
    ingest(fleet, "h", "g", sample(NOW_S, ram_bytes=4 * 2**30), NOW_S)
    driver = TickDriver(fleet, Returns(_halve), GuardSettings(), stale_after_s=60.0)
    fresh = driver.tick(NOW_S + 30).view
    assert fresh is not None and fresh.host_total_bytes.tolist() == [64 * 2**30]
    stale = driver.tick(NOW_S + 90).view
    assert stale is not None and np.isnan(stale.host_total_bytes).all()
    assert np.isnan(stale.host_available_bytes).all()
