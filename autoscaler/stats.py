"""Guest memory statistics: names, units, spellings, and payload validation.

The 16 stat tags are ``VIRTIO_BALLOON_S_NAMES`` from ``include/uapi/linux/virtio_balloon.h``
(tag = index). Memory amounts are bytes; event tags are cumulative counts (or byte totals)
since guest boot. Each device spells them differently, so every adapter and agent translates
through the tables here instead of keeping its own:

- the wire (MQTT) and the kernel: ``free-memory`` …
- QEMU QMP ``guest-stats``: ``stat-free-memory`` …, 2^64−1 for "not supported";
- libvirt ``memoryStats()``: KiB, with renames (``unused`` = MemFree, ``available`` = MemTotal,
  ``usable`` = MemAvailable).

:func:`parse_stats_payload` validates one MQTT payload and raises :class:`PayloadError` with a
short machine-readable ``reason`` that the ingest path counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

import numpy as np
import orjson

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


MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_BATCH_BYTES: Final = 16 * 1024 * 1024
"""A host agent's batch carries every guest of the host in one message."""
# Anything above 2^50 bytes (1 PiB) of RAM is not a real guest; rejecting it keeps float64
# arithmetic exact (integers below 2^53) everywhere downstream.
MAX_RAM_BYTES: Final = 2**50
MAX_STAT_VALUE: Final = 2**63 - 1024
"""The largest stat accepted: the largest float64 below 2^63, so that a stat survives the
float64 stats vectors and still fits the recordings' (and Parquet's) int64 columns."""
ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
GUEST_STATS_SUFFIX: Final = "/stats"
BATCH_SUFFIX: Final = "/batch"


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


class PayloadError(ValueError):
    """A stats payload or topic that does not fit the wire contract.

    ``reason`` is a short, stable token (``invalid_json``, ``missing_field`` …) used as a metric
    label; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class StatsSample:
    """One validated guest stats sample. ``values`` is float64[16], NaN where missing."""

    ts_s: float
    ram_bytes: float
    num_pages: float
    actual_pages: float
    values: np.ndarray
    unknown_stats: int = 0


def valid_id(value: str) -> bool:
    """Host and guest ids: 1–128 chars of ``[A-Za-z0-9._-]``, but not ``.`` or ``..``.

    Ids become path segments (recordings, adapter sockets, topics): those two would name the
    directory itself or its parent.
    """
    return ID_PATTERN.fullmatch(value) is not None and value not in (".", "..")


def split_guest_ids(ids: str) -> tuple[str, str]:
    """``"{host}/{guest}"`` (the middle of a guest topic) → (host, guest), validated."""
    host, sep, guest = ids.partition("/")
    if not sep or not valid_id(host) or not valid_id(guest):
        raise PayloadError("bad_topic", f"bad host/guest id in topic: {ids!r}")
    return host, guest


def stats_topic_ids(topic: str, prefix: str) -> tuple[str, str | None] | None:
    """The ids in a stats topic, or None if ``topic`` is not one.

    ``{prefix}/guest/{host}/{guest}/stats`` → ``(host, guest)``; a host agent's batch,
    ``{prefix}/host/{host}/batch``, → ``(host, None)``. Raises :class:`PayloadError`
    (``bad_topic``) for a stats topic with invalid ids.
    """
    guest_prefix = f"{prefix}/guest/"
    host_prefix = f"{prefix}/host/"
    if topic.startswith(guest_prefix) and topic.endswith(GUEST_STATS_SUFFIX):
        return split_guest_ids(topic[len(guest_prefix) : -len(GUEST_STATS_SUFFIX)])
    if topic.startswith(host_prefix) and topic.endswith(BATCH_SUFFIX):
        host = topic[len(host_prefix) : -len(BATCH_SUFFIX)]
        if not valid_id(host):
            raise PayloadError("bad_topic", f"bad host id in topic: {host!r}")
        return host, None
    return None


def parse_stats_message(
    guest: str | None, raw: bytes | bytearray | memoryview, *, now_s: float
) -> list[tuple[str, StatsSample | PayloadError]]:
    """The samples in one stats message, as ``(guest, sample or its error)``.

    ``guest`` is the topic's guest id (see :func:`stats_topic_ids`), None for a batch. A
    message that is bad as a whole (any bad single-guest message) raises :class:`PayloadError`;
    in a batch, a bad guest costs only its own sample (:func:`parse_batch_payload`).
    """
    if guest is None:
        return parse_batch_payload(raw, now_s=now_s)
    return [(guest, parse_stats_payload(raw, now_s=now_s))]


def decode_object(
    raw: bytes | bytearray | memoryview, *, max_bytes: int = MAX_PAYLOAD_BYTES
) -> dict[str, object]:
    """A JSON object payload of at most ``max_bytes``; :class:`PayloadError` otherwise."""
    if len(raw) > max_bytes:
        raise PayloadError("too_large", f"payload of {len(raw)} bytes > {max_bytes}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PayloadError("invalid_json", f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError("wrong_type", "payload must be a JSON object")
    return data


def number_field(payload: dict[str, object], key: str, *, required: bool) -> float:
    """A finite, non-negative number field (NaN if absent and not ``required``)."""
    value = payload.get(key)
    if value is None:
        if required:
            raise PayloadError("missing_field", f"missing field {key!r}")
        return math.nan
    # bool is an int subclass in Python; true/false is not a number here.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError("wrong_type", f"field {key!r} must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise PayloadError("bad_value", f"field {key!r} must be finite and >= 0, not {value!r}")
    return float(value)


def parse_stats_payload(raw: bytes | bytearray | memoryview, *, now_s: float) -> StatsSample:
    """Validate one guest stats payload (design.md, wire contract) into a :class:`StatsSample`.

    ``now_s`` bounds timestamps: samples from more than a day in the future are rejected, since a
    wrong clock would otherwise make a guest look fresh forever.
    """
    payload = decode_object(raw)
    return parse_stats_document(payload, now_s=now_s)


def parse_batch_payload(
    raw: bytes | bytearray | memoryview, *, now_s: float
) -> list[tuple[str, StatsSample | PayloadError]]:
    """A host agent's batch: ``{"samples": {guest_id: <guest stats payload>, …}}``.

    The whole message is rejected if it is not such an object; each guest's sample is then
    validated on its own, so one bad guest costs only its own sample.
    """
    entries = batch_entries(raw)
    return [parse_batch_entry(guest, document, now_s=now_s) for guest, document in entries.items()]


def batch_entries(
    raw: bytes | bytearray | memoryview, *, max_bytes: int = MAX_BATCH_BYTES
) -> dict[str, object]:
    """A batch's ``samples`` object, decoded but not validated (see :func:`parse_batch_entry`).

    Raises :class:`PayloadError` if the message is not such an object.
    """
    payload = decode_object(raw, max_bytes=max_bytes)
    samples = payload.get("samples")
    if not isinstance(samples, dict):
        raise PayloadError("wrong_type", "a batch must be an object with a 'samples' object")
    return samples


def parse_batch_entry(
    guest: str, document: object, *, now_s: float
) -> tuple[str, StatsSample | PayloadError]:
    """One guest's entry of a batch: ``(guest, sample or its error)``."""
    if not valid_id(guest):
        return guest[:200], PayloadError("bad_topic", f"bad guest id {guest[:200]!r}")
    try:
        return guest, parse_stats_document(document, now_s=now_s)
    except PayloadError as exc:
        return guest, exc


def parse_stats_document(payload: object, *, now_s: float) -> StatsSample:
    """Validate an already decoded guest stats payload."""
    if not isinstance(payload, dict):
        raise PayloadError("wrong_type", "payload must be a JSON object")

    ts_s = number_field(payload, "ts", required=True)
    if ts_s > now_s + 86_400.0:
        raise PayloadError("bad_value", f"ts {ts_s} is more than a day in the future")
    ram_bytes = number_field(payload, "ram_bytes", required=True)
    if ram_bytes < PAGE_BYTES or ram_bytes > MAX_RAM_BYTES:
        raise PayloadError("bad_value", f"ram_bytes {ram_bytes:.0f} is out of range")
    num_pages = number_field(payload, "num_pages", required=False)
    actual_pages = number_field(payload, "actual", required=False)
    ram_pages = ram_bytes / PAGE_BYTES
    for key, pages in (("num_pages", num_pages), ("actual", actual_pages)):
        if pages > ram_pages or pages > MAX_NUM_PAGES:
            raise PayloadError("bad_value", f"{key} {pages:.0f} exceeds the guest's RAM")

    stats = payload.get("stats")
    if not isinstance(stats, dict):
        if stats is None:
            raise PayloadError("missing_field", "missing field 'stats'")
        raise PayloadError("wrong_type", "field 'stats' must be an object")
    values = np.full(N_STATS, np.nan)
    unknown = 0
    for name, value in stats.items():
        index = STAT_INDEX.get(name)
        if index is None:
            unknown += 1
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise PayloadError("wrong_type", f"stat {name!r} must be an integer, not {value!r}")
        if value < 0 or value > MAX_STAT_VALUE:
            raise PayloadError("bad_value", f"stat {name!r} = {value} is out of range")
        values[index] = value
    # Memory gauges larger than the guest's RAM are not a guest's numbers: reject rather than
    # let one broken agent make the controller think a guest needs more than it can ever have.
    # disk-caches too: with available-memory missing, demand is estimated from free + caches.
    gauges = values[[S_FREE, S_TOTAL, S_AVAILABLE, S_CACHES]]
    if np.any(gauges > ram_bytes * 1.01):
        raise PayloadError("bad_value", "a memory stat exceeds ram_bytes")
    _check_gauges_agree(values, ram_bytes)
    return StatsSample(ts_s, ram_bytes, num_pages, actual_pages, values, unknown)


def _check_gauges_agree(values: np.ndarray, ram_bytes: float) -> None:
    """The memory gauges must fit the guest's total (its RAM when the total is missing): a
    guest with more available, or more free plus cached, than it has would read as idle and be
    inflated. Missing gauges (NaN) compare false and pass."""
    total = values[S_TOTAL] if values[S_TOTAL] == values[S_TOTAL] else ram_bytes * 1.01
    if values[S_AVAILABLE] > total:
        raise PayloadError("bad_value", "available-memory exceeds total-memory")
    if np.nansum(values[[S_FREE, S_CACHES]]) > total:
        raise PayloadError("bad_value", "free-memory + disk-caches exceed total-memory")


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


def stats_to_wire(values: np.ndarray) -> dict[str, int]:
    """float64[16] → the wire's ``stats`` object (missing stats left out)."""
    return {
        name: int(value) for name, value in zip(STAT_NAMES, values, strict=True) if value == value
    }


def stats_from_firecracker(statistics: dict[str, object]) -> np.ndarray:
    """``GET /balloon/statistics`` → float64[16] in bytes and counts (NaN for missing or out of
    range)."""
    values = np.full(N_STATS, np.nan)
    for key, name in FIRECRACKER_STAT_KEYS.items():
        _put_stat(values, name, statistics.get(key))
    return values
