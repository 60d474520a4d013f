"""The MQTT wire contract: every topic and message round trip, every decoder's rejections."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from autoscaler.stats import STAT_NAMES, StatsSample
from autoscaler.wire import (
    MAX_BATCH_BYTES,
    PRESENCE_OFFLINE,
    HostStats,
    OnlinePresence,
    ParsedTopic,
    PayloadError,
    TargetCommand,
    TopicKind,
    Topics,
    decode_batch,
    decode_guest_stats,
    decode_host_stats,
    decode_presence,
    decode_target,
    encode_batch,
    encode_guest_stats,
    encode_host_stats,
    encode_presence,
    encode_target,
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


# -- topics --------------------------------------------------------------------------------------

TOPICS = Topics("balloon/v1")


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        (TOPICS.guest_stats("h-1", "vm.2"), ParsedTopic(TopicKind.GUEST_STATS, "h-1", "vm.2")),
        (TOPICS.target("h-1", "vm_2"), ParsedTopic(TopicKind.TARGET, "h-1", "vm_2")),
        (TOPICS.host_stats("h-1"), ParsedTopic(TopicKind.HOST_STATS, "h-1", "")),
        (TOPICS.batch("h-1"), ParsedTopic(TopicKind.BATCH, "h-1", "")),
        (TOPICS.presence("c1"), ParsedTopic(TopicKind.PRESENCE, "c1", "")),
    ],
)
def test_topics_round_trip(topic: str, parsed: ParsedTopic) -> None:
    assert TOPICS.parse(topic) == parsed


def test_topics_spell_the_contract() -> None:
    assert TOPICS.guest_stats("h", "g") == "balloon/v1/guest/h/g/stats"
    assert TOPICS.target("h", "g") == "balloon/v1/guest/h/g/target"
    assert TOPICS.host_stats("h") == "balloon/v1/host/h/stats"
    assert TOPICS.batch("h") == "balloon/v1/host/h/batch"
    assert TOPICS.presence("c") == "balloon/v1/controller/c/alive"
    assert TOPICS.guest_stats_filter() == "balloon/v1/guest/+/+/stats"
    assert TOPICS.target_filter() == "balloon/v1/guest/+/+/target"
    assert TOPICS.target_filter("h") == "balloon/v1/guest/h/+/target"
    assert TOPICS.host_stats_filter() == "balloon/v1/host/+/stats"
    assert TOPICS.batch_filter() == "balloon/v1/host/+/batch"
    assert TOPICS.presence_filter() == "balloon/v1/controller/+/alive"


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/guest/h/g/stats",  # another prefix
        "balloon/v1x/guest/h/g/stats",  # a prefix that only starts the same
        "balloon/v1",
        "balloon/v1/",
        "balloon/v1/guest/h/g/other",
        "balloon/v1/guest/h/stats",
        "balloon/v1/guest/h/x/y/stats",
        "balloon/v1/host/h/target",
        "balloon/v1/host/h/g/stats",
        "balloon/v1/controller/c/stats",
        "balloon/v1/controller/x/y/alive",
        "balloon/v1/other/h/stats",
        "balloon/v1/guest/bad host!/g/stats",  # invalid ids, in every position
        "balloon/v1/guest/h/g!/target",
        f"balloon/v1/guest/{'x' * 129}/g/stats",
        "balloon/v1/guest/+/g/stats",
        "balloon/v1/guest/h/../stats",
        "balloon/v1/host/h!/stats",
        "balloon/v1/host//batch",
        "balloon/v1/controller/./alive",
    ],
)
def test_bad_topics_are_rejected(topic: str) -> None:
    with pytest.raises(PayloadError) as info:
        TOPICS.parse(topic)
    assert info.value.reason == "bad_topic"
    assert repr(topic[:50])[:-1] in str(info.value)  # names the topic


# -- guest stats ---------------------------------------------------------------------------------


def test_wire_format_example_parses() -> None:
    sample = decode_guest_stats(orjson.dumps(GOOD), now_s=NOW)
    assert sample.ts_s == NOW
    assert sample.ram_bytes == 4 * 2**30
    assert sample.values[STAT_NAMES.index("available-memory")] == 3 * 2**30
    assert math.isnan(sample.values[STAT_NAMES.index("direct-scans")])
    assert sample.unknown_stats == 0


def test_unknown_stats_are_ignored_and_counted() -> None:
    payload = dict(GOOD, stats={**GOOD["stats"], "new-stat-from-2030": 5, "other": 1})  # type: ignore[dict-item]
    sample = decode_guest_stats(orjson.dumps(payload), now_s=NOW)
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
        (orjson.dumps(dict(GOOD, ram_bytes="4 GiB")), "wrong_type"),
        (orjson.dumps(dict(GOOD, num_pages=[0])), "wrong_type"),
        (orjson.dumps(dict(GOOD, ram_bytes=2**45, actual=2**32)), "bad_value"),
        (orjson.dumps(dict(GOOD, stats={"swap-in": 2**63 - 1})), "bad_value"),
        (
            orjson.dumps(dict(GOOD, stats={"total-memory": 2**30, "available-memory": 2**31})),
            "bad_value",
        ),
        (
            orjson.dumps(
                dict(
                    GOOD,
                    stats={
                        "free-memory": 3 * 2**30,
                        "disk-caches": 2**30,
                        "total-memory": 4 * 2**30 - 1,
                    },
                )
            ),
            "bad_value",
        ),
    ],
)
def test_bad_payloads_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_guest_stats(raw, now_s=NOW)
    assert info.value.reason == reason
    assert str(info.value)


def test_nan_and_infinity_are_rejected() -> None:
    raw = b'{"ts": NaN, "ram_bytes": 4096, "stats": {}}'
    with pytest.raises(PayloadError):
        decode_guest_stats(raw, now_s=NOW)


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


def test_stats_to_wire_leaves_missing_stats_out() -> None:
    values = np.full(16, np.nan)
    values[4] = 5
    values[10] = 0
    assert stats_to_wire(values) == {"free-memory": 5, "oom-kills": 0}


def test_guest_stats_round_trip() -> None:
    values = np.full(len(STAT_NAMES), np.nan)
    values[STAT_NAMES.index("free-memory")] = 2**30
    values[STAT_NAMES.index("oom-kills")] = 0
    raw = encode_guest_stats(NOW, 4 * 2**30, values, num_pages=10, actual_pages=8)
    assert orjson.loads(raw) == {
        "ts": NOW,
        "ram_bytes": 4 * 2**30,
        "num_pages": 10,
        "actual": 8,
        "stats": {"free-memory": 2**30, "oom-kills": 0},
    }
    sample = decode_guest_stats(raw, now_s=NOW)
    assert (sample.ts_s, sample.ram_bytes, sample.num_pages, sample.actual_pages) == (
        NOW,
        4 * 2**30,
        10,
        8,
    )
    np.testing.assert_array_equal(sample.values, values)
    unknown = decode_guest_stats(encode_guest_stats(NOW, 4096, values * 0), now_s=NOW)
    assert math.isnan(unknown.num_pages) and math.isnan(unknown.actual_pages)
    assert b"num_pages" not in encode_guest_stats(NOW, 4096, values)


# -- batch ---------------------------------------------------------------------------------------


def test_batch_round_trip() -> None:
    raw = encode_batch({"a": orjson.dumps(GOOD), "b": orjson.dumps(dict(GOOD, ts=NOW + 1))})
    assert orjson.loads(raw) == {"samples": {"a": GOOD, "b": dict(GOOD, ts=NOW + 1)}}
    decoded = decode_batch(raw, now_s=NOW)
    assert [guest for guest, _ in decoded] == ["a", "b"]
    assert all(isinstance(sample, StatsSample) for _, sample in decoded)
    assert [s.ts_s for _, s in decoded if isinstance(s, StatsSample)] == [NOW, NOW + 1]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b" " * (MAX_BATCH_BYTES + 1), "too_large"),
        (b"{", "invalid_json"),
        (b"[]", "wrong_type"),
        (b'{"samples": []}', "wrong_type"),
        (b"{}", "wrong_type"),
    ],
)
def test_bad_batches_are_rejected_whole(raw: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_batch(raw, now_s=NOW)
    assert info.value.reason == reason


def test_a_bad_guest_costs_only_its_own_sample() -> None:
    samples = {"ok": GOOD, "bad id!": GOOD, "x" * 300: GOOD, "no-ts": dict(GOOD, ts=None), "n": 1}
    decoded = dict(decode_batch(orjson.dumps({"samples": samples}), now_s=NOW))
    assert isinstance(decoded.pop("ok"), StatsSample)
    reasons = {guest: e.reason for guest, e in decoded.items() if isinstance(e, PayloadError)}
    assert reasons == {
        "bad id!": "bad_topic",
        "x" * 200: "bad_topic",  # cut short: ids come from the network
        "no-ts": "missing_field",
        "n": "wrong_type",
    }


# -- host stats ----------------------------------------------------------------------------------

HOST = {"ts": NOW, "mem_total_bytes": 64 * 2**30, "mem_available_bytes": 20 * 2**30}


def test_host_stats_round_trip() -> None:
    raw = encode_host_stats(NOW, 64 * 2**30, 20 * 2**30)
    assert orjson.loads(raw) == HOST
    assert decode_host_stats(raw) == HostStats(NOW, 64 * 2**30, 20 * 2**30)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b" " * (64 * 1024 + 1), "too_large"),
        (b"{", "invalid_json"),
        (b"[]", "wrong_type"),
        *[
            (orjson.dumps({k: v for k, v in HOST.items() if k != key}), "missing_field")
            for key in HOST
        ],
        *[(orjson.dumps(dict(HOST, **{key: "1"})), "wrong_type") for key in HOST],
        *[(orjson.dumps(dict(HOST, **{key: True})), "wrong_type") for key in HOST],
        *[(orjson.dumps(dict(HOST, **{key: -1})), "bad_value") for key in HOST],
        (b'{"ts": 1, "mem_total_bytes": Infinity, "mem_available_bytes": 1}', "invalid_json"),
        (orjson.dumps(dict(HOST, mem_total_bytes=0, mem_available_bytes=0)), "bad_value"),
        (orjson.dumps(dict(HOST, mem_available_bytes=65 * 2**30)), "bad_value"),
    ],
)
def test_bad_host_stats_are_rejected(raw: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_host_stats(raw)
    assert info.value.reason == reason


# -- target command ------------------------------------------------------------------------------


def test_target_round_trip() -> None:
    raw = encode_target(NOW, 131072, "threshold", "available 62% > high watermark")
    assert orjson.loads(raw) == {
        "ts": NOW,
        "num_pages": 131072,
        "policy": "threshold",
        "reason": "available 62% > high watermark",
    }
    assert decode_target(raw) == TargetCommand(
        NOW, 131072, "threshold", "available 62% > high watermark"
    )
    assert decode_target(encode_target(0, 2**32 - 1, "", "")).num_pages == 2**32 - 1


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{nope", "invalid_json"),
        (b"[1]", "wrong_type"),
        (b'{"ts": 1, "num_pages": 1, "policy": "p"}', "missing_field"),
        (b'{"ts": 1, "num_pages": -1, "policy": "p", "reason": "r"}', "bad_value"),
        (b'{"ts": 1, "num_pages": 4294967296, "policy": "p", "reason": "r"}', "bad_value"),
        (b'{"ts": 1, "num_pages": 1.5, "policy": "p", "reason": "r"}', "wrong_type"),
        (b'{"ts": 1, "num_pages": true, "policy": "p", "reason": "r"}', "wrong_type"),
        (b'{"ts": "x", "num_pages": 1, "policy": "p", "reason": "r"}', "wrong_type"),
        (b'{"ts": 1, "num_pages": 1, "policy": 3, "reason": "r"}', "wrong_type"),
        (b" " * (65 * 1024), "too_large"),
        (b'{"ts": null, "num_pages": 1, "policy": "p", "reason": "r"}', "missing_field"),
        (b'{"ts": -1, "num_pages": 1, "policy": "p", "reason": "r"}', "bad_value"),
        (b'{"ts": 1, "num_pages": 1, "policy": "p", "reason": null}', "wrong_type"),
    ],
)
def test_target_validation(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as raised:
        decode_target(payload)
    assert raised.value.reason == reason


# -- presence ------------------------------------------------------------------------------------

ONLINE = {"state": "online", "ts": NOW, "ttl_s": 30.0}


def test_presence_round_trip() -> None:
    raw = encode_presence(NOW, 30.0)
    assert orjson.loads(raw) == ONLINE
    assert decode_presence(raw) == OnlinePresence(NOW, 30.0)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (PRESENCE_OFFLINE, "offline"),
        (b"online", "invalid_json"),
        (b"[]", "wrong_type"),
        (b" " * (64 * 1024 + 1), "too_large"),
        (orjson.dumps(dict(ONLINE, state="offline")), "bad_value"),
        (orjson.dumps({k: v for k, v in ONLINE.items() if k != "state"}), "bad_value"),
        (orjson.dumps({k: v for k, v in ONLINE.items() if k != "ts"}), "missing_field"),
        (orjson.dumps({k: v for k, v in ONLINE.items() if k != "ttl_s"}), "missing_field"),
        (orjson.dumps(dict(ONLINE, ts="now")), "wrong_type"),
        (orjson.dumps(dict(ONLINE, ttl_s=True)), "wrong_type"),
        (orjson.dumps(dict(ONLINE, ttl_s=-1)), "bad_value"),
        (orjson.dumps(dict(ONLINE, ttl_s=0)), "bad_value"),
        (orjson.dumps(dict(ONLINE, ttl_s=3601)), "bad_value"),
    ],
)
def test_bad_presences_are_rejected(raw: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_presence(raw)
    assert info.value.reason == reason
