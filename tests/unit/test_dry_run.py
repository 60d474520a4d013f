"""The dry-run adapter: every decision logged once, marked as not applied."""

from __future__ import annotations

import logging

import pytest

from autoscaler.adapters.dry_run import DryRunAdapter
from tests.helpers import idle_fleet_tick

GUESTS = 5


async def test_a_dry_run_logs_each_decision_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autoscaler")  # as the daemon logs by default
    adapter = DryRunAdapter()
    controller, changes = idle_fleet_tick(adapter, GUESTS)
    caplog.clear()
    done = await controller.apply(changes)
    assert len(done) == GUESTS == len(adapter.targets)
    for i in range(GUESTS):
        lines = [r.getMessage() for r in caplog.records if f"h0/g{i}:" in r.getMessage()]
        assert len(lines) == 1, lines
        assert lines[0].startswith("target (dry run, not applied) h0/g")
