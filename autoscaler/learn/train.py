"""Training the learned policy (:mod:`policies.regressor`) on a recording.

``balloon-autoscaler train RECORDING --out models/NAME`` runs :func:`train`:

1. every sample of the recording becomes a fleet history row (:func:`recording_history`): the
   same demand estimate, allocation and counter rates the daemon computes at ingest;
2. the split is by time: the last ``validation_days`` are held out, and training uses only
   samples whose label window ends before them (a label reaching into the validation days would
   leak them into training). Rows are never shuffled across that boundary;
3. up to ``max_rows`` training samples (drawn at random from the training days, seeded) get
   their window (:func:`gather_windows`) and features (:func:`compute_features`, the very function
   the policy calls each tick), and the label: the rise of the guest's peak demand over the next
   ``horizon_s`` above its demand now, as a share of RAM;
4. a ``HistGradientBoostingRegressor(loss="quantile")`` of modest capacity is fitted (shallow
   trees, large leaves, L2: it must generalise to other fleets, not remember this one);
5. the model is saved with skops with its card, loaded back through the policy's own checks, and
   evaluated on the validation days: pinball loss and coverage of the predictions, and the
   closed-loop simulator's metrics for ``regressor``, ``threshold`` and ``vpa`` side by side. The
   simulation starts ``warmup_days`` before the validation days, so that every policy (VPA keeps
   a day-scale histogram) has history when scoring starts; only the validation days are scored.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa

from autoscaler.config import GuardSettings
from autoscaler.learn.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    MIN_SAMPLES,
    WINDOW_SAMPLES,
    RecordingHistory,
    compute_features,
    future_peak_share,
    gather_windows,
    recording_history,
)
from autoscaler.sim.simulate import (
    PolicyRun,
    Replay,
    SimulationSettings,
    compute_metrics,
    replay_from_recording,
    simulate_policy,
)

DAY_S: Final = 86_400.0
FEATURE_CHUNK_ROWS: Final = 100_000
"""Windows are cut and featurised this many at a time: 100k windows are ~150 MB of float32."""
FIT_CHUNK_ITERATIONS: Final = 10
"""Trees added per warm-started fit call, so that the progress bar moves while fitting."""
BASELINES: Final[tuple[str, ...]] = ("threshold", "vpa")

Progress = Callable[[str, int], Any]
"""``progress(stage, total)`` returns a context manager with ``update(n)`` (a tqdm bar)."""


class TrainingError(ValueError):
    """The recording cannot train a model (too short, too few samples, no validation days)."""


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the model; recorded in its card.

    Defaults, and why (chosen on the Bitbrains month's validation days, see models/README.md):

    - ``horizon_s=300``: the next sample at 5-minute steps. The policy decides again every tick,
      so the allocation it proposes only has to hold until the next decision; a longer horizon
      buys safety with memory the quantile buys more cheaply. A 15-minute horizon with a higher
      quantile gives the conservative end of the trade-off (the ``-safe`` model).
    - ``quantile=0.9``, ``margin=0``, ``headroom_bytes=128 MiB``: size for nine peaks in ten,
      then add a fixed cushion. The quantile already knows which guests are bursty; the cushion
      is cheap where bursts hurt most in relative terms (small guests) and negligible on big
      ones, which a share-of-RAM margin cannot be.
    - capacity: 150 trees of at most 15 leaves with at least 500 samples each, learning rate
      0.1, L2 1.0 — few enough parameters that the model learns how demand moves in general,
      not the habits of this fleet's machines.
    - ``max_rows=400_000``: a few minutes on 2 cores; more rows barely change the fit.
    - ``validation_days=7`` and ``warmup_days=2``: a week of days the model never saw, with two
      days before them simulated (not scored) so that VPA's day-scale history is warm.
    """

    horizon_s: float = 300.0
    quantile: float = 0.9
    margin: float = 0.0
    headroom_bytes: float = 128 * 2**20
    validation_days: float = 7.0
    warmup_days: float = 2.0
    max_rows: int = 400_000
    max_iter: int = 150
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 500
    learning_rate: float = 0.1
    l2_regularization: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {self.quantile}")
        if not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")
        if not self.headroom_bytes >= 0:
            raise ValueError(f"headroom_bytes must be >= 0, got {self.headroom_bytes}")
        for name in ("horizon_s", "validation_days", "learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_days < 0:
            raise ValueError(f"warmup_days must be >= 0, got {self.warmup_days}")
        for name in ("max_rows", "max_iter", "max_leaf_nodes", "min_samples_leaf"):
            if getattr(self, name) < (2 if name == "max_leaf_nodes" else 1):
                raise ValueError(f"{name} is too small: {getattr(self, name)}")

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "loss": "quantile",
            "quantile": self.quantile,
            "max_iter": self.max_iter,
            "max_leaf_nodes": self.max_leaf_nodes,
            "min_samples_leaf": self.min_samples_leaf,
            "learning_rate": self.learning_rate,
            "l2_regularization": self.l2_regularization,
            "early_stopping": False,
            "random_state": self.seed,
        }


@dataclass
class Dataset:
    """Features and labels of some samples of a recording (shares of RAM)."""

    features: np.ndarray
    peak: np.ndarray
    """The guest's highest demand over the horizon after the sample."""
    now: np.ndarray
    """The guest's demand at the sample (feature ``demand_share``)."""
    positions: np.ndarray
    ram_bytes: np.ndarray

    @property
    def rise(self) -> np.ndarray:
        """The model's label: how far the peak rises above the current demand."""
        return np.asarray(self.peak - self.now)

    def __len__(self) -> int:
        return len(self.peak)


@dataclass
class TrainReport:
    model_path: Path
    card_path: Path
    card: Any
    runs: list[PolicyRun]
    fit_s: float
    total_s: float
    model_bytes: int
    prediction: dict[str, float] = field(default_factory=dict)


def recording_sha256(path: Path) -> str:
    """sha256 of a recording file, or of a directory's Parquet files in name order."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def eligible_positions(
    history: RecordingHistory, labels: np.ndarray, ts_from: float, ts_to: float
) -> np.ndarray:
    """Samples in [ts_from, ts_to) with a label and enough history for the model to be asked.

    Cold-start samples are left out: the policy hands those guests to the threshold rules, so the
    model never sees such windows and need not learn them.
    """
    seen = _samples_so_far(history)
    mask = (
        (history.ts_s >= ts_from)
        & (history.ts_s < ts_to)
        & np.isfinite(labels)
        & np.isfinite(history.rows[:, 1])
        & (seen >= MIN_SAMPLES)
    )
    return np.flatnonzero(mask)


def _samples_so_far(history: RecordingHistory) -> np.ndarray:
    """Demand samples in each sample's window (as :func:`demand_samples`, without the windows)."""
    total = np.cumsum(np.isfinite(history.rows[:, 1]))
    index = np.arange(len(total))
    # A window reaches back WINDOW_SAMPLES samples, never before the guest's first one.
    first = np.maximum(index - WINDOW_SAMPLES + 1, history.starts[history.guest_of_row])
    before = np.where(first > 0, total[np.maximum(first - 1, 0)], 0)
    return np.asarray(total - before)


def build_dataset(
    history: RecordingHistory,
    labels: np.ndarray,
    positions: np.ndarray,
    *,
    bar: Any = None,
) -> Dataset:
    """Features (the policy's own function) and labels for ``positions``, in chunks."""
    parts = []
    for start in range(0, len(positions), FEATURE_CHUNK_ROWS):
        chunk = positions[start : start + FEATURE_CHUNK_ROWS]
        windows = gather_windows(history, chunk)
        parts.append(compute_features(windows, history.ram_bytes[chunk]))
        if bar is not None:
            bar.update(len(chunk))
    features = (
        np.concatenate(parts) if parts else np.empty((0, len(FEATURE_NAMES)), dtype=np.float32)
    )
    return Dataset(
        features=features,
        peak=labels[positions],
        now=features[:, 0].astype(np.float64),
        positions=positions,
        ram_bytes=history.ram_bytes[positions],
    )


def fit_model(data: Dataset, settings: TrainSettings, *, bar: Any = None) -> Any:
    """Fit the quantile regressor on ``data``, a few trees at a time for the progress bar.

    Warm starting adds trees to the same ensemble; with early stopping off and no subsampling,
    the result is the model one call with ``max_iter`` trees would give.

    A feature the recording never has (the pressure counters of a trace that has none) is given
    to the fitter as zeros: scikit-learn cannot bin a column without a single value, and a
    constant column is what such a column is to the trees — nothing to split on — so the model
    ignores it, as it would an all-missing one. :func:`absent_features` names them for the card.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor  # type: ignore[import-untyped]

    features = data.features
    absent = np.isnan(features).all(axis=0)
    if absent.any():
        features = features.copy()
        features[:, absent] = 0.0
    model = HistGradientBoostingRegressor(**settings.hyperparameters(), warm_start=True)
    done = 0
    while done < settings.max_iter:
        step = min(FIT_CHUNK_ITERATIONS, settings.max_iter - done)
        model.set_params(max_iter=done + step)
        model.fit(features, data.rise)
        done += step
        if bar is not None:
            bar.update(step)
    model.set_params(warm_start=False)
    return model


def absent_features(data: Dataset) -> list[str]:
    """Features without a single value in ``data`` (the model cannot have learned from them)."""
    absent = np.isnan(data.features).all(axis=0)
    return [name for name, gone in zip(FEATURE_NAMES, absent.tolist(), strict=True) if gone]


def prediction_metrics(
    model: Any, data: Dataset, *, quantile: float, margin: float, headroom_bytes: float
) -> dict[str, float]:
    """Pinball loss and coverage of the predicted peak (share of RAM) on ``data``.

    ``coverage`` is the share of real peaks at or under the prediction itself;
    ``coverage_with_margin`` under what the policy allocates (prediction × (1 + margin) +
    headroom), before guards.
    """
    from sklearn.metrics import mean_pinball_loss  # type: ignore[import-untyped]

    if not len(data):
        return {}
    predicted = np.clip(data.now + model.predict(data.features), 0.0, 1.0)
    return {
        "pinball_loss": float(mean_pinball_loss(data.peak, predicted, alpha=quantile)),
        "coverage": float(np.mean(data.peak <= predicted)),
        "coverage_with_margin": float(
            np.mean(data.peak <= predicted * (1.0 + margin) + headroom_bytes / data.ram_bytes)
        ),
        "mean_predicted_share": float(np.mean(predicted)),
        "mean_peak_share": float(np.mean(data.peak)),
        "rows": float(len(data)),
    }


def simulate_validation(
    replay: Replay,
    policies: Sequence[tuple[str, Any]],
    guards: GuardSettings,
    sim: SimulationSettings,
    *,
    validation_from_s: float,
    warmup_s: float,
    progress: Callable[[str, int], Any] | None = None,
) -> list[PolicyRun]:
    """Simulate each policy from ``warmup_s`` before ``validation_from_s``; score from there on.

    Target changes are counted as allocation moves on the scored days (each accepted target
    moves the simulated balloon within a step at the default balloon speeds).
    """
    first = int(np.searchsorted(replay.grid_s, validation_from_s - warmup_s))
    scored_from = int(np.searchsorted(replay.grid_s, validation_from_s)) - first
    part = replay.from_step(first)
    scored = part.from_step(scored_from)
    runs = []
    for label, policy in policies:
        started = time.perf_counter()
        steps = part.demand_bytes.shape[1]
        if progress is not None:
            with progress(f"simulate {label}", steps) as bar:
                run = simulate_policy(part, policy, guards, sim, label=label, progress=bar.update)
        else:
            run = simulate_policy(part, policy, guards, sim, label=label)
        alloc = run.alloc_bytes[:, scored_from:]
        moves = np.count_nonzero(np.abs(np.diff(run.alloc_bytes[:, max(scored_from - 1, 0) :])) > 0)
        metrics = compute_metrics(scored, alloc, int(moves), sim)
        metrics["wall_s"] = time.perf_counter() - started
        runs.append(
            PolicyRun(label, alloc, run.changes, run.emergencies, run.policy_errors, metrics)
        )
    return runs


def train(
    recording: Path,
    out: Path,
    settings: TrainSettings,
    *,
    guards: GuardSettings,
    sim: SimulationSettings,
    progress: Callable[[str, int], Any],
    log: Callable[[str], Any],
    command: str = "",
) -> TrainReport:
    """Train, save, reload and validate a model (see the module docstring)."""
    import sklearn  # type: ignore[import-untyped]

    from autoscaler.plugins import create_policy
    from autoscaler.recordings.recording import read_recording
    from policies.regressor import ModelCard, save_model

    settings.validate()
    started = time.perf_counter()
    table: pa.Table = read_recording(recording)
    if table.num_rows == 0:
        raise TrainingError(f"{recording}: the recording is empty")
    history = recording_history(table)
    labels = future_peak_share(history, settings.horizon_s)
    start_s, end_s = float(history.ts_s.min()), float(history.ts_s.max())
    validation_from_s = end_s - settings.validation_days * DAY_S
    if validation_from_s <= start_s + settings.horizon_s:
        raise TrainingError(
            f"{recording}: {(end_s - start_s) / DAY_S:.2f} days of data leave nothing to train on "
            f"before {settings.validation_days} validation days"
        )
    # A training label must end before the validation days start.
    train_positions = eligible_positions(
        history, labels, start_s, validation_from_s - settings.horizon_s
    )
    validation_positions = eligible_positions(history, labels, validation_from_s, np.inf)
    if len(train_positions) < 100:
        raise TrainingError(
            f"{recording}: only {len(train_positions)} training samples with "
            f"{MIN_SAMPLES}+ samples of history and a label"
        )
    rng = np.random.default_rng(settings.seed)
    if len(train_positions) > settings.max_rows:
        train_positions = np.sort(rng.choice(train_positions, settings.max_rows, replace=False))
    if len(validation_positions) > settings.max_rows:
        validation_positions = np.sort(
            rng.choice(validation_positions, settings.max_rows, replace=False)
        )
    log(
        f"{len(history.guests)} guests, {len(history.ts_s):,} samples every "
        f"{history.step_s:.0f} s over {(end_s - start_s) / DAY_S:.1f} days; training on "
        f"{len(train_positions):,} samples before {_date(validation_from_s)}, validating on "
        f"{len(validation_positions):,} after"
    )
    with progress("features", len(train_positions) + len(validation_positions)) as bar:
        train_data = build_dataset(history, labels, train_positions, bar=bar)
        validation_data = build_dataset(history, labels, validation_positions, bar=bar)

    fit_started = time.perf_counter()
    with progress("fit", settings.max_iter) as bar:
        model = fit_model(train_data, settings, bar=bar)
    fit_s = time.perf_counter() - fit_started

    prediction = prediction_metrics(
        model,
        validation_data,
        quantile=settings.quantile,
        margin=settings.margin,
        headroom_bytes=settings.headroom_bytes,
    )
    training_data = {
        "path": str(recording),
        "source": _source(table),
        "sha256": recording_sha256(recording),
        "guests": len(history.guests),
        "samples": len(history.ts_s),
        "start": _date(start_s),
        "end": _date(end_s),
        "step_s": history.step_s,
        "train_until": _date(validation_from_s - settings.horizon_s),
        "validation_from": _date(validation_from_s),
        "train_rows": len(train_data),
        "validation_rows": len(validation_data),
        "features_without_data": absent_features(train_data),
    }
    card = ModelCard(
        feature_names=list(FEATURE_NAMES),
        feature_version=FEATURE_VERSION,
        window_samples=WINDOW_SAMPLES,
        horizon_s=settings.horizon_s,
        step_s=history.step_s,
        quantile=settings.quantile,
        margin=settings.margin,
        headroom_bytes=settings.headroom_bytes,
        sklearn_version=sklearn.__version__,
        model_sha256="",
        training_data=training_data,
        hyperparameters=settings.hyperparameters(),
        metrics={"validation_prediction": prediction},
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=command,
    )
    model_path, card_path = save_model(model, card, out)

    # Validate through the policy's own loading path: what ships is what was measured.
    policy = create_policy("regressor", {"model_path": str(model_path)})
    replay = replay_from_recording(table, sim)
    runs = simulate_validation(
        replay,
        [("regressor", policy), *((name, create_policy(name)) for name in BASELINES)],
        guards,
        sim,
        validation_from_s=validation_from_s,
        warmup_s=settings.warmup_days * DAY_S,
        progress=progress,
    )
    from policies.regressor import read_card

    saved = read_card(model_path)
    metrics = {
        "validation_prediction": prediction,
        "validation_simulation": {
            "days": settings.validation_days,
            "warmup_days": settings.warmup_days,
            "simulation": asdict(sim),
            "policies": {run.label: run.metrics for run in runs},
        },
        "fit_s": fit_s,
    }
    card = ModelCard(**{**asdict(saved), "metrics": metrics})
    card_path.write_text(card.to_json())
    return TrainReport(
        model_path=model_path,
        card_path=card_path,
        card=card,
        runs=runs,
        fit_s=fit_s,
        total_s=time.perf_counter() - started,
        model_bytes=model_path.stat().st_size,
        prediction=prediction,
    )


def _date(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _source(table: pa.Table) -> str:
    metadata = table.schema.metadata or {}
    return metadata.get(b"source", b"").decode(errors="replace")


__all__ = [
    "BASELINES",
    "Dataset",
    "TrainReport",
    "TrainSettings",
    "TrainingError",
    "build_dataset",
    "eligible_positions",
    "fit_model",
    "prediction_metrics",
    "simulate_validation",
    "train",
]
