"""The QMP adapter against real QEMU guests (tests/helpers/guest): stats, targets, deflate-on-oom,
crashes.

Two 512 MiB guests boot once for the module, one with deflate-on-oom and one without. The
guest's own view (memhog's MemTotal/MemFree status line) checks what QMP says.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Awaitable, Iterator

import numpy as np
import pytest

from autoscaler.adapters.base import (
    AdapterContext,
    AdapterTimeout,
    GuestUnavailable,
    TargetRejected,
)
from autoscaler.adapters.qmp import QmpAdapter
from autoscaler.stats import STAT_INDEX
from tests.helpers import probe_until, reading_after, target_change, wait_actual
from tests.helpers.guest.vm import GuestSet, GuestSpec, Memhog, boot_guests, qmp_settings

pytestmark = pytest.mark.slow

MIB = 2**20
PAGE = 4096


@pytest.fixture(scope="module")
def guests() -> Iterator[GuestSet]:
    specs = [GuestSpec("on", 512, deflate_on_oom=True), GuestSpec("off", 512, deflate_on_oom=False)]
    yield from boot_guests(specs)


async def started(guests: GuestSet) -> QmpAdapter:
    adapter = QmpAdapter()
    await adapter.start(AdapterContext(qmp_settings(guests)))
    return adapter


async def timed(call: Awaitable[object]) -> tuple[object, float]:
    """(result or exception, seconds taken)."""
    started_s = time.monotonic()
    try:
        result = await call
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started_s


def stat(values: np.ndarray, name: str) -> float:
    return float(values[STAT_INDEX[name]])


async def test_reads_stats_sets_targets_and_deflate_on_oom_decides_memtotal(
    guests: GuestSet,
) -> None:
    adapter = await started(guests)
    try:
        assert sorted(await adapter.discover()) == ["off", "on"]
        async with Memhog(guests["on"]) as hog_on, Memhog(guests["off"]) as hog_off:
            hogs = {"on": hog_on, "off": hog_off}
            before = {name: await hog.status() for name, hog in hogs.items()}
            first = {name: await adapter.read(name) for name in hogs}
            for reading in first.values():
                assert reading.ram_bytes == 512 * MIB
                assert reading.actual_pages == 0
                assert reading.num_pages is None  # nothing sent yet, and QEMU does not say

            # The polling interval set on connect makes QEMU ask for fresh stats every second.
            for name in hogs:
                await reading_after(adapter, name, first[name].ts_s, timeout_s=10)
            for name in hogs:
                reading = await adapter.read(name)
                assert abs(reading.ts_s - time.time()) < 5  # last-update is host wall-clock time
                values = reading.values
                assert stat(values, "total-memory") == before[name]["MemTotal_kb"] * 1024
                assert stat(values, "free-memory") == pytest.approx(
                    before[name]["MemFree_kb"] * 1024, rel=0.05
                )
                assert stat(values, "available-memory") > 0
                assert stat(values, "disk-caches") > 0
                assert stat(values, "minor-faults") > 0
                # QEMU calls these stat-htlb-pgalloc/-pgfail; the adapter maps them.
                assert stat(values, "hugetlb-allocations") == 0
                assert stat(values, "hugetlb-failures") == 0
                # Linux 6.1's driver does not send tags 10-15 (and QEMU 7.2 has no names for
                # them): missing, not zero.
                assert math.isnan(stat(values, "oom-kills"))

            # Inflate both balloons to 256 MiB: balloon(value = ram − num_pages × 4096).
            pages = 256 * MIB // PAGE
            sent_s = time.monotonic()
            await asyncio.gather(*(adapter.set_target(target_change(n, pages)) for n in hogs))
            set_s = time.monotonic() - sent_s
            waits = [wait_actual(adapter, n, pages, 30) for n in hogs]
            inflate_s = dict(zip(hogs, await asyncio.gather(*waits), strict=True))
            print(f"balloon commands {set_s:.3f} s; inflated 256 MiB in {inflate_s}")
            for name in hogs:
                reading = await adapter.read(name)
                assert reading.num_pages == pages
                assert adapter.last_actual_bytes(name) == 256 * MIB  # BALLOON_CHANGE followed

            inflated_wall_s = time.time()
            await asyncio.sleep(1.2)  # skip a status line sampled mid-inflation
            after = {name: await hog.status() for name, hog in hogs.items()}
            for name in hogs:
                dropped_free_kb = before[name]["MemFree_kb"] - after[name]["MemFree_kb"]
                assert dropped_free_kb > 0.9 * 256 * 1024, (name, before[name], after[name])
            # deflate-on-oom keeps ballooned pages in MemTotal; without it MemTotal shrinks by
            # exactly the balloon.
            assert after["on"]["MemTotal_kb"] == before["on"]["MemTotal_kb"]
            assert before["off"]["MemTotal_kb"] - after["off"]["MemTotal_kb"] == 256 * 1024

            # The stats QEMU relays say the same once refreshed.
            total = {
                n: stat((await reading_after(adapter, n, inflated_wall_s)).values, "total-memory")
                for n in hogs
            }
            assert total["on"] == before["on"]["MemTotal_kb"] * 1024
            assert total["off"] == after["off"]["MemTotal_kb"] * 1024

            # A balloon as large as RAM would be a target of 0 bytes, which QEMU refuses: the
            # adapter asks for one page instead and the guest's driver stops at its own floor.
            await adapter.set_target(target_change("on", 512 * MIB // PAGE))
            with pytest.raises(TargetRejected):
                await adapter.set_target(target_change("on", 512 * MIB // PAGE + 1))
            with pytest.raises(TargetRejected):
                await adapter.set_target(target_change("on", 2**32))

            # Deflating gives everything back.
            await asyncio.gather(*(adapter.set_target(target_change(n, 0)) for n in hogs))
            waits = [wait_actual(adapter, n, 0, 30) for n in hogs]
            deflate_s = dict(zip(hogs, await asyncio.gather(*waits), strict=True))
            print(f"deflated in {deflate_s}")
    finally:
        await adapter.close()


async def test_a_hung_or_killed_guest_fails_alone_and_is_retried(guests: GuestSet) -> None:
    adapter = QmpAdapter()
    await adapter.start(AdapterContext(qmp_settings(guests), adapter_timeout_s=1.0))
    try:
        await asyncio.gather(adapter.read("on"), adapter.read("off"))  # both connected

        # A QEMU that stops answering (SIGSTOP) times out on its own; the other guest's calls
        # are not held up.
        os.kill(guests["off"].pid, signal.SIGSTOP)
        try:
            hung, fine = await asyncio.gather(timed(adapter.read("off")), timed(adapter.read("on")))
        finally:
            os.kill(guests["off"].pid, signal.SIGCONT)
        assert isinstance(hung[0], AdapterTimeout), hung
        assert not isinstance(fine[0], BaseException), fine
        assert fine[1] < 0.5 < hung[1], (fine, hung)
        print(f"hung guest timed out after {hung[1]:.2f} s, the other answered in {fine[1]:.3f} s")
        # The wedged connection was dropped; the next call connects again.
        assert (await adapter.read("off")).ram_bytes == 512 * MIB

        guests["off"].kill()
        for _ in range(2):  # dropped, retried on the next call, still gone
            with pytest.raises(GuestUnavailable) as raised:
                await adapter.read("off")
            assert raised.value.guest_id == "off"
        with pytest.raises(GuestUnavailable):
            await adapter.set_target(target_change("off", 1000))
        # The dead guest's socket file is left behind by a crash: still listed, and reading it
        # fails fast (connection refused) instead of waiting for a timeout.
        assert "off" in await adapter.discover()

        started_s = time.monotonic()
        results = await asyncio.gather(
            adapter.read("on"),
            adapter.read("off"),
            adapter.set_target(target_change("on", 1000)),
            return_exceptions=True,
        )
        elapsed_s = time.monotonic() - started_s
        assert not isinstance(results[0], BaseException)
        assert isinstance(results[1], GuestUnavailable)
        assert results[2] is None
        assert elapsed_s < 2.0
        assert (await adapter.read("on")).num_pages == 1000
        await adapter.set_target(target_change("on", 0))

        with pytest.raises(GuestUnavailable):
            await adapter.read("no-such-guest")
    finally:
        await adapter.close()


async def test_before_the_driver_binds_stats_are_missing_and_a_target_waits() -> None:
    # Its own guest, read within milliseconds of QEMU starting: the guest kernel needs about
    # 2 s (TCG) before its balloon driver binds.
    with GuestSet([GuestSpec("early", 256)], wait=False) as early:
        adapter = await started(early)
        try:
            reading = await adapter.read("early")
            assert reading.ram_bytes == 256 * MIB
            assert reading.actual_pages == 0
            assert np.isnan(reading.values).all()  # last-update 0: no report yet
            assert abs(reading.ts_s - time.time()) < 2  # sampled now, not at time 0

            # QEMU accepts a target before the driver is up; the driver applies it on binding.
            pages = 64 * MIB // PAGE
            await adapter.set_target(target_change("early", pages, 256 * MIB))
            bound_s = await wait_actual(adapter, "early", pages, 60)
            await probe_until(
                lambda: adapter.read("early"),
                lambda r: not np.isnan(r.values).all(),
                10,
                what="stats after the driver bound",
            )
            print(f"target applied {bound_s:.1f} s after it was sent, when the driver bound")
        finally:
            await adapter.close()
