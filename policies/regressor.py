"""The learned policy: predict each guest's peak demand with a quantile regressor, size for it.

Per guest, every tick, from its history window (:mod:`autoscaler.learn.features`):

1. a ``HistGradientBoostingRegressor(loss="quantile")`` predicts a high quantile of the guest's
   highest demand over the next ``horizon_s`` (the model card says which horizon and quantile),
   as a share of its RAM: one ``predict`` call for the whole fleet;
2. the proposed allocation is that predicted peak × (1 + ``margin``) + ``headroom_bytes``; the
   predicted pressure is the predicted peak / the current allocation;
3. the guards then apply as to every policy (floor, ceiling, step limits, dead band).

The model learns the *rise* above the current demand, (peak − demand now) / RAM, and the policy
adds the current demand back. A tree predicts one constant per leaf: learning the level itself
would round every guest's prediction to one of a few hundred leaf values, while the rise is small,
centred on zero, and the same kind of number for every guest size.

Where the model has nothing sound to say, the threshold policy decides instead (one
:class:`~policies.threshold.ThresholdPolicy` with its defaults is composed inside):

- **cold start**: fewer than :data:`~autoscaler.learn.features.MIN_SAMPLES` demand samples in the
  window — the recent level and trend do not exist yet, and a guess from an empty window is no
  prediction;
- **other sampling interval**: the guest's samples are more than a factor of two apart from the
  interval the model was trained on (its card's ``step_s``) — its windows then cover another
  span of time than the model learned from, and the numbers would be wrong without looking so;
- **pressure now**: a guest that swaps, stalls, faults heavily or lost a process to the OOM killer
  is already short of memory, and its reported demand is capped by what it has (it cannot use
  more): the model sees a censored input. It gets the larger of the model's and the threshold
  rules' allocation.

A guest without memory statistics holds, as in the threshold policy.

Model files are skops files (``skops.io``, never pickle) loaded with an explicit list of trusted
types; a JSON model card beside each says what the model was made for. A model for other features
(names, order or :data:`~autoscaler.learn.features.FEATURE_VERSION`) or from another scikit-learn
major.minor version, a model file that is not the one its card describes, or one holding any
type outside :data:`TRUSTED_TYPES`, is refused at start-up with :class:`ModelError` (a
``ValueError``, so ``create_policy`` reports it as a :class:`~autoscaler.plugins.PluginError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from autoscaler.learn.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    MIN_SAMPLES,
    N_FEATURES,
    WINDOW_SAMPLES,
    compute_features,
    demand_samples,
    sample_interval_s,
)
from autoscaler.plugins import PluginError
from autoscaler.policy import Decision, FleetView, Policy
from policies.threshold import REASONS as THRESHOLD_REASONS
from policies.threshold import ThresholdPolicy, under_pressure

DEFAULT_MODEL_NAME: Final = "bitbrains-2013-08"
"""The model shipped with the package (``models/`` in the source tree)."""
MODEL_SUFFIX: Final = ".skops"
CARD_SUFFIX: Final = ".json"
CARD_FORMAT: Final = "balloon-autoscaler-model-card"

TRUSTED_TYPES: Final[tuple[str, ...]] = (
    # The one type inside a fitted HistGradientBoostingRegressor that skops does not trust by
    # default; the estimator itself, its bin mapper, loss and numpy arrays are trusted already.
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
)

INTERVAL_TOLERANCE: Final = 2.0
"""A guest sampled more than this factor faster or slower than the training data falls back."""

R_PREDICTED: Final = 0
R_NO_STATS: Final = 1
_OWN_REASONS: Final = (
    "predicted peak {peak_pct:.1f}% of RAM within {horizon_min:.0f} min (q{quantile_pct:.0f})"
    " + {margin_pct:.0f}% margin + {headroom_mib:.0f} MiB",
    "hold: no memory stats",
)
_FALLBACKS: Final = (
    "cold start ({samples:.0f} of {min_samples:.0f} samples), threshold rules: ",
    "sampled every {interval_s:.0f} s, model made for {step_s:.0f} s, threshold rules: ",
    "pressure overrides the prediction: ",
)
F_COLD, F_INTERVAL, F_PRESSURE = range(3)
REASONS: Final[tuple[str, ...]] = (
    *_OWN_REASONS,
    *(prefix + text for prefix in _FALLBACKS for text in THRESHOLD_REASONS),
)


def _fallback_code(kind: int, threshold_reason: np.ndarray) -> np.ndarray:
    return np.asarray(
        len(_OWN_REASONS) + kind * len(THRESHOLD_REASONS) + threshold_reason, dtype=np.int16
    )


class ModelError(PluginError, ValueError):
    """A model file or card that cannot be used: missing, untrusted, or made for other inputs."""


@dataclass(frozen=True)
class ModelCard:
    """What a model was made for and how well it did; stored as JSON beside the model file."""

    feature_names: list[str]
    feature_version: int
    window_samples: int
    horizon_s: float
    step_s: float
    """Median time between samples in the training data: the model's notion of a sample."""
    quantile: float
    margin: float
    """The margin the policy applies by default (``margin`` parameter = None)."""
    headroom_bytes: float
    """The fixed headroom the policy adds by default (``headroom_bytes`` parameter = None)."""
    sklearn_version: str
    model_sha256: str
    training_data: dict[str, Any]
    """Description of the recording: path, source, sha256, guests, samples, time span, split."""
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    command: str = ""
    format: str = CARD_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{where}: not a JSON model card: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != CARD_FORMAT:
            raise ModelError(f"{where}: not a model card (format is not {CARD_FORMAT!r})")
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(n for n in names if n not in data and n not in _CARD_OPTIONAL)
        if missing:
            raise ModelError(f"{where}: model card lacks {', '.join(missing)}")
        data["metrics"] = _current_metrics(data.get("metrics", {}))
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise ModelError(f"{where}: malformed model card: {exc}") from None


_CARD_OPTIONAL: Final = frozenset({"metrics", "created", "command"})


def _current_metrics(metrics: Any) -> Any:
    """A card's metrics with the simulator's metric keys as named now (older cards have
    ``reclaimed_gib`` for ``reclaimed_gib_per_guest``)."""
    from autoscaler.sim.simulate import current_metric_names

    try:
        policies = metrics["validation_simulation"]["policies"]
        renamed = {label: current_metric_names(values) for label, values in policies.items()}
    except (KeyError, TypeError, AttributeError):
        return metrics
    simulation = {**metrics["validation_simulation"], "policies": renamed}
    return {**metrics, "validation_simulation": simulation}


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def card_problems(card: ModelCard) -> list[str]:
    """Why this program cannot use a model made as ``card`` says (empty if it can)."""
    import sklearn  # type: ignore[import-untyped]

    problems = []
    if card.feature_version != FEATURE_VERSION:
        problems.append(
            f"it was trained on feature version {card.feature_version}, this program computes "
            f"version {FEATURE_VERSION}"
        )
    elif list(card.feature_names) != list(FEATURE_NAMES):
        problems.append("its feature names or their order differ from this program's")
    if card.window_samples != WINDOW_SAMPLES:
        problems.append(
            f"it was trained on {card.window_samples}-sample windows, not {WINDOW_SAMPLES}"
        )
    if _major_minor(card.sklearn_version) != _major_minor(sklearn.__version__):
        problems.append(
            f"it was made with scikit-learn {card.sklearn_version}, this is {sklearn.__version__}"
            " (the major.minor versions must match: retrain it with `balloon-autoscaler train`)"
        )
    for name, low, high in (("quantile", 0.0, 1.0), ("horizon_s", 0.0, np.inf)):
        value = getattr(card, name)
        if not (isinstance(value, int | float) and low < value < high):
            problems.append(f"its {name} {value!r} is out of range")
    for name in ("margin", "headroom_bytes"):
        value = getattr(card, name)
        if not (isinstance(value, int | float) and value >= 0):
            problems.append(f"its {name} {value!r} is not a number >= 0")
    if not (isinstance(card.step_s, int | float) and card.step_s > 0):
        problems.append(f"its step_s {card.step_s!r} is not a positive number")
    return problems


def shipped_models_dir() -> Path:
    """Where the shipped models are: ``policies/models/`` in a wheel, ``models/`` in a checkout."""
    package_dir = Path(__file__).resolve().parent
    installed = package_dir / "models"
    return installed if installed.is_dir() else package_dir.parent / "models"


def shipped_model_names() -> list[str]:
    """Names of the models shipped with the package (``bitbrains-2013-08``, …)."""
    return sorted(path.stem for path in shipped_models_dir().glob("*" + MODEL_SUFFIX))


def default_model_path() -> Path:
    """The shipped default model."""
    return shipped_models_dir() / (DEFAULT_MODEL_NAME + MODEL_SUFFIX)


def resolve_model(spec: str | os.PathLike[str] | None) -> Path:
    """The model a ``model_path`` parameter names: a path (with or without ``.skops``), or the
    bare name of a shipped model (``bitbrains-2013-08-safe``) when no such file is here."""
    if spec is None:
        return default_model_path()
    path = Path(spec)
    if model_paths(path)[0].exists() or path.name != str(spec):
        return path
    shipped = shipped_models_dir() / path.name
    return shipped if model_paths(shipped)[0].exists() else path


def model_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(model file, card file) for a model path given with or without its ``.skops`` suffix."""
    base = Path(path)
    if base.suffix in (MODEL_SUFFIX, CARD_SUFFIX):
        base = base.with_suffix("")
    return base.with_name(base.name + MODEL_SUFFIX), base.with_name(base.name + CARD_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(model: Any, card: ModelCard, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``model`` with skops and its card beside it; the card gets the file's sha256."""
    import skops.io  # type: ignore[import-untyped]

    model_file, card_file = model_paths(path)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    # Deflated: the trees' arrays shrink to a third, which matters for a file kept in git.
    skops.io.dump(model, model_file, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    card = ModelCard(**{**asdict(card), "model_sha256": file_sha256(model_file)})
    card_file.write_text(card.to_json())
    return model_file, card_file


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    _, card_file = model_paths(path)
    try:
        text = card_file.read_text()
    except OSError as exc:
        raise ModelError(f"cannot read the model card {card_file}: {exc.strerror or exc}") from None
    return ModelCard.from_json(text, where=str(card_file))


def load_model(path: str | os.PathLike[str]) -> tuple[Any, ModelCard]:
    """Load and check a model and its card; :class:`ModelError` says what is wrong.

    The card is checked first (features, scikit-learn version, the file's hash), so that a model
    made for other inputs is refused before any of it is deserialised.
    """
    import skops.io
    from sklearn.ensemble import HistGradientBoostingRegressor  # type: ignore[import-untyped]
    from sklearn.exceptions import InconsistentVersionWarning  # type: ignore[import-untyped]

    model_file, card_file = model_paths(path)
    if not model_file.exists():
        names = ", ".join(shipped_model_names()) or "none"
        raise ModelError(f"no model file {model_file} (models shipped with the program: {names})")
    card = read_card(path)
    problems = card_problems(card)
    if problems:
        raise ModelError(f"model {model_file} cannot be used: " + "; ".join(problems))
    digest = file_sha256(model_file)
    if digest != card.model_sha256:
        raise ModelError(
            f"model {model_file} is not the file its card {card_file} describes "
            f"(sha256 {digest[:12]}…, card says {str(card.model_sha256)[:12]}…)"
        )
    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(file=model_file)) - set(TRUSTED_TYPES))
        if untrusted:
            raise ModelError(
                f"model {model_file} holds types this program does not trust: "
                f"{', '.join(untrusted)} (only a HistGradientBoostingRegressor is accepted)"
            )
        with warnings.catch_warnings():
            # scikit-learn warns whenever the saving and loading versions differ at all; the
            # card check above already refused another major.minor version, and patch releases
            # keep the estimators' state compatible, so the warning says nothing new here.
            warnings.simplefilter("ignore", InconsistentVersionWarning)
            model = skops.io.load(model_file, trusted=list(TRUSTED_TYPES))
    except ModelError:
        raise
    except Exception as exc:
        # skops raises a variety of errors for foreign or damaged files; all mean "unusable".
        raise ModelError(f"cannot load model {model_file}: {exc}") from exc
    if not isinstance(model, HistGradientBoostingRegressor):
        raise ModelError(
            f"model {model_file} is a {type(model).__name__}, not a HistGradientBoostingRegressor"
        )
    if getattr(model, "n_features_in_", None) != N_FEATURES:
        raise ModelError(
            f"model {model_file} takes {getattr(model, 'n_features_in_', '?')} features, "
            f"not {N_FEATURES}"
        )
    return model, card


_cache: dict[tuple[str, int, int], tuple[Any, ModelCard]] = {}
_cache_lock = threading.Lock()


def _load_cached(path: Path) -> tuple[Any, ModelCard]:
    """:func:`load_model`, remembered per file version: policies are often built many times
    (``check-config``, ``policies -v``, the conformance suite) and a fitted model is read-only."""
    model_file, card_file = model_paths(path)
    try:
        stat, card_stat = model_file.stat(), card_file.stat()
    except OSError:
        return load_model(path)
    key = (str(model_file.resolve()), stat.st_mtime_ns ^ card_stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load_model(path)
        return _cache[key]


class RegressorPolicy(Policy):
    """Size each guest for a predicted high quantile of its near-future peak demand.

    Parameters:

    - ``model_path``: a model trained by ``balloon-autoscaler train`` (``.skops`` file, its card
      beside it), or the name of a model shipped with the package (``bitbrains-2013-08-safe``);
      ``None`` uses the shipped default (trained on the Bitbrains month, see
      ``models/README.md``).
    - ``margin``: extra share on top of the predicted peak; ``None`` uses the margin the model
      was validated with (its card's ``margin``).
    - ``headroom_bytes``: a fixed amount added on top; ``None`` uses the card's. Why a fixed
      amount besides a share: what a burst costs the host is bytes, while what it costs the guest
      is the same for every guest size. A few hundred MiB is a large cushion for a 1 GiB guest and
      nothing for a 64 GiB one, so it buys the most safety for the least memory exactly where the
      share-of-RAM prediction is coarsest (small guests, whose demand moves in big steps).
    """

    name: ClassVar[str] = "regressor"
    param_docs: ClassVar[Mapping[str, str]] = {
        "model_path": "model trained by `train` (.skops, its card beside it) or a shipped "
        "model's name",
        "margin": "share added on top of the predicted peak",
        "headroom_bytes": "bytes added on top of the predicted peak",
    }
    param_unset: ClassVar[Mapping[str, str]] = {
        "model_path": f"the shipped default model, {DEFAULT_MODEL_NAME}",
        "margin": "the margin on the model's card",
        "headroom_bytes": "the headroom on the model's card",
    }

    model_: Any
    card_: ModelCard
    fallback_: ThresholdPolicy

    def __init__(
        self,
        *,
        model_path: str | None = None,
        margin: float | None = None,
        headroom_bytes: float | None = None,
    ) -> None:
        self.model_path = model_path
        self.margin = margin
        self.headroom_bytes = headroom_bytes

    def validate(self) -> None:
        if self.margin is not None and not 0 <= self.margin <= 1:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")
        if self.headroom_bytes is not None and not self.headroom_bytes >= 0:
            raise ValueError(f"headroom_bytes must be >= 0, got {self.headroom_bytes}")
        self.model_, self.card_ = _load_cached(resolve_model(self.model_path))
        self.fallback_ = ThresholdPolicy()

    @property
    def effective_margin(self) -> float:
        return float(self.card_.margin if self.margin is None else self.margin)

    @property
    def effective_headroom_bytes(self) -> float:
        value = self.card_.headroom_bytes if self.headroom_bytes is None else self.headroom_bytes
        return float(value)

    def decide(self, view: FleetView) -> Decision:
        if not hasattr(self, "model_"):
            raise RuntimeError("RegressorPolicy.validate() loads the model; call it first")
        n = len(view)
        ram = view.ram_bytes
        alloc = view.alloc_bytes
        demand = view.demand_bytes
        fallback = self.fallback_.decide(view)
        margin = self.effective_margin
        card = self.card_

        if view.fleet is not None and n:
            windows = view.history()
            samples = demand_samples(windows)
            interval = sample_interval_s(windows)
        else:
            windows = np.empty((n, 0, 0), dtype=np.float32)
            samples = np.zeros(n, dtype=np.int64)
            interval = np.full(n, np.nan)
        known = np.isfinite(demand) & np.isfinite(ram) & (ram > 0) & np.isfinite(alloc)
        cold = samples < MIN_SAMPLES
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = interval / card.step_s
        off_interval = ~cold & ~((ratio >= 1 / INTERVAL_TOLERANCE) & (ratio <= INTERVAL_TOLERANCE))
        predicted = known & ~cold & ~off_interval

        peak_share = np.full(n, np.nan)
        rows = np.flatnonzero(predicted)
        if len(rows):
            # Usually every guest is predicted: then no copy of the windows at all.
            every = len(rows) == n
            features = compute_features(
                windows if every else windows[rows], ram if every else ram[rows]
            )
            # One thread: with OpenMP's two, every tree waits for the slower thread, and a core
            # taken by anything else (ingest, the broker) stretched a 60 ms predict to seconds.
            with threadpool_limits(limits=1, user_api="openmp"):
                rise = np.asarray(self.model_.predict(features), dtype=np.float64)
            # The current demand is the fleet's latest sample, the last row of the window.
            peak_share[rows] = np.clip(features[:, 0] + rise, 0.0, 1.0)
        peak_bytes = peak_share * ram
        headroom = self.effective_headroom_bytes
        target = np.where(predicted, peak_bytes * (1.0 + margin) + headroom, np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            pressure = peak_bytes / alloc
        reason = np.full(n, R_PREDICTED, dtype=np.int16)

        # A guest under pressure right now: never less than the threshold rules would give it.
        signal = predicted & under_pressure(fallback.reason)
        if signal.any():
            target[signal] = np.fmax(target[signal], fallback.target_bytes[signal])
            pressure[signal] = np.fmax(pressure[signal], fallback.pressure[signal])
            reason[signal] = _fallback_code(F_PRESSURE, fallback.reason[signal])
        for kind, mask in ((F_COLD, cold & known), (F_INTERVAL, off_interval & known)):
            target[mask] = fallback.target_bytes[mask]
            pressure[mask] = fallback.pressure[mask]
            reason[mask] = _fallback_code(kind, fallback.reason[mask])
        reason[~known] = R_NO_STATS
        target[~known] = np.nan

        detail = dict(fallback.detail)
        detail.update(
            peak_pct=peak_share * 100.0,
            horizon_min=np.full(n, card.horizon_s / 60.0),
            quantile_pct=np.full(n, card.quantile * 100.0),
            margin_pct=np.full(n, margin * 100.0),
            headroom_mib=np.full(n, headroom / 2**20),
            samples=samples.astype(np.float64),
            min_samples=np.full(n, float(MIN_SAMPLES)),
            interval_s=interval,
            step_s=np.full(n, card.step_s),
        )
        return Decision(target, pressure, reason, REASONS, detail)


__all__ = [
    "CARD_FORMAT",
    "DEFAULT_MODEL_NAME",
    "ModelCard",
    "ModelError",
    "REASONS",
    "RegressorPolicy",
    "TRUSTED_TYPES",
    "card_problems",
    "default_model_path",
    "load_model",
    "model_paths",
    "read_card",
    "resolve_model",
    "save_model",
    "shipped_model_names",
    "shipped_models_dir",
]
