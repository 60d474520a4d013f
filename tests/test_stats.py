"""Stats payload validation and the device spellings of the 16 stat tags."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from autoscaler.stats import (
    CUMULATIVE_STATS,
    LIBVIRT_STAT_KEYS,
    QMP_STAT_KEYS,
    STAT_NAMES,
    UNSUPPORTED,
    PayloadError,
    available_memory_bytes,
    counter_rates,
    parse_stats_payload,
    stats_from_libvirt,
    stats_from_qmp,
    stats_to_wire,
    valid_id,
)

NOW = 1_764_150_000.0
GOOD = {
    "ts": NOW,
    "ram_bytes": 4 * 2**30,
    "num_pages": 0,
    "actual": 0,
    "stats": {
        "free-memory": 2 * 2**30,
        "total-memory": 4 * 2**30,
        "available-memory": 3 * 2**30,
        "major-faults": 120,
        "swap-in": 0,
        "oom-kills": 0,
    },
}


def test_names_are_the_kernel_tags_in_order() -> None:
    # include/uapi/linux/virtio_balloon.h, VIRTIO_BALLOON_S_NAMES, tags 0..15
    assert STAT_NAMES[0] == "swap-in"
    assert STAT_NAMES[4] == "free-memory"
    assert STAT_NAMES[10] == "oom-kills"
    assert STAT_NAMES[15] == "direct-reclaims"
    assert len(STAT_NAMES) == 16


def test_design_example_parses() -> None:
    sample = parse_stats_payload(orjson.dumps(GOOD), now_s=NOW)
    assert sample.ts_s == NOW
    assert sample.ram_bytes == 4 * 2**30
    assert sample.values[STAT_NAMES.index("available-memory")] == 3 * 2**30
    assert math.isnan(sample.values[STAT_NAMES.index("direct-scans")])
    assert sample.unknown_stats == 0


def test_unknown_stats_are_ignored_and_counted() -> None:
    payload = dict(GOOD, stats={**GOOD["stats"], "new-stat-from-2030": 5, "other": 1})  # type: ignore[dict-item]
    sample = parse_stats_payload(orjson.dumps(payload), now_s=NOW)
    assert sample.unknown_stats == 2


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[]", "wrong_type"),
        (b'"text"', "wrong_type"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "ts"}), "missing_field"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "ram_bytes"}), "missing_field"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "stats"}), "missing_field"),
        (orjson.dumps(dict(GOOD, ts="now")), "wrong_type"),
        (orjson.dumps(dict(GOOD, ts=True)), "wrong_type"),
        (orjson.dumps(dict(GOOD, stats=[1])), "wrong_type"),
        (orjson.dumps(dict(GOOD, stats={"free-memory": 1.5})), "wrong_type"),
        (orjson.dumps(dict(GOOD, stats={"free-memory": "1"})), "wrong_type"),
        (orjson.dumps(dict(GOOD, ram_bytes=-1)), "bad_value"),
        (orjson.dumps(dict(GOOD, ram_bytes=2**60)), "bad_value"),
        (orjson.dumps(dict(GOOD, ram_bytes=100)), "bad_value"),
        (orjson.dumps(dict(GOOD, ts=NOW + 10 * 86400)), "bad_value"),
        (orjson.dumps(dict(GOOD, actual=2**21)), "bad_value"),
        (orjson.dumps(dict(GOOD, num_pages=-3)), "bad_value"),
        (orjson.dumps(dict(GOOD, stats={"swap-in": -1})), "bad_value"),
        (b'{"ts": 1, "ram_bytes": 4096, "stats": {"swap-in": 9223372036854775808}}', "bad_value"),
        (b'{"ts": 1, "ram_bytes": 4096, "stats": {"swap-in": 1' + b"0" * 30 + b"}}", "wrong_type"),
        (orjson.dumps(dict(GOOD, stats={"free-memory": 8 * 2**30})), "bad_value"),
        (b" " * (64 * 1024 + 1), "too_large"),
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_stats_payload(raw, now_s=NOW)
    assert info.value.reason == reason
    assert str(info.value)


def test_nan_and_infinity_are_rejected() -> None:
    raw = b'{"ts": NaN, "ram_bytes": 4096, "stats": {}}'
    with pytest.raises(PayloadError):
        parse_stats_payload(raw, now_s=NOW)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("vm-1", True),
        ("a.b_c-D9", True),
        ("x" * 128, True),
        ("", False),
        ("x" * 129, False),
        ("a/b", False),
        ("a b", False),
        ("+", False),
        ("#", False),
        ("é", False),
        (".", False),  # path segments wherever ids name files or topics
        ("..", False),
        ("...", True),
    ],
)
def test_ids(value: str, ok: bool) -> None:
    assert valid_id(value) is ok


def test_qmp_mapping_and_unsupported_marker() -> None:
    qmp = {
        "stats": {
            "stat-swap-in": 0,
            "stat-free-memory": 123 * 4096,
            "stat-available-memory": 456 * 4096,
            "stat-htlb-pgalloc": 7,
            "stat-oom-kills": UNSUPPORTED,
        },
        "last-update": 1764150000,
    }
    values = stats_from_qmp(qmp)
    assert values[STAT_NAMES.index("free-memory")] == 123 * 4096
    assert values[STAT_NAMES.index("available-memory")] == 456 * 4096
    assert math.isnan(values[STAT_NAMES.index("oom-kills")])
    assert values[STAT_NAMES.index("hugetlb-allocations")] == 7
    assert set(QMP_STAT_KEYS.values()) == set(STAT_NAMES)


def test_libvirt_mapping_converts_kib_and_renames() -> None:
    values = stats_from_libvirt(
        {
            "unused": 1024,
            "available": 4096,
            "usable": 2048,
            "swap_in": 8,
            "major_fault": 7,
            "actual": 4096,
            "rss": 100,
        }
    )
    assert values[STAT_NAMES.index("free-memory")] == 1024 * 1024
    assert values[STAT_NAMES.index("total-memory")] == 4096 * 1024
    assert values[STAT_NAMES.index("available-memory")] == 2048 * 1024
    assert values[STAT_NAMES.index("swap-in")] == 8 * 1024
    assert values[STAT_NAMES.index("major-faults")] == 7
    assert {name for name, _ in LIBVIRT_STAT_KEYS.values()} <= set(STAT_NAMES)


def test_wire_round_trip() -> None:
    values = np.full(16, np.nan)
    values[4] = 5
    values[10] = 0
    assert stats_to_wire(values) == {"free-memory": 5, "oom-kills": 0}


def test_counter_rates_restart_when_any_counter_goes_down() -> None:
    assert len(CUMULATIVE_STATS) == 12 and "free-memory" not in CUMULATIVE_STATS
    delta = np.full((3, len(CUMULATIVE_STATS)), np.nan)
    delta[:, 0] = [600.0, 600.0, 600.0]
    delta[1, CUMULATIVE_STATS.index("minor-faults")] = -5.0  # counters restarted: a reboot
    rates, rebooted = counter_rates(delta, np.array([60.0, 60.0, np.nan]))
    assert rebooted.tolist() == [False, True, False]
    assert rates[0, 0] == 10.0
    assert np.isnan(rates[1]).all() and np.isnan(rates[2, 0])


def test_available_memory_falls_back_to_free_plus_caches() -> None:
    got = available_memory_bytes(
        np.array([5.0, np.nan]), np.array([1.0, 1.0]), np.array([2.0, 2.0])
    )
    assert got.tolist() == [5.0, 3.0]
