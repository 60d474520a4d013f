"""The dry-run adapter: every decision logged once, marked as not applied."""

from __future__ import annotations

import logging
import time

import orjson
import pytest

from autoscaler.adapters.dry_run import DryRunAdapter
from autoscaler.config import load_settings
from autoscaler.controller import Controller

GIB = 2**30
GUESTS = 5


async def test_a_dry_run_logs_each_decision_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autoscaler")  # as the daemon logs by default
    adapter = DryRunAdapter()
    controller = Controller(load_settings(None), adapter=adapter)
    now = time.time()
    for i in range(GUESTS):
        stats = {"total-memory": 4 * GIB, "available-memory": 3 * GIB}
        sample = {"ts": now, "ram_bytes": 4 * GIB, "actual": 0, "stats": stats}
        controller.handle_message(f"balloon/v1/guest/h/g{i}/stats", orjson.dumps(sample))
    controller.flush()
    changes = controller.driver.tick(time.time() + 30).changes
    assert len(changes) == GUESTS
    caplog.clear()
    done = await controller.apply(changes)
    assert len(done) == GUESTS == len(adapter.targets)
    for i in range(GUESTS):
        lines = [r.getMessage() for r in caplog.records if f"h/g{i}:" in r.getMessage()]
        assert len(lines) == 1, lines
        assert lines[0].startswith("target (dry run, not applied) h/g")
