"""``record`` and the recording writer under faults: batches, extreme stats, a failing disk."""

from __future__ import annotations

import asyncio
import errno
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import orjson
import pytest

from autoscaler.config import Settings, load_settings
from autoscaler.recordings import recording
from autoscaler.recordings.recording import (
    RecordingError,
    RecordingWriteError,
    RecordingWriter,
    batch_to_table,
    read_recording,
)
from autoscaler.service.recorder import Recorder
from autoscaler.stats import (
    MAX_STAT_VALUE,
    STAT_NAMES,
    stats_from_firecracker,
    stats_from_libvirt,
    stats_from_qmp,
)
from autoscaler.wire import PayloadError, decode_guest_stats, stats_to_wire
from tests.helpers import Broker

GIB = 1 << 30


def settings_for(host: str = "127.0.0.1", port: int = 1883, prefix: str = "rec") -> Settings:
    return load_settings(None, mqtt={"host": host, "port": port, "topic_prefix": prefix})


def payload(ts: float, **stats: int) -> dict[str, object]:
    return {"ts": ts, "ram_bytes": 8 * GIB, "actual": 10, "stats": stats}


def row(**fields: object) -> dict[str, object]:
    return {"host": "h1", "guest": "g1", "ts": 1000.0, "ram_bytes": 4 * GIB, **fields}


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(0.01)


def fail_writes(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """Make the next ``times`` part-file writes fail with ENOSPC; returns the failure count."""
    real = recording._write_parquet_atomically
    failures: list[int] = []

    def write(*args: Any, **kwargs: Any) -> None:
        if len(failures) < times:
            failures.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(recording, "_write_parquet_atomically", write)
    return failures


# --- 1. host agents' batches are recorded ------------------------------------------------------


async def test_records_host_batches(mosquitto: Broker, tmp_path: Path) -> None:
    prefix = f"rec-{uuid.uuid4().hex[:8]}"
    recorder = Recorder(
        settings_for(mosquitto.host, mosquitto.port, prefix), tmp_path / "rec", flush_interval_s=0.5
    )
    stop = asyncio.Event()
    task = asyncio.create_task(recorder.run(stop))
    await asyncio.wait_for(recorder.link.connected.wait(), 10)
    now = time.time()
    batch = {
        "samples": {
            "g1": payload(now, **{"oom-kills": 1}),
            "g2": payload(now, **{"oom-kills": 2}),
            "g3": {"ram_bytes": 8 * GIB, "stats": {}},  # no ts: this guest alone is rejected
            "bad id!": payload(now),
        }
    }
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        await pub.publish(f"{prefix}/host/h2/batch", orjson.dumps(batch), qos=1)
        await pub.publish(f"{prefix}/guest/h1/a/stats", orjson.dumps(payload(now)), qos=1)
        await pub.publish(f"{prefix}/host/h3/batch", b"[]", qos=1)
    deadline = time.monotonic() + 10
    while recorder.recorded + len(recorder.rows) < 3 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)

    table = read_recording(tmp_path / "rec").sort_by(
        [("host", "ascending"), ("guest", "ascending")]
    )
    assert list(
        zip(table.column("host").to_pylist(), table.column("guest").to_pylist(), strict=True)
    ) == [
        ("h1", "a"),
        ("h2", "g1"),
        ("h2", "g2"),
    ]
    assert table.column("oom-kills").to_pylist() == [None, 1, 2]
    assert recorder.recorded == 3
    assert recorder.rejected == {"missing_field": 1, "bad_topic": 1, "wrong_type": 1}


def test_unexpected_topic_is_counted(tmp_path: Path) -> None:
    recorder = Recorder(settings_for(), tmp_path / "rec")
    try:
        recorder.handle_message("rec/host/h1/stats", orjson.dumps(payload(time.time())))
        recorder.handle_message("rec/host/bad id/batch", b"{}")
        assert recorder.rejected == {"bad_topic": 2}
        assert not recorder.rows
    finally:
        recorder.writer.close()


# --- 2. stats at the int64 limit -------------------------------------------------------------


def test_stat_bound_survives_float64_and_int64() -> None:
    assert MAX_STAT_VALUE == 2**63 - 1024
    assert int(float(MAX_STAT_VALUE)) == MAX_STAT_VALUE
    now = time.time()
    sample = decode_guest_stats(
        orjson.dumps(payload(now, **{"swap-in": MAX_STAT_VALUE})), now_s=now
    )
    assert stats_to_wire(sample.values)["swap-in"] == MAX_STAT_VALUE
    for too_big in (MAX_STAT_VALUE + 1, 2**63 - 1):
        with pytest.raises(PayloadError) as excinfo:
            decode_guest_stats(orjson.dumps(payload(now, **{"swap-in": too_big})), now_s=now)
        assert excinfo.value.reason == "bad_value"


def test_recorder_records_the_largest_stat(tmp_path: Path) -> None:
    recorder = Recorder(settings_for(), tmp_path / "rec", flush_interval_s=60)
    recorder.handle_message(
        "rec/guest/h1/g1/stats", orjson.dumps(payload(time.time(), **{"swap-in": MAX_STAT_VALUE}))
    )
    recorder.handle_message(
        "rec/guest/h1/g2/stats", orjson.dumps(payload(time.time(), **{"swap-in": 2**63 - 1}))
    )
    recorder.drain()
    recorder.writer.close()
    assert recorder.rejected == {"bad_value": 1}
    assert read_recording(tmp_path / "rec").column("swap-in").to_pylist() == [MAX_STAT_VALUE]


def test_overflowing_value_is_a_recording_error() -> None:
    with pytest.raises(RecordingError, match="swap-in"):
        batch_to_table([row(**{"swap-in": 2**63})])


def test_unrecordable_row_costs_only_itself(tmp_path: Path) -> None:
    recorder = Recorder(settings_for(), tmp_path / "rec", flush_interval_s=60)
    recorder.rows.extend([row(ts=1.0), row(ts=2.0, **{"swap-in": 2**63}), row(ts=3.0)])
    recorder.drain()  # must not raise, nor lose the good rows
    recorder.writer.close()
    assert recorder.unrecordable == 1
    assert read_recording(tmp_path / "rec").column("ts").to_pylist() == [1.0, 3.0]


# --- 3. disk-caches larger than RAM ------------------------------------------------------------


def test_disk_caches_larger_than_ram_is_rejected() -> None:
    now = time.time()
    raw = orjson.dumps(payload(now, **{"disk-caches": 2**62}))
    with pytest.raises(PayloadError) as excinfo:
        decode_guest_stats(raw, now_s=now)
    assert excinfo.value.reason == "bad_value"
    ok = decode_guest_stats(orjson.dumps(payload(now, **{"disk-caches": 4 * GIB})), now_s=now)
    assert ok.values[STAT_NAMES.index("disk-caches")] == 4 * GIB


# --- 4. one bound for every device adapter ----------------------------------------------------


@pytest.mark.parametrize(
    ("convert", "raw"),
    [
        (stats_from_qmp, {"stats": {"stat-free-memory": GIB, "stat-swap-in": 2**64 - 2}}),
        (stats_from_qmp, {"stats": {"stat-free-memory": GIB, "stat-swap-in": 2**63 - 1}}),
        (stats_from_libvirt, {"unused": GIB // 1024, "swap_in": 2**62}),  # KiB: 2^72 bytes
        (stats_from_libvirt, {"unused": GIB // 1024, "swap_in": -1}),
        (stats_from_firecracker, {"free_memory": GIB, "swap_in": 2**63 - 1}),
        (stats_from_firecracker, {"free_memory": GIB, "swap_in": 2**64 - 1}),
    ],
)
def test_out_of_range_device_stat_is_missing_alone(
    convert: Callable[[Any], np.ndarray], raw: dict[str, Any]
) -> None:
    values = convert(raw)
    assert math.isnan(values[STAT_NAMES.index("swap-in")])
    assert values[STAT_NAMES.index("free-memory")] == GIB
    # What the agent publishes from these values is accepted by the controller.
    now = time.time()
    wire = {"ts": now, "ram_bytes": 8 * GIB, "stats": stats_to_wire(values)}
    sample = decode_guest_stats(orjson.dumps(wire), now_s=now)
    assert sample.values[STAT_NAMES.index("free-memory")] == GIB


def test_device_stat_at_the_bound_is_kept() -> None:
    assert stats_from_qmp({"stat-swap-in": MAX_STAT_VALUE})[0] == MAX_STAT_VALUE
    assert stats_from_firecracker({"swap_in": MAX_STAT_VALUE})[0] == MAX_STAT_VALUE
    assert stats_from_libvirt({"swap_in": MAX_STAT_VALUE // 1024})[0] == (
        MAX_STAT_VALUE // 1024 * 1024
    )


# --- 5. a failed flush is retried, and close() tries a last one -------------------------------


def test_background_flush_is_retried_after_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = fail_writes(monkeypatch, times=1)
    writer = RecordingWriter(tmp_path / "rec", source="s", flush_interval_s=0.05)
    writer.append([row(ts=1.0), row(ts=2.0)])
    wait_for(lambda: writer.parts_written == 1)
    assert failures == [1]
    writer.append([row(ts=3.0)])  # usable again: no error left over
    writer.close()
    assert read_recording(tmp_path / "rec").column("ts").to_pylist() == [1.0, 2.0, 3.0]


def test_close_tries_a_last_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_writes(monkeypatch, times=1)
    writer = RecordingWriter(
        tmp_path / "rec", source="s", flush_interval_s=None, max_buffered_rows=2
    )
    with pytest.raises(RecordingWriteError, match="No space left"):
        writer.append([row(ts=1.0), row(ts=2.0)])  # the size-triggered flush fails
    assert writer.buffered_rows == 2  # kept
    writer.close()  # the disk has room again: no error, nothing lost
    assert read_recording(tmp_path / "rec").column("ts").to_pylist() == [1.0, 2.0]


def test_close_after_a_failed_last_flush_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_writes(monkeypatch, times=1)
    writer = RecordingWriter(tmp_path / "rec", source="s", flush_interval_s=None)
    writer.append([row()])
    with pytest.raises(RecordingWriteError, match="1 rows not written"):
        writer.close()
    writer.close()
    writer.close()
    assert read_recording(tmp_path / "rec").num_rows == 1


def test_recorder_survives_a_transient_write_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = fail_writes(monkeypatch, times=2)
    recorder = Recorder(settings_for(), tmp_path / "rec", flush_interval_s=0.05)
    recorder.rows.append(row(ts=1.0))
    recorder.drain()
    wait_for(lambda: recorder.writer._flush_error is not None)
    recorder.rows.append(row(ts=2.0))
    recorder.drain()  # the writer reports the failure; the recorder carries on
    assert recorder.write_errors == 1
    wait_for(lambda: recorder.writer.parts_written == 1)
    assert len(failures) == 2
    recorder.writer.close()
    assert recorder.recorded == 2
    assert read_recording(tmp_path / "rec").column("ts").to_pylist() == [1.0, 2.0]


# --- 6. a slow disk does not freeze the event loop ---------------------------------------------


async def test_drain_does_not_block_the_event_loop(tmp_path: Path) -> None:
    recorder = Recorder(settings_for(), tmp_path / "rec", flush_interval_s=60)
    recorder.rows.append(row())
    # The writer's lock held as through a slow part-file write: the drain at t = 1 s waits.
    recorder.writer._lock.acquire()
    release = threading.Timer(2.5, recorder.writer._lock.release)
    release.start()
    drain = asyncio.create_task(recorder._drain_loop())
    try:
        longest = 0.0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            longest = max(longest, time.monotonic() - before)
        assert longest < 0.5
        await asyncio.wait_for(asyncio.to_thread(release.join), 5)
        deadline = time.monotonic() + 5
        while recorder.recorded < 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert recorder.recorded == 1
    finally:
        release.cancel()
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
        recorder.writer.close()
