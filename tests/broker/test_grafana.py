"""The Grafana dashboard in deploy/grafana, its every query run by a real Prometheus scraping a
running controller."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from tests.helpers import REPO, Broker, free_port, metered_controller, poll_until, running

DASHBOARD = REPO / "deploy" / "grafana" / "balloon-autoscaler.json"
GIB = 2**30
RATE_INTERVAL = "30s"  # what Grafana puts for $__rate_interval at a 1 s scrape, roughly
INTERVAL = "30s"
READY_TIMEOUT_S = 30.0


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.fail(
            "prometheus is not installed (apt-get install -y prometheus; .ci/run does this)"
        )
    return found


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def prometheus(directory: Path, target_port: int) -> Iterator[str]:
    """A Prometheus scraping ``127.0.0.1:target_port`` every second; yields its base URL."""
    binary = prometheus_binary()
    port = free_port()
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: balloon-autoscaler\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}: see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready within {READY_TIMEOUT_S} s: see {log.name}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def substituted(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", INTERVAL)


def test_dashboard_is_importable_with_a_datasource_variable() -> None:
    board = dashboard()
    variables = board["templating"]["list"]
    (datasource,) = [v for v in variables if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    name = datasource["name"]
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = [panel["title"] for panel in board["panels"]]
    assert len(titles) == len(set(titles))
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": f"${{{name}}}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            leftover = re.findall(r"\$\w+", substituted(target["expr"]))
            assert leftover == [], (panel["title"], leftover)
    exprs = " ".join(expr for _, expr in queries())
    for metric in (
        "balloon_autoscaler_memory_reclaimed_bytes",
        "balloon_autoscaler_memory_provisioned_bytes",
        "balloon_autoscaler_targets_total",
        "balloon_autoscaler_messages_rejected_total",
        "balloon_autoscaler_emergency_deflates_total",
        "balloon_autoscaler_tick_duration_seconds_bucket",
        "balloon_autoscaler_mqtt_connected",
        "balloon_autoscaler_guests",
    ):
        assert metric in exprs


def stats(ts: float, available: int) -> bytes:
    return orjson.dumps(
        {
            "ts": ts,
            "ram_bytes": 4 * GIB,
            "actual": 0,
            "stats": {"total-memory": 4 * GIB, "available-memory": available},
        }
    )


def query(url: str, expr: str) -> list[dict[str, Any]]:
    reply = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def has_data(result: list[dict[str, Any]]) -> bool:
    return bool(result) and all(not math.isnan(float(r["value"][1])) for r in result)


async def test_every_panel_query_returns_data_from_a_running_controller(
    mosquitto: Broker, tmp_path: Path
) -> None:
    prefix = f"grafana-{uuid.uuid4().hex[:8]}"
    controller, metrics_port = metered_controller(mosquitto, prefix)
    with prometheus(tmp_path, metrics_port) as url:
        async with running(controller), aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:

            async def feed(seconds: float) -> None:
                """Guest stats every 0.2 s, and a few bad messages, so the counters move."""
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    now = time.time()
                    for guest in ("idle", "busy", "mid"):
                        await pub.publish(
                            f"{prefix}/guest/h/{guest}/stats", stats(now, 3 * GIB), qos=1
                        )
                    await pub.publish(f"{prefix}/guest/h/idle/stats", b"nope", qos=1)
                    await pub.publish(f"{prefix}/guest/h/idle/stats", b"[]", qos=1)
                    await asyncio.sleep(0.2)

            await feed(1.0)
            await poll_until(
                lambda: controller.counters["targets_applied"] >= 1, 10, what="a target applied"
            )
            deadline = time.monotonic() + 30
            pending = queries()
            while pending and time.monotonic() < deadline:
                await feed(1.0)
                results = [
                    (title, expr, await asyncio.to_thread(query, url, substituted(expr)))
                    for title, expr in pending
                ]
                pending = [(t, e) for t, e, result in results if not has_data(result)]
    missing = {expr: title for title, expr in pending}
    assert missing == {}, f"queries without data (panel by query): {missing}"
