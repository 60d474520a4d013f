"""Guest memory statistics: names, units and device spellings.

The 16 stat tags are ``VIRTIO_BALLOON_S_NAMES`` from ``include/uapi/linux/virtio_balloon.h``
(tag = index). Memory amounts are bytes; event tags are cumulative counts (or byte totals)
since guest boot. Each device spells them differently, so every adapter and agent translates
through the tables here instead of keeping its own:

- the wire (MQTT) and the kernel: ``free-memory`` …
- QEMU QMP ``guest-stats``: ``stat-free-memory`` …, 2^64−1 for "not supported";
- libvirt ``memoryStats()``: KiB, with renames (``unused`` = MemFree, ``available`` = MemTotal,
  ``usable`` = MemAvailable).

The MQTT payloads that carry them are encoded and validated in :mod:`autoscaler.wire`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

STAT_NAMES: Final[tuple[str, ...]] = (
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "free-memory",
    "total-memory",
    "available-memory",
    "disk-caches",
    "hugetlb-allocations",
    "hugetlb-failures",
    "oom-kills",
    "alloc-stalls",
    "async-scans",
    "direct-scans",
    "async-reclaims",
    "direct-reclaims",
)
N_STATS: Final = len(STAT_NAMES)
STAT_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(STAT_NAMES)}

# Gauges describe the guest now; every other tag is cumulative since boot and is turned into a
# per-second rate from consecutive samples.
GAUGE_STATS: Final[frozenset[str]] = frozenset(
    {"free-memory", "total-memory", "available-memory", "disk-caches"}
)
CUMULATIVE_STATS: Final[tuple[str, ...]] = tuple(
    name for name in STAT_NAMES if name not in GAUGE_STATS
)
CUMULATIVE_MASK: Final = np.array([name not in GAUGE_STATS for name in STAT_NAMES])

# Tag indices used on hot paths.
S_SWAP_IN: Final = STAT_INDEX["swap-in"]
S_MAJOR_FAULTS: Final = STAT_INDEX["major-faults"]
S_FREE: Final = STAT_INDEX["free-memory"]
S_TOTAL: Final = STAT_INDEX["total-memory"]
S_AVAILABLE: Final = STAT_INDEX["available-memory"]
S_CACHES: Final = STAT_INDEX["disk-caches"]
S_OOM_KILLS: Final = STAT_INDEX["oom-kills"]
S_ALLOC_STALLS: Final = STAT_INDEX["alloc-stalls"]
S_DIRECT_SCANS: Final = STAT_INDEX["direct-scans"]
S_DIRECT_RECLAIMS: Final = STAT_INDEX["direct-reclaims"]

PAGE_BYTES: Final = 4096
"""Balloon page size: VIRTIO_BALLOON_PFN_SHIFT 12, whatever the guest's own page size."""
MAX_NUM_PAGES: Final = 2**32 - 1
"""``num_pages`` and ``actual`` are u32 in ``struct virtio_balloon_config``."""
UNSUPPORTED: Final = 2**64 - 1
"""QEMU reports a stat the guest driver does not send as 2^64−1."""

QMP_STAT_KEYS: Final[dict[str, str]] = {
    **{f"stat-{name}": name for name in STAT_NAMES},
    # QEMU names the two hugetlb tags after the kernel's macros (VIRTIO_BALLOON_S_HTLB_PGALLOC,
    # _PGFAIL) rather than VIRTIO_BALLOON_S_NAMES (measured on QEMU 7.2).
    "stat-htlb-pgalloc": "hugetlb-allocations",
    "stat-htlb-pgfail": "hugetlb-failures",
}
"""QMP ``qom-get <balloon> guest-stats`` keys → stat names."""

LIBVIRT_STAT_KEYS: Final[dict[str, tuple[str, int]]] = {
    # libvirt key: (stat name, multiplier to bytes or counts). Memory values are KiB.
    "swap_in": ("swap-in", 1024),
    "swap_out": ("swap-out", 1024),
    "major_fault": ("major-faults", 1),
    "minor_fault": ("minor-faults", 1),
    "unused": ("free-memory", 1024),
    "available": ("total-memory", 1024),
    "usable": ("available-memory", 1024),
    "disk_caches": ("disk-caches", 1024),
    "hugetlb_pgalloc": ("hugetlb-allocations", 1),
    "hugetlb_pgfail": ("hugetlb-failures", 1),
}
"""libvirt ``virDomainMemoryStats`` keys → stat names (libvirt passes tags 0–9 only)."""

FIRECRACKER_STAT_KEYS: Final[dict[str, str]] = {
    # GET /balloon/statistics field → stat name. Memory values are bytes, the rest counts, as
    # the guest driver sent them; the last six exist in newer Firecracker versions only.
    "swap_in": "swap-in",
    "swap_out": "swap-out",
    "major_faults": "major-faults",
    "minor_faults": "minor-faults",
    "free_memory": "free-memory",
    "total_memory": "total-memory",
    "available_memory": "available-memory",
    "disk_caches": "disk-caches",
    "hugetlb_allocations": "hugetlb-allocations",
    "hugetlb_failures": "hugetlb-failures",
    "oom_kill": "oom-kills",
    "alloc_stall": "alloc-stalls",
    "async_scan": "async-scans",
    "direct_scan": "direct-scans",
    "async_reclaim": "async-reclaims",
    "direct_reclaim": "direct-reclaims",
}


MAX_STAT_VALUE: Final = 2**63 - 1024
"""The largest stat accepted: the largest float64 below 2^63, so that a stat survives the
float64 stats vectors and still fits the recordings' (and Parquet's) int64 columns."""


def counter_rates(delta: np.ndarray, dt_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-second rates of the cumulative counters between consecutive samples of a guest.

    ``delta`` is float[n, len(CUMULATIVE_STATS)], each counter's change since the guest's
    previous sample (NaN where either sample lacks it); ``dt_s`` is float[n], the time between
    the two samples. Returns ``(rates, rebooted)``: a counter that went down means the guest
    rebooted and every counter restarted, so all rates of that row are NaN and ``rebooted``
    marks it. The fleet at ingest and the learned policy's training both count rates here.
    """
    rebooted = np.any(delta < 0, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = delta / dt_s[:, None]
    rates[rebooted] = np.nan
    return rates, rebooted


def available_memory_bytes(
    available_bytes: np.ndarray, free_bytes: np.ndarray, caches_bytes: np.ndarray
) -> np.ndarray:
    """MemAvailable, or free + page cache where it is missing (NaN if that is missing too).

    Kernels before 3.14 have no MemAvailable: free + page cache is the classic estimate.
    """
    return np.where(np.isnan(available_bytes), free_bytes + caches_bytes, available_bytes)


@dataclass(slots=True)
class StatsSample:
    """One validated guest stats sample. ``values`` is float64[16], NaN where missing."""

    ts_s: float
    ram_bytes: float
    num_pages: float
    actual_pages: float
    values: np.ndarray
    unknown_stats: int = 0


def _put_stat(values: np.ndarray, name: str, value: object, scale: int = 1) -> None:
    """Store one device stat (× ``scale``) if it is an integer in [0, MAX_STAT_VALUE].

    Anything else (a device's "unsupported" marker, a wrapped counter, a non-integer) leaves
    that one stat missing: published, it would make the controller reject the whole sample.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        scaled = value * scale
        if 0 <= scaled <= MAX_STAT_VALUE:
            values[STAT_INDEX[name]] = scaled


def stats_from_qmp(guest_stats: dict[str, object]) -> np.ndarray:
    """QMP ``guest-stats`` → float64[16] (NaN for missing, unsupported or out of range)."""
    values = np.full(N_STATS, np.nan)
    raw = guest_stats.get("stats", guest_stats)
    if isinstance(raw, dict):
        for key, value in raw.items():
            name = QMP_STAT_KEYS.get(key)
            if name is not None:
                _put_stat(values, name, value)  # UNSUPPORTED (2^64-1) is out of range
    return values


def stats_from_libvirt(memory_stats: dict[str, int]) -> np.ndarray:
    """libvirt ``memoryStats()`` → float64[16] in bytes and counts (NaN for missing or out of
    range)."""
    values = np.full(N_STATS, np.nan)
    for key, value in memory_stats.items():
        entry = LIBVIRT_STAT_KEYS.get(key)
        if entry is not None:
            name, scale = entry
            _put_stat(values, name, value, scale)
    return values


def stats_from_firecracker(statistics: dict[str, object]) -> np.ndarray:
    """``GET /balloon/statistics`` → float64[16] in bytes and counts (NaN for missing or out of
    range)."""
    values = np.full(N_STATS, np.nan)
    for key, name in FIRECRACKER_STAT_KEYS.items():
        _put_stat(values, name, statistics.get(key))
    return values


HISTORY_CHANNELS: Final[tuple[str, ...]] = (
    "ts_s",  # relative to the fleet's epoch_s, so float32 keeps 1 s resolution for ~190 days
    "demand_bytes",
    "alloc_bytes",
    "swap-in",
    "swap-out",
    "major-faults",
    "alloc-stalls",
    "async-scans",
    "direct-scans",
    "async-reclaims",
    "direct-reclaims",
    "oom-kills",
)
"""The per-sample history the fleet keeps for each guest (float32): the sample time, demand,
allocation and per-second rates of these counters (bytes/s or events/s)."""
