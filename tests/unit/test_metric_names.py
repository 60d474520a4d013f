"""Metric names: per-guest figures say so, and cards written under the old names still read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from click.testing import CliRunner

from autoscaler.cli import main
from autoscaler.sim.simulate import current_metric_names
from policies.regressor import ModelCard, read_card, shipped_models_dir
from tests.helpers.data import small_recording


def test_summary_and_table_name_the_reclaimed_memory_per_guest(tmp_path: Path) -> None:
    recording = small_recording(tmp_path / "r.parquet", guests=2, steps=120)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["simulate", str(recording), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "reclaimed GiB/guest" in result.stdout
    metrics = json.loads((out / "summary.json").read_text())["policies"]["threshold"]
    assert "reclaimed_gib_per_guest" in metrics and "reclaimed_gib" not in metrics
    with (out / "summary.csv").open() as file:
        header = next(csv.reader(file))
    assert "reclaimed_gib_per_guest" in header and "reclaimed_gib" not in header


def test_old_metric_names_read_as_new_ones() -> None:
    assert current_metric_names({"reclaimed_gib": 2.0, "reclaimed_pct": 50.0}) == {
        "reclaimed_gib_per_guest": 2.0,
        "reclaimed_pct": 50.0,
    }
    both = {"reclaimed_gib": 1.0, "reclaimed_gib_per_guest": 2.0}
    assert current_metric_names(both) == {"reclaimed_gib_per_guest": 2.0}


def test_a_card_written_with_the_old_metric_names_reads_with_the_new_ones() -> None:
    card_file = shipped_models_dir() / "bitbrains-2013-08.json"
    raw = json.loads(card_file.read_text())
    old = raw["metrics"]["validation_simulation"]["policies"]["threshold"]
    assert "reclaimed_gib" in old  # written before the rename
    card = read_card(card_file.with_suffix(".skops"))
    policies = card.metrics["validation_simulation"]["policies"]
    for label, metrics in policies.items():
        assert "reclaimed_gib" not in metrics, label
        assert (
            metrics["reclaimed_gib_per_guest"]
            == (raw["metrics"]["validation_simulation"]["policies"][label]["reclaimed_gib"])
        )
    # and a card without simulation metrics reads as before
    assert ModelCard.from_json(json.dumps({**raw, "metrics": {}}), where="x").metrics == {}
