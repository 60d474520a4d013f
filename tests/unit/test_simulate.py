"""The simulator: closed loop, the daemon's own tick driver, recomputable outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from autoscaler.cli import main
from autoscaler.config import GuardSettings
from autoscaler.plugins import create_policy
from autoscaler.recordings.recording import write_recording
from autoscaler.sim.simulate import (
    Replay,
    SimulationSettings,
    compute_metrics,
    replay_from_recording,
    simulate_policy,
)
from tests.helpers.data import small_recording

GIB = 2**30
T0 = 1_700_000_000.0


def test_replay_grid_forward_fills_and_drops_long_gaps(tmp_path: Path) -> None:
    rows = {
        "host": ["h"] * 4,
        "guest": ["g"] * 4,
        "ts": [T0, T0 + 60, T0 + 120, T0 + 600],
        "ram_bytes": [GIB] * 4,
        "demand_bytes": [1.0, 2.0, 3.0, 4.0],
    }
    write_recording(rows, tmp_path / "r.parquet", source="test")
    from autoscaler.recordings.recording import read_recording

    replay = replay_from_recording(read_recording(tmp_path / "r.parquet"))
    assert replay.step_s == 60
    row = replay.demand_bytes[0]
    assert row[:3].tolist() == [1.0, 2.0, 3.0]
    assert row[3:6].tolist() == [3.0, 3.0, 3.0]  # held for max_gap_steps
    assert np.isnan(row[6:10]).all()  # then silent
    assert row[10] == 4.0


def test_closed_loop_threshold_reclaims_and_reacts_to_bursts(tmp_path: Path) -> None:
    from autoscaler.recordings.recording import read_recording

    replay = replay_from_recording(read_recording(small_recording(tmp_path / "r.parquet")))
    settings = SimulationSettings()
    run = simulate_policy(replay, create_policy("threshold"), GuardSettings(), settings)
    again = simulate_policy(replay, create_policy("threshold"), GuardSettings(), settings)
    np.testing.assert_array_equal(run.alloc_bytes, again.alloc_bytes)  # deterministic
    assert run.metrics["reclaimed_pct"] > 20
    # The burst at step 200 is met: allocation rises within a few steps of it.
    burst = replay.demand_bytes[:, 205]
    assert np.all(run.alloc_bytes[:, 210] >= burst * 0.9)
    assert run.metrics["under_provisioned_pct"] < 10


def test_policy_that_never_moves_reclaims_nothing(tmp_path: Path) -> None:
    from autoscaler.recordings.recording import read_recording

    replay = replay_from_recording(read_recording(small_recording(tmp_path / "r.parquet", 2, 50)))
    run = simulate_policy(
        replay,
        create_policy("tests.unit.test_policies:HalfIdle", {"share": 0.0}),
        GuardSettings(),
        SimulationSettings(),
    )
    assert run.metrics["reclaimed_gib_per_guest"] == 0
    assert run.metrics["under_provisioned_pct"] == 0
    assert run.metrics["changes_per_guest_day"] == 0


def test_cli_outputs_recompute_to_the_summary(tmp_path: Path) -> None:
    recording = small_recording(tmp_path / "r.parquet")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            str(recording),
            "--policy",
            "threshold",
            "--policy",
            "threshold,high_watermark=0.5",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "threshold,high_watermark=0.5" in result.output
    for name in (
        "summary.json",
        "summary.csv",
        "allocations.parquet",
        "tradeoff.png",
        "guests.png",
    ):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    table = pq.read_table(out / "allocations.parquet")
    columns = {name: table.column(name).to_numpy() for name in table.column_names}
    for label, metrics in summary["policies"].items():
        rows = columns["policy"] == label
        ram, alloc = columns["ram_bytes"][rows], columns["alloc_bytes"][rows]
        demand = columns["demand_bytes"][rows]
        assert np.mean(ram - alloc) / GIB == pytest.approx(metrics["reclaimed_gib_per_guest"])
        assert 100 * np.mean(alloc < demand) == pytest.approx(metrics["under_provisioned_pct"])
        assert np.mean((alloc - demand) / alloc) == pytest.approx(metrics["relative_slack"])
        step_h = summary["meta"]["step_s"] / 3600
        deficit = np.maximum(demand - alloc, 0).sum() * step_h / GIB
        assert deficit == pytest.approx(metrics["deficit_gib_h"])


def test_cli_rejects_unknown_policy(tmp_path: Path) -> None:
    recording = small_recording(tmp_path / "r.parquet", 1, 10)
    result = CliRunner().invoke(main, ["simulate", str(recording), "--policy", "nope"])
    assert result.exit_code == 2
    assert "unknown policy 'nope'" in result.output


@pytest.mark.slow
def test_shared_month_imports_and_simulates(tmp_path: Path, bitbrains_trace: Path) -> None:
    runner = CliRunner()
    recording = tmp_path / "bitbrains.parquet"
    result = runner.invoke(
        main, ["import-trace", "--no-progress", str(bitbrains_trace), str(recording)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main, ["simulate", str(recording), "--out", str(tmp_path / "out"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    metrics = summary["policies"]["threshold"]
    assert summary["meta"]["guests"] == 500
    assert metrics["reclaimed_pct"] > 50
    assert metrics["under_provisioned_pct"] < 5


def test_metrics_of_a_perfect_allocation() -> None:
    demand = np.array([[1.0, 2.0, np.nan]]) * GIB
    replay = Replay(["h"], ["g"], np.array([4.0 * GIB]), np.array([0.0, 60.0, 120.0]), demand)
    metrics = compute_metrics(replay, np.array([[1.0, 2.0, 4.0]]) * GIB, 2, SimulationSettings())
    assert metrics["reclaimed_gib_per_guest"] == pytest.approx(2.5)
    assert metrics["under_provisioned_pct"] == 0
    assert metrics["relative_slack"] == 0
    assert metrics["changes_per_guest_day"] == pytest.approx(2 / (2 * 60 / 86400))


def test_cli_simulates_the_shipped_models_by_name(tmp_path: Path) -> None:
    """The learned policy with its default model and with the ``-safe`` one, named, not pathed:
    on 5-minute samples (the models' interval) both predict, and the safe one keeps more."""
    from tests.training.test_train import synthetic_recording

    recording = synthetic_recording(tmp_path / "fleet.parquet", guests=6, days=1.5)
    out = tmp_path / "out"
    safe = "regressor,model_path=bitbrains-2013-08-safe"
    result = CliRunner().invoke(
        main,
        [
            *("simulate", str(recording), "--policy", "regressor", "--policy", safe),
            *("--out", str(out), "--no-progress"),
        ],
    )
    assert result.exit_code == 0, result.output
    policies = json.loads((out / "summary.json").read_text())["policies"]
    assert set(policies) == {"regressor", safe}
    assert policies[safe]["reclaimed_pct"] < policies["regressor"]["reclaimed_pct"]
    assert policies[safe]["under_provisioned_pct"] <= policies["regressor"]["under_provisioned_pct"]
