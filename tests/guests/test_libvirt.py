"""The libvirt adapter against a real libvirtd and real TCG domains that boot the test guest.

tests/helpers/libvirt_env.py starts virtlogd and libvirtd as root when they are not running (and
stops them at the end), and boots transient domains of the guest in tests/helpers/guest. The
guest's own /proc/meminfo, read from memhog's status lines, confirms what libvirt reports. The
module is skipped, with the reason, only when libvirtd cannot run here (not root, packages
missing); with CI=true it fails instead, since .ci/run installs everything it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autoscaler.adapters.base import (
    AdapterContext,
    AdapterTimeout,
    GuestReading,
    GuestUnavailable,
    TargetRejected,
)
from autoscaler.config import AdapterSettings, LibvirtSettings, Settings
from autoscaler.plugins import create_adapter
from autoscaler.stats import PAGE_BYTES, S_AVAILABLE, S_FREE, S_TOTAL

try:
    import libvirt  # type: ignore[import-untyped]

    from autoscaler.adapters.libvirt import LibvirtAdapter
except ImportError as exc:
    if os.environ.get("CI"):
        raise
    pytest.skip(
        f"libvirt-python is not installed ({exc}): apt-get install -y libvirt-dev pkg-config, "
        "then pip install libvirt-python",
        allow_module_level=True,
    )

from tests.helpers import probe_until, target_change
from tests.helpers.libvirt_env import (
    URI,
    Daemons,
    GuestControl,
    GuestDomain,
    LibvirtUnavailable,
    domain_xml,
    guest_images,
    start_daemons,
)

pytestmark = pytest.mark.slow

MIB = 2**20
RAM_BYTES = 512 * MIB
STATS_INTERVAL_S = 1
"""The adapter's stats period; the domains boot with 2 s, so the live XML shows who set it."""
BOOT_TIMEOUT_S = 90.0


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemons() -> Iterator[Daemons]:
    try:
        started = start_daemons()
    except LibvirtUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"libvirtd cannot run: {exc}")
        pytest.skip(f"libvirtd cannot run here: {exc}")
    yield started
    started.stop()


@contextlib.contextmanager
def connection(uri: str = URI) -> Iterator[Any]:
    """A libvirt connection of the tests' own, to create, destroy and inspect domains.

    Opened per use: a connection does not survive the libvirtd restart of one of the tests.
    """
    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def virt(daemons: Daemons) -> Iterator[Any]:
    with connection(daemons.uri) as conn:
        yield conn


@pytest.fixture(scope="module")
def boot(daemons: Daemons) -> Iterator[Callable[..., GuestDomain]]:
    """Creates transient test domains; destroys every one still running at the end."""
    images = guest_images()
    # Unix socket paths are limited to 107 bytes: a short directory of its own under /tmp.
    workdir = Path(tempfile.mkdtemp(prefix="lv.", dir="/tmp"))
    names: list[str] = []

    def create(name: str | None = None, *, balloon: bool = True) -> GuestDomain:
        domain = GuestDomain(name or f"bt-{uuid.uuid4().hex[:8]}", workdir)
        with connection(daemons.uri) as conn:
            conn.createXML(domain_xml(domain, images, balloon=balloon), 0)
        names.append(domain.name)
        return domain

    try:
        yield create
    finally:
        destroy_all(daemons.uri, names)
        shutil.rmtree(workdir, ignore_errors=True)


def destroy_all(uri: str, names: list[str]) -> None:
    """Destroy the test domains; kill a QEMU that libvirtd could not stop (by its pid file)."""
    try:
        with connection(uri) as conn:
            for name in set(names):
                with contextlib.suppress(libvirt.libvirtError):  # already gone
                    conn.lookupByName(name).destroy()
    except libvirt.libvirtError:
        pass  # libvirtd is not answering: fall through to the pid files
    for name in set(names):
        pidfile = Path(f"/run/libvirt/qemu/{name}.pid")
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


@pytest.fixture(scope="module")
def steady(boot: Callable[..., GuestDomain]) -> GuestDomain:
    """A domain that stays up for the whole module."""
    return boot()


def settings(uri: str = URI) -> Settings:
    return Settings(
        adapter=AdapterSettings(
            kind="libvirt", libvirt=LibvirtSettings(uri=uri, stats_interval_s=STATS_INTERVAL_S)
        )
    )


@pytest.fixture
async def adapter(daemons: Daemons) -> AsyncIterator[LibvirtAdapter]:
    started = LibvirtAdapter(call_timeout_s=20.0)
    await started.start(AdapterContext(settings(daemons.uri)))
    yield started
    await started.close()


# -- building blocks -------------------------------------------------------------------------------


async def booted(adapter: LibvirtAdapter, guest_id: str) -> GuestReading:
    """The first reading with guest stats (the balloon driver is up and has reported)."""
    return await probe_until(
        lambda: adapter.read(guest_id),
        lambda r: not np.isnan(r.values[S_FREE]),
        BOOT_TIMEOUT_S,
        what=f"stats of {guest_id}",
    )


def stats_period_s(virt: Any, name: str) -> str:
    xml: str = virt.lookupByName(name).XMLDesc(0)
    return xml.split("<stats period='", 1)[1].split("'", 1)[0]


# -- tests -----------------------------------------------------------------------------------------


def test_alias_resolves_to_the_adapter() -> None:
    assert isinstance(create_adapter("libvirt", {"call_timeout_s": 2.0}), LibvirtAdapter)


async def test_reads_real_stats_and_sets_a_target(
    adapter: LibvirtAdapter, steady: GuestDomain, virt: Any
) -> None:
    started = time.monotonic()
    reading = await booted(adapter, steady.name)
    control = await asyncio.to_thread(GuestControl, steady.control)
    try:
        guest = await asyncio.to_thread(control.meminfo)
        assert steady.name in await adapter.discover()
        assert reading.ram_bytes == RAM_BYTES
        assert reading.actual_pages == 0
        assert reading.num_pages is None  # no target set by this adapter yet
        assert abs(reading.ts_s - time.time()) < 30
        # libvirt's KiB, renamed, back in bytes: the guest's own MemTotal, exactly.
        assert reading.values[S_TOTAL] == guest.mem_total_kb * 1024
        assert 0 < reading.values[S_AVAILABLE] <= reading.values[S_TOTAL]
        assert np.isnan(reading.values[10:]).all()  # libvirt passes tags 0–9 only
        assert stats_period_s(virt, steady.name) == str(STATS_INTERVAL_S)
        boot_s = time.monotonic() - started

        # A 128 MiB balloon leaves the guest 384 MiB.
        balloon_pages = 128 * MIB // PAGE_BYTES
        set_at = time.monotonic()
        await adapter.set_target(target_change(steady.name, balloon_pages, RAM_BYTES))
        reading = await probe_until(
            lambda: adapter.read(steady.name),
            lambda r: r.actual_pages == balloon_pages,
            30,
            what="the balloon at 128 MiB",
        )
        inflate_s = time.monotonic() - set_at
        assert reading.num_pages == balloon_pages
        domain = virt.lookupByName(steady.name)
        assert domain.memoryStats()["actual"] == 384 * 1024
        await probe_until(
            lambda: asyncio.to_thread(domain.info),
            lambda info: info[2] == 384 * 1024,  # current memory, KiB
            10,
            what="info() memory at 384 MiB",
        )
        await probe_until(
            lambda: asyncio.to_thread(adapter.balloon_event_bytes, steady.name),
            lambda actual: actual == 384 * MIB,
            10,
            what="a BALLOON_CHANGE event at 384 MiB",
        )
        # Without deflate-on-oom the guest's MemTotal shrinks by the balloon: 128 MiB.
        shrunk_kb = guest.mem_total_kb - 128 * 1024
        guest_after = await probe_until(
            lambda: asyncio.to_thread(control.meminfo),
            lambda info: info.mem_total_kb == shrunk_kb,
            15,
            what="the guest's MemTotal 128 MiB smaller",
        )
        assert guest_after.mem_free_kb < guest.mem_free_kb - 120 * 1024
        await probe_until(
            lambda: adapter.read(steady.name),
            lambda r: r.values[S_TOTAL] == shrunk_kb * 1024,
            15,
            what="total-memory in the stats 128 MiB smaller",
        )
        logging.getLogger(__name__).info(
            "libvirt: stats %.1f s after start, balloon inflated in %.2f s", boot_s, inflate_s
        )
    finally:
        control.close()
        await adapter.set_target(target_change(steady.name, 0, RAM_BYTES))


async def test_destroyed_domain_is_unavailable_and_others_carry_on(
    adapter: LibvirtAdapter, steady: GuestDomain, boot: Callable[..., GuestDomain], virt: Any
) -> None:
    victim = boot()
    await booted(adapter, victim.name)
    await booted(adapter, steady.name)
    assert stats_period_s(virt, victim.name) == str(STATS_INTERVAL_S)
    await adapter.set_target(target_change(victim.name, 1024, RAM_BYTES))

    virt.lookupByName(victim.name).destroy()
    with pytest.raises(GuestUnavailable) as raised:
        await adapter.read(victim.name)
    assert raised.value.guest_id == victim.name
    with pytest.raises(GuestUnavailable):
        await adapter.set_target(target_change(victim.name, 2048, RAM_BYTES))
    assert victim.name not in await adapter.discover()
    # The other domain is not affected, nor is the connection.
    assert (await adapter.read(steady.name)).ram_bytes == RAM_BYTES
    await adapter.set_target(target_change(steady.name, 0, RAM_BYTES))

    # Re-created under the same name: a new domain, so its stats period is set again and the
    # old target is not reported as its own.
    boot(victim.name)
    reading = await booted(adapter, victim.name)
    assert reading.num_pages is None
    assert stats_period_s(virt, victim.name) == str(STATS_INTERVAL_S)
    await adapter.set_target(target_change(victim.name, 2048, RAM_BYTES))
    await probe_until(
        lambda: adapter.read(victim.name),
        lambda r: r.actual_pages == 2048,
        30,
        what="the re-created domain's balloon at 8 MiB",
    )
    virt.lookupByName(victim.name).destroy()


async def test_target_refusals(
    adapter: LibvirtAdapter, boot: Callable[..., GuestDomain], virt: Any
) -> None:
    no_balloon = boot(balloon=False)
    try:
        # The adapter refuses a target that leaves the guest nothing, before asking libvirt.
        with pytest.raises(TargetRejected, match="leaves no memory"):
            await adapter.set_target(
                target_change(no_balloon.name, RAM_BYTES // PAGE_BYTES, RAM_BYTES)
            )
        # libvirt refuses a live change on a domain without a balloon device.
        with pytest.raises(TargetRejected, match="setMemoryFlags"):
            await adapter.set_target(target_change(no_balloon.name, 1024, RAM_BYTES))
        reading = await adapter.read(no_balloon.name)
        assert reading.actual_pages is None
        assert np.isnan(reading.values).all()
    finally:
        virt.lookupByName(no_balloon.name).destroy()


async def test_unreachable_libvirt_is_unavailable_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "no-such.sock"
    unreachable = LibvirtAdapter(call_timeout_s=5.0)
    with caplog.at_level(logging.WARNING, logger="autoscaler.adapters.libvirt"):
        await unreachable.start(AdapterContext(settings(f"qemu+unix:///system?socket={missing}")))
    assert "unreachable at start" in caplog.text
    try:
        with pytest.raises(GuestUnavailable, match="cannot connect"):
            await unreachable.read("any")
        with pytest.raises(GuestUnavailable):
            await unreachable.discover()
    finally:
        await unreachable.close()


async def test_reconnects_after_libvirtd_restarts(
    adapter: LibvirtAdapter,
    daemons: Daemons,
    steady: GuestDomain,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if "libvirtd" not in daemons.started:
        pytest.skip("libvirtd was running before the tests: not restarting someone else's daemon")
    await booted(adapter, steady.name)
    with caplog.at_level(logging.INFO, logger="autoscaler.adapters.libvirt"):
        restart_s = await asyncio.to_thread(daemons.restart_libvirtd)
        failures = 0
        while True:
            try:
                reading = await adapter.read(steady.name)
                break
            except GuestUnavailable:
                # The one call that finds the old connection dead, if the close event has not
                # arrived before it.
                failures += 1
                assert failures == 1
    assert reading.ram_bytes == RAM_BYTES
    logging.getLogger(__name__).info("libvirt: libvirtd restarted in %.2f s", restart_s)
    assert "lost" in caplog.text
    assert "connected to libvirt" in caplog.text
    assert restart_s < 20


async def test_hung_libvirtd_times_out_then_recovers(daemons: Daemons, steady: GuestDomain) -> None:
    pid = daemons.started.get("libvirtd")
    if pid is None:
        pytest.skip("libvirtd was running before the tests: not stopping someone else's daemon")
    quick = LibvirtAdapter(call_timeout_s=1.0)
    await quick.start(AdapterContext(settings(daemons.uri)))
    try:
        await booted(quick, steady.name)
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(AdapterTimeout):
                await quick.read(steady.name)
            assert time.monotonic() - began < 2.0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert (await quick.read(steady.name)).ram_bytes == RAM_BYTES
    finally:
        await quick.close()
