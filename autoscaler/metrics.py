"""Prometheus metrics of a controller, served on ``metrics.port``.

Per-message counters stay plain Python counters on the controller; this collector turns them
into Prometheus metrics only when scraped, so ingest pays nothing for being observed. The tick
duration is a real histogram, observed once per tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from autoscaler.stats import PAGE_BYTES

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from autoscaler.controller import Controller

log = logging.getLogger(__name__)
NS: Final = "balloon_autoscaler"

# Ticks take about a millisecond at 1,000 guests and tens of ms at 100,000.
TICK_BUCKETS_S: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ControllerCollector(Collector):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def collect(self) -> Iterator[Metric]:
        c = self.controller
        counters = c.counters
        adapter = c.settings.adapter.kind

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{NS}_{name}", doc, value=value)

        yield counter("messages", "Stats messages received.", counters["messages"])
        yield counter("samples_ingested", "Guest samples stored.", counters["ingested"])
        rejected = CounterMetricFamily(
            f"{NS}_messages_rejected", "Messages rejected, by reason.", labels=["reason"]
        )
        for reason, count in sorted(c.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield counter("unknown_stats", "Unknown stat names ignored.", counters["unknown_stats"])
        yield counter(
            "guest_reboots", "Guest reboots seen (counters going down).", counters["guest_reboots"]
        )
        yield GaugeMetricFamily(f"{NS}_guests", "Guests tracked.", value=len(c.fleet))
        targets = CounterMetricFamily(
            f"{NS}_targets", "Balloon targets sent to the adapter.", labels=["adapter", "result"]
        )
        targets.add_metric([adapter, "applied"], counters["targets_applied"])
        targets.add_metric([adapter, "failed"], counters["targets_failed"])
        yield targets
        errors = CounterMetricFamily(
            f"{NS}_adapter_errors", "Adapter errors, by type.", labels=["adapter", "error"]
        )
        for kind, count in sorted(c.adapter_errors.items()):
            errors.add_metric([adapter, kind], count)
        yield errors
        yield counter("emergency_deflates", "Emergency deflates.", counters["emergency_deflates"])
        yield counter(
            "policy_errors", "Ticks held because the policy failed.", counters["policy_errors"]
        )
        decisions = CounterMetricFamily(
            f"{NS}_decisions", "Target changes applied, by policy.", labels=["policy"]
        )
        for policy, count in sorted(c.decisions.items()):
            decisions.add_metric([policy], count)
        yield decisions
        fleet = c.fleet
        active = fleet.active
        balloon = np.nan_to_num(fleet.actual_pages[active]) * float(PAGE_BYTES)
        yield GaugeMetricFamily(
            f"{NS}_memory_reclaimed_bytes",
            "Memory held in balloons across tracked guests.",
            value=float(balloon.sum()),
        )
        yield GaugeMetricFamily(
            f"{NS}_memory_provisioned_bytes",
            "Boot RAM of tracked guests.",
            value=float(np.nansum(fleet.ram_bytes[active])),
        )
        yield GaugeMetricFamily(
            f"{NS}_mqtt_connected",
            "1 while connected to the broker.",
            value=float(c.link.connected.is_set()),
        )
        yield counter("mqtt_reconnects", "Broker connections lost.", c.link.disconnects)


class Metrics:
    """A registry for one controller, and the HTTP endpoint when ``metrics.port`` is set."""

    def __init__(self, controller: Controller) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ControllerCollector(controller))
        self.tick_duration = Histogram(
            f"{NS}_tick_duration_seconds",
            "Duration of a control tick (policy + guards), without the adapter calls.",
            buckets=TICK_BUCKETS_S,
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, addr: str) -> None:
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
