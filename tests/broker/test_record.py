"""``record`` against a real mosquitto: what is published is what lands in the recording."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import aiomqtt
import orjson

from autoscaler.config import load_settings
from autoscaler.recordings.recording import read_recording
from autoscaler.service.recorder import Recorder
from tests.helpers import Broker, poll_until, running


async def test_records_valid_samples_and_counts_bad_ones(mosquitto: Broker, tmp_path: Path) -> None:
    prefix = f"rec-{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        None, mqtt={"host": mosquitto.host, "port": mosquitto.port, "topic_prefix": prefix}
    )
    recorder = Recorder(settings, tmp_path / "rec", flush_interval_s=0.5)
    now = time.time()
    async with running(recorder):
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            for k in range(3):
                for guest in ("a", "b"):
                    payload = {
                        "ts": now + k,
                        "ram_bytes": 2**32,
                        "actual": 10,
                        "stats": {"free-memory": 2**30, "oom-kills": k},
                    }
                    topic = f"{prefix}/guest/h1/{guest}/stats"
                    await pub.publish(topic, orjson.dumps(payload), qos=1)
            await pub.publish(f"{prefix}/guest/h1/a/stats", b"garbage", qos=1)
        await poll_until(
            lambda: recorder.recorded + len(recorder.rows) >= 6, 10, what="six recorded samples"
        )

    table = read_recording(tmp_path / "rec").sort_by([("guest", "ascending"), ("ts", "ascending")])
    assert table.num_rows == 6
    assert table.column("guest").to_pylist() == ["a"] * 3 + ["b"] * 3
    assert table.column("oom-kills").to_pylist() == [0, 1, 2, 0, 1, 2]
    assert table.column("actual").to_pylist() == [10] * 6
    assert table.column("swap-in").null_count == 6
    assert recorder.rejected["invalid_json"] == 1
