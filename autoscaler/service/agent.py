"""The agent: publishes guest stats over MQTT and, on a host, applies the targets it receives.

Two modes (``agent.mode``):

- **host** (:class:`HostAgent`): runs beside the hypervisor with a device adapter
  (``adapter.kind`` = ``qmp``, ``libvirt``, ``firecracker``: a
  :class:`~autoscaler.adapters.base.DeviceAdapter`). Every ``agent.interval_s`` it lists the
  local guests, reads them all concurrently (each bounded by the adapter's own timeout, with
  :func:`~autoscaler.adapters.base.call_adapter` as a safety net) and
  publishes each new sample on ``{prefix}/guest/{host_id}/{guest}/stats``, plus this machine's
  memory on ``{prefix}/host/{host_id}/stats``. It subscribes to
  ``{prefix}/guest/{host_id}/+/target`` and applies every valid target command through the
  adapter, the newest one per guest winning.
- **guest** (:class:`GuestAgent`): runs inside a VM or container without access to the
  balloon device and publishes the 16 stats from ``/proc/meminfo`` and ``/proc/vmstat`` on
  ``{prefix}/guest/{host_id}/{guest_id}/stats``, computed exactly as the Linux driver does
  (``update_balloon_stats`` in drivers/virtio/virtio_balloon.c; see :func:`stats_from_proc`).

Bad input — a malformed target, a target for a guest this host does not have, a guest that
cannot be read — is counted by reason, logged at most once per reason every 10 s, and never
stops the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Final

import numpy as np

from autoscaler.adapters.base import (
    AdapterContext,
    AdapterError,
    DeviceAdapter,
    GuestReading,
    Target,
    TargetRejected,
    call_adapter,
)
from autoscaler.config import ConfigError, Settings
from autoscaler.plugins import PluginError, create_adapter
from autoscaler.service.lifecycle import every, run_until
from autoscaler.service.logs import CountedWarnings
from autoscaler.service.mqtt import MqttLink, MqttUnavailable
from autoscaler.stats import N_STATS, PAGE_BYTES, STAT_INDEX
from autoscaler.wire import (
    PayloadError,
    TopicKind,
    Topics,
    decode_target,
    encode_batch,
    encode_guest_stats,
    encode_host_stats,
    valid_id,
)

log = logging.getLogger(__name__)

PROC_ROOT: Final = Path("/proc")
KIB: Final = 1024
# How many guests a host agent reads at once: enough to finish a poll of a big host well
# within the interval, few enough not to open hundreds of sockets in the same instant.
READ_CONCURRENCY: Final = 64
BATCH_GATHER_S: Final = 0.05


class AgentConfigError(ConfigError):
    """The agent cannot run with this configuration; the message says why."""


# -- /proc -------------------------------------------------------------------------------------


def read_meminfo(proc_root: Path = PROC_ROOT) -> dict[str, int]:
    """``/proc/meminfo`` as bytes (``kB`` values × 1024) or plain counts (HugePages_*)."""
    values: dict[str, int] = {}
    for line in (proc_root / "meminfo").read_text().splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not fields:
            continue
        with contextlib.suppress(ValueError):
            values[key] = int(fields[0]) * (KIB if fields[1:] == ["kB"] else 1)
    return values


def read_vmstat(proc_root: Path = PROC_ROOT) -> dict[str, int]:
    """``/proc/vmstat``: counter name → value (pages or events)."""
    values: dict[str, int] = {}
    for line in (proc_root / "vmstat").read_text().splitlines():
        fields = line.split()
        if len(fields) == 2:
            with contextlib.suppress(ValueError):
                values[fields[0]] = int(fields[1])
    return values


def stats_from_proc(
    meminfo: dict[str, int], vmstat: dict[str, int], *, page_bytes: int
) -> np.ndarray:
    """The 16 balloon stats as the Linux driver computes them, float64[16], NaN where missing.

    ``update_balloon_stats`` (drivers/virtio/virtio_balloon.c) reads the same kernel counters
    that /proc shows:

    - swap-in/swap-out = ``pswpin``/``pswpout`` × PAGE_SIZE; major-faults = ``pgmajfault``;
      minor-faults = ``pgfault`` (counts every fault, major ones included);
    - free-memory = ``si_meminfo().freeram`` = MemFree; total-memory = ``totalram`` = MemTotal;
      available-memory = ``si_mem_available()`` = MemAvailable;
    - disk-caches = ``global_node_page_state(NR_FILE_PAGES)`` × PAGE_SIZE: vmstat's
      ``nr_file_pages``, which is meminfo's Cached + Buffers + SwapCached;
    - hugetlb-allocations/failures = ``HTLB_BUDDY_PGALLOC``/``_FAIL`` events
      (``htlb_buddy_alloc_success``/``htlb_buddy_alloc_fail``; only with CONFIG_HUGETLB_PAGE);
    - oom-kills = ``oom_kill``; alloc-stalls = the sum of the per-zone ``allocstall_*`` events;
    - async/direct scans = ``pgscan_kswapd``/``pgscan_direct`` × PAGE_SIZE and async/direct
      reclaims = ``pgsteal_kswapd``/``pgsteal_direct`` × PAGE_SIZE.

    The driver sends tags 10–15 only from Linux 6.12; the counters behind them are older, so
    this reports them on any kernel that has them.
    """
    values = np.full(N_STATS, np.nan)

    def put(name: str, value: int | None, scale: int = 1) -> None:
        if value is not None:
            values[STAT_INDEX[name]] = value * scale

    put("swap-in", vmstat.get("pswpin"), page_bytes)
    put("swap-out", vmstat.get("pswpout"), page_bytes)
    put("major-faults", vmstat.get("pgmajfault"))
    put("minor-faults", vmstat.get("pgfault"))
    put("free-memory", meminfo.get("MemFree"))
    put("total-memory", meminfo.get("MemTotal"))
    put("available-memory", meminfo.get("MemAvailable"))
    file_pages = vmstat.get("nr_file_pages")
    if file_pages is not None:
        put("disk-caches", file_pages, page_bytes)
    elif "Cached" in meminfo:  # vmstat without node counters: meminfo's pieces of the same sum
        put(
            "disk-caches",
            meminfo["Cached"] + meminfo.get("Buffers", 0) + meminfo.get("SwapCached", 0),
        )
    put("hugetlb-allocations", vmstat.get("htlb_buddy_alloc_success"))
    put("hugetlb-failures", vmstat.get("htlb_buddy_alloc_fail"))
    put("oom-kills", vmstat.get("oom_kill"))
    # allocstall_{dma,dma32,normal,movable,device,high}: the driver adds up every zone's
    # counter (kernels before 4.10 had a single ``allocstall``).
    stalls = [v for k, v in vmstat.items() if k == "allocstall" or k.startswith("allocstall_")]
    put("alloc-stalls", sum(stalls) if stalls else None)
    put("async-scans", vmstat.get("pgscan_kswapd"), page_bytes)
    put("direct-scans", vmstat.get("pgscan_direct"), page_bytes)
    put("async-reclaims", vmstat.get("pgsteal_kswapd"), page_bytes)
    put("direct-reclaims", vmstat.get("pgsteal_direct"), page_bytes)
    return values


def host_memory(proc_root: Path = PROC_ROOT) -> tuple[int, int]:
    """(MemTotal, MemAvailable) of this machine in bytes."""
    meminfo = read_meminfo(proc_root)
    return meminfo["MemTotal"], meminfo["MemAvailable"]


# -- wire payloads -----------------------------------------------------------------------------


def stats_payload(reading: GuestReading) -> bytes:
    """A reading as a guest stats payload; num_pages and actual only when known."""
    return encode_guest_stats(
        reading.ts_s,
        reading.ram_bytes,
        reading.values,
        num_pages=reading.num_pages,
        actual_pages=reading.actual_pages,
    )


# -- lifecycle ---------------------------------------------------------------------------------


async def _publish(link: MqttLink, topic: str, payload: bytes, faults: CountedWarnings) -> bool:
    """Publish at QoS 0; a failure is counted (``publish_errors``) and logged at most every 10 s."""
    try:
        await link.publish(topic, payload, qos=0)
    except MqttUnavailable as exc:
        faults.warn("publish_errors", "publish failed: %s", exc)
        return False
    return True


# -- host mode ---------------------------------------------------------------------------------


class HostAgent:
    """Publishes the stats of this host's guests and applies their targets (module docstring)."""

    def __init__(
        self,
        settings: Settings,
        adapter: DeviceAdapter,
        *,
        proc_root: Path = PROC_ROOT,
    ) -> None:
        self.settings = settings
        self.adapter = adapter
        self.host_id = settings.agent.host_id
        self.proc_root = proc_root
        self.topics = Topics(settings.mqtt.topic_prefix)
        self._batch: dict[str, GuestReading] = {}
        self._batch_task: asyncio.Task[None] | None = None
        self.link = MqttLink(
            settings.mqtt,
            subscriptions=[(self.topics.target_filter(self.host_id), 1)],
            on_message=self.handle_message,
            name="agent",
        )
        self.timeout_s = settings.agent.adapter_timeout_s
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        """Adapter failures by error type (``GuestUnavailable`` …)."""
        self.rejected: Counter[str] = Counter()
        """Target commands not applied, by reason."""
        self.readings: dict[str, GuestReading] = {}
        """The latest reading of every guest present at the last poll."""
        self._published_ts: dict[str, float] = {}
        self._wanted: dict[str, Target] = {}
        self._done: dict[str, Target] = {}
        """Per guest, the wanted target that was applied (or rejected by the device)."""
        self._appliers: dict[str, asyncio.Task[None]] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._semaphore = asyncio.Semaphore(READ_CONCURRENCY)
        self._faults = CountedWarnings(log, self.counters)
        self._errors = CountedWarnings(log, self.errors)
        self._rejections = CountedWarnings(log, self.rejected)

    # -- reading and publishing ----------------------------------------------------------------

    def _count_error(self, error: AdapterError, action: str) -> None:
        kind = type(error).__name__
        self._errors.warn(
            kind,
            "%s failed: %s",
            action,
            error,
            limit_key=f"{action}:{kind}",
            extra={"guest": error.guest_id, "error": kind},
        )

    async def _read_one(self, guest_id: str) -> GuestReading | None:
        async with self._semaphore:
            try:
                return await call_adapter(
                    self.adapter.read(guest_id),
                    adapter_timeout_s=self.timeout_s,
                    what="read",
                    guest_id=guest_id,
                )
            except AdapterError as error:  # a buggy plugin adapter's error too
                self.counters["read_errors"] += 1
                self._count_error(error, "read")
                return None

    async def _discover(self) -> list[str] | None:
        """The guests present now; forgets everything about the ones that went away."""
        try:
            guests = await call_adapter(
                self.adapter.discover(), adapter_timeout_s=self.timeout_s, what="discover"
            )
        except AdapterError as exc:  # timeouts, adapter errors, and bugs in a plugin adapter
            self._faults.warn("discover_errors", "listing guests failed: %r", exc)
            return None
        present = set(guests)
        for table in (self.readings, self._published_ts, self._wanted, self._done):
            for gone in [g for g in table if g not in present]:
                del table[gone]
        return guests

    async def _refresh(self, guest_id: str, *, publish: bool) -> None:
        """Read one guest, retry its failed target if it is back, publish a new sample."""
        reading = await self._read_one(guest_id)
        if reading is None:
            # The previous reading stays for target commands until the guest is gone.
            return
        self.counters["reads"] += 1
        self.readings[guest_id] = reading
        wanted = self._wanted.get(guest_id)
        if wanted is not None and self._done.get(guest_id) is not wanted:
            self._schedule(guest_id)
        if not publish:
            return
        # QEMU's guest-stats keep their time stamp until the guest reports again; the
        # controller would reject a repeat as out of order, so it is not sent.
        if reading.ts_s <= self._published_ts.get(guest_id, -math.inf):
            self.counters["stats_unchanged"] += 1
            return
        if self.settings.agent.batch:
            self._batch[guest_id] = reading
            if self._batch_task is None or self._batch_task.done():
                self._batch_task = asyncio.create_task(self._publish_batch(), name="batch")
            return
        topic = self.topics.guest_stats(self.host_id, guest_id)
        if await self._publish(topic, stats_payload(reading)):
            self._published_ts[guest_id] = reading.ts_s
            self.counters["stats_published"] += 1

    async def _publish_batch(self) -> None:
        """Publish the readings of one round as one message on ``{prefix}/host/{host}/batch``.

        Reads finish a few milliseconds apart; a short wait gathers one round into one message.
        """
        await asyncio.sleep(BATCH_GATHER_S)
        readings, self._batch = self._batch, {}
        if not readings:
            return
        payload = encode_batch({guest: stats_payload(r) for guest, r in readings.items()})
        if await self._publish(self.topics.batch(self.host_id), payload):
            for guest, reading in readings.items():
                self._published_ts[guest] = reading.ts_s
            self.counters["stats_published"] += len(readings)
            self.counters["batches_published"] += 1

    async def poll(self, *, publish: bool = True) -> None:
        """One full round: list the guests, read (and publish) each, wait for all of them."""
        guests = await self._discover()
        if guests:
            await asyncio.gather(*(self._refresh(g, publish=publish) for g in guests))

    async def _publish(self, topic: str, payload: bytes) -> bool:
        return await _publish(self.link, topic, payload, self._faults)

    async def publish_host(self) -> None:
        """This machine's memory on ``{prefix}/host/{host_id}/stats``."""
        try:
            total_bytes, available_bytes = host_memory(self.proc_root)
        except (OSError, KeyError) as exc:
            self._faults.warn("host_stats_errors", "cannot read host memory: %r", exc)
            return
        if await self._publish(
            self.topics.host_stats(self.host_id),
            encode_host_stats(time.time(), total_bytes, available_bytes),
        ):
            self.counters["host_stats_published"] += 1

    # -- targets -------------------------------------------------------------------------------

    def handle_message(self, topic: str, payload: bytes) -> None:
        """A target command from the broker (called on the event loop; never raises)."""
        self.counters["targets_received"] += 1
        if not payload:
            # An empty retained message is how a target is cleared on the broker (the
            # controller forgot the guest, a test cleaned up): nothing to apply, nothing wrong.
            self.counters["targets_cleared"] += 1
            return
        try:
            kind, host_id, guest_id = self.topics.parse(topic)
            if kind is not TopicKind.TARGET or host_id != self.host_id:
                raise PayloadError("bad_topic", f"unexpected topic {topic!r}")
            command = decode_target(payload)
            reading = self.readings.get(guest_id)
            if reading is None:
                raise PayloadError(
                    "unknown_guest", f"no guest {guest_id!r} on host {self.host_id!r}"
                )
            if command.num_pages * PAGE_BYTES > reading.ram_bytes:
                raise PayloadError(
                    "bad_value",
                    f"num_pages {command.num_pages} exceeds the {reading.ram_bytes} bytes of RAM "
                    f"of {guest_id!r}",
                )
            last = self._wanted.get(guest_id)
            if last is not None and command.ts_s < last.ts_s:
                raise PayloadError(
                    "out_of_order", f"target for {guest_id!r} older than the one in force"
                )
        except PayloadError as exc:
            self._rejections.warn(
                exc.reason,
                "rejected target command: %s",
                exc,
                extra={"reason": exc.reason, "topic": topic[:200]},
            )
            return
        if last is not None and (command.ts_s, command.num_pages) == (last.ts_s, last.num_pages):
            # The same command again: the retained one, redelivered on every reconnect to the
            # broker. It is already applied, or waiting for the guest to be readable again.
            self.counters["targets_repeated"] += 1
            return
        self._wanted[guest_id] = Target(
            host_id=self.host_id,
            guest_id=guest_id,
            num_pages=command.num_pages,
            ram_bytes=reading.ram_bytes,
            policy=command.policy,
            reason=command.reason,
            ts_s=command.ts_s,
        )
        self._schedule(guest_id)

    def _schedule(self, guest_id: str) -> None:
        task = self._appliers.get(guest_id)
        if task is None or task.done():
            self._appliers[guest_id] = asyncio.get_running_loop().create_task(
                self._apply_loop(guest_id), name=f"target:{guest_id}"
            )

    async def _apply_loop(self, guest_id: str) -> None:
        """Apply the newest wanted target of one guest; one set_target per guest at a time."""
        while (change := self._wanted.get(guest_id)) is not None:
            if self._done.get(guest_id) is change:
                return
            try:
                await call_adapter(
                    self.adapter.set_target(change),
                    adapter_timeout_s=self.timeout_s,
                    what="set_target",
                    guest_id=guest_id,
                )
            except AdapterError as exc:  # a buggy plugin adapter's error too
                error = exc
            else:
                self._done[guest_id] = change
                self.counters["targets_applied"] += 1
                log.info(
                    "target applied",
                    extra={
                        "guest": guest_id,
                        "num_pages": change.num_pages,
                        "policy": change.policy,
                        "reason": change.reason,
                    },
                )
                continue
            self.counters["targets_failed"] += 1
            self._count_error(error, "set_target")
            if isinstance(error, TargetRejected):
                # The device will refuse the same value again: wait for a new command.
                self._done[guest_id] = change
            # Otherwise (guest unreachable, timeout) the next poll that reads the guest retries.
            return

    # -- lifecycle -----------------------------------------------------------------------------

    async def _poll_round(self) -> None:
        """Start reading every guest present, and publish this machine's memory."""
        guests = await self._discover()
        for guest_id in guests or ():
            # Each guest is read on its own: one that hangs until the timeout delays only
            # itself, and is not read again while its previous read is still waiting.
            task = self._readers.get(guest_id)
            if task is None or task.done():
                self._readers[guest_id] = asyncio.create_task(
                    self._refresh(guest_id, publish=True), name=f"read:{guest_id}"
                )
            else:
                self.counters["reads_skipped"] += 1
        for gone in [g for g in self._readers if self._readers[g].done()]:
            del self._readers[gone]
        await self.publish_host()

    async def _poll_loop(self) -> None:
        await self.link.connected.wait()
        await every(self.settings.agent.interval_s, self._poll_round)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever); then close the adapter in bounded time."""
        stop = stop or asyncio.Event()
        await self.adapter.start(
            AdapterContext(self.settings, self.link, adapter_timeout_s=self.timeout_s)
        )
        log.info(
            "host agent started",
            extra={
                "host": self.host_id,
                "adapter": self.settings.adapter.kind,
                "interval_s": self.settings.agent.interval_s,
            },
        )
        try:
            # Know the guests before subscribing: the retained targets arrive at once.
            await self.poll(publish=False)
            await run_until(stop, ("mqtt", self.link.run()), ("poll", self._poll_loop()))
        finally:
            pending = [
                t for t in [*self._appliers.values(), *self._readers.values()] if not t.done()
            ]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.settings.agent.shutdown_timeout_s / 2):
                    await self.adapter.close()
            log.info("host agent stopped", extra=dict(self.counters))


# -- guest mode --------------------------------------------------------------------------------


class GuestAgent:
    """Publishes this machine's /proc stats as one guest (module docstring).

    ``ram_bytes`` defaults to MemTotal. Inside a VM that is the boot RAM only with
    deflate-on-oom (or no balloon); without deflate-on-oom, MemTotal shrinks as the balloon
    inflates, so pass the VM's real size when it is known. The balloon's size is not visible
    from inside, so ``num_pages`` and ``actual`` are left out of the payload.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        proc_root: Path = PROC_ROOT,
        page_bytes: int | None = None,
        ram_bytes: int | None = None,
    ) -> None:
        self.settings = settings
        self.proc_root = proc_root
        self.page_bytes = page_bytes or os.sysconf("SC_PAGE_SIZE")
        self.ram_bytes = ram_bytes
        agent = settings.agent
        self.topic = Topics(settings.mqtt.topic_prefix).guest_stats(agent.host_id, agent.guest_id)
        self.link = MqttLink(settings.mqtt, name="agent")
        self.counters: Counter[str] = Counter()
        self._faults = CountedWarnings(log, self.counters)

    def sample(self, now_s: float | None = None) -> bytes:
        """One stats payload from /proc now."""
        meminfo = read_meminfo(self.proc_root)
        values = stats_from_proc(meminfo, read_vmstat(self.proc_root), page_bytes=self.page_bytes)
        reading = GuestReading(
            guest_id=self.settings.agent.guest_id,
            ts_s=time.time() if now_s is None else now_s,
            ram_bytes=self.ram_bytes or meminfo["MemTotal"],
            actual_pages=None,
            num_pages=None,
            values=values,
        )
        return stats_payload(reading)

    async def publish_once(self) -> bool:
        try:
            payload = self.sample()
        except (OSError, KeyError) as exc:
            self._faults.warn(
                "read_errors",
                "cannot read /proc: %r",
                exc,
                extra={"proc_root": str(self.proc_root)},
            )
            return False
        if not await _publish(self.link, self.topic, payload, self._faults):
            return False
        self.counters["stats_published"] += 1
        return True

    async def _loop(self) -> None:
        await self.link.connected.wait()
        await every(self.settings.agent.interval_s, self.publish_once)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        agent = self.settings.agent
        log.info(
            "guest agent started",
            extra={"host": agent.host_id, "guest": agent.guest_id, "interval_s": agent.interval_s},
        )
        try:
            await run_until(stop, ("mqtt", self.link.run()), ("publish", self._loop()))
        finally:
            log.info("guest agent stopped", extra=dict(self.counters))


def create_agent(settings: Settings) -> HostAgent | GuestAgent:
    """The agent ``settings.agent.mode`` asks for; :class:`AgentConfigError` if it cannot run."""
    agent = settings.agent
    ids = [("agent.host_id", agent.host_id)]
    if agent.mode == "guest":
        ids.append(("agent.guest_id", agent.guest_id))
    for key, value in ids:
        if not valid_id(value):
            raise AgentConfigError(f"{key} {value!r} is not 1-128 characters of [A-Za-z0-9._-]")
    if agent.mode == "guest":
        return GuestAgent(settings, ram_bytes=settings.agent.ram_bytes or None)
    try:
        adapter = create_adapter(settings.adapter.kind, settings.adapter.params)
    except PluginError as exc:
        raise AgentConfigError(str(exc)) from exc
    if not isinstance(adapter, DeviceAdapter):
        raise AgentConfigError(
            f"adapter.kind {settings.adapter.kind!r} cannot list or read local guests; the host "
            "agent needs a device adapter (qmp, libvirt, firecracker)"
        )
    return HostAgent(settings, adapter)


__all__ = [
    "AgentConfigError",
    "GuestAgent",
    "HostAgent",
    "create_agent",
    "host_memory",
    "read_meminfo",
    "read_vmstat",
    "stats_from_proc",
    "stats_payload",
]
