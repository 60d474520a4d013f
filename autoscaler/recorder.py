"""``record``: subscribe to guest stats and write them to a recording as they arrive.

Rows are buffered in memory and handed to :class:`~autoscaler.recording.RecordingWriter` once a
second; the writer puts a complete Parquet part file on disk every ``flush_interval_s``, so a
crash loses at most a few seconds. Bad messages are counted and skipped, as in the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

from autoscaler.config import Settings
from autoscaler.logs import RateLimiter
from autoscaler.mqtt import MqttLink
from autoscaler.recording import RecordingWriter
from autoscaler.stats import STAT_NAMES, PayloadError, parse_stats_payload, split_guest_ids

log = logging.getLogger(__name__)
SUFFIX: Final = "/stats"


class Recorder:
    def __init__(self, settings: Settings, out_dir: Path, *, flush_interval_s: float = 5.0) -> None:
        self.settings = settings
        self.writer = RecordingWriter(
            out_dir,
            source=f"balloon-autoscaler record from {settings.mqtt.host}:{settings.mqtt.port}",
            flush_interval_s=flush_interval_s,
        )
        prefix = settings.mqtt.topic_prefix
        self._prefix = f"{prefix}/guest/"
        self.link = MqttLink(
            settings.mqtt,
            subscriptions=[(f"{prefix}/guest/+/+/stats", 1)],
            on_message=self.handle_message,
            name="recorder",
        )
        self.rows: list[dict[str, Any]] = []
        self.recorded = 0
        self.rejected: Counter[str] = Counter()
        self._rate_limit = RateLimiter(10.0)

    def handle_message(self, topic: str, payload: bytes) -> None:
        try:
            if not (topic.startswith(self._prefix) and topic.endswith(SUFFIX)):
                raise PayloadError("bad_topic", f"unexpected topic {topic!r}")
            host, guest = split_guest_ids(topic[len(self._prefix) : -len(SUFFIX)])
            sample = parse_stats_payload(payload, now_s=time.time())
        except PayloadError as exc:
            self.rejected[exc.reason] += 1
            if self._rate_limit.allow(exc.reason) is not None:
                log.warning("rejected message: %s", exc, extra={"reason": exc.reason})
            return
        row: dict[str, Any] = {
            "host": host,
            "guest": guest,
            "ts": sample.ts_s,
            "ram_bytes": int(sample.ram_bytes),
            "num_pages": None if sample.num_pages != sample.num_pages else int(sample.num_pages),
            "actual": None
            if sample.actual_pages != sample.actual_pages
            else int(sample.actual_pages),
        }
        for name, value in zip(STAT_NAMES, sample.values.tolist(), strict=True):
            row[name] = None if value != value else int(value)
        self.rows.append(row)

    def drain(self) -> None:
        if self.rows:
            rows, self.rows = self.rows, []
            self.writer.append(rows)
            self.recorded += len(rows)

    async def _drain_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.drain()

    async def run(self, stop: asyncio.Event, duration_s: float | None = None) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                link = group.create_task(self.link.run(), name="mqtt")
                drain = group.create_task(self._drain_loop(), name="drain")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), duration_s)
                link.cancel()
                drain.cancel()
        finally:
            self.drain()
            self.writer.close()
            log.info(
                "recording closed",
                extra={"rows": self.recorded, "rejected": dict(self.rejected)},
            )
