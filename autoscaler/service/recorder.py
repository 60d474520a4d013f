"""``record``: subscribe to guest stats and write them to a recording as they arrive.

Both forms of guest stats are recorded: one guest's ``{prefix}/guest/{host}/{guest}/stats``, and
a host agent's ``{prefix}/host/{host}/batch`` (every guest of the host in one message). Rows are
buffered in memory and handed to
:class:`~autoscaler.recordings.recording.RecordingWriter` once a second, on a worker thread
(the writer may be busy writing a part file); the writer puts a complete Parquet part file on
disk every ``flush_interval_s``, so a crash loses at most a few seconds.
Bad messages (or a batch's bad guests) are counted and skipped, as in the controller. If the
writer cannot write (disk full), it keeps the rows and retries; the recorder stops only once
the writer's buffer is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import pyarrow as pa

from autoscaler.config import Settings
from autoscaler.recordings.recording import (
    RecordingError,
    RecordingWriteError,
    RecordingWriter,
    batch_to_table,
)
from autoscaler.service.lifecycle import every
from autoscaler.service.logs import CountedWarnings
from autoscaler.service.mqtt import MqttLink
from autoscaler.stats import STAT_NAMES, StatsSample
from autoscaler.wire import PayloadError, TopicKind, Topics, decode_batch, decode_guest_stats

log = logging.getLogger(__name__)


def sample_row(host: str, guest: str, sample: StatsSample) -> dict[str, Any]:
    """One recording row (see :mod:`autoscaler.recordings.recording`) for a validated sample."""
    row: dict[str, Any] = {
        "host": host,
        "guest": guest,
        "ts": sample.ts_s,
        "ram_bytes": int(sample.ram_bytes),
        "num_pages": None if sample.num_pages != sample.num_pages else int(sample.num_pages),
        "actual": None if sample.actual_pages != sample.actual_pages else int(sample.actual_pages),
    }
    for name, value in zip(STAT_NAMES, sample.values.tolist(), strict=True):
        row[name] = None if value != value else int(value)
    return row


class Recorder:
    def __init__(self, settings: Settings, out_dir: Path, *, flush_interval_s: float = 5.0) -> None:
        self.settings = settings
        self.writer = RecordingWriter(
            out_dir,
            source=f"balloon-autoscaler record from {settings.mqtt.host}:{settings.mqtt.port}",
            flush_interval_s=flush_interval_s,
        )
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.link = MqttLink(
            settings.mqtt,
            subscriptions=[(self.topics.guest_stats_filter(), 1), (self.topics.batch_filter(), 1)],
            on_message=self.handle_message,
            name="recorder",
        )
        # A deque: the event loop appends while drain() pops on a worker thread, and both are
        # atomic, so no row can slip between a swap and its use.
        self.rows: deque[dict[str, Any]] = deque()
        self.rejected: Counter[str] = Counter()
        """Rejected messages (or a batch's guests) by reason; updated on the event loop only."""
        self._rejections = CountedWarnings(log, self.rejected)
        # Its own: drain() runs on a worker thread, and counts only under the drain lock.
        self._drain_faults = CountedWarnings(log)
        # Serialises drains: the final one waits for one still running on a worker thread.
        self._drain_lock = threading.Lock()

    @property
    def unrecordable(self) -> int:
        """Valid samples the recording schema still refused."""
        return self._drain_faults.counts["unrecordable"]

    @property
    def write_errors(self) -> int:
        """Hand-overs to the writer that failed to write (the rows stayed buffered)."""
        return self._drain_faults.counts["write_errors"]

    @property
    def recorded(self) -> int:
        """Rows handed to the writer: written to part files or buffered for the next one."""
        return self.writer.rows_written + self.writer.buffered_rows

    def handle_message(self, topic: str, payload: bytes) -> None:
        samples: list[tuple[str, StatsSample | PayloadError]]
        try:
            kind, host, topic_guest = self.topics.parse(topic)
            if kind is TopicKind.GUEST_STATS:
                samples = [(topic_guest, decode_guest_stats(payload, now_s=time.time()))]
            elif kind is TopicKind.BATCH:
                samples = decode_batch(payload, now_s=time.time())
            else:
                raise PayloadError("bad_topic", f"unexpected topic {topic!r}")
        except PayloadError as exc:
            self._reject(exc.reason, str(exc))
            return
        for guest, sample in samples:
            if isinstance(sample, PayloadError):
                self._reject(sample.reason, f"{host}/{guest}: {sample}")
            else:
                self.rows.append(sample_row(host, guest, sample))

    def _reject(self, reason: str, message: str) -> None:
        self._rejections.warn(reason, "rejected message: %s", message, extra={"reason": reason})

    def drain(self) -> None:
        """Hand the buffered rows to the writer. Thread-safe; blocks while the writer flushes.

        Raises :class:`RecordingWriteError` only once the writer's buffer is full and it still
        cannot write; short of that the writer keeps the rows and retries on its own.
        """
        with self._drain_lock:
            rows = [self.rows.popleft() for _ in range(len(self.rows))]
            if not rows:
                return
            table = self._to_table(rows)
            try:
                self.writer.append(table)
            except RecordingWriteError as exc:
                # The rows are buffered in the writer all the same.
                if self.writer.buffered_rows >= self.writer.max_buffered_rows:
                    raise
                self._drain_faults.warn(
                    "write_errors", "recording is not being written, rows kept in memory: %s", exc
                )

    def _to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        """The rows as a recording table; a row the schema refuses is counted and dropped alone."""
        try:
            return batch_to_table(rows)
        except RecordingError:
            pass
        good: list[dict[str, Any]] = []
        for row in rows:
            try:
                batch_to_table([row])
            except RecordingError as exc:
                self._drain_faults.warn(
                    "unrecordable", "sample not recordable: %s", exc, extra={"guest": row["guest"]}
                )
            else:
                good.append(row)
        return batch_to_table(good)

    async def _drain_loop(self) -> None:
        # Off the event loop: the writer's lock may be held through a slow part-file write.
        await every(1.0, lambda: asyncio.to_thread(self.drain), delay_first=True)

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
            try:
                try:
                    self.drain()
                finally:
                    self.writer.close()  # tries a last flush, even after failed ones
            finally:
                log.info(
                    "recording closed",
                    extra={
                        "rows": self.recorded,
                        "rejected": dict(self.rejected),
                        "unrecordable": self.unrecordable,
                        "write_errors": self.write_errors,
                    },
                )
