"""The learned policy: features, model files and cards, fallbacks, and the conformance suite."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import sklearn  # type: ignore[import-untyped]
import skops.io  # type: ignore[import-untyped]

from autoscaler.fleet import Fleet
from autoscaler.learn.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    MIN_SAMPLES,
    N_FEATURES,
    WINDOW_SAMPLES,
    compute_features,
    gather_windows,
    recording_history,
)
from autoscaler.plugins import PluginError, create_policy
from autoscaler.stats import HISTORY_CHANNELS
from autoscaler.testing import ingest, parametrize_policy_checks, sample
from autoscaler.tick import fleet_view
from policies.regressor import (
    REASONS,
    ModelError,
    RegressorPolicy,
    default_model_path,
    load_model,
    model_paths,
)
from policies.threshold import ThresholdPolicy
from tests.helpers.data import fleet_with_history

GIB = 2**30
STEP_S = 300.0
COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}


# -- features ------------------------------------------------------------------------------------


def windows_of(demand_shares: np.ndarray, ram: float = 4 * GIB) -> np.ndarray:
    """Fleet-shaped windows whose demand follows ``demand_shares`` (rows = guests)."""
    n, length = demand_shares.shape
    windows = np.full((n, length, len(HISTORY_CHANNELS)), np.nan, dtype=np.float32)
    windows[:, :, 0] = np.arange(length) * STEP_S
    windows[:, :, 1] = demand_shares * ram
    windows[:, :, 2] = ram
    return windows


def test_feature_names_are_ordered_unique_and_versioned() -> None:
    assert len(FEATURE_NAMES) == N_FEATURES == len(set(FEATURE_NAMES))
    assert FEATURE_NAMES[0] == "demand_share"  # the policy adds the predicted rise to it
    assert isinstance(FEATURE_VERSION, int)


def test_features_shape_and_meaning() -> None:
    ramp = np.linspace(0.1, 0.4, WINDOW_SAMPLES)[None, :]
    features = compute_features(windows_of(ramp), np.array([4.0 * GIB]))
    assert features.shape == (1, N_FEATURES) and features.dtype == np.float32
    row = features[0]
    step = 0.3 / (WINDOW_SAMPLES - 1)
    assert row[COLUMN["demand_share"]] == pytest.approx(0.4)
    assert row[COLUMN["demand_change_1"]] == pytest.approx(step, rel=1e-3)
    assert row[COLUMN["recent_slope"]] == pytest.approx(step, rel=1e-3)
    assert row[COLUMN["window_max"]] == pytest.approx(0.4)
    assert row[COLUMN["window_mean"]] == pytest.approx(0.25, rel=1e-4)
    assert row[COLUMN["window_samples"]] == WINDOW_SAMPLES
    assert row[COLUMN["level_60min_before_next"]] == pytest.approx(-11 * step, rel=1e-3)


def test_features_are_shares_of_ram() -> None:
    """A guest four times the size with four times the demand looks the same to the model."""
    rng = np.random.default_rng(1)
    shares = rng.uniform(0.05, 0.6, (8, WINDOW_SAMPLES))
    small = compute_features(windows_of(shares, 2 * GIB), np.full(8, 2.0 * GIB))
    large = compute_features(windows_of(shares, 8 * GIB), np.full(8, 8.0 * GIB))
    np.testing.assert_allclose(small, large, rtol=1e-5, atol=1e-7)


def test_features_tolerate_missing_data() -> None:
    """Partly filled and empty windows, missing counters, unknown RAM: NaN, no warning, no crash.

    (pytest turns warnings into errors here, so a numpy "mean of empty slice" would fail.)
    """
    shares = np.full((4, WINDOW_SAMPLES), 0.2)
    windows = windows_of(shares)
    windows[1, :-3] = np.nan  # three samples so far
    windows[2] = np.nan  # nothing at all
    ram = np.array([4.0 * GIB, 4.0 * GIB, 4.0 * GIB, np.nan])
    features = compute_features(windows, ram)
    assert features.shape == (4, N_FEATURES)
    assert features[1, COLUMN["window_samples"]] == 3
    assert np.isnan(features[1, COLUMN["demand_change_3"]])  # needs four samples
    assert features[1, COLUMN["recent_max"]] == pytest.approx(0.2)
    assert np.isnan(features[2, : COLUMN["window_samples"]]).all()
    assert features[2, COLUMN["window_samples"]] == 0
    assert np.isnan(features[3, COLUMN["demand_share"]])  # unknown RAM: unknown share
    # No pressure counters in the windows: every rate feature is NaN, never a made-up zero.
    assert np.isnan(features[:, COLUMN["swap_in_share_ps"] :]).all()
    # A window shorter than the model's reads as one the guest has not filled yet.
    short = compute_features(windows_of(shares[:, -8:]), np.full(4, 4.0 * GIB))
    assert (short[:, COLUMN["window_samples"]] == 8).all()
    assert compute_features(windows[:0], ram[:0]).shape == (0, N_FEATURES)


def test_rates_become_features() -> None:
    windows = windows_of(np.full((1, WINDOW_SAMPLES), 0.3))
    windows[0, :, HISTORY_CHANNELS.index("swap-in")] = 0.0
    windows[0, -1, HISTORY_CHANNELS.index("swap-in")] = 0.01 * 4 * GIB
    windows[0, -5, HISTORY_CHANNELS.index("alloc-stalls")] = 2.0
    features = compute_features(windows, np.array([4.0 * GIB]))
    assert features[0, COLUMN["swap_in_share_ps"]] == pytest.approx(0.01)
    assert features[0, COLUMN["pressure_events_window"]] == pytest.approx(2.0)


def test_training_windows_are_the_fleets_windows() -> None:
    """The windows cut from a recording equal those the fleet builds from the same samples."""
    rng = np.random.default_rng(2)
    ts0 = 1_700_000_000.0
    rows = []
    fleet = Fleet(max_guests=4, history_len=WINDOW_SAMPLES, epoch_s=ts0)
    for k in range(40):
        for g in range(3):
            if g == 2 and k % 7 == 3:
                continue  # a guest that misses samples
            ram = 4 * GIB
            available = float(rng.uniform(0.2, 0.9)) * ram
            swap = 1000.0 * k * (g + 1) if k != 20 else 0.0  # a reboot at k = 20
            ts = ts0 + k * STEP_S + g
            stats = {"total-memory": ram, "available-memory": available, "swap-in": swap}
            rows.append({"host": "h", "guest": f"g{g}", "ts": ts, "ram_bytes": ram, **stats})
            values = {"total_memory": ram, "available_memory": available, "swap_in": swap}
            ingest(fleet, "h", f"g{g}", sample(ts, ram_bytes=ram, **values), ts)
    table = pa.Table.from_pylist(rows)
    history = recording_history(table)
    assert history.guests == ["g0", "g1", "g2"]
    last_rows = history.starts[1:] - 1
    from_recording = gather_windows(history, last_rows)
    live = fleet.ordered_history(np.array([fleet.slot_for("h", f"g{g}", ts0) for g in range(3)]))
    # Timestamps differ only by the epoch each side counts from.
    np.testing.assert_allclose(
        from_recording[:, :, 0] + history.epoch_s, live[:, :, 0] + fleet.epoch_s, atol=1.0
    )
    np.testing.assert_allclose(from_recording[:, :, 1:], live[:, :, 1:], rtol=1e-6)
    rams = np.full(3, 4.0 * GIB)
    np.testing.assert_array_equal(
        compute_features(from_recording, rams), compute_features(live, rams)
    )


def test_training_rates_restart_on_any_counter_reset_as_the_fleets() -> None:
    """A reboot seen only in a counter the history does not keep (minor faults) restarts the
    rates of the training rows as it does the fleet's."""
    ts0 = 1_700_000_000.0
    fleet = Fleet(max_guests=1, history_len=WINDOW_SAMPLES, epoch_s=ts0)
    rows = []
    for k in range(10):
        ts = ts0 + k * STEP_S
        swap, minor = 1000.0 * k, 5000.0 * (k if k < 6 else k - 6)  # minor faults reset at 6
        stats = {"total-memory": 4 * GIB, "swap-in": swap, "minor-faults": minor}
        rows.append({"host": "h", "guest": "g", "ts": ts, "ram_bytes": 4 * GIB, **stats})
        ingest(
            fleet, "h", "g", sample(ts, total_memory=4 * GIB, swap_in=swap, minor_faults=minor), ts
        )
    history = recording_history(pa.Table.from_pylist(rows))
    swap_in = HISTORY_CHANNELS.index("swap-in")
    live = fleet.ordered_history(np.array([fleet.slot_for("h", "g", ts0)]))[0, -10:, swap_in]
    np.testing.assert_array_equal(history.rows[:, swap_in], live)
    assert np.isnan(live[6]) and live[7] == pytest.approx(1000.0 / STEP_S)


# -- the policy ------------------------------------------------------------------------------------


@parametrize_policy_checks(["regressor", ("regressor", {"margin": 0.1, "headroom_bytes": 0.0})])
def test_registered_regressor_conforms(check: Callable[[], None]) -> None:
    check()


def test_warm_guests_get_the_predicted_peak_plus_margin_and_headroom() -> None:
    policy = create_policy("regressor", {"margin": 0.1, "headroom_bytes": 64 * 2**20})
    assert isinstance(policy, RegressorPolicy)
    fleet = fleet_with_history(WINDOW_SAMPLES)
    view = fleet_view(fleet, float(np.nanmax(fleet.ts_s)) + 1)
    decision = policy.decide(view)
    assert (decision.reason == 0).all()
    features = compute_features(view.history(), view.ram_bytes)
    peak = np.clip(features[:, 0] + policy.model_.predict(features), 0, 1) * view.ram_bytes
    np.testing.assert_allclose(decision.target_bytes, peak * 1.1 + 64 * 2**20, rtol=1e-6)
    np.testing.assert_allclose(decision.pressure, peak / view.alloc_bytes, rtol=1e-6)
    assert "predicted peak" in decision.reason_text(0)


def test_cold_start_delegates_to_threshold() -> None:
    """Too few samples: the threshold rules decide, never a guess from an empty window."""
    policy = create_policy("regressor")
    fleet = fleet_with_history(MIN_SAMPLES - 1)
    view = fleet_view(fleet, float(np.nanmax(fleet.ts_s)) + 1)
    decision = policy.decide(view)
    expected = ThresholdPolicy().decide(view)
    np.testing.assert_array_equal(decision.target_bytes, expected.target_bytes)
    np.testing.assert_array_equal(decision.pressure, expected.pressure)
    for i in range(len(view)):
        text = decision.reason_text(i)
        assert text.startswith(f"cold start ({MIN_SAMPLES - 1} of {MIN_SAMPLES} samples)")
        assert text.endswith(expected.reason_text(i))


def test_guests_sampled_at_another_interval_fall_back() -> None:
    """A model made for 5-minute samples is not asked about a guest sampled every 5 s."""
    policy = create_policy("regressor")
    fleet = fleet_with_history(WINDOW_SAMPLES, interval_s=5.0)
    view = fleet_view(fleet, float(np.nanmax(fleet.ts_s)) + 1)
    decision = policy.decide(view)
    expected = ThresholdPolicy().decide(view)
    np.testing.assert_array_equal(decision.target_bytes, expected.target_bytes)
    assert decision.reason_text(0).startswith("sampled every 5 s, model made for 300 s")


def test_pressure_gets_at_least_the_threshold_allocation() -> None:
    policy = create_policy("regressor", {"headroom_bytes": 0.0})
    fleet = fleet_with_history(WINDOW_SAMPLES, swap_last=True)
    view = fleet_view(fleet, float(np.nanmax(fleet.ts_s)) + 1)
    decision = policy.decide(view)
    expected = ThresholdPolicy().decide(view)
    assert (decision.target_bytes >= expected.target_bytes).all()
    assert decision.reason_text(0).startswith("pressure overrides the prediction: pressure: swap")


def test_reasons_cover_every_fallback_of_every_threshold_reason() -> None:
    from policies.threshold import REASONS as THRESHOLD_REASONS

    assert len(REASONS) == 2 + 3 * len(THRESHOLD_REASONS)


# -- model files and cards -------------------------------------------------------------------------


def shipped_copy(tmp_path: Path) -> Path:
    """A copy of the shipped model and card, to be altered by a test."""
    model, card = model_paths(default_model_path())
    shutil.copy(model, tmp_path / model.name)
    shutil.copy(card, tmp_path / card.name)
    return tmp_path / model.name


def rewrite_card(path: Path, **changes: object) -> None:
    _, card_file = model_paths(path)
    data = json.loads(card_file.read_text())
    data.update(changes)
    card_file.write_text(json.dumps(data))


def test_shipped_model_loads_and_is_small() -> None:
    path = default_model_path()
    model, card = load_model(path)
    assert card.feature_names == list(FEATURE_NAMES)
    assert path.stat().st_size < 5 * 2**20  # committed to git: a few MB at most
    assert model.n_features_in_ == N_FEATURES


class Intruder:
    """A type no model file should hold."""

    def __init__(self) -> None:
        self.payload = "anything"


def test_load_refuses_untrusted_types(tmp_path: Path) -> None:
    path = shipped_copy(tmp_path)
    model, _ = load_model(path)
    model.intruder_ = Intruder()  # hidden inside an otherwise valid estimator
    skops.io.dump(model, path)
    from policies.regressor import file_sha256

    rewrite_card(path, model_sha256=file_sha256(path))
    with pytest.raises(ModelError, match=r"does not trust: tests\.unit\.test_regressor\.Intruder"):
        load_model(path)
    with pytest.raises(PluginError, match="does not trust"):
        create_policy("regressor", {"model_path": str(path)})


def test_load_refuses_a_model_for_other_features(tmp_path: Path) -> None:
    path = shipped_copy(tmp_path)
    rewrite_card(path, feature_version=FEATURE_VERSION + 1)
    with pytest.raises(PluginError, match="feature version"):
        create_policy("regressor", {"model_path": str(path)})
    rewrite_card(path, feature_version=FEATURE_VERSION, feature_names=list(reversed(FEATURE_NAMES)))
    with pytest.raises(PluginError, match="feature names or their order"):
        create_policy("regressor", {"model_path": str(path)})


def test_load_refuses_another_sklearn_version(tmp_path: Path) -> None:
    path = shipped_copy(tmp_path)
    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    rewrite_card(path, sklearn_version=f"{major}.{minor + 1}.0")
    with pytest.raises(PluginError, match=r"scikit-learn .* major\.minor versions must match"):
        create_policy("regressor", {"model_path": str(path)})
    # Another patch release of the same major.minor is fine.
    rewrite_card(path, sklearn_version=f"{major}.{minor}.99")
    create_policy("regressor", {"model_path": str(path)})


def test_another_patch_release_loads_without_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scikit-learn warns on any version difference; the card check is what decides."""
    import sklearn.base  # type: ignore[import-untyped]

    major, minor = sklearn.__version__.split(".")[:2]
    monkeypatch.setattr(sklearn.base, "__version__", f"{major}.{minor}.99")
    model, _ = load_model(shipped_copy(tmp_path))  # warnings are errors in this suite
    assert model.n_features_in_ == N_FEATURES


def test_load_refuses_a_model_its_card_does_not_describe(tmp_path: Path) -> None:
    path = shipped_copy(tmp_path)
    rewrite_card(path, model_sha256="0" * 64)
    with pytest.raises(PluginError, match="not the file its card"):
        create_policy("regressor", {"model_path": str(path)})


def test_a_shipped_model_is_found_by_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no models/ here: the name must resolve to the shipped one
    policy = create_policy("regressor", {"model_path": "bitbrains-2013-08-safe"})
    assert isinstance(policy, RegressorPolicy)
    assert policy.card_.quantile == 0.99 and policy.card_.horizon_s == 900
    with pytest.raises(PluginError, match=r"shipped with the program: bitbrains-2013-08, "):
        create_policy("regressor", {"model_path": "bitbrains-1999"})


def test_missing_model_or_card_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="no model file"):
        create_policy("regressor", {"model_path": str(tmp_path / "nothing.skops")})
    path = shipped_copy(tmp_path)
    model_paths(path)[1].unlink()
    with pytest.raises(PluginError, match="cannot read the model card"):
        create_policy("regressor", {"model_path": str(path)})
    model_paths(path)[1].write_text("{}")
    with pytest.raises(PluginError, match="not a model card"):
        create_policy("regressor", {"model_path": str(path)})


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(PluginError, match="margin"):
        create_policy("regressor", {"margin": -0.1})
    with pytest.raises(PluginError, match="headroom_bytes"):
        create_policy("regressor", {"headroom_bytes": -1.0})
