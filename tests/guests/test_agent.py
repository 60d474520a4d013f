"""The agent: host mode against real QEMU guests and a real controller, guest mode on /proc.

Host mode: two 512 MiB guests (tests/helpers/guest), the agent with the QMP adapter, a real
:class:`Controller` (adapter kind ``mqtt``) and mosquitto in between — nothing is faked. The
controller inflates the idle guests; memhog then grows in one of them and the controller gives
memory back before the guest's OOM killer has to act; one QEMU is killed half-way.

Guest mode: the /proc mapping on fixed files with known numbers (exact payload), and one run of
the real command against mosquitto on this machine's /proc.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from click.testing import CliRunner

from autoscaler.adapters.base import AdapterContext, Target
from autoscaler.adapters.qmp import QmpAdapter
from autoscaler.cli import main
from autoscaler.config import Settings, load_settings
from autoscaler.service.agent import (
    GuestAgent,
    HostAgent,
    read_meminfo,
    read_vmstat,
    stats_from_proc,
)
from autoscaler.service.controller import Controller
from autoscaler.wire import decode_guest_stats
from tests.helpers import Broker, cancel_and_wait, poll_until, running
from tests.helpers.guest.vm import GuestSet, GuestSpec, Memhog, boot_guests, parse_status

MIB = 2**20
PAGE = 4096
HOST = "host-1"


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}/v1"


# -- guest mode: /proc -------------------------------------------------------------------------

# Trimmed from a real guest, with distinct numbers so that every mapping is checked.
MEMINFO = """\
MemTotal:         468416 kB
MemFree:          437500 kB
MemAvailable:     436000 kB
Buffers:             100 kB
Cached:             2168 kB
SwapCached:           12 kB
Active:             1000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""
VMSTAT = """\
nr_free_pages 109375
nr_file_pages 570
pswpin 7
pswpout 11
pgfault 40961
pgmajfault 13
pgsteal_kswapd 17
pgsteal_direct 19
pgsteal_khugepaged 999
pgscan_kswapd 23
pgscan_direct 29
pgscan_direct_throttle 999
allocstall_dma 1
allocstall_dma32 2
allocstall_normal 3
allocstall_movable 4
allocstall_device 5
oom_kill 31
htlb_buddy_alloc_success 37
htlb_buddy_alloc_fail 41
"""


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "vmstat").write_text(VMSTAT)
    return tmp_path


def guest_settings(**agent: Any) -> Settings:
    return load_settings(None, agent={"mode": "guest", "host_id": "h", "guest_id": "g", **agent})


def test_proc_mapping_is_the_drivers(proc_root: Path) -> None:
    agent = GuestAgent(guest_settings(), proc_root=proc_root, page_bytes=4096)
    payload = orjson.loads(agent.sample(now_s=1764150000.5))
    assert payload == {
        "ts": 1764150000.5,
        "ram_bytes": 468416 * 1024,  # MemTotal: the balloon is not visible from inside
        "stats": {
            "swap-in": 7 * 4096,
            "swap-out": 11 * 4096,
            "major-faults": 13,
            "minor-faults": 40961,
            "free-memory": 437500 * 1024,
            "total-memory": 468416 * 1024,
            "available-memory": 436000 * 1024,
            # NR_FILE_PAGES = Buffers + Cached + SwapCached = 100 + 2168 + 12 kB = 570 pages
            "disk-caches": 570 * 4096,
            "hugetlb-allocations": 37,
            "hugetlb-failures": 41,
            "oom-kills": 31,
            "alloc-stalls": 1 + 2 + 3 + 4 + 5,
            "async-scans": 23 * 4096,
            "direct-scans": 29 * 4096,
            "async-reclaims": 17 * 4096,
            "direct-reclaims": 19 * 4096,
        },
    }
    # The controller's own validation accepts it as is.
    sample = decode_guest_stats(agent.sample(), now_s=time.time())
    assert sample.unknown_stats == 0


def test_proc_mapping_page_size_and_missing_counters(proc_root: Path) -> None:
    # 64 KiB pages (arm64, ppc64): page counts scale by the guest's page size.
    (proc_root / "vmstat").write_text("pswpin 2\nnr_file_pages 3\n")
    values = stats_from_proc(read_meminfo(proc_root), read_vmstat(proc_root), page_bytes=65536)
    payload = orjson.loads(GuestAgent(guest_settings(), proc_root=proc_root).sample())
    stats = payload["stats"]
    assert values[0] == 2 * 65536
    assert values[7] == 3 * 65536
    # Counters this kernel lacks are left out, not reported as 0.
    assert set(stats) == {
        "swap-in",
        "free-memory",
        "total-memory",
        "available-memory",
        "disk-caches",
    }
    assert GuestAgent(guest_settings(), proc_root=proc_root, ram_bytes=2**30).ram_bytes == 2**30


def test_proc_mapping_on_this_machine() -> None:
    meminfo = read_meminfo()
    vmstat = read_vmstat()
    page = os.sysconf("SC_PAGE_SIZE")
    payload = orjson.loads(GuestAgent(guest_settings()).sample())
    stats = payload["stats"]
    assert payload["ram_bytes"] == meminfo["MemTotal"]
    assert stats["total-memory"] == meminfo["MemTotal"]
    assert 0 < stats["free-memory"] <= stats["total-memory"]
    assert 0 < stats["available-memory"] <= stats["total-memory"]
    # nr_file_pages and meminfo's pieces are read a moment apart: close, not equal.
    pieces = meminfo["Cached"] + meminfo["Buffers"] + meminfo.get("SwapCached", 0)
    assert stats["disk-caches"] == pytest.approx(pieces, rel=0.05, abs=16 * MIB)
    assert stats["minor-faults"] >= vmstat["pgfault"] >= stats["major-faults"]
    assert stats["swap-in"] % page == 0
    # Every counter the driver reads exists on a modern kernel: all 16 tags.
    if sys.platform == "linux" and "pgscan_direct" in vmstat and "oom_kill" in vmstat:
        assert len(stats) == 16 - ("htlb_buddy_alloc_success" not in vmstat) * 2


async def test_guest_agent_command_on_real_proc(mosquitto: Broker, prefix: str) -> None:
    """``balloon-autoscaler agent --mode guest`` publishes valid samples and stops on SIGTERM."""
    env = {
        **os.environ,
        "BALLOON_AUTOSCALER_MQTT__HOST": mosquitto.host,
        "BALLOON_AUTOSCALER_MQTT__PORT": str(mosquitto.port),
        "BALLOON_AUTOSCALER_MQTT__TOPIC_PREFIX": prefix,
        "BALLOON_AUTOSCALER_AGENT__HOST_ID": "host-g",
        "BALLOON_AUTOSCALER_AGENT__GUEST_ID": "guest-g",
        "BALLOON_AUTOSCALER_AGENT__INTERVAL_S": "0.2",
    }
    samples: list[bytes] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.subscribe(f"{prefix}/guest/host-g/guest-g/stats")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "autoscaler",
            "agent",
            "--mode",
            "guest",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(20):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    samples.append(message.payload)
                    if len(samples) == 3:
                        break
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
    assert b"guest agent stopped" in stderr
    parsed = [decode_guest_stats(s, now_s=time.time()) for s in samples]
    assert parsed[0].ts_s < parsed[1].ts_s < parsed[2].ts_s
    assert parsed[-1].ram_bytes == read_meminfo()["MemTotal"]


def test_agent_command_refuses_an_adapter_that_cannot_read_guests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_ADAPTER__KIND", "mqtt")
    result = CliRunner().invoke(main, ["agent", "--mode", "host"])
    assert result.exit_code == 2
    assert "device adapter" in result.output
    monkeypatch.setenv("BALLOON_AUTOSCALER_AGENT__HOST_ID", "bad host!")
    result = CliRunner().invoke(main, ["agent", "--mode", "host"])
    assert result.exit_code == 2
    assert "agent.host_id" in result.output


# -- host mode: real guests, real controller ---------------------------------------------------


@pytest.fixture(scope="module")
def guests() -> Iterator[GuestSet]:
    # "a" has no deflate-on-oom: if the controller is late, its OOM killer fires. "b" is the
    # one that gets killed.
    specs = [GuestSpec("a", 512, deflate_on_oom=False), GuestSpec("b", 512, deflate_on_oom=True)]
    yield from boot_guests(specs)


def host_settings(broker: Broker, prefix: str, guests: GuestSet) -> Settings:
    return load_settings(
        None,
        mqtt={"host": broker.host, "port": broker.port, "topic_prefix": prefix},
        agent={"mode": "host", "host_id": HOST, "interval_s": 0.5, "adapter_timeout_s": 2.0},
        adapter={"kind": "qmp", "qmp": {"socket_glob": guests.socket_glob, "stats_interval_s": 1}},
    )


def controller_settings(broker: Broker, prefix: str) -> Settings:
    return load_settings(
        None,
        mqtt={"host": broker.host, "port": broker.port, "topic_prefix": prefix},
        controller={"interval_s": 0.5, "stale_after_s": 10.0},
        adapter={"kind": "mqtt"},
    )


class Targets:
    """Target commands seen on the broker: (monotonic time, guest, num_pages)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, int]] = []

    def of(self, guest: str, after_s: float = 0.0) -> list[int]:
        return [pages for t, g, pages in self.seen if g == guest and t >= after_s]


async def collect_targets(
    broker: Broker, prefix: str, targets: Targets, ready: asyncio.Event
) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        await client.subscribe(f"{prefix}/guest/{HOST}/+/target", qos=1)
        ready.set()
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            guest = str(message.topic).split("/")[-2]
            try:
                command = orjson.loads(message.payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(command, dict) and command.get("policy") not in (None, "garbage"):
                targets.seen.append((time.monotonic(), guest, command["num_pages"]))


@pytest.fixture
async def steering(
    mosquitto: Broker, prefix: str, guests: GuestSet
) -> AsyncIterator[tuple[HostAgent, Controller, Targets]]:
    """The agent and the controller running, connected, and the targets they exchange."""
    agent = HostAgent(host_settings(mosquitto, prefix, guests), QmpAdapter())
    controller = Controller(controller_settings(mosquitto, prefix))
    targets = Targets()
    ready = asyncio.Event()
    collector = asyncio.create_task(collect_targets(mosquitto, prefix, targets, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with running(controller, timeout_s=15), running(agent, timeout_s=15):
            yield agent, controller, targets
    finally:
        await cancel_and_wait(collector)


@pytest.mark.slow
async def test_host_agent_applies_the_retained_target_at_start_and_publishes_stats(
    mosquitto: Broker, prefix: str, guests: GuestSet
) -> None:
    settings = host_settings(mosquitto, prefix, guests)
    pages = 64 * MIB // PAGE
    guest_stats: list[dict[str, Any]] = []
    host_stats: list[dict[str, Any]] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        await client.subscribe(f"{prefix}/guest/{HOST}/a/stats")
        await client.subscribe(f"{prefix}/host/{HOST}/stats")
        target_topic = f"{prefix}/guest/{HOST}/a/target"
        command = {"ts": time.time(), "num_pages": pages, "policy": "test", "reason": "retained"}
        await client.publish(target_topic, orjson.dumps(command), qos=1, retain=True)

        agent = HostAgent(settings, QmpAdapter())
        stop = asyncio.Event()
        started_s = time.monotonic()
        task = asyncio.create_task(agent.run(stop))
        try:
            async with asyncio.timeout(20):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    payload = orjson.loads(message.payload)
                    if message.topic.matches(f"{prefix}/host/+/stats"):
                        host_stats.append(payload)
                    else:
                        decode_guest_stats(message.payload, now_s=time.time())  # valid
                        guest_stats.append(payload)
                    if host_stats and guest_stats and guest_stats[-1].get("actual") == pages:
                        break
            applied_s = time.monotonic() - started_s
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await client.publish(target_topic, b"", qos=1, retain=True)  # clears the retained one
    print(f"retained target applied and reported {applied_s:.1f} s after the agent started")

    last = guest_stats[-1]
    assert set(last) == {"ts", "ram_bytes", "num_pages", "actual", "stats"}
    assert last["ram_bytes"] == 512 * MIB
    assert last["num_pages"] == pages
    assert 0 < last["stats"]["total-memory"] < 512 * MIB
    assert {"free-memory", "available-memory", "minor-faults"} <= set(last["stats"])
    # One sample per guest-stats refresh: time stamps only go forward.
    stamps = [p["ts"] for p in guest_stats]
    assert stamps == sorted(set(stamps))
    host = host_stats[-1]
    assert set(host) == {"ts", "mem_total_bytes", "mem_available_bytes"}
    assert host["mem_total_bytes"] == read_meminfo()["MemTotal"]
    assert 0 < host["mem_available_bytes"] <= host["mem_total_bytes"]
    assert agent.counters["targets_applied"] == 1
    assert agent.rejected.total() == 0

    adapter = QmpAdapter()
    await adapter.start(AdapterContext(settings))
    try:
        reading = await adapter.read("a")
        assert reading.actual_pages == pages  # query-balloon, from a fresh connection
        await adapter.set_target(Target(HOST, "a", 0, 512 * MIB, "test", "reset", time.time()))
    finally:
        await adapter.close()


@pytest.mark.slow
async def test_agent_and_controller_keep_real_guests_right_sized(
    steering: tuple[HostAgent, Controller, Targets],
    guests: GuestSet,
    mosquitto: Broker,
    prefix: str,
) -> None:
    agent, controller, targets = steering
    adapter = agent.adapter
    ram_pages = 512 * MIB // PAGE

    async with Memhog(guests["a"]) as hog:
        idle = await hog.status()

        # 1. Idle guests: the controller inflates both, the agent applies, QEMU confirms. The
        # pace is the guards' (0.3 % of RAM a second), whatever the tick interval.
        async def inflated() -> bool:
            readings = await asyncio.gather(adapter.read("a"), adapter.read("b"))
            return all((r.actual_pages or 0) >= ram_pages // 4 for r in readings)

        inflate_s = await poll_until(
            inflated, 300, what="both balloons inflated past a quarter of RAM", interval_s=0.5
        )
        print(f"inflated both guests in {inflate_s:.1f} s")
        assert targets.of("a") and targets.of("b")
        assert agent.counters["targets_applied"] >= 2
        shrunk = await hog.status()
        # No deflate-on-oom: MemTotal shrinks with the balloon (a quarter of 512 MiB at least).
        assert shrunk["MemTotal_kb"] <= idle["MemTotal_kb"] - 128 * 1024
        assert controller.counters["host_stats"] > 0

        # Garbage on the target topics is counted and changes nothing.
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            topic = f"{prefix}/guest/{HOST}/{{}}/target"
            command = {"ts": time.time(), "policy": "garbage", "reason": "r"}
            for guest, payload in [
                ("a", b"{not json"),
                ("a", orjson.dumps({**command, "num_pages": -1})),
                ("a", orjson.dumps({**command, "num_pages": ram_pages + 1})),
                ("a", orjson.dumps({"num_pages": 1})),
                ("zzz", orjson.dumps({**command, "num_pages": 1})),
            ]:
                await pub.publish(topic.format(guest), payload, qos=1)

        # 2. Kill "b" as a crash would: its reads and targets fail, counted, nothing else stops.
        guests["b"].kill()
        killed_s = time.monotonic()
        await poll_until(
            lambda: agent.errors["GuestUnavailable"] >= 3,
            10,
            what="errors for the killed guest",
            interval_s=0.2,
        )

        # 3. Memory demand grows in "a" by 16 MiB/s: the controller must give memory back
        # before the guest runs out (no deflate-on-oom: running out means an OOM kill).
        ramp_started = time.monotonic()
        held_mib = 0
        while held_mib < 320:
            held_mib += 16
            await hog.send(held_mib)
            await asyncio.sleep(1.0)
        reached = await hog.wait_for(r"^memhog (reached 320|died)", 30)
        ramp_status = [
            parse_status(line)
            for t, line in hog.lines
            if t >= ramp_started and line.startswith("memhog held_mib=")
        ]
        least_available_mib = min(s["MemAvailable_kb"] for s in ramp_status) / 1024
        assert reached == "memhog reached 320", hog.lines[-10:]
        await asyncio.sleep(2.5)
        final = await hog.status()
        reading = await adapter.read("a")
        print(
            f"ramp to 320 MiB took {time.monotonic() - ramp_started:.1f} s; "
            f"allocation now {(512 * MIB - (reading.actual_pages or 0) * PAGE) / MIB:.0f} MiB; "
            f"MemAvailable never below {least_available_mib:.0f} MiB; "
            f"status {final}"
        )

    start_s = targets.seen[0][0] if targets.seen else 0.0
    print(
        "targets for a (s since the first target, MiB allocated):",
        [
            (round(t - start_s, 1), (ram_pages - p) * PAGE // MIB)
            for t, g, p in targets.seen
            if g == "a"
        ],
        f"ramp started at {ramp_started - start_s:.1f} s, b killed at {killed_s - start_s:.1f} s",
    )
    assert final["oom_kill"] == 0, final
    assert least_available_mib > 10  # deflated ahead of demand, not at the last moment
    assert not hog.died()
    assert "Out of memory" not in guests["a"].console()
    allocation_mib = (512 * MIB - (reading.actual_pages or 0) * PAGE) / MIB
    assert allocation_mib > 320
    # The surviving guest kept being controlled after the other one died.
    after_kill = targets.of("a", after_s=killed_s)
    assert after_kill and min(after_kill) < max(targets.of("a")), targets.seen

    assert agent.errors["GuestUnavailable"] >= 3
    assert agent.counters["read_errors"] >= 3
    assert agent.rejected["invalid_json"] == 1
    assert agent.rejected["bad_value"] == 2
    assert agent.rejected["missing_field"] == 1
    assert agent.rejected["unknown_guest"] == 1
    assert controller.rejected.total() == 0, controller.rejected
