"""Shutdown stays bounded while the event loop is busy: the real program, real signals."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import orjson
import pytest

from autoscaler.config import load_settings
from autoscaler.policy import Decision, FleetView, Policy
from autoscaler.service.controller import Controller
from tests.helpers import Broker, read_until, start_program

BUSY_S = 60.0


class BusyPolicy(Policy):
    """Holds the event loop for a minute on every decision: a stand-in for any long stall."""

    name: ClassVar[str] = "busy"

    def decide(self, view: FleetView) -> Decision:
        logging.getLogger("tests.busy").warning("busy deciding")
        time.sleep(BUSY_S)
        return Decision.hold(len(view))


Start = Callable[[float], subprocess.Popen[str]]


@pytest.fixture
def busy_controller(mosquitto: Broker, tmp_path: Path) -> Iterator[Start]:
    """Starts ``balloon-autoscaler run`` with a given ``controller.shutdown_timeout_s``; returns
    once its first tick holds the event loop (for a minute)."""

    def start(shutdown_timeout_s: float) -> subprocess.Popen[str]:
        config = tmp_path / "config.toml"
        config.write_text(
            f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
            'topic_prefix = "busy"\n'
            f"[controller]\nshutdown_timeout_s = {shutdown_timeout_s}\n"
            '[policy]\nname = "tests.broker.test_shutdown:BusyPolicy"\n[log]\nformat = "json"\n'
        )
        process = start_program(config)
        processes.append(process)
        assert process.stderr is not None
        read_until(process.stderr, "busy deciding", [])
        return process

    processes: list[subprocess.Popen[str]] = []
    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def exit_within(process: subprocess.Popen[str], timeout_s: float) -> tuple[float, str]:
    """Seconds until ``process`` exits (failing the test after ``timeout_s``), and its log."""
    started = time.monotonic()
    try:
        _, rest = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout_s} s after the signal", pytrace=False)
    return time.monotonic() - started, rest


def test_the_shutdown_timeout_holds_while_the_loop_is_busy(busy_controller: Start) -> None:
    process = busy_controller(1.0)
    process.send_signal(signal.SIGTERM)
    elapsed_s, rest = exit_within(process, 15.0)
    assert process.returncode == 128 + signal.SIGTERM
    assert 0.9 < elapsed_s < 10.0
    messages = [json.loads(line)["msg"] for line in rest.splitlines() if line.startswith("{")]
    assert "SIGTERM received, shutting down" in messages
    assert "shutdown took longer than 1 s, exiting now" in messages


def test_a_second_signal_exits_at_once_while_the_loop_is_busy(busy_controller: Start) -> None:
    process = busy_controller(30.0)
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    read_until(process.stderr, "SIGTERM received, shutting down", [], timeout_s=10.0)
    process.send_signal(signal.SIGTERM)
    elapsed_s, _ = exit_within(process, 15.0)
    assert process.returncode == 128 + signal.SIGTERM
    assert elapsed_s < 5.0


def test_nothing_is_taken_in_after_the_stop() -> None:
    controller = Controller(load_settings(None))
    stats = {"ts": time.time(), "ram_bytes": 2**30, "stats": {}}
    controller.stop_ingest()
    controller.handle_message("balloon/v1/guest/h/g/stats", orjson.dumps(stats))
    controller.handle_message("balloon/v1/host/h/batch", orjson.dumps({"samples": {"g": stats}}))
    assert len(controller.fleet) == 0
    assert controller.counters["messages"] == 0
