"""The Prometheus endpoint of a running controller, scraped over HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
import uuid

import aiomqtt
import orjson

from tests.helpers import Broker, metered_controller, poll_until, running

GIB = 2**30


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_metrics_count_ingest_rejects_targets_and_ticks(mosquitto: Broker) -> None:
    prefix = f"metrics-{uuid.uuid4().hex[:8]}"
    controller, port = metered_controller(mosquitto, prefix)
    now = time.time()
    async with running(controller):
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            for k in range(2):
                payload = {
                    "ts": now - 5 + k,
                    "ram_bytes": 4 * GIB,
                    "actual": 0,
                    "stats": {"total-memory": 4 * GIB, "available-memory": 3 * GIB},
                }
                await pub.publish(f"{prefix}/guest/h/idle/stats", orjson.dumps(payload), qos=1)
            await pub.publish(f"{prefix}/guest/h/idle/stats", b"nope", qos=1)
            await pub.publish(f"{prefix}/guest/h/idle/stats", b"[]", qos=1)
        await poll_until(
            lambda: controller.counters["targets_applied"] >= 1, 10, what="a target applied"
        )
        samples = await asyncio.to_thread(scrape, port)

    assert samples["balloon_autoscaler_samples_ingested_total"] == 2
    assert samples['balloon_autoscaler_messages_rejected_total{reason="invalid_json"}'] == 1
    assert samples['balloon_autoscaler_messages_rejected_total{reason="wrong_type"}'] == 1
    assert samples["balloon_autoscaler_guests"] == 1
    assert samples['balloon_autoscaler_targets_total{adapter="dry-run",result="applied"}'] == 1
    assert samples['balloon_autoscaler_decisions_total{policy="threshold"}'] == 1
    assert samples["balloon_autoscaler_tick_duration_seconds_count"] >= 1
    assert samples["balloon_autoscaler_mqtt_connected"] == 1
    assert samples["balloon_autoscaler_memory_provisioned_bytes"] == 4 * GIB


def batch(ts: float, guests: range) -> bytes:
    sample = {
        "ts": ts,
        "ram_bytes": 4 * GIB,
        "actual": 1024,
        "stats": {"total-memory": 4 * GIB, "available-memory": 3 * GIB},
    }
    return orjson.dumps({"samples": {f"vm{i:06d}": sample for i in guests}})


class Scraper(threading.Thread):
    """Scrapes ``/metrics`` back to back until stopped, keeping every result or error."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.results: list[dict[str, float]] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.results.append(scrape(self.port))
            except Exception as exc:  # an HTTP 500 from a failed collect, a reset connection
                self.errors.append(exc)
            self.stop.wait(0.005)


async def test_scrapes_while_guests_register_are_consistent(mosquitto: Broker) -> None:
    """The collector runs on the HTTP server's thread while ingest grows the fleet's columns:
    every scrape must succeed and describe one moment of the fleet."""
    prefix = f"metrics-{uuid.uuid4().hex[:8]}"
    controller, port = metered_controller(mosquitto, prefix)
    hosts, per_host = 40, 1000
    scraper = Scraper(port)
    async with running(controller):
        scraper.start()
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            for h in range(hosts):
                guests = range(h * per_host, (h + 1) * per_host)
                await pub.publish(f"{prefix}/host/h{h}/batch", batch(time.time(), guests), qos=1)
        await poll_until(
            lambda: (
                bool(scraper.results)
                and scraper.results[-1]["balloon_autoscaler_guests"] == hosts * per_host
            ),
            30,
            what="a scrape showing every guest",
            last_seen=lambda: len(controller.fleet),
        )
        scraper.stop.set()
        await asyncio.to_thread(scraper.join)

    assert scraper.errors == []
    seen = [s["balloon_autoscaler_guests"] for s in scraper.results]
    assert seen == sorted(seen)  # no scrape goes back in time
    for s in scraper.results:
        count = s["balloon_autoscaler_guests"]
        assert s["balloon_autoscaler_memory_provisioned_bytes"] == count * 4 * GIB
        assert s["balloon_autoscaler_memory_reclaimed_bytes"] == count * 1024 * 4096
