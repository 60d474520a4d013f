"""The MQTT wire contract: topics, and each message's encoding and validation.

Topics live under a prefix (``mqtt.topic_prefix``, ``balloon/v1`` by default):

=========================================  ==========================  ======================
topic                                      message                     encode / decode
=========================================  ==========================  ======================
``{prefix}/guest/{host}/{guest}/stats``    guest stats                 :func:`encode_guest_stats`
                                                                       / :func:`decode_guest_stats`
``{prefix}/guest/{host}/{guest}/target``   target command              :func:`encode_target`
                                                                       / :func:`decode_target`
``{prefix}/host/{host}/stats``             host memory                 :func:`encode_host_stats`
                                                                       / :func:`decode_host_stats`
``{prefix}/host/{host}/batch``             every guest of a host       :func:`encode_batch`
                                                                       / :func:`decode_batch`
``{prefix}/controller/{replica}/alive``    a controller's presence     :func:`encode_presence`
                                                                       / :func:`decode_presence`
=========================================  ==========================  ======================

:class:`Topics` builds and parses the topics. Every decoder raises :class:`PayloadError` with a
short machine-readable ``reason`` that consumers count; encoders trust their caller.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import numpy as np
import orjson

from autoscaler.stats import (
    MAX_NUM_PAGES,
    MAX_STAT_VALUE,
    N_STATS,
    PAGE_BYTES,
    S_AVAILABLE,
    S_CACHES,
    S_FREE,
    S_TOTAL,
    STAT_INDEX,
    STAT_NAMES,
    StatsSample,
)

MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_BATCH_BYTES: Final = 16 * 1024 * 1024
"""A host agent's batch carries every guest of the host in one message."""
# Anything above 2^50 bytes (1 PiB) of RAM is not a real guest; rejecting it keeps float64
# arithmetic exact (integers below 2^53) everywhere downstream.
MAX_RAM_BYTES: Final = 2**50
MAX_PRESENCE_TTL_S: Final = 3600.0
"""A longer TTL in a presence is not believed: it would let one ghost hold hosts for hours."""
PRESENCE_OFFLINE: Final = b"offline"
"""A replica's presence once it is gone (its MQTT will, or a clean shutdown)."""
ID_CHARS: Final = r"[A-Za-z0-9._-]{1,128}"
ID_PATTERN: Final = re.compile(ID_CHARS)
_DOT_IDS: Final = (".", "..")
ANY: Final = "+"
"""MQTT's single-level wildcard, for subscription filters."""


class PayloadError(ValueError):
    """A payload or topic that does not fit the wire contract.

    ``reason`` is a short, stable token (``invalid_json``, ``missing_field`` …) used as a metric
    label; the message says what exactly was wrong.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def valid_id(value: str) -> bool:
    """Host and guest ids: 1–128 chars of ``[A-Za-z0-9._-]``, but not ``.`` or ``..``.

    Ids become path segments (recordings, adapter sockets, topics): those two would name the
    directory itself or its parent.
    """
    return ID_PATTERN.fullmatch(value) is not None and value not in _DOT_IDS


# -- topics --------------------------------------------------------------------------------------


class TopicKind(enum.Enum):
    """The message a topic carries."""

    GUEST_STATS = "guest stats"
    TARGET = "target"
    HOST_STATS = "host stats"
    BATCH = "batch"
    PRESENCE = "presence"


class ParsedTopic(NamedTuple):
    """What :meth:`Topics.parse` found in a topic."""

    kind: TopicKind
    host: str
    """The host id; for a :attr:`TopicKind.PRESENCE`, the replica id."""
    guest: str
    """The guest id; ``""`` for the topics of a host or a replica."""


# Last level of a guest topic → kind; (first, last) level of a host or replica topic → kind.
_GUEST_KINDS: Final = {"stats": TopicKind.GUEST_STATS, "target": TopicKind.TARGET}
_OWNER_KINDS: Final = {
    ("host", "stats"): TopicKind.HOST_STATS,
    ("host", "batch"): TopicKind.BATCH,
    ("controller", "alive"): TopicKind.PRESENCE,
}
# ParsedTopic(...) runs a Python-level __new__; this builds the same tuple in one C call, which
# matters at tens of thousands of messages a second.
_new_tuple: Final = tuple.__new__


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics under one prefix: builders, subscription filters and :meth:`parse`.

    Builders do not validate ids; :meth:`parse` does.
    """

    prefix: str
    _root: str = field(init=False, repr=False, compare=False)
    # One regular expression per topic shape matches a valid topic in a single C call; only a
    # topic it refuses is taken apart to say what is wrong with it.
    _guest_topic: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _owner_topic: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        root = f"{self.prefix}/"
        object.__setattr__(self, "_root", root)
        ids = f"({ID_CHARS})"
        root_pattern = re.escape(root)
        object.__setattr__(
            self, "_guest_topic", re.compile(f"{root_pattern}guest/{ids}/{ids}/(stats|target)")
        )
        object.__setattr__(
            self,
            "_owner_topic",
            re.compile(f"{root_pattern}(host|controller)/{ids}/(stats|batch|alive)"),
        )

    def guest_stats(self, host: str, guest: str) -> str:
        return f"{self.prefix}/guest/{host}/{guest}/stats"

    def target(self, host: str, guest: str) -> str:
        return f"{self.prefix}/guest/{host}/{guest}/target"

    def host_stats(self, host: str) -> str:
        return f"{self.prefix}/host/{host}/stats"

    def batch(self, host: str) -> str:
        return f"{self.prefix}/host/{host}/batch"

    def presence(self, replica: str) -> str:
        return f"{self.prefix}/controller/{replica}/alive"

    def guest_stats_filter(self) -> str:
        return self.guest_stats(ANY, ANY)

    def target_filter(self, host: str = ANY) -> str:
        """Every guest's target (of one ``host``, or of every host)."""
        return self.target(host, ANY)

    def host_stats_filter(self) -> str:
        return self.host_stats(ANY)

    def batch_filter(self) -> str:
        return self.batch(ANY)

    def presence_filter(self) -> str:
        return self.presence(ANY)

    def parse(self, topic: str) -> ParsedTopic:
        """The kind and ids of ``topic``; :class:`PayloadError` (``bad_topic``) if it is not a
        topic of this prefix or an id in it is not valid (:func:`valid_id`)."""
        match = self._guest_topic.fullmatch(topic)
        if match is not None:
            host, guest, last = match.groups()
            if host not in _DOT_IDS and guest not in _DOT_IDS:
                return _new_tuple(ParsedTopic, (_GUEST_KINDS[last], host, guest))
        else:
            match = self._owner_topic.fullmatch(topic)
            if match is not None:
                first, owner, last = match.groups()
                kind = _OWNER_KINDS.get((first, last))
                if kind is not None and owner not in _DOT_IDS:
                    return _new_tuple(ParsedTopic, (kind, owner, ""))
        raise self._topic_error(topic)

    def _topic_error(self, topic: str) -> PayloadError:
        """What is wrong with a topic that :meth:`parse` refused."""
        root = self._root
        if topic.startswith(root):
            levels = topic[len(root) :].split("/")
            if len(levels) == 4 and levels[0] == "guest":
                if levels[3] in _GUEST_KINDS:
                    return PayloadError("bad_topic", f"bad host/guest id in topic: {topic[:300]!r}")
            elif len(levels) == 3 and (levels[0], levels[2]) in _OWNER_KINDS:
                return PayloadError("bad_topic", f"bad {levels[0]} id in topic: {topic[:300]!r}")
        return PayloadError("bad_topic", f"unexpected topic {topic[:300]!r}")


# -- JSON objects --------------------------------------------------------------------------------


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


# -- guest stats ---------------------------------------------------------------------------------


def stats_to_wire(values: np.ndarray) -> dict[str, int]:
    """float64[16] → the wire's ``stats`` object (missing stats left out)."""
    return {
        name: int(value)
        for name, value in zip(STAT_NAMES, values.tolist(), strict=True)
        if value == value
    }


def encode_guest_stats(
    ts_s: float,
    ram_bytes: int,
    values: np.ndarray,
    *,
    num_pages: int | None = None,
    actual_pages: int | None = None,
) -> bytes:
    """A guest stats payload; ``num_pages`` and ``actual`` only when known (not None)."""
    payload: dict[str, object] = {"ts": ts_s, "ram_bytes": ram_bytes}
    if num_pages is not None:
        payload["num_pages"] = num_pages
    if actual_pages is not None:
        payload["actual"] = actual_pages
    payload["stats"] = stats_to_wire(values)
    return orjson.dumps(payload)


def decode_guest_stats(raw: bytes | bytearray | memoryview, *, now_s: float) -> StatsSample:
    """Validate one guest stats payload into a :class:`~autoscaler.stats.StatsSample`.

    ``now_s`` bounds timestamps: samples from more than a day in the future are rejected, since a
    wrong clock would otherwise make a guest look fresh forever.
    """
    return _guest_stats_document(decode_object(raw), now_s=now_s)


def _guest_stats_document(payload: object, *, now_s: float) -> StatsSample:
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


# -- batch ---------------------------------------------------------------------------------------


def encode_batch(samples: Mapping[str, bytes]) -> bytes:
    """A host agent's batch from each guest's guest stats payload (embedded as is)."""
    return orjson.dumps({"samples": {guest: orjson.Fragment(p) for guest, p in samples.items()}})


def decode_batch(
    raw: bytes | bytearray | memoryview, *, now_s: float
) -> list[tuple[str, StatsSample | PayloadError]]:
    """A host agent's batch: ``{"samples": {guest_id: <guest stats payload>, …}}``.

    The whole message is rejected if it is not such an object; each guest's sample is then
    validated on its own, so one bad guest costs only its own sample.
    """
    entries = batch_entries(raw)
    return [decode_batch_entry(guest, document, now_s=now_s) for guest, document in entries.items()]


def batch_entries(
    raw: bytes | bytearray | memoryview, *, max_bytes: int = MAX_BATCH_BYTES
) -> dict[str, object]:
    """A batch's ``samples`` object, decoded but not validated (see :func:`decode_batch_entry`).

    Raises :class:`PayloadError` if the message is not such an object.
    """
    payload = decode_object(raw, max_bytes=max_bytes)
    samples = payload.get("samples")
    if not isinstance(samples, dict):
        raise PayloadError("wrong_type", "a batch must be an object with a 'samples' object")
    return samples


def decode_batch_entry(
    guest: str, document: object, *, now_s: float
) -> tuple[str, StatsSample | PayloadError]:
    """One guest's entry of a batch: ``(guest, sample or its error)``."""
    if not valid_id(guest):
        return guest[:200], PayloadError("bad_topic", f"bad guest id {guest[:200]!r}")
    try:
        return guest, _guest_stats_document(document, now_s=now_s)
    except PayloadError as exc:
        return guest, exc


# -- host stats ----------------------------------------------------------------------------------


class HostStats(NamedTuple):
    """A validated host memory payload (from the host's /proc/meminfo)."""

    ts_s: float
    mem_total_bytes: float
    mem_available_bytes: float


def encode_host_stats(ts_s: float, mem_total_bytes: int, mem_available_bytes: int) -> bytes:
    return orjson.dumps(
        {"ts": ts_s, "mem_total_bytes": mem_total_bytes, "mem_available_bytes": mem_available_bytes}
    )


def decode_host_stats(raw: bytes | bytearray | memoryview) -> HostStats:
    """Validate one host memory payload."""
    data = decode_object(raw)
    ts_s, total, available = (
        number_field(data, key, required=True)
        for key in ("ts", "mem_total_bytes", "mem_available_bytes")
    )
    # A zero total would make the host look over budget and squeeze every guest on it.
    if total <= 0:
        raise PayloadError("bad_value", "mem_total_bytes must be > 0")
    if available > total:
        raise PayloadError("bad_value", "mem_available_bytes > mem_total_bytes")
    return HostStats(ts_s, total, available)


# -- target command ------------------------------------------------------------------------------


class TargetCommand(NamedTuple):
    """A validated target command: ``{"ts", "num_pages", "policy", "reason"}``."""

    ts_s: float
    num_pages: int
    policy: str
    reason: str


def encode_target(ts_s: float, num_pages: int, policy: str, reason: str) -> bytes:
    return orjson.dumps({"ts": ts_s, "num_pages": num_pages, "policy": policy, "reason": reason})


def decode_target(raw: bytes | bytearray | memoryview) -> TargetCommand:
    """Validate one target command payload. ``num_pages`` is checked against the u32 range
    only: the guest's RAM is known to whoever applies the command."""
    data = decode_object(raw)
    for key in ("ts", "num_pages", "policy", "reason"):
        if key not in data:
            raise PayloadError("missing_field", f"missing field {key!r}")
    ts_s = number_field(data, "ts", required=True)
    num_pages, policy, reason = data["num_pages"], data["policy"], data["reason"]
    if isinstance(num_pages, bool) or not isinstance(num_pages, int):
        raise PayloadError("wrong_type", f"field 'num_pages' must be an integer, not {num_pages!r}")
    if not 0 <= num_pages <= MAX_NUM_PAGES:
        raise PayloadError("bad_value", f"num_pages {num_pages} is not a u32")
    if not isinstance(policy, str) or not isinstance(reason, str):
        raise PayloadError("wrong_type", "fields 'policy' and 'reason' must be strings")
    return TargetCommand(ts_s, num_pages, policy, reason)


# -- presence ------------------------------------------------------------------------------------


class OnlinePresence(NamedTuple):
    """A validated online presence: the replica counts as live for ``ttl_s`` after receipt."""

    ts_s: float
    ttl_s: float


def encode_presence(ts_s: float, ttl_s: float) -> bytes:
    """A replica's online presence, valid for ``ttl_s`` after it is received."""
    return orjson.dumps({"state": "online", "ts": ts_s, "ttl_s": ttl_s})


def decode_presence(raw: bytes | bytearray | memoryview) -> OnlinePresence:
    """Validate an online presence; anything else (:data:`PRESENCE_OFFLINE`, an online one
    without a time or a TTL) raises :class:`PayloadError`."""
    if raw == PRESENCE_OFFLINE:
        raise PayloadError("offline", "the replica is offline")
    data = decode_object(raw)
    if data.get("state") != "online":
        raise PayloadError("bad_value", f"presence state {data.get('state')!r} is not 'online'")
    ts_s = number_field(data, "ts", required=True)
    ttl_s = number_field(data, "ttl_s", required=True)
    if not 0 < ttl_s <= MAX_PRESENCE_TTL_S:
        raise PayloadError("bad_value", f"ttl_s {ttl_s} is not in (0, {MAX_PRESENCE_TTL_S:g}]")
    return OnlinePresence(ts_s, ttl_s)
