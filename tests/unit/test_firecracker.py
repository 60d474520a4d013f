"""The Firecracker adapter against a stand-in for Firecracker's API.

No Firecracker can run on this machine (it needs KVM and is not packaged for Debian), so these
tests talk to tests/helpers/firecracker_api.py: a small HTTP server on a real unix socket that
answers as Firecracker's API spec says (status codes, JSON shapes, ``fault_message`` errors,
balloon state that PATCH changes, statistics). The adapter's side — httpx over the socket,
units, rounding, errors — is the real code.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from autoscaler.adapters.base import (
    AdapterContext,
    AdapterTimeout,
    GuestUnavailable,
    TargetRejected,
)
from autoscaler.adapters.firecracker import FirecrackerAdapter
from autoscaler.config import AdapterSettings, FirecrackerSettings, Settings
from autoscaler.plugins import create_adapter
from autoscaler.stats import FIRECRACKER_STAT_KEYS, N_STATS, PAGE_BYTES, STAT_INDEX, STAT_NAMES
from tests.helpers import target_change
from tests.helpers.firecracker_api import FirecrackerApi, MicroVm

MIB = 2**20
STATS_INTERVAL_S = 2


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="fc.", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture
def servers(run_dir: Path) -> Iterator[dict[str, FirecrackerApi]]:
    started: dict[str, FirecrackerApi] = {}
    yield started
    for server in started.values():
        server.kill()


def serve(
    servers: dict[str, FirecrackerApi], run_dir: Path, guest_id: str, **state: object
) -> FirecrackerApi:
    server = FirecrackerApi(run_dir / f"{guest_id}.sock", MicroVm(**state))  # type: ignore[arg-type]
    servers[guest_id] = server
    return server


async def started_adapter(run_dir: Path, call_timeout_s: float = 2.0) -> FirecrackerAdapter:
    adapter = FirecrackerAdapter(call_timeout_s=call_timeout_s)
    settings = Settings(
        adapter=AdapterSettings(
            kind="firecracker",
            firecracker=FirecrackerSettings(
                socket_glob=str(run_dir / "*.sock"), stats_interval_s=STATS_INTERVAL_S
            ),
        )
    )
    await adapter.start(AdapterContext(settings))
    return adapter


@pytest.fixture
async def adapter(run_dir: Path) -> AsyncIterator[FirecrackerAdapter]:
    started = await started_adapter(run_dir)
    yield started
    await started.close()


def test_alias_resolves_to_the_adapter() -> None:
    assert isinstance(create_adapter("firecracker"), FirecrackerAdapter)


def test_every_statistic_maps_to_a_wire_name() -> None:
    # The 16 VIRTIO_BALLOON_S_* tags, each spelt once in Firecracker's BalloonStats.
    assert sorted(FIRECRACKER_STAT_KEYS.values()) == sorted(STAT_NAMES)


async def test_discover_lists_sockets_by_file_name(
    adapter: FirecrackerAdapter, servers: dict[str, FirecrackerApi], run_dir: Path
) -> None:
    assert await adapter.discover() == []
    serve(servers, run_dir, "web-1")
    serve(servers, run_dir, "db.primary")
    (run_dir / "notes.sock").write_text("a file, not a socket")
    assert await adapter.discover() == ["db.primary", "web-1"]
    servers["web-1"].kill()
    assert await adapter.discover() == ["db.primary"]


async def test_read_reports_balloon_and_guest_stats(
    adapter: FirecrackerAdapter, servers: dict[str, FirecrackerApi], run_dir: Path
) -> None:
    server = serve(servers, run_dir, "vm", mem_size_mib=1024, amount_mib=100)
    before = time.time()
    reading = await adapter.read("vm")
    assert reading.guest_id == "vm"
    assert reading.ram_bytes == 1024 * MIB
    assert reading.num_pages == 100 * 256
    assert reading.actual_pages == 100 * 256
    assert before <= reading.ts_s <= time.time()
    stats = server.vm.statistics()
    for key, name in FIRECRACKER_STAT_KEYS.items():
        assert reading.values[STAT_INDEX[name]] == stats[key], key  # bytes and counts as sent
    assert reading.values[STAT_INDEX["total-memory"]] == 1024 * MIB - 40 * MIB - 100 * MIB
    # The statistics interval is set once per microVM, to the configured value.
    await adapter.read("vm")
    assert server.requests("PATCH", "/balloon/statistics") == [
        {"stats_polling_interval_s": STATS_INTERVAL_S}
    ]


async def test_older_firecracker_and_no_stats_yet(
    adapter: FirecrackerAdapter, servers: dict[str, FirecrackerApi], run_dir: Path
) -> None:
    serve(servers, run_dir, "old", newer_stats=False)
    serve(servers, run_dir, "booting", stats_reported=False, amount_mib=8)
    old = await adapter.read("old")
    assert not np.isnan(old.values[: STAT_INDEX["oom-kills"]]).any()
    assert np.isnan(old.values[STAT_INDEX["oom-kills"] :]).all()
    booting = await adapter.read("booting")
    assert np.isnan(booting.values).all()
    assert booting.actual_pages == 8 * 256


async def test_statistics_off_at_boot(
    adapter: FirecrackerAdapter,
    servers: dict[str, FirecrackerApi],
    run_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = serve(servers, run_dir, "quiet", stats_polling_interval_s=0, amount_mib=64)
    with caplog.at_level(logging.WARNING, logger="autoscaler.adapters.firecracker"):
        reading = await adapter.read("quiet")
        await adapter.read("quiet")
    # The target still comes from GET /balloon; the balloon's size and the stats are unknown.
    assert reading.num_pages == 64 * 256
    assert reading.actual_pages is None
    assert reading.values.shape == (N_STATS,)
    assert np.isnan(reading.values).all()
    assert caplog.text.count("statistics were not enabled at boot") == 1
    assert server.requests("PATCH", "/balloon/statistics") == []


async def test_statistics_interval_retried_until_the_driver_is_up(
    adapter: FirecrackerAdapter,
    servers: dict[str, FirecrackerApi],
    run_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = serve(servers, run_dir, "vm", driver_active=False, stats_reported=False)
    with caplog.at_level(logging.WARNING, logger="autoscaler.adapters.firecracker"):
        for _ in range(2):
            reading = await adapter.read("vm")
            assert np.isnan(reading.values).all()
        with pytest.raises(TargetRejected, match="Device is inactive"):
            await adapter.set_target(target_change("vm", 256))
        server.vm.driver_active = True
        server.vm.stats_reported = True
        for _ in range(2):
            reading = await adapter.read("vm")
    assert not np.isnan(reading.values).any()
    assert caplog.text.count("cannot set the statistics interval") == 1
    assert "Device is inactive" in caplog.text
    # Refused twice while the driver was down, accepted once, then not sent again.
    assert len(server.requests("PATCH", "/balloon/statistics")) == 3


async def test_set_target_patches_the_balloon_in_whole_mib(
    adapter: FirecrackerAdapter, servers: dict[str, FirecrackerApi], run_dir: Path
) -> None:
    server = serve(servers, run_dir, "vm", mem_size_mib=512)
    # 100 MiB and 255 pages: the balloon rounds down to 100 MiB, so the guest keeps
    # 412 MiB, more than the 411.0039 MiB the target allows, never less.
    num_pages = 100 * 256 + 255
    await adapter.set_target(target_change("vm", num_pages))
    assert server.requests("PATCH", "/balloon") == [{"amount_mib": 100}]
    reading = await adapter.read("vm")
    assert reading.num_pages == 100 * 256
    allocation = reading.ram_bytes - reading.actual_pages * PAGE_BYTES  # type: ignore[operator]
    assert allocation >= target_change("vm", num_pages).target_bytes
    assert allocation - target_change("vm", num_pages).target_bytes < MIB

    await adapter.set_target(target_change("vm", 0))
    assert (await adapter.read("vm")).actual_pages == 0


async def test_refused_target_carries_the_fault_message(
    adapter: FirecrackerAdapter, servers: dict[str, FirecrackerApi], run_dir: Path
) -> None:
    serve(servers, run_dir, "small", mem_size_mib=128)
    with pytest.raises(TargetRejected, match=r"HTTP 400: .*Amount of pages requested") as raised:
        await adapter.set_target(target_change("small", 256 * 256, ram_bytes=128 * MIB))
    assert raised.value.guest_id == "small"
    with pytest.raises(TargetRejected, match="< 0"):
        await adapter.set_target(target_change("small", -1))

    serve(servers, run_dir, "bare", balloon=False)
    with pytest.raises(TargetRejected, match="No balloon device found"):
        await adapter.set_target(target_change("bare", 256))


async def test_vanished_and_dead_sockets_are_unavailable(
    adapter: FirecrackerAdapter, servers: dict[str, FirecrackerApi], run_dir: Path
) -> None:
    serve(servers, run_dir, "gone")
    serve(servers, run_dir, "dead")
    serve(servers, run_dir, "alive")
    assert await adapter.discover() == ["alive", "dead", "gone"]
    for guest_id in ("gone", "dead", "alive"):
        await adapter.read(guest_id)  # connections now open and pooled

    servers["gone"].kill()  # process and socket file gone
    servers["dead"].kill(unlink=False)  # socket file left behind, nobody listening
    for guest_id in ("gone", "dead"):
        with pytest.raises(GuestUnavailable) as raised:
            await adapter.read(guest_id)
        assert raised.value.guest_id == guest_id
        with pytest.raises(GuestUnavailable):
            await adapter.set_target(target_change(guest_id, 256))
    with pytest.raises(GuestUnavailable, match="no Firecracker API socket"):
        await adapter.read("never-existed")

    # The other microVM is not affected.
    await adapter.set_target(target_change("alive", 512))
    assert (await adapter.read("alive")).actual_pages == 512

    # A new process under the same name: its statistics interval is set again.
    (run_dir / "dead.sock").unlink()
    reborn = serve(servers, run_dir, "dead")
    assert (await adapter.read("dead")).ram_bytes == 512 * MIB
    assert reborn.requests("PATCH", "/balloon/statistics") == [
        {"stats_polling_interval_s": STATS_INTERVAL_S}
    ]


async def test_stuck_vmm_times_out(servers: dict[str, FirecrackerApi], run_dir: Path) -> None:
    server = serve(servers, run_dir, "stuck")
    adapter = await started_adapter(run_dir, call_timeout_s=0.3)
    try:
        server.vm.delay_s = 1.0
        began = time.monotonic()
        with pytest.raises(AdapterTimeout):
            # The same target as below: the stuck request still lands when the delay ends.
            await adapter.set_target(target_change("stuck", 512))
        assert time.monotonic() - began < 0.8
        server.vm.delay_s = 0.0
        await adapter.set_target(target_change("stuck", 512))
        assert (await adapter.read("stuck")).num_pages == 512
    finally:
        await adapter.close()
