"""The 16 stat tags and their device spellings."""

from __future__ import annotations

import math

import numpy as np

from autoscaler.stats import (
    CUMULATIVE_STATS,
    LIBVIRT_STAT_KEYS,
    QMP_STAT_KEYS,
    STAT_NAMES,
    UNSUPPORTED,
    available_memory_bytes,
    counter_rates,
    stats_from_libvirt,
    stats_from_qmp,
)


def test_names_are_the_kernel_tags_in_order() -> None:
    # include/uapi/linux/virtio_balloon.h, VIRTIO_BALLOON_S_NAMES, tags 0..15
    assert STAT_NAMES[0] == "swap-in"
    assert STAT_NAMES[4] == "free-memory"
    assert STAT_NAMES[10] == "oom-kills"
    assert STAT_NAMES[15] == "direct-reclaims"
    assert len(STAT_NAMES) == 16


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
