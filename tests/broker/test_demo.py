"""The embedded demo: generator, simulated fleet on MQTT, and the ``demo`` command end to end.

The command runs as an operator runs it, in a subprocess with stdout on a pipe (so it prints
plain status lines), against its own in-process broker; the parts are also tested one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np
import orjson
import pytest
from rich.console import Console
from rich.text import Text

from autoscaler.config import MqttSettings
from autoscaler.demo.app import (
    DemoOptions,
    DemoStatus,
    EmbeddedBroker,
    GuestRow,
    demo_settings,
    load_replay,
    render,
    status_line,
    summary_text,
)
from autoscaler.service.mqtt import MqttLink
from autoscaler.sim.fleetsim import KINDS, FleetSim, synthetic_replay
from autoscaler.stats import PAGE_BYTES, STAT_INDEX
from autoscaler.wire import decode_guest_stats
from policies.threshold import ThresholdPolicy
from tests.helpers import REPO

GIB = 2**30
PROGRAM = [sys.executable, "-m", "autoscaler", "demo"]
STARTED = "embedded MQTT broker on"
"""The banner line printed once broker, fleet and controller are about to run."""
SHUTDOWN_SLACK_S = 8.0
"""Time allowed past --duration (or past SIGINT) for shutdown and summary: more than the
demo's own 5 s limit, so that a stuck shutdown shows as the demo's report of what is stuck."""


# -- the command, end to end -----------------------------------------------------------------------


class DemoProcess:
    """A ``demo`` subprocess; threads collect its stdout lines (with arrival times) and stderr.

    A context manager: on exit the process is killed if still running and its pipes closed.
    """

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BALLOON_AUTOSCALER_")}
        self.process = subprocess.Popen(
            [*PROGRAM, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        self.lines: list[tuple[float, str]] = []
        self.stderr: list[str] = []
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], timed: bool) -> None:
        for line in stream:
            if timed:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
            else:
                self.stderr.append(line)

    def __enter__(self) -> DemoProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def wait_for_line(self, pattern: str, timeout_s: float) -> float:
        """Arrival time of the first stdout line matching ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            for arrived, line in list(self.lines):
                if re.search(pattern, line):
                    return arrived
            time.sleep(0.05)
        for arrived, line in list(self.lines):  # the process may have printed it and ended
            if re.search(pattern, line):
                return arrived
        raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output()}")

    def finish(self, timeout_s: float) -> tuple[int, float]:
        """Exit status and exit time; fails if the process overstays ``timeout_s``."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout_s} s:\n{self.output()}") from None
        return code, time.monotonic()

    def output(self) -> str:
        """Everything printed so far (all of it, once the process has ended)."""
        if self.process.poll() is not None:
            for reader in self._readers:
                reader.join(timeout=5)
        stdout = "\n".join(line for _, line in self.lines)
        return f"{stdout}\n--- stderr:\n{''.join(self.stderr)}"


def summary_numbers(output: str) -> dict[str, float]:
    patterns = {
        "ingested": r"stats ingested\s+(\d+) \(rejected (\d+)\)",
        "applied": r"targets applied\s+(\d+) by the guests \(controller: (\d+) acknowledged",
        "reclaimed_gib": r"memory reclaimed\s+now ([\d.]+) GiB",
    }
    numbers = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, output)
        assert match, f"summary has no {key!r}:\n{output}"
        numbers[key] = float(match.group(1))
        if match.lastindex and match.lastindex > 1:
            numbers[f"{key}_2"] = float(match.group(2))
    return numbers


def run_for(duration_s: float, *args: str, startup_s: float) -> str:
    with DemoProcess("--duration", str(duration_s), *args) as demo:
        started = demo.wait_for_line(STARTED, startup_s)
        code, ended = demo.finish(duration_s + SHUTDOWN_SLACK_S)
        output = demo.output()
    assert code == 0, output
    assert ended - started < duration_s + SHUTDOWN_SLACK_S, output
    # Not a terminal: plain status lines, no escape sequences of a live view.
    assert "\x1b[" not in output
    assert len(re.findall(r"^\[\s*\d+\.\d s\] sim \+", output, re.M)) >= duration_s // 2 - 1
    return output


def test_demo_with_the_builtin_generator() -> None:
    output = run_for(8, "--synthetic", "--guests", "40", startup_s=30)
    numbers = summary_numbers(output)
    assert numbers["ingested"] > 0 and numbers["ingested_2"] == 0  # nothing rejected
    assert numbers["applied"] > 0 and numbers["applied_2"] > 0  # by the guests; by the controller
    assert numbers["reclaimed_gib"] > 0
    assert "40 guests, built-in generator" in output


@pytest.mark.slow
def test_demo_replays_the_shared_trace(bitbrains_trace: Path) -> None:
    # The import of the whole month comes first and takes a few seconds: not in the duration.
    output = run_for(8, "--trace", str(bitbrains_trace), "--guests", "20", startup_s=90)
    numbers = summary_numbers(output)
    assert numbers["ingested"] > 0
    assert numbers["applied"] > 0
    assert numbers["reclaimed_gib"] > 0
    assert "Bitbrains trace bitbrains-rnd-2013-08.csv.gz (20 of 500 VMs" in output


def test_ctrl_c_ends_the_demo_cleanly() -> None:
    with DemoProcess("--synthetic", "--guests", "20") as demo:
        demo.wait_for_line(r"^\[\s*\d+\.\d s\] sim", 30)  # running: a status line is out
        demo.process.send_signal(signal.SIGINT)
        code, _ = demo.finish(SHUTDOWN_SLACK_S)
        output = demo.output()
    assert code == 0, output
    assert summary_numbers(output)["ingested"] > 0
    assert "Traceback" not in output


def test_bad_policy_is_a_usage_error() -> None:
    result = subprocess.run(
        [*PROGRAM, "--synthetic", "--policy", "no-such-policy", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "no-such-policy" in result.stderr


# -- the parts -------------------------------------------------------------------------------------


def test_generator_is_deterministic_and_varied() -> None:
    a = synthetic_replay(12, seed=3)
    b = synthetic_replay(12, seed=3)
    np.testing.assert_array_equal(a.demand_bytes, b.demand_bytes)
    assert not np.array_equal(a.demand_bytes, synthetic_replay(12, seed=4).demand_bytes)
    assert [name.split("-")[0] for name in a.guests[:4]] == list(KINDS)
    assert a.step_s == 300.0
    assert np.all(a.demand_bytes > 0) and np.all(a.demand_bytes <= a.ram_bytes[:, None])
    share = a.demand_bytes / a.ram_bytes[:, None]
    by_kind = {kind: share[i :: len(KINDS)] for i, kind in enumerate(KINDS)}
    assert by_kind["idle"].max() < 0.2  # flat and low
    assert by_kind["bursty"].max() > 0.5  # bursts well above the base
    assert np.all(np.ptp(by_kind["diurnal"], axis=1) > 0.15)  # a daily wave
    assert np.all(by_kind["growing"].max(axis=1) > 0.8)  # a leak up to most of RAM


def test_load_replay_picks_guests_from_the_generator() -> None:
    replay, source = load_replay(DemoOptions(guests=7, seed=1))
    assert len(replay.guests) == 7
    assert "built-in generator" in source and "seed 1" in source


def fleet(guests: int = 4) -> FleetSim:
    settings = MqttSettings(host="127.0.0.1", port=1, topic_prefix="t/v1")
    return FleetSim(synthetic_replay(guests, seed=0), settings, speed=300.0)


def test_fleet_publishes_wire_contract_stats_and_host_stats() -> None:
    sim = fleet()
    messages = dict(sim.advance())
    guest_topics = [t for t in messages if t.endswith("/stats") and "/guest/" in t]
    assert len(guest_topics) == 4
    for topic in guest_topics:
        sample = decode_guest_stats(messages[topic], now_s=time.time())  # validates
        assert sample.unknown_stats == 0
        assert sample.actual_pages == 0  # no target yet: the balloon is empty
    host = orjson.loads(messages["t/v1/host/simhost0/stats"])
    assert host["mem_available_bytes"] <= host["mem_total_bytes"]
    assert sim.totals.samples == 4 and sim.totals.reclaimed_bytes == 0


def test_fleet_applies_targets_at_the_balloon_rate_and_ignores_bad_ones() -> None:
    sim = fleet()
    guest, host = sim.replay.guests[0], sim.guest_hosts[0]
    ram = int(sim.ram_bytes[0])
    pages = ram // 2 // PAGE_BYTES
    payload = {"ts": 1.0, "num_pages": pages, "policy": "threshold", "reason": "idle"}
    sim.handle_target(f"t/v1/guest/{host}/{guest}/target", orjson.dumps(payload))
    sim.handle_target(f"t/v1/guest/{host}/{guest}/target", orjson.dumps(payload))  # redelivered
    assert sim.targets_applied == 1 and sim.targets_duplicate == 1
    assert sim.last_reason[0] == "idle"
    sim.advance()
    # Inflating 2 GiB or more takes time: 256 MiB/s over a 300 s step is plenty here.
    assert sim.alloc_bytes[0] == pytest.approx(ram - pages * PAGE_BYTES)
    stats = dict(sim.advance())[f"t/v1/guest/{host}/{guest}/stats"]
    sample = decode_guest_stats(stats, now_s=time.time())
    assert sample.num_pages == pages and sample.actual_pages == pages
    for topic, bad in [
        (f"t/v1/guest/{host}/{guest}/target", b"not json"),
        (f"t/v1/guest/{host}/{guest}/target", orjson.dumps({"num_pages": -1})),
        (f"t/v1/guest/{host}/{guest}/target", orjson.dumps({"num_pages": 2**40})),
        (f"t/v1/guest/{host}/{guest}/target", orjson.dumps({"num_pages": True})),
        (f"t/v1/guest/{host}/nobody/target", orjson.dumps(payload)),
        ("t/v1/guest/bad id/x/target", orjson.dumps(payload)),
    ]:
        sim.handle_target(topic, bad)
    assert sim.targets_rejected == 6 and sim.targets_applied == 1


def test_under_provisioned_guest_reports_pressure() -> None:
    sim = fleet(1)
    ram = int(sim.ram_bytes[0])
    pages = int(ram * 0.99) // PAGE_BYTES  # leave 1 % of RAM: far below any demand
    sim.handle_target(
        f"t/v1/guest/{sim.guest_hosts[0]}/{sim.replay.guests[0]}/target",
        orjson.dumps({"ts": 1.0, "num_pages": pages, "policy": "test", "reason": "test"}),
    )
    sim.advance()
    (_topic, payload), _host = sim.advance()
    sample = decode_guest_stats(payload, now_s=time.time())
    assert sample.values[STAT_INDEX["swap-in"]] > 0
    assert sample.values[STAT_INDEX["alloc-stalls"]] > 0
    assert sim.totals.under_samples >= 1


async def test_fleet_and_links_talk_through_the_embedded_broker() -> None:
    async with EmbeddedBroker() as broker:
        settings = MqttSettings(host=broker.host, port=broker.port, topic_prefix="t/v1")
        sim = FleetSim(synthetic_replay(3, seed=0), settings, speed=3000.0)
        received: list[str] = []
        watcher = MqttLink(
            settings,
            subscriptions=[("t/v1/guest/+/+/stats", 0)],
            on_message=lambda topic, payload: received.append(topic),
        )
        watching = asyncio.create_task(watcher.run())
        stop = asyncio.Event()
        await asyncio.wait_for(watcher.connected.wait(), 10)
        running = asyncio.create_task(sim.run(stop, ready=[watcher.connected]))
        try:
            await asyncio.wait_for(sim.link.connected.wait(), 10)
            pages = int(sim.ram_bytes[0]) // 4 // PAGE_BYTES
            target = {"ts": 1.0, "num_pages": pages, "policy": "test", "reason": "test"}
            topic = f"t/v1/guest/{sim.guest_hosts[0]}/{sim.replay.guests[0]}/target"
            await watcher.publish(topic, orjson.dumps(target), qos=1, retain=True)
            for _ in range(200):  # up to 10 s
                if sim.targets_applied and len(received) >= 6:
                    break
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(running, 10)
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    assert sim.targets_applied == 1 and sim.last_reason[0] == "test"
    assert len(received) >= 6 and sim.stats_published >= 6
    assert sim.publish_failures == 0


# -- rendering -------------------------------------------------------------------------------------


def status(**overrides: object) -> DemoStatus:
    values: dict[str, object] = {
        "policy": "threshold",
        "source": "built-in generator",
        "guests": 2,
        "wall_s": 5.0,
        "duration_s": 8.0,
        "sim_elapsed_s": 3900.0,
        "steps": 13,
        "step_s": 300.0,
        "period_s": 1.0,
        "ram_bytes": 12.0 * GIB,
        "alloc_bytes": 7.0 * GIB,
        "under_now": 1,
        "targets_acknowledged": 9,
        "targets_applied": 9,
        "ingested": 26,
        "rejected": 0,
        "emergency_deflates": 1,
        "samples": 26,
        "mean_reclaimed_bytes": 1.5 * GIB,
        "mean_reclaimed_pct": 25.0,
        "under_pct": 3.85,
        "deficit_gib_h": 0.25,
        "rows": (
            GuestRow("bursty-002", 4.0 * GIB, 3.5 * GIB, 2.0 * GIB, "pressure: OOM kill"),
            GuestRow("idle-000", 8.0 * GIB, 1.0 * GIB, 5.0 * GIB, "idle: available 80% > 30%"),
        ),
    }
    values.update(overrides)
    return DemoStatus(**values)  # type: ignore[arg-type]


def test_status_line_and_summary() -> None:
    line = status_line(status())
    assert "sim +0d 01:05 (×780)" in line and "reclaimed 5.0 GiB (41.7 %)" in line
    assert "under-provisioned 1 |" in line and "emergency deflates 1" in line
    text = summary_text(status())
    assert "stats ingested        26 (rejected 0)" in text
    assert "now 1 guest;" in text
    assert "mean over the run 1.50 GiB per guest (25.0 %)" in text
    assert summary_numbers(text) == {
        "ingested": 26,
        "ingested_2": 0,
        "applied": 9,
        "applied_2": 9,
        "reclaimed_gib": 5.0,
    }


def test_live_view_renders_header_and_guests() -> None:
    console = Console(record=True, width=160, color_system=None)
    console.print(render(status()))
    text = console.export_text()
    assert "reclaimed 5.0 GiB of 12.0 GiB (41.7 %)" in text
    assert "under-provisioned 1 guest" in text
    assert "targets applied 9" in text and "messages ingested 26" in text
    assert "UNDER 175%" in text and "bursty-002" in text and "pressure: OOM kill" in text
    assert "3 s left" in text and "×780 real time" in text
    empty = status(rows=(), duration_s=None, ram_bytes=0.0, alloc_bytes=0.0, under_now=0)
    console.print(render(empty))
    assert "Ctrl-C to stop" in console.export_text()
    assert math.isfinite(empty.reclaimed_pct)


def many_rows(n: int = 30) -> tuple[GuestRow, ...]:
    kinds = ("bursty", "idle", "steady", "batch")
    return tuple(
        GuestRow(
            f"{kinds[i % 4]}-{i:03d}",
            (4.0 + 12.0 * (i % 3)) * GIB,
            (0.37 + 1.11 * (i % 7)) * GIB,
            (1.5 + 1.25 * (i % 5)) * GIB,
            "pressure: available 3% < 10%, growing by 120 MiB/s",
        )
        for i in range(n)
    )


ROW = re.compile(
    r"^│ (?P<guest>[a-z]+-\d{3}) +│(?: +(?P<ram>\d+\.\d) │)? +(?P<demand>\d+\.\d\d) │"
    r" +(?P<alloc>\d+\.\d\d) │ +(?P<pressure>(?:UNDER )?\d+%) │"
)


def check_view(text: str, width: int, height: int, rows: tuple[GuestRow, ...]) -> list[str]:
    """The view's lines fit ``width`` and ``height``; every guest row shown has its id and
    numbers whole and right; the header's numbers are on one line each. Returns the guests."""
    lines = text.rstrip("\n").splitlines()
    assert all(Text(line).cell_len <= width for line in lines), max(map(len, lines))
    assert len(lines) <= height
    by_id = {row.guest: row for row in rows}
    shown = []
    for line in lines:
        if not line.startswith("│"):
            continue
        match = ROW.match(line)
        assert match, f"a cut or wrapped row at {width} columns: {line!r}"
        row = by_id[match["guest"]]
        if match["ram"] is not None:
            assert match["ram"] == f"{row.ram_bytes / GIB:.1f}"
        assert match["demand"] == f"{row.demand_bytes / GIB:.2f}"
        assert match["alloc"] == f"{row.alloc_bytes / GIB:.2f}"
        shown.append(match["guest"])
    assert shown, text
    assert re.search(r"^reclaimed \d+\.\d GiB of \d+\.\d GiB \(\d+\.\d %\)", text, re.M), text
    assert re.search(r"under-provisioned \d+ guests? \(\d+\.\d\d % of guest-steps", text), text
    assert re.search(r"simulated \+\d+d \d\d:\d\d at ×\d+ real time", text), text
    assert re.search(r"busiest \d+ of \d+ guests", text), text
    return shown


@pytest.mark.parametrize("width", [80, 100, 120])
def test_live_view_keeps_ids_and_numbers_whole_at_narrow_widths(width: int) -> None:
    rows = many_rows()
    console = Console(record=True, width=width, height=24, color_system=None)
    console.print(render(status(rows=rows, guests=len(rows))))
    text = console.export_text()
    shown = check_view(text, width, 24, rows)
    assert shown == [row.guest for row in rows[: len(shown)]]  # the busiest first
    assert f"busiest {len(shown)} of {len(rows)} guests" in text
    assert len(shown) >= 10  # the header leaves room for guests at 24 lines
    # the reason goes first, and is shown (shortened) once there is room for it
    assert ("last target reason" in text) == (width >= 100)
    assert ("pressure: available" in text) == (width >= 100)
    assert "memory" in text and "RAM" in text


def test_live_view_in_a_real_80x24_terminal(tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux is not installed (apt-get install -y tmux; .ci/run does this)")
    server = [tmux, "-L", f"demo-{os.getpid()}", "-f", os.devnull]
    command = shlex.join([*PROGRAM, "--synthetic", "--duration", "6"]) + "; sleep 30"
    subprocess.run(
        [*server, "new-session", "-d", "-x", "80", "-y", "24", "-c", str(REPO), command],
        check=True,
        timeout=10,
    )
    try:
        deadline = time.monotonic() + 40
        screen = ""
        while time.monotonic() < deadline:
            screen = subprocess.run(
                [*server, "capture-pane", "-p"], capture_output=True, text=True, timeout=10
            ).stdout
            if re.search(r"^│ [a-z]+-\d{3} ", screen, re.M) and "s left" in screen:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no live view in the terminal within 40 s:\n{screen}")
        # The banner printed before the view, scrolled up into the terminal's history by now.
        history = subprocess.run(
            [*server, "capture-pane", "-p", "-S", "-200"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    finally:
        subprocess.run([*server, "kill-server"], timeout=10, check=False)
    # The start-up banner's lines fit: none wraps, the command to copy stands whole on its own.
    assert re.search(r"^balloon-autoscaler demo: policy threshold, \d+ guests$", history, re.M)
    assert re.search(r"^  watch   mosquitto_sub -p \d+ -t 'balloon/v1/#' -v$", history, re.M)
    view = screen[screen.index("balloon-autoscaler demo ·") :]
    lines = view.rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in screen.splitlines())
    ids = [m["guest"] for line in lines if (m := ROW.match(line))]
    assert ids, view
    for line in lines:
        if line.startswith("│"):
            assert ROW.match(line), f"a cut or wrapped row: {line!r}"
    assert re.search(r"^reclaimed \d+\.\d GiB of \d+\.\d GiB \(\d+\.\d %\)", view, re.M), view


def test_the_guards_count_in_the_demos_simulated_time() -> None:
    mqtt = MqttSettings(host="127.0.0.1", port=1883)
    real = demo_settings(mqtt, 1.0, ThresholdPolicy()).guards
    fast = demo_settings(mqtt, 1.0, ThresholdPolicy(), time_scale=300.0).guards
    # 300 simulated seconds a wall second: a guest is paced, given headroom and held as if
    # each second were five minutes.
    assert fast.max_inflate_bps == 300 * real.max_inflate_bps
    assert fast.prior_growth_bps == 300 * real.prior_growth_bps
    assert fast.trouble_hold_s == real.trouble_hold_s / 300
    assert fast.max_inflate_share_per_s == pytest.approx(300 * real.max_inflate_share_per_s)
    assert fast.floor_bytes == real.floor_bytes
