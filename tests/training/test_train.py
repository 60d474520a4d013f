"""Training: time split, features shared with the policy, skops model and card, the CLI report."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sklearn  # type: ignore[import-untyped]
from click.testing import CliRunner

from autoscaler.cli import main
from autoscaler.learn.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    MIN_SAMPLES,
    compute_features,
    future_peak_share,
    gather_windows,
    recording_history,
)
from autoscaler.learn.train import (
    TrainSettings,
    eligible_positions,
    recording_sha256,
)
from autoscaler.plugins import create_policy
from autoscaler.recordings.recording import read_recording, write_recording
from autoscaler.sim.simulate import current_metric_names
from autoscaler.tick import fleet_view
from policies.regressor import RegressorPolicy, load_model
from tests.helpers.data import fleet_with_history

GIB = 2**30
T0 = 1_700_000_000.0
STEP_S = 300.0
DAY_S = 86_400.0


def synthetic_recording(path: Path, *, guests: int = 12, days: float = 3.0) -> Path:
    """Guests of several sizes with a daily wave, a quarter-hourly job and random bursts."""
    rng = np.random.default_rng(3)
    steps = int(days * DAY_S / STEP_S)
    k = np.arange(steps)
    columns: dict[str, list[object]] = {
        name: [] for name in ("host", "guest", "ts", "ram_bytes", "demand_bytes")
    }
    for g in range(guests):
        ram = float(2 ** (g % 4 + 1)) * GIB
        base = rng.uniform(0.05, 0.3)
        wave = 0.1 * np.sin(2 * np.pi * k * STEP_S / DAY_S + rng.uniform(0, 6))
        job = np.where(k % 3 == g % 3, rng.uniform(0.0, 0.15), 0.0)
        bursts = (rng.random(steps) < 0.02) * rng.uniform(0.1, 0.4, steps)
        share = np.clip(base + wave + job + bursts + rng.normal(0, 0.01, steps), 0.01, 1.0)
        keep = rng.random(steps) > 0.05  # the odd missing sample, as in real traces
        columns["host"] += ["h"] * int(keep.sum())
        columns["guest"] += [f"vm{g}"] * int(keep.sum())
        columns["ts"] += (T0 + k[keep] * STEP_S + rng.uniform(0, 3, int(keep.sum()))).tolist()
        columns["ram_bytes"] += [ram] * int(keep.sum())
        columns["demand_bytes"] += (share[keep] * ram).tolist()
    write_recording(columns, path, source="synthetic test fleet")
    return path


def test_labels_are_the_peak_of_the_next_horizon(tmp_path: Path) -> None:
    history = recording_history(read_recording(synthetic_recording(tmp_path / "r.parquet")))
    labels = future_peak_share(history, 900.0)
    share = history.rows[:, 1] / history.ram_bytes
    i = int(history.starts[0]) + 100
    expected = share[i + 1 : i + 4].max()
    if np.all(np.diff(history.ts_s[i : i + 4]) < 1.5 * STEP_S):
        assert labels[i] == pytest.approx(expected, rel=1e-6)
    # The last sample of each guest has no future: no label.
    assert np.isnan(labels[history.starts[1:] - 1]).all()


def test_split_never_trains_on_validation_days(tmp_path: Path) -> None:
    history = recording_history(read_recording(synthetic_recording(tmp_path / "r.parquet")))
    labels = future_peak_share(history, 900.0)
    validation_from = history.ts_s.max() - DAY_S
    train = eligible_positions(history, labels, history.ts_s.min(), validation_from - 900.0)
    assert len(train) > 0
    # Neither a training sample nor the samples its label looks at reach the validation days.
    assert history.ts_s[train].max() + 900.0 < validation_from
    # Cold-start samples are not training samples: the model is never asked about them.
    first_rows = history.starts[:-1]
    assert not np.isin(first_rows + MIN_SAMPLES - 2, train).any()


def test_train_command_end_to_end(tmp_path: Path) -> None:
    recording = synthetic_recording(tmp_path / "fleet.parquet")
    out = tmp_path / "models" / "small"
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(recording),
            "--out",
            str(out),
            "--horizon-s",
            "900",
            "--quantile",
            "0.9",
            "--margin",
            "0.05",
            "--validation-days",
            "1",
            "--warmup-days",
            "0.5",
            "--max-rows",
            "4000",
            "--max-iter",
            "20",
            "--min-samples-leaf",
            "20",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    for label in ("regressor", "threshold", "vpa"):
        assert f"\n{label} " in result.output
    assert "pinball loss" in result.output and "coverage" in result.output

    model_file, card_file = out.with_suffix(".skops"), out.with_suffix(".json")
    assert model_file.stat().st_size > 0
    assert b"pickle" not in model_file.read_bytes()[:4]  # a skops zip, not a pickle stream
    card = json.loads(card_file.read_text())
    assert card["feature_names"] == list(FEATURE_NAMES)
    assert card["feature_version"] == FEATURE_VERSION
    assert card["horizon_s"] == 900 and card["quantile"] == 0.9 and card["margin"] == 0.05
    assert card["step_s"] == pytest.approx(STEP_S, abs=5)
    assert card["sklearn_version"] == sklearn.__version__
    assert card["training_data"]["sha256"] == recording_sha256(recording)
    assert card["training_data"]["source"] == "synthetic test fleet"
    assert "swap_in_share_ps" in card["training_data"]["features_without_data"]
    assert card["command"].startswith(f"balloon-autoscaler train {recording} --out {out}")
    prediction = card["metrics"]["validation_prediction"]
    assert 0.5 < prediction["coverage"] <= 1.0 and prediction["pinball_loss"] > 0
    simulated = card["metrics"]["validation_simulation"]["policies"]
    assert set(simulated) == {"regressor", "threshold", "vpa"}
    assert simulated["regressor"]["samples"] > 0

    # Load it back as the daemon would, and decide for a fleet with full windows.
    policy = create_policy("regressor", {"model_path": str(model_file)})
    assert isinstance(policy, RegressorPolicy) and policy.effective_margin == 0.05
    fleet = fleet_with_history(40)
    decision = policy.decide(fleet_view(fleet, float(np.nanmax(fleet.ts_s)) + 1))
    assert (decision.reason == 0).all() and np.isfinite(decision.target_bytes).all()


def test_train_command_refuses_too_little_data(tmp_path: Path) -> None:
    recording = synthetic_recording(tmp_path / "r.parquet", guests=2, days=0.5)
    result = CliRunner().invoke(
        main, ["train", str(recording), "--out", str(tmp_path / "m"), "--no-progress"]
    )
    assert result.exit_code == 2
    assert "leave nothing to train on" in result.output


def test_train_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="quantile"):
        TrainSettings(quantile=1.5).validate()
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0 and "--horizon-s" in result.output


# -- the shipped models ----------------------------------------------------------------------------

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = sorted(path.stem for path in MODELS.glob("*.json"))


@pytest.fixture(scope="module")
def shared_month(tmp_path_factory: pytest.TempPathFactory, bitbrains_trace: Path) -> Path:
    """The shared Bitbrains month, imported as models/README.md says (about 5 s)."""
    recording = tmp_path_factory.mktemp("month") / "bitbrains.parquet"
    result = CliRunner().invoke(
        main, ["import-trace", "--no-progress", str(bitbrains_trace), str(recording)]
    )
    assert result.exit_code == 0, result.output
    return recording


def _flat_metrics(card: dict[str, Any]) -> dict[str, Any]:
    """The card's metrics as {"a.b.c": value}, without the timings (they vary run to run)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in current_metric_names(value).items():  # older cards' names too
                walk(f"{prefix}.{key}" if prefix else key, item)
        elif not prefix.endswith(("fit_s", "wall_s")):
            flat[prefix] = value

    walk("", card["metrics"])
    return flat


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_model_is_what_its_card_command_trains(
    shared_month: Path, tmp_path: Path, name: str
) -> None:
    """models/README.md's promise: the command on a model's card, run on the imported month,
    trains the same model — the same predictions for real windows, the same validation results.

    The files themselves differ (skops names zip entries after object ids and stamps them with
    the time), so the comparison is of what the model does, not of its bytes.
    """
    shipped_card = json.loads((MODELS / f"{name}.json").read_text())
    argv = shlex.split(shipped_card["command"])
    assert argv[:3] == ["balloon-autoscaler", "train", "bitbrains.parquet"], argv
    out = tmp_path / name
    args = ["train", str(shared_month), *argv[3:], "--no-progress"]
    args[args.index("--out") + 1] = str(out)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    card = json.loads(out.with_suffix(".json").read_text())
    assert shlex.split(card["command"])[5:] == argv[5:]  # the same options, spelled the same
    assert card["training_data"]["sha256"] == shipped_card["training_data"]["sha256"]
    for key in ("feature_names", "feature_version", "horizon_s", "quantile", "margin"):
        assert card[key] == shipped_card[key], key
    assert card["hyperparameters"] == shipped_card["hyperparameters"]
    metrics, shipped_metrics = _flat_metrics(card), _flat_metrics(shipped_card)
    assert metrics.keys() == shipped_metrics.keys()
    for key, value in shipped_metrics.items():
        assert metrics[key] == (pytest.approx(value) if isinstance(value, float) else value), key

    model, _ = load_model(out.with_suffix(".skops"))
    shipped, _ = load_model(MODELS / f"{name}.skops")
    history = recording_history(read_recording(shared_month))
    positions = np.sort(np.random.default_rng(0).choice(len(history.ts_s), 20_000, replace=False))
    features = compute_features(gather_windows(history, positions), history.ram_bytes[positions])
    np.testing.assert_array_equal(model.predict(features), shipped.predict(features))
