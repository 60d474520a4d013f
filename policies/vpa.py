"""Kubernetes VPA baseline: the Vertical Pod Autoscaler's memory recommender, per guest.

Source: repository ``kubernetes/autoscaler``, under ``vertical-pod-autoscaler/pkg/``:

- ``recommender/model/container.go`` — ``addMemorySample`` keeps one usage *peak* per
  aggregation interval: the first sample opens a window ending ``MemoryAggregationInterval``
  later; a higher sample inside the window replaces the window's peak in the histogram (subtract
  the old peak, add the new); a sample past the window end opens the next window. ``RecordOOM``
  adds an artificial sample ``max(used + OOMMinBumpUp, used × OOMBumpUpRatio)`` with ``used =
  max(request, window peak)``, both capped at the container's maximum.
- ``recommender/model/aggregations_config.go`` — ``MemoryAggregationInterval = 24h``,
  ``MemoryHistogramDecayHalfLife = 24h``, ``OOMBumpUpRatio = 1.2``, ``OOMMinBumpUp = 100 MiB``
  (100 × 1024 × 1024 bytes), histogram buckets: exponential, first bucket 1e7 bytes, each bucket
  5% wider than the previous, up to 1e12 bytes (176 buckets), ``epsilon = 1e-4``.
- ``recommender/model/aggregate_container_state.go`` — peaks go into ``AggregateMemoryPeaks``
  with weight 1 at the window's end time.
- ``recommender/util/decaying_histogram.go`` — a sample's weight is multiplied by
  ``2^((t − referenceTimestamp) / halfLife)``; when the exponent would pass 100 the reference moves
  forward (rounded to a whole half-life) and all weights are rescaled. Only relative weights
  matter, so this is an exponential forgetting of old peaks.
- ``recommender/util/histogram.go`` — ``Percentile(p)``: walk the buckets from the first
  non-empty one until the cumulative weight reaches ``p × total``; return that bucket's *end*.
- ``recommender/logic/recommender.go`` and ``estimator.go`` — target = 90th percentile of the
  peaks, lower bound = 50th, upper bound = 95th, each + 15% margin
  (``recommendation-margin-fraction``); the bounds are scaled by confidence multipliers
  ``(1 + 0.001/c)^−2`` (lower) and ``(1 + 1/c)`` (upper), with ``c = min(history days, samples /
  1440)``; all three are raised to at least 250 MiB (``pod-recommendation-min-memory-mb``,
  250 × 1024 × 1024 bytes).
- ``updater/priority/update_priority_calculator.go`` and ``priority_processor.go`` — a pod is
  updated when its request is outside ``[lower bound, upper bound]``, or when it has lived 12 h
  (``podLifetimeUpdateThreshold``) and the request differs from the target by at least 10%
  (``defaultUpdateThreshold``), or right after an OOM kill if the target changes.

Adaptation to guests (what we chose and why):

- **Samples.** VPA's recommender polls the metrics API once per loop (1 min) and sees one usage
  value per container: point samples, not every peak between polls. We do the same with the
  guest's latest sample at each control tick: a new sample (``ts_s`` newer than the last one this
  policy saw) goes through ``addMemorySample`` with usage = ``demand_bytes``. We keep VPA's
  *peaks per interval* rather than adding every sample with weight 1: memory is not compressible,
  and a percentile over all samples would size a guest below any peak shorter than 10% of the
  time — the under-provisioning VPA's design avoids.
- **Request.** A container's request is the guest's allocation (``alloc_bytes``); its maximum
  (``MaxMemory``, VPA's ``maxAllowed``) is ``ram_bytes``, which also caps the recommendation.
- **OOM kills.** An OOM is an increase of the guest's ``oom-kills`` counter since the last sample
  this policy saw (or ``rate("oom-kills") > 0`` for a guest seen for the first time), recorded at
  the sample's time after the sample itself.
- **Lifetime and confidence.** A pod's start time becomes the first sample this policy saw of
  the guest; the confidence counts the samples seen, normalised like VPA's to one a minute.
- **State.** Per fleet slot, in numpy arrays grown as slots grow (``hist_`` is
  ``float64[slots, 176]``); a slot whose ``uid`` changed is reset, so a reused slot starts over.

Nothing else is per-guest Python: every step is vectorised over the guests with a new sample.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar, Final

import numpy as np

from autoscaler.policy import Decision, FleetView, Policy

MIB: Final = 2**20
DAY_S: Final = 86_400.0
HOUR_S: Final = 3_600.0

# Histogram options (aggregations_config.go memoryHistogramOptions): fixed in VPA too, since
# changing them invalidates checkpoints.
FIRST_BUCKET_BYTES: Final = 1e7
BUCKET_RATIO: Final = 1.05
MAX_BUCKET_BYTES: Final = 1e12
EPSILON: Final = 0.001 * 0.1
"""``0.001 × minSampleWeight``: buckets lighter than this count as empty."""
N_BUCKETS: Final = (
    math.ceil(
        math.log(MAX_BUCKET_BYTES * (BUCKET_RATIO - 1) / FIRST_BUCKET_BYTES + 1)
        / math.log(BUCKET_RATIO)
    )
    + 1
)
BUCKET_START: Final = np.array(
    [0.0]
    + [FIRST_BUCKET_BYTES * (BUCKET_RATIO**b - 1) / (BUCKET_RATIO - 1) for b in range(1, N_BUCKETS)]
)
"""Bucket ``b`` covers ``[BUCKET_START[b], BUCKET_START[b + 1])``; the last has no upper end."""
MAX_DECAY_EXPONENT: Final = 100
"""Rescale a histogram before a weight reaches 2^100 (decaying_histogram.go)."""
SAMPLES_PER_DAY: Final = 60 * 24
"""The confidence heuristic assumes one sample a minute (estimator.go ``getConfidence``)."""
LOWER_CONFIDENCE: Final = (0.001, -2.0)
UPPER_CONFIDENCE: Final = (1.0, 1.0)
"""``WithMemoryConfidenceMultiplier(multiplier, exponent)`` of the bounds (recommender.go)."""

REASONS: Final = (
    "hold: no usage history",
    "vpa: p{pct:.0f} of usage peaks {peak_mib:.0f} MiB + {margin_pct:.0f}% margin",
    "vpa: {min_mib:.0f} MiB minimum",
    "vpa: OOM kill, peak bumped to {bump_mib:.0f} MiB",
    "hold: recommendation {target_mib:.0f} MiB within {threshold_pct:.0f}% of the allocation",
    "hold: history shorter than {lifetime_h:.0f} h and allocation within "
    "[{lower_mib:.0f}, {upper_mib:.0f}] MiB",
)
R_NO_HISTORY, R_PERCENTILE, R_MINIMUM, R_OOM, R_SMALL, R_YOUNG = range(6)


def find_bucket(value: np.ndarray) -> np.ndarray:
    """Bucket index of each value: ``floor(log_ratio(value × (ratio − 1) / first + 1))``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        index = np.floor(
            np.log(value * (BUCKET_RATIO - 1) / FIRST_BUCKET_BYTES + 1) / np.log(BUCKET_RATIO)
        )
    index = np.where(value < FIRST_BUCKET_BYTES, 0, index)
    return np.asarray(np.clip(index, 0, N_BUCKETS - 1), dtype=np.int64)


def percentiles(weights: np.ndarray, fractions: tuple[float, ...]) -> list[np.ndarray]:
    """``histogram.Percentile`` for each row of ``weights`` (0 for an empty row)."""
    n = len(weights)
    index = np.arange(N_BUCKETS)
    nonempty = weights >= EPSILON
    any_bucket = nonempty.any(axis=1)
    min_bucket = np.where(any_bucket, np.argmax(nonempty, axis=1), N_BUCKETS - 1)
    max_bucket = np.where(any_bucket, N_BUCKETS - 1 - np.argmax(nonempty[:, ::-1], axis=1), 0)
    total = weights.sum(axis=1)
    # The walk starts at the first non-empty bucket: lighter buckets before it do not count
    # toward the partial sum (they do count in the total, as in histogram.go).
    from_min = index[None, :] >= min_bucket[:, None]
    partial = np.cumsum(np.where(from_min, weights, 0.0), axis=1)
    walkable = from_min & (index[None, :] < max_bucket[:, None])
    out = []
    for fraction in fractions:
        reached = walkable & (partial >= (fraction * total)[:, None])
        bucket = np.where(reached.any(axis=1), np.argmax(reached, axis=1), max_bucket)
        # The end of the bucket, i.e. the start of the next; the last bucket has no end.
        end = BUCKET_START[np.minimum(bucket + 1, N_BUCKETS - 1)]
        out.append(np.where(any_bucket, end, np.zeros(n)))
    return out


@dataclass(slots=True)
class _State:
    """Per-slot VPA state: one ``ContainerState`` and its decaying peaks histogram."""

    uid: np.ndarray
    last_ts_s: np.ndarray
    first_ts_s: np.ndarray
    samples: np.ndarray
    window_end_s: np.ndarray
    memory_peak: np.ndarray
    oom_peak: np.ndarray
    oom_kills: np.ndarray
    reference_s: np.ndarray
    hist: np.ndarray
    percentiles: np.ndarray
    """Cached target, lower and upper percentiles of ``hist`` (float64[slots, 3])."""
    dirty: np.ndarray
    """``hist`` changed since ``percentiles`` were computed."""

    @classmethod
    def empty(cls, capacity: int) -> _State:
        nan = np.full(capacity, np.nan)
        return cls(
            uid=np.zeros(capacity, dtype=np.int64),
            last_ts_s=nan.copy(),
            first_ts_s=nan.copy(),
            samples=np.zeros(capacity),
            window_end_s=nan.copy(),
            memory_peak=np.zeros(capacity),
            oom_peak=np.zeros(capacity),
            oom_kills=nan.copy(),
            reference_s=nan.copy(),
            hist=np.zeros((capacity, N_BUCKETS)),
            percentiles=np.zeros((capacity, 3)),
            dirty=np.zeros(capacity, dtype=bool),
        )

    def grown(self, capacity: int) -> _State:
        new = _State.empty(capacity)
        old = len(self.uid)
        for column in fields(self):
            getattr(new, column.name)[:old] = getattr(self, column.name)
        return new

    def reset(self, slots: np.ndarray) -> None:
        fresh = _State.empty(1)
        for column in fields(self):
            getattr(self, column.name)[slots] = getattr(fresh, column.name)[0]


class VpaPolicy(Policy):
    """The Kubernetes VPA memory recommender and updater rules (see module docstring).

    Defaults are VPA's, and why VPA chose them:

    - ``target_percentile=0.9``: size for all but the top tenth of (weighted) daily peaks.
    - ``lower_percentile=0.5`` / ``upper_percentile=0.95``: the range inside which a running
      pod is left alone; outside it the pod is updated at once.
    - ``safety_margin=0.15``: 15% above the percentile for growth between recommendations.
    - ``min_bytes=250 MiB``: the smallest recommendation (``pod-recommendation-min-memory-mb``).
    - ``half_life_s=24 h``: yesterday's peak weighs half of today's.
    - ``aggregation_interval_s=24 h``: one peak per day, so daily cycles are captured whole.
    - ``oom_bump_ratio=1.2`` / ``oom_min_bump_bytes=100 MiB``: after an OOM kill, record at least
      20% (and at least 100 MiB) more than the memory the guest had.
    - ``update_threshold=0.10``: a change under 10% of the allocation is not worth an update.
    - ``min_lifetime_s=12 h``: a guest in range is not updated before 12 h of history.
    """

    name: ClassVar[str] = "vpa"
    param_docs: ClassVar[Mapping[str, str]] = {
        "target_percentile": "percentile of the weighted daily peaks that the allocation targets",
        "lower_percentile": "an allocation below this percentile of the peaks is updated at once",
        "upper_percentile": "an allocation above this percentile of the peaks is updated at once",
        "safety_margin": "share added to the percentile for growth between recommendations",
        "min_bytes": "smallest recommendation, in bytes",
        "half_life_s": "age in seconds at which a peak weighs half as much as a new one",
        "aggregation_interval_s": "seconds of samples aggregated into one peak",
        "oom_bump_ratio": "after an OOM kill, record at least this multiple of the memory it had",
        "oom_min_bump_bytes": "after an OOM kill, record at least this many bytes more",
        "update_threshold": "a change under this share of the allocation is not made",
        "min_lifetime_s": "seconds of history before a guest inside the range is updated",
    }

    def __init__(
        self,
        *,
        target_percentile: float = 0.9,
        lower_percentile: float = 0.5,
        upper_percentile: float = 0.95,
        safety_margin: float = 0.15,
        min_bytes: float = 250 * MIB,
        half_life_s: float = 24 * HOUR_S,
        aggregation_interval_s: float = 24 * HOUR_S,
        oom_bump_ratio: float = 1.2,
        oom_min_bump_bytes: float = 100 * MIB,
        update_threshold: float = 0.10,
        min_lifetime_s: float = 12 * HOUR_S,
    ) -> None:
        self.target_percentile = target_percentile
        self.lower_percentile = lower_percentile
        self.upper_percentile = upper_percentile
        self.safety_margin = safety_margin
        self.min_bytes = min_bytes
        self.half_life_s = half_life_s
        self.aggregation_interval_s = aggregation_interval_s
        self.oom_bump_ratio = oom_bump_ratio
        self.oom_min_bump_bytes = oom_min_bump_bytes
        self.update_threshold = update_threshold
        self.min_lifetime_s = min_lifetime_s

    def validate(self) -> None:
        for name in ("target_percentile", "lower_percentile", "upper_percentile"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not self.lower_percentile <= self.target_percentile <= self.upper_percentile:
            raise ValueError(
                "need lower_percentile <= target_percentile <= upper_percentile, got "
                f"{self.lower_percentile}, {self.target_percentile}, {self.upper_percentile}"
            )
        for name in ("safety_margin", "min_bytes", "oom_min_bump_bytes", "update_threshold"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("half_life_s", "aggregation_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.oom_bump_ratio >= 1:
            raise ValueError(f"oom_bump_ratio must be >= 1, got {self.oom_bump_ratio}")
        if not self.min_lifetime_s >= 0:
            raise ValueError(f"min_lifetime_s must be >= 0, got {self.min_lifetime_s}")

    # -- state -----------------------------------------------------------------------------------

    def _state_for(self, view: FleetView) -> _State:
        state: _State | None = getattr(self, "state_", None)
        needed = int(view.slots.max()) + 1 if len(view) else 0
        if state is None:
            state = _State.empty(max(needed, 16))
        elif needed > len(state.uid):
            state = state.grown(max(needed, 2 * len(state.uid)))
        self.state_ = state
        slots = view.slots
        reused = state.uid[slots] != view.uid
        if reused.any():
            state.reset(slots[reused])
            state.uid[slots[reused]] = view.uid[reused]
        return state

    def _add_to_histogram(
        self, state: _State, slots: np.ndarray, value: np.ndarray, ts_s: np.ndarray, sign: float
    ) -> None:
        """``decayingHistogram.AddSample`` (sign +1) or ``SubtractSample`` (sign −1)."""
        if not len(slots):
            return
        half_life = self.half_life_s
        reference = state.reference_s[slots]
        shift = np.isnan(reference) | (ts_s > reference + MAX_DECAY_EXPONENT * half_life)
        if shift.any():
            # Move the reference to the sample's time, rounded to a whole half-life, and rescale
            # the existing weights by 2^(old − new) so relative weights are unchanged.
            new_reference = np.floor(ts_s[shift] / half_life + 0.5) * half_life
            old_reference = reference[shift]
            exponent = np.floor((old_reference - new_reference) / half_life + 0.5)
            rescale = np.isfinite(exponent)
            rows = slots[shift][rescale]
            state.hist[rows] *= np.ldexp(1.0, exponent[rescale].astype(np.int64))[:, None]
            reference[shift] = new_reference
            state.reference_s[slots] = reference
        weight = np.exp2((ts_s - reference) / half_life)
        bucket = find_bucket(value)
        state.dirty[slots] = True
        if sign > 0:
            np.add.at(state.hist, (slots, bucket), weight)
        else:
            held = state.hist[slots, bucket]
            # Never below zero: a weight within epsilon of the bucket's empties it.
            weight = np.where(weight > held - EPSILON, held, weight)
            state.hist[slots, bucket] = held - weight

    def _add_memory_sample(
        self, state: _State, slots: np.ndarray, ts_s: np.ndarray, usage: np.ndarray, *, oom: bool
    ) -> None:
        """``ContainerState.addMemorySample``: one peak per aggregation interval."""
        if not len(slots):
            return
        interval = self.aggregation_interval_s
        window_end = state.window_end_s[slots]
        window_end = np.where(np.isnan(window_end), ts_s, window_end)  # first sample
        memory_peak = state.memory_peak[slots]
        oom_peak = state.oom_peak[slots]
        in_window = ts_s < window_end
        old_peak = np.maximum(memory_peak, oom_peak)
        replace = in_window & (old_peak != 0) & (usage > old_peak)
        self._add_to_histogram(
            state, slots[replace], old_peak[replace], window_end[replace], sign=-1.0
        )
        # Past the window: jump to the window that contains ts and start a new peak there.
        new_window = ~in_window
        skipped = np.floor((ts_s - window_end) / interval) * interval
        window_end = np.where(new_window, window_end + skipped + interval, window_end)
        memory_peak[new_window] = 0.0
        oom_peak[new_window] = 0.0
        add = replace | new_window
        self._add_to_histogram(state, slots[add], usage[add], window_end[add], sign=1.0)
        if oom:
            oom_peak[add] = usage[add]
        else:
            memory_peak[add] = usage[add]
        state.window_end_s[slots] = window_end
        state.memory_peak[slots] = memory_peak
        state.oom_peak[slots] = oom_peak

    # -- decision --------------------------------------------------------------------------------

    def decide(self, view: FleetView) -> Decision:
        n = len(view)
        state = self._state_for(view)
        slots = view.slots
        ts = view.ts_s
        ram = view.ram_bytes
        alloc = view.alloc_bytes
        demand = view.demand_bytes

        # New samples only: a tick without a new sample must not count the old one twice.
        new = np.isfinite(ts) & np.isfinite(demand) & ~(ts <= state.last_ts_s[slots])
        oom_kills = view.stat("oom-kills")
        seen_kills = state.oom_kills[slots]
        oom = new & np.where(
            np.isnan(seen_kills), view.rate("oom-kills") > 0, oom_kills > seen_kills
        )
        counted = new & np.isfinite(oom_kills)
        state.oom_kills[slots[counted]] = oom_kills[counted]

        self._add_memory_sample(state, slots[new], ts[new], demand[new], oom=False)
        state.last_ts_s[slots[new]] = ts[new]
        first = new & np.isnan(state.first_ts_s[slots])
        state.first_ts_s[slots[first]] = ts[first]
        state.samples[slots[new]] += 1.0

        # RecordOOM: bump the larger of the allocation (the request) and the window's peak.
        used = np.minimum(np.maximum(alloc, state.memory_peak[slots]), ram)
        bumped = np.minimum(
            np.maximum(used + self.oom_min_bump_bytes, used * self.oom_bump_ratio), ram
        )
        self._add_memory_sample(state, slots[oom], ts[oom], bumped[oom], oom=True)

        # Recommendation: percentiles of the peaks, + margin, confidence for the bounds, minimum.
        # A histogram changes only when a window's peak does, so most ticks recompute few rows.
        stale = slots[state.dirty[slots]]
        if len(stale):
            fractions = (self.target_percentile, self.lower_percentile, self.upper_percentile)
            state.percentiles[stale] = np.column_stack(percentiles(state.hist[stale], fractions))
            state.dirty[stale] = False
        p_target, p_lower, p_upper = state.percentiles[slots].T
        has_history = p_target > 0
        margin = 1.0 + self.safety_margin
        history_days = (state.last_ts_s[slots] - state.first_ts_s[slots]) / DAY_S
        confidence = np.minimum(history_days, state.samples[slots] / SAMPLES_PER_DAY)
        with np.errstate(divide="ignore", invalid="ignore"):
            lower_factor = (1.0 + LOWER_CONFIDENCE[0] / confidence) ** LOWER_CONFIDENCE[1]
            upper_factor = (1.0 + UPPER_CONFIDENCE[0] / confidence) ** UPPER_CONFIDENCE[1]
            raw_target = p_target * margin
            lower = np.minimum(np.maximum(p_lower * margin * lower_factor, self.min_bytes), ram)
            upper = np.minimum(np.maximum(p_upper * margin * upper_factor, self.min_bytes), ram)
        # maxAllowed: a guest cannot be given more than its RAM.
        recommended = np.minimum(np.maximum(raw_target, self.min_bytes), ram)

        # Updater: outside [lower, upper], or old enough and 10% off, or just OOM-killed.
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.abs(recommended - alloc) / np.maximum(alloc, 1.0)
        outside = (alloc < lower) | (alloc > upper)
        old_enough = view.now_s - state.first_ts_s[slots] >= self.min_lifetime_s
        big_enough = change >= self.update_threshold
        apply = has_history & (outside | (old_enough & big_enough) | (oom & (change > 0)))

        reason = np.full(n, R_PERCENTILE, dtype=np.int16)
        reason[raw_target < self.min_bytes] = R_MINIMUM
        reason[oom] = R_OOM
        reason[~apply & ~big_enough] = R_SMALL
        reason[~apply & big_enough] = R_YOUNG
        reason[~has_history] = R_NO_HISTORY
        target = np.where(apply, recommended, np.nan)

        with np.errstate(divide="ignore", invalid="ignore"):
            predicted = demand / np.where(np.isfinite(target), target, alloc)
        detail = {
            "pct": np.full(n, self.target_percentile * 100.0),
            "peak_mib": p_target / MIB,
            "margin_pct": np.full(n, self.safety_margin * 100.0),
            "min_mib": np.full(n, self.min_bytes / MIB),
            "bump_mib": np.where(oom, bumped, np.nan) / MIB,
            "target_mib": recommended / MIB,
            "lower_mib": lower / MIB,
            "upper_mib": upper / MIB,
            "threshold_pct": np.full(n, self.update_threshold * 100.0),
            "lifetime_h": np.full(n, self.min_lifetime_s / HOUR_S),
        }
        return Decision(target, predicted, reason, REASONS, detail)
