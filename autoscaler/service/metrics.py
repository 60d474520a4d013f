"""Prometheus metrics of a controller, served on ``metrics.port``.

Per-message counters stay plain Python counters in the controller's :class:`ControllerStats`;
this module turns them into Prometheus metrics only when scraped, so ingest pays nothing for
being observed. The tick duration is a real histogram, observed once per tick. This module
knows nothing of the controller: it is handed the stats, the fleet and the broker link.

Threads. prometheus_client serves ``/metrics`` from a thread of its own, while the event loop
keeps changing the fleet's numpy columns (setting ``active`` per message, reallocating every
column when the fleet grows) and the counters. Reading those from the HTTP thread gives wrong
sums at best and corrupts the heap at worst. So the collector never touches them: the
controller builds a :class:`MetricsSnapshot` (plain numbers and copied dicts) on the event
loop after every tick and every ``SNAPSHOT_INTERVAL_S``, and the collector reads that one
reference, which CPython replaces atomically.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from autoscaler.stats import PAGE_BYTES

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from autoscaler.fleet import Fleet
    from autoscaler.service.mqtt import MqttLink

log = logging.getLogger(__name__)
NS: Final = "balloon_autoscaler"

# Ticks take about a millisecond at 1,000 guests and tens of ms at 100,000.
TICK_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SNAPSHOT_INTERVAL_S: Final = 1.0
"""How stale a scrape may be between ticks; a snapshot costs about a millisecond at 100,000
guests."""


def _frozen(counts: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(counts))


@dataclass(slots=True)
class ControllerStats:
    """The counters a controller keeps; changed and read on the event loop only."""

    counters: Counter[str] = field(default_factory=Counter)
    """Events by name: ``messages``, ``ingested``, ``targets_applied`` …"""
    rejected: Counter[str] = field(default_factory=Counter)
    """Messages (or a batch's guests) rejected, by reason."""
    adapter_errors: Counter[str] = field(default_factory=Counter)
    """Targets the adapter failed to apply, by error type."""
    decisions: Counter[str] = field(default_factory=Counter)
    """Target changes applied, by policy."""


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What a scrape reports, taken on the event loop: nothing in it is shared with the loop."""

    adapter: str = ""
    counters: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    rejected: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    adapter_errors: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    decisions: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    guests: int = 0
    reclaimed_bytes: float = 0.0
    provisioned_bytes: float = 0.0
    mqtt_connected: bool = False
    mqtt_reconnects: int = 0

    @classmethod
    def of(
        cls, stats: ControllerStats, fleet: Fleet, link: MqttLink, *, adapter: str
    ) -> MetricsSnapshot:
        """A controller's numbers now, labelled with its ``adapter`` kind. Call on the event
        loop only."""
        active = fleet.active
        return cls(
            adapter=adapter,
            counters=_frozen(stats.counters),
            rejected=_frozen(stats.rejected),
            adapter_errors=_frozen(stats.adapter_errors),
            decisions=_frozen(stats.decisions),
            guests=len(fleet),
            reclaimed_bytes=float(np.nansum(fleet.actual_pages[active])) * PAGE_BYTES,
            provisioned_bytes=float(np.nansum(fleet.ram_bytes[active])),
            mqtt_connected=link.connected.is_set(),
            mqtt_reconnects=link.disconnects,
        )


class SnapshotCollector(Collector):
    """Prometheus metrics from the latest :class:`MetricsSnapshot`; safe on any thread."""

    def __init__(self) -> None:
        self.snapshot = MetricsSnapshot()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot  # one read: every metric of a scrape comes from the same snapshot
        counters = s.counters

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{NS}_{name}", doc, value=value)

        def by_label(
            name: str, doc: str, label: str, counts: Mapping[str, int], *, per_adapter: bool = True
        ) -> CounterMetricFamily:
            """One counter per key of ``counts``, labelled ``label`` (and the adapter's kind)."""
            labels, values = (["adapter", label], [s.adapter]) if per_adapter else ([label], [])
            family = CounterMetricFamily(f"{NS}_{name}", doc, labels=labels)
            for key, count in sorted(counts.items()):
                family.add_metric([*values, key], count)
            return family

        yield counter("messages", "Stats messages received.", counters.get("messages", 0))
        yield counter("samples_ingested", "Guest samples stored.", counters.get("ingested", 0))
        yield by_label(
            "messages_rejected",
            "Messages rejected, by reason.",
            "reason",
            s.rejected,
            per_adapter=False,
        )
        yield counter(
            "unknown_stats", "Unknown stat names ignored.", counters.get("unknown_stats", 0)
        )
        yield counter(
            "guest_reboots",
            "Guest reboots seen (counters going down).",
            counters.get("guest_reboots", 0),
        )
        yield GaugeMetricFamily(f"{NS}_guests", "Guests tracked.", value=s.guests)
        yield by_label(
            "targets",
            "Balloon targets sent to the adapter.",
            "result",
            {
                "applied": counters.get("targets_applied", 0),
                "failed": counters.get("targets_failed", 0),
            },
        )
        yield by_label("adapter_errors", "Adapter errors, by type.", "error", s.adapter_errors)
        yield counter(
            "emergency_deflates", "Emergency deflates.", counters.get("emergency_deflates", 0)
        )
        yield counter(
            "policy_errors",
            "Ticks held because the policy failed.",
            counters.get("policy_errors", 0),
        )
        yield by_label(
            "decisions",
            "Target changes applied, by policy.",
            "policy",
            s.decisions,
            per_adapter=False,
        )
        yield GaugeMetricFamily(
            f"{NS}_memory_reclaimed_bytes",
            "Memory held in balloons across tracked guests.",
            value=s.reclaimed_bytes,
        )
        yield GaugeMetricFamily(
            f"{NS}_memory_provisioned_bytes",
            "Boot RAM of tracked guests.",
            value=s.provisioned_bytes,
        )
        yield GaugeMetricFamily(
            f"{NS}_mqtt_connected",
            "1 while connected to the broker.",
            value=float(s.mqtt_connected),
        )
        yield counter("mqtt_reconnects", "Broker connections lost.", s.mqtt_reconnects)


class Metrics:
    """A registry for one controller, and the HTTP endpoint when ``metrics.port`` is set."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._collector = SnapshotCollector()
        self.registry.register(self._collector)
        self.tick_duration = Histogram(  # prometheus_client's own metrics are thread-safe
            f"{NS}_tick_duration_seconds",
            "Duration of a control tick (policy + guards), without the adapter calls.",
            buckets=TICK_BUCKETS_S,
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def publish(self, snapshot: MetricsSnapshot) -> None:
        """Make ``snapshot`` what the next scrape reports."""
        self._collector.snapshot = snapshot

    def serve(self, port: int, addr: str) -> None:
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
