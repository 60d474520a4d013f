"""Linux 6.12 guests through the QMP adapter: balloon stat tags 10–15 under memory pressure.

Linux 6.12's virtio-balloon driver sends six more stats than 6.1: oom-kills (tag 10),
alloc-stalls (11), async-scans (12), direct-scans (13), async-reclaims (14) and
direct-reclaims (15). They are the guest's ``oom_kill``, the sum of ``allocstall_*``, and
``pgscan_kswapd``, ``pgscan_direct``, ``pgsteal_kswapd``, ``pgsteal_direct`` × 4096 (bytes),
as ``autoscaler.service.agent.stats_from_proc`` spells out.

Whether they reach QMP depends on QEMU, not on the guest: QEMU keeps a stat only if its tag is
below its own ``VIRTIO_BALLOON_S_NR`` (``virtio_balloon_receive_stats``), and ``qom-get
<balloon> guest-stats`` lists exactly the names of its ``balloon_stat_names[]``. Up to QEMU 9.1
both end at tag 9 (``stat-htlb-pgfail``), so tags 10–15 are dropped on arrival and the reply has
no key for them at all (not even 2^64−1, which is what a known but unsent tag reads as). QEMU 9.2
imported the 6.12 header (``VIRTIO_BALLOON_S_NR`` 16) and named them ``stat-oom-kills`` …
``stat-direct-reclaims`` (commit "hw/virtio: fix crash in processing balloon stats", 9.2.0-rc);
``autoscaler.stats.QMP_STAT_KEYS`` maps those names. Debian 12 has QEMU 7.2, whose binary holds
only the ten older names. So this test asks QEMU for its version and asserts what is true for it:

- QEMU < 9.2: QEMU's reply has only the ten older keys, and the adapter reads tags 10–15 as
  missing (NaN) before and after the pressure, so the agent's wire payload leaves them out;
- QEMU ≥ 9.2: the reply has all 16 keys, the adapter reads all six new tags, equal to the
  guest's own counters, and the scan, reclaim and stall counters grow under the pressure.
  (Checked with QEMU 10.0.2, Debian's bookworm-backports build unpacked and put first on PATH.)

Either way the guest's own counters (memhog's status line reads ``/proc/vmstat``) must show the
reclaim happen: that is what makes the ≥ 9.2 assertions mean something, and what tags 0–9 show
on any QEMU (the page cache in ``disk-caches`` is taken back).

The pressure: each 6.12 guest starts with 96 MiB of clean page cache (``page_cache_mib``; the
guest has no disk and no swap, so without it nothing is reclaimable and the scan/reclaim
counters stay 0), the adapter inflates its balloon to 256 MiB, then memhog asks for 300 MiB.
Reclaim takes the cache (kswapd and direct reclaim both, about 96 MiB in all); then "on"
(deflate-on-oom, booted from the bzImage ``vmlinuz``) gets the rest from its balloon and "off"
(``vmlinux``, PVH) OOM-kills memhog. Measured in seven runs of each guest (6.12.117, QEMU 7.2
and 10.0 alike): before, every one of these counters is 0; after, pgscan_kswapd = pgsteal_kswapd
≈ 20 300–23 600 pages and pgscan_direct = pgsteal_direct ≈ 1 000–4 200 pages (together the
24 576 pages of the cache), allocstall 58–83 ("off") or 4 090–4 320 ("on"), oom_kill 1 ("off")
or 0 ("on"). How the reclaim splits between kswapd and direct reclaim varies, so only kswapd's
share and the total are asserted.

A third guest keeps the 6.1 bzImage booting (the other guest tests use ``vmlinux``), which
together with these covers every kernel series × image combination.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
from qemu.qmp import QMPClient

from autoscaler.adapters.base import AdapterContext, GuestReading
from autoscaler.adapters.qmp import QmpAdapter
from autoscaler.service.agent import stats_payload
from autoscaler.stats import STAT_INDEX, STAT_NAMES
from tests.helpers import reading_after, target_change, wait_actual
from tests.helpers.guest.vm import Guest, GuestSet, GuestSpec, Memhog, boot_guests, qmp_settings

pytestmark = pytest.mark.slow

MIB = 2**20
PAGE = 4096
PAGE_CACHE_MIB = 96
BALLOON_MIB = 256
HOG_MIB = 300
BALLOON = "/machine/peripheral/balloon0"
FIRST_QEMU_WITH_NEW_TAGS = (9, 2)

NEW_TAGS = STAT_NAMES[10:]
OLD_QMP_KEYS = {
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
}
# Tag → (memhog status field, multiplier): how the 6.12 driver computes tags 10–15.
GUEST_COUNTERS = {
    "oom-kills": ("oom_kill", 1),
    "alloc-stalls": ("allocstall", 1),
    "async-scans": ("pgscan_kswapd", PAGE),
    "direct-scans": ("pgscan_direct", PAGE),
    "async-reclaims": ("pgsteal_kswapd", PAGE),
    "direct-reclaims": ("pgsteal_direct", PAGE),
}


@pytest.fixture(scope="module")
def guests() -> Iterator[GuestSet]:
    specs = [
        GuestSpec("on", 512, deflate_on_oom=True, kernel="vmlinuz", page_cache_mib=PAGE_CACHE_MIB),
        GuestSpec(
            "off", 512, deflate_on_oom=False, kernel="vmlinux", page_cache_mib=PAGE_CACHE_MIB
        ),
        GuestSpec("old", 256, flavour="6.1", kernel="vmlinuz"),
    ]
    yield from boot_guests(specs, flavour="6.12")


async def qemu_facts(guest: Guest) -> tuple[tuple[int, int], set[str]]:
    """(QEMU major.minor, the keys of its guest-stats) over a QMP connection of our own.

    QEMU serves one QMP client per socket at a time, so this runs before the adapter connects.
    """
    client = QMPClient("test")
    await client.connect(str(guest.qmp_path))
    try:
        version = await client.execute("query-version")
        stats = await client.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
    finally:
        await client.disconnect()
    assert isinstance(version, dict) and isinstance(stats, dict)
    qemu = version["qemu"]
    return (qemu["major"], qemu["minor"]), set(stats["stats"])


async def settled(hog: Memhog) -> dict[str, int]:
    """memhog's status once two lines in a row have the same reclaim counters."""
    async with asyncio.timeout(30):
        previous = await hog.status()
        while True:
            status = await hog.status()
            if all(status[f] == previous[f] for f, _ in GUEST_COUNTERS.values()):
                return status
            previous = status


def guest_view(status: dict[str, int]) -> dict[str, int]:
    """Tags 10–15 as the guest's driver computes them, from a memhog status line."""
    return {tag: status[field] * scale for tag, (field, scale) in GUEST_COUNTERS.items()}


def new_tags(reading: GuestReading) -> dict[str, float]:
    return {tag: float(reading.values[STAT_INDEX[tag]]) for tag in NEW_TAGS}


def stat(reading: GuestReading, name: str) -> float:
    return float(reading.values[STAT_INDEX[name]])


@dataclass
class Run:
    """What one 6.12 guest went through: the guest's view (memhog) and the adapter's."""

    outcome: str | None
    status_before: dict[str, int]
    status_inflated: dict[str, int]
    status_after: dict[str, int]
    before: GuestReading
    after: GuestReading


async def pressure(adapter: QmpAdapter, guest: Guest) -> Run:
    """Inflate the balloon, make memhog ask for more than is left, wait for it to settle."""
    name = guest.name
    balloon_pages = BALLOON_MIB * MIB // PAGE
    async with Memhog(guest) as hog:
        status_before = await hog.status()
        before = await reading_after(adapter, name, time.time())
        await adapter.set_target(target_change(name, balloon_pages, guest.ram_bytes))
        await wait_actual(adapter, name, balloon_pages)
        await hog.status()  # may have been sampled mid-inflation
        status_inflated = await hog.status()
        mark = len(hog.lines)
        await hog.send(HOG_MIB)
        outcome = await hog.wait_for(rf"^memhog (reached {HOG_MIB}|died)", 90, since=mark)
        status_after = await settled(hog)
        after = await reading_after(adapter, name, time.time())
    return Run(outcome, status_before, status_inflated, status_after, before, after)


async def test_612_reclaim_counters_reach_the_adapter_as_far_as_qemu_passes_them(
    guests: GuestSet,
) -> None:
    facts = {name: await qemu_facts(guests[name]) for name in ("on", "off")}
    qemu_version, qmp_keys = facts["on"]
    passes_new_tags = qemu_version >= FIRST_QEMU_WITH_NEW_TAGS
    print(f"QEMU {qemu_version}: guest-stats keys {sorted(qmp_keys)}")
    if passes_new_tags:
        assert qmp_keys >= OLD_QMP_KEYS | {f"stat-{tag}" for tag in NEW_TAGS}
    else:
        assert qmp_keys == OLD_QMP_KEYS, "QEMU < 9.2 lists tags 0–9 only"
    assert facts["off"][1] == qmp_keys

    settings = qmp_settings(guests)
    adapter = QmpAdapter()
    await adapter.start(AdapterContext(settings))
    try:
        on, off = await asyncio.gather(
            pressure(adapter, guests["on"]), pressure(adapter, guests["off"])
        )
    finally:
        await adapter.close()

    balloon_pages = BALLOON_MIB * MIB // PAGE
    cache_bytes = PAGE_CACHE_MIB * MIB
    for name, run in (("on", on), ("off", off)):
        before, after = run.before, run.after
        guest_before, guest_after = guest_view(run.status_before), guest_view(run.status_after)
        print(f"{name}: {run.outcome}; balloon {after.actual_pages} pages after")
        print(f"{name}: guest before   {guest_before}")
        print(f"{name}: guest after    {guest_after}")
        print(f"{name}: adapter before {new_tags(before)}")
        print(f"{name}: adapter after  {new_tags(after)}")

        # The balloon as on 6.1 (tests/guests/test_qmp.py): deflate-on-oom keeps ballooned pages in
        # MemTotal and gives them back to memhog; without it MemTotal shrinks by the balloon,
        # the balloon holds and memhog is OOM-killed.
        inflated_kb = run.status_before["MemTotal_kb"] - run.status_inflated["MemTotal_kb"]
        assert inflated_kb == (0 if name == "on" else BALLOON_MIB * 1024), (name, run)
        if name == "on":
            assert run.outcome == f"memhog reached {HOG_MIB}", run
            assert after.actual_pages is not None and after.actual_pages < balloon_pages
        else:
            assert run.outcome is not None and "died" in run.outcome, run
            assert after.actual_pages == balloon_pages

        # The guest did reclaim: the counters behind tags 11–15 moved, and together the scans
        # and reclaims took about the whole page cache (the guest has nothing else to reclaim).
        grew = {tag: guest_after[tag] - guest_before[tag] for tag in NEW_TAGS}
        assert grew["async-scans"] + grew["direct-scans"] >= 0.8 * cache_bytes, (name, grew)
        assert grew["async-reclaims"] + grew["direct-reclaims"] >= 0.8 * cache_bytes, (name, grew)
        assert grew["async-scans"] > 0, (name, grew)  # kswapd woke up
        assert grew["alloc-stalls"] > 0, (name, grew)  # and allocations waited for reclaim
        assert grew["oom-kills"] == (0 if name == "on" else 1), (name, grew)

        # Tags 0–9 show it on any QEMU: the page cache was there, and was taken back.
        assert stat(before, "disk-caches") >= cache_bytes
        assert stat(after, "disk-caches") < 0.2 * cache_bytes
        assert stat(after, "minor-faults") > stat(before, "minor-faults")
        assert stat(before, "total-memory") == run.status_before["MemTotal_kb"] * 1024

        if passes_new_tags:
            # Every tag is reported, as the guest counts it (its counters had settled before
            # the reading was taken).
            assert new_tags(before) == guest_before, name
            assert new_tags(after) == guest_after, name
            for tag in ("async-scans", "async-reclaims", "alloc-stalls"):
                assert new_tags(after)[tag] > new_tags(before)[tag], (name, tag)
        else:
            # Dropped by QEMU: missing for the adapter, and left out of what the agent sends.
            for reading in (before, after):
                assert all(math.isnan(v) for v in new_tags(reading).values()), name
                wire = orjson.loads(stats_payload(reading))["stats"]
                assert not set(wire) & set(NEW_TAGS), wire
                assert len(wire) == 10, wire


async def test_the_61_bzimage_boots_and_balloons(guests: GuestSet) -> None:
    """The 6.1 kernel from ``vmlinuz`` (xz-compressed bzImage) works like its ``vmlinux``."""
    guest = guests["old"]
    assert re.search(r"guest-init: ready kernel=6\.1\.", guest.console())
    settings = qmp_settings(guests)
    adapter = QmpAdapter()
    await adapter.start(AdapterContext(settings))
    try:
        reading = await reading_after(adapter, "old", 0)
        assert reading.ram_bytes == 256 * MIB
        assert all(not math.isnan(v) for v in reading.values[:10])
        # 6.1 sends tags 0–9 only (a QEMU that knows tags 10–15 reads them as 2^64−1: NaN too).
        assert all(math.isnan(v) for v in new_tags(reading).values())
        pages = 64 * MIB // PAGE
        await adapter.set_target(target_change("old", pages, 256 * MIB))
        await wait_actual(adapter, "old", pages)
    finally:
        await adapter.close()
