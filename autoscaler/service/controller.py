"""The controller daemon: MQTT ingest → fleet state → tick (policy + guards) → adapter.

Tasks, under one ``asyncio.TaskGroup``:

- ``mqtt``: the broker connection (:class:`~autoscaler.service.mqtt.MqttLink`); every guest's stats
  message is validated and given its slot by :meth:`Controller.handle_message`, synchronously
  and in a few microseconds, so ingest never queues behind the control work; the samples are
  stored together by :meth:`Controller.flush` at most ``FLUSH_DELAY_S`` later (at once for an
  OOM kill or an allocation stall);
- ``tick``: every ``controller.interval_s``, expire silent guests and run a step of the tick
  driver (:meth:`~autoscaler.tick.TickDriver.step`: emergencies still waiting, then the tick),
  its changes applied through the adapter, what the adapter accepted recorded;
- ``batches``: ingests host agents' batches queued by :meth:`Controller.handle_message`, a chunk
  of guests per event-loop turn, so a large batch never holds up the other tasks;
- ``emergency``: deflates a guest at once when ingest sees trouble (an OOM kill, memory that
  would run out within the guest's reaction time, a self-deflating balloon …; see
  :mod:`autoscaler.guards`), without waiting for the tick: a step without the tick.

Bad input never stops the daemon: each rejected message is counted by reason and logged at
most once per reason every 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from typing import Final

import numpy as np

from autoscaler.adapters.base import Adapter, AdapterContext, AdapterError, call_adapter
from autoscaler.config import Settings
from autoscaler.fleet import Fleet, FleetFull
from autoscaler.plugins import create_adapter, create_policy
from autoscaler.policy import Policy
from autoscaler.service.cluster import Membership
from autoscaler.service.lifecycle import every, run_until
from autoscaler.service.logs import CountedWarnings
from autoscaler.service.metrics import (
    SNAPSHOT_INTERVAL_S,
    ControllerStats,
    Metrics,
    MetricsSnapshot,
)
from autoscaler.service.mqtt import MqttLink, MqttUnavailable, Presence
from autoscaler.stats import S_ALLOC_STALLS, S_OOM_KILLS, StatsSample
from autoscaler.tick import (
    StepResult,
    TargetChange,
    TickDriver,
    TickResult,
    describe,
    drive_step,
)
from autoscaler.wire import (
    PRESENCE_OFFLINE,
    PayloadError,
    TopicKind,
    Topics,
    batch_entries,
    decode_batch_entry,
    decode_guest_stats,
    decode_host_stats,
)

log = logging.getLogger(__name__)
decisions = logging.getLogger("autoscaler.decisions")

# Ingest stores samples at most this late, or at once when this many are waiting.
FLUSH_DELAY_S: Final = 0.005
FLUSH_ROWS: Final = 1024
BATCH_ENTRY_BYTES: Final = 1024
"""Bytes a batch may spend per guest of ``controller.max_batch_guests``: a sample with every stat
at 19 digits and a 128-character guest id takes about 800."""
BATCH_CHUNK: Final = 64
"""Guests of a batch validated and stored per event-loop turn: about half a millisecond."""
RECORD_CHUNK: Final = 256
"""Applied targets recorded and logged per event-loop turn (a few milliseconds)."""
MAX_QUEUED_BATCH_BYTES: Final = 64 * 2**20
"""Batches waiting to be ingested, in bytes; more are rejected (``overloaded``)."""


class Controller:
    """One controller: owns the fleet state, the policy, the guards and the adapter."""

    def __init__(
        self,
        settings: Settings,
        *,
        policy: Policy | None = None,
        adapter: Adapter | None = None,
    ) -> None:
        self.settings = settings
        cs = settings.controller
        self.fleet = Fleet(
            max_guests=cs.max_guests,
            history_len=cs.history_len,
            ttl_s=cs.guest_ttl_s,
            guards=settings.guards,
            tick_interval_s=cs.interval_s,
            epoch_s=time.time(),
            shares=settings.guards.shares,
        )
        self.policy = policy or create_policy(settings.policy.name, settings.policy.params)
        self.adapter = adapter or create_adapter(settings.adapter.kind, settings.adapter.params)
        self.driver = TickDriver(
            self.fleet,
            self.policy,
            settings.guards,
            stale_after_s=cs.stale_after_s,
            clock=time.time,
        )
        self.topics = Topics(settings.mqtt.topic_prefix)
        subscriptions = [
            (self.topics.guest_stats_filter(), 1),
            (self.topics.host_stats_filter(), 1),
            (self.topics.batch_filter(), 1),
        ]
        self.membership: Membership | None = None
        presence = None
        if cs.replica_id:
            self.membership = Membership(
                cs.replica_id, settings.mqtt.topic_prefix, ttl_s=cs.presence_ttl_s
            )
            subscriptions.append((self.membership.topic_filter, 1))
            presence = Presence(
                self.membership.presence_topic, self.membership.online_payload, PRESENCE_OFFLINE
            )
        self._membership_changes = 0
        self.link = MqttLink(
            settings.mqtt,
            subscriptions=subscriptions,
            on_message=self.handle_message,
            name="controller",
            identifier=f"balloon-autoscaler-{cs.replica_id}" if cs.replica_id else None,
            presence=presence,
        )
        self.stats = ControllerStats()
        self._rejections = CountedWarnings(log, self.stats.rejected)
        self._adapter_failures = CountedWarnings(log, self.stats.adapter_errors)
        self._pending: list[StatsSample] = []
        self._pending_slots: list[int] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._emergency_slots: set[int] = set()
        self._emergency_event = asyncio.Event()
        self._batches: deque[tuple[str, bytes, str]] = deque()
        self._queued_batch_bytes = 0
        self._batch_ready = asyncio.Event()
        self._stopping = False
        self.last_tick: TickResult | None = None
        self.ticks = 0
        self.metrics = Metrics()

    @property
    def counters(self) -> Counter[str]:
        """Events by name (:attr:`ControllerStats.counters`)."""
        return self.stats.counters

    @property
    def rejected(self) -> Counter[str]:
        """Rejected messages by reason (:attr:`ControllerStats.rejected`)."""
        return self.stats.rejected

    @property
    def adapter_errors(self) -> Counter[str]:
        """Failed targets by error type (:attr:`ControllerStats.adapter_errors`)."""
        return self.stats.adapter_errors

    @property
    def decisions(self) -> Counter[str]:
        """Applied target changes by policy (:attr:`ControllerStats.decisions`)."""
        return self.stats.decisions

    # -- ingest (per message: keep it small) ---------------------------------------------------

    def handle_message(self, topic: str, payload: bytes) -> None:
        if self._stopping:
            return
        self.counters["messages"] += 1
        with self._counted_errors(topic):
            kind, host, guest = self.topics.parse(topic)
            if kind is TopicKind.GUEST_STATS:
                self._stats(host, guest, payload)
            elif kind is TopicKind.BATCH:
                self._queue_batch(host, payload, topic)
            elif kind is TopicKind.HOST_STATS:
                self._host_stats(host, payload)
            elif kind is TopicKind.PRESENCE and self.membership is not None:
                self.membership.handle(topic, payload)
            else:
                raise PayloadError("bad_topic", f"unexpected topic {topic!r}")

    @contextlib.contextmanager
    def _counted_errors(self, topic: str) -> Iterator[None]:
        """Count and log what goes wrong handling a message; never let it out."""
        try:
            yield
        except PayloadError as exc:
            self._reject(exc.reason, str(exc), topic)
        except FleetFull as exc:  # or HostsFull
            self._reject(exc.reason, str(exc), topic)
        except Exception:
            # A bug must not cost the broker connection (this runs inside the MQTT client's read
            # callback): count it, log it with its traceback, drop the message, carry on.
            self._rejections.warn(
                "internal_error",
                "message could not be handled",
                extra={"topic": topic[:200]},
                level=logging.ERROR,
                exc_info=True,
            )

    def _owned(self, host: str) -> bool:
        if self.membership is not None and not self.membership.owns(host):
            self.counters["not_owned"] += 1
            return False
        return True

    def _stats(self, host: str, guest: str, payload: bytes) -> None:
        if self._owned(host):
            now_s = time.time()
            self._accept(host, guest, decode_guest_stats(payload, now_s=now_s), now_s)

    def _queue_batch(self, host: str, payload: bytes, topic: str) -> None:
        """Queue a host agent's batch for :meth:`_batch_loop`, turning away at once what it
        could not take: ingesting a batch takes milliseconds, and MQTT delivers each message
        in one event-loop turn."""
        if not self._owned(host):
            return
        limit_bytes = self.settings.controller.max_batch_guests * BATCH_ENTRY_BYTES
        if len(payload) > limit_bytes:
            raise PayloadError(
                "too_large",
                f"batch of {len(payload)} bytes > {limit_bytes} "
                f"(controller.max_batch_guests x {BATCH_ENTRY_BYTES})",
            )
        if self._queued_batch_bytes + len(payload) > MAX_QUEUED_BATCH_BYTES:
            raise PayloadError("overloaded", f"{len(self._batches)} batches already queued")
        self._batches.append((host, payload, topic))
        self._queued_batch_bytes += len(payload)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called outside the event loop (tools, tests): ingest now
            for _ in self._ingest_batch():
                pass
        else:
            self._batch_ready.set()

    async def _batch_loop(self) -> None:
        while True:
            await self._batch_ready.wait()
            self._batch_ready.clear()
            while self._batches and not self._stopping:
                for _ in self._ingest_batch():
                    await asyncio.sleep(0)  # ticks, emergencies and ingest run in between

    def _ingest_batch(self) -> Iterator[None]:
        """Ingest the oldest queued batch, yielding after each :data:`BATCH_CHUNK` guests.

        A bad guest costs only its own sample; a guest that cannot be admitted costs a lookup.
        """
        host, payload, topic = self._batches.popleft()
        self._queued_batch_bytes -= len(payload)
        with self._counted_errors(topic):
            entries = list(batch_entries(payload).items())
            if len(entries) > self.settings.controller.max_batch_guests:
                raise PayloadError(
                    "too_large",
                    f"batch of {len(entries)} guests > {self.settings.controller.max_batch_guests}"
                    " (controller.max_batch_guests)",
                )
            for start in range(0, len(entries), BATCH_CHUNK):
                if self._stopping:
                    return
                now_s = time.time()
                for guest, document in entries[start : start + BATCH_CHUNK]:
                    self._batch_entry(host, guest, document, now_s, topic)
                yield

    def _batch_entry(
        self, host: str, guest: str, document: object, now_s: float, topic: str
    ) -> None:
        if not self.fleet.admits(host, guest):
            message = f"{host}/{guest}: tracking {self.fleet.max_guests} guests"
            self._reject(FleetFull.reason, message, topic)
            return
        guest, sample = decode_batch_entry(guest, document, now_s=now_s)
        try:
            if isinstance(sample, PayloadError):
                raise sample
            self._accept(host, guest, sample, now_s)
        except (FleetFull, PayloadError) as exc:  # HostsFull, clock_skew too
            self._reject(exc.reason, f"{host}/{guest}: {exc}", topic)

    def _accept(self, host: str, guest: str, sample: StatsSample, now_s: float) -> None:
        self._check_clock(sample.ts_s, now_s, f"{host}/{guest}")
        slot = self.fleet.slot_for(host, guest, now_s)
        self._pending_slots.append(slot)
        self._pending.append(sample)
        if sample.unknown_stats:
            self.counters["unknown_stats"] += sample.unknown_stats
        stored = self.fleet.stats[slot]
        # An OOM kill or allocation stall since the stored sample cannot wait for the batch.
        urgent = (
            sample.values[S_OOM_KILLS] > stored[S_OOM_KILLS]
            or sample.values[S_ALLOC_STALLS] > stored[S_ALLOC_STALLS]
        )
        if urgent or len(self._pending) >= FLUSH_ROWS:
            self.flush()
        elif self._flush_handle is None:
            # Store samples in vectorised batches: paho hands over one message per event-loop
            # turn, so storing "after this turn" would store batches of one (100+ µs each in
            # fixed numpy cost). Waiting FLUSH_DELAY_S gathers a batch; it also bounds how late
            # an emergency is seen.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called outside the event loop (tools, tests): store now
                self.flush()
            else:
                self._flush_handle = loop.call_later(FLUSH_DELAY_S, self.flush)

    def flush(self) -> None:
        """Store the samples received since the last flush in the fleet, all at once."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending:
            return
        samples, self._pending = self._pending, []
        slots, self._pending_slots = np.array(self._pending_slots, dtype=np.int64), []
        result = self.fleet.ingest_batch(
            slots,
            ts_s=np.array([s.ts_s for s in samples]),
            ram_bytes=np.array([s.ram_bytes for s in samples]),
            num_pages=np.array([s.num_pages for s in samples]),
            actual_pages=np.array([s.actual_pages for s in samples]),
            values=np.stack([s.values for s in samples]),
            recv_s=time.time(),
        )
        self.counters["ingested"] += result.stored
        if result.reboots:
            self.counters["guest_reboots"] += result.reboots
        if result.clock_resets:
            self.counters["clock_resets"] += result.clock_resets
        if result.out_of_order:
            self._reject_out_of_order(result.out_of_order, result.out_of_order_slot)
        if result.emergency.size:
            self._emergency_slots.update(result.emergency.tolist())
            self._emergency_event.set()

    def _reject_out_of_order(self, count: int, slot: int) -> None:
        fleet = self.fleet
        message = (
            f"{count} samples not newer than their guest's last one, among them "
            f"{fleet.host_id(slot)}/{fleet.guest_ids[slot]} (stored ts {fleet.ts_s[slot]:.3f})"
        )
        self._reject("out_of_order", message, "", count=count)

    def _check_clock(self, ts_s: float, now_s: float, who: str) -> None:
        """Reject a ts further ahead of our clock than ``controller.max_clock_skew_s``."""
        skew_s = ts_s - now_s
        if skew_s > self.settings.controller.max_clock_skew_s:
            raise PayloadError(
                "clock_skew",
                f"{who}: ts {ts_s:.3f} is {skew_s:.0f} s ahead of this controller's clock "
                f"(controller.max_clock_skew_s = {self.settings.controller.max_clock_skew_s:g})",
            )

    def _host_stats(self, host: str, payload: bytes) -> None:
        if self.membership is not None and not self.membership.owns(host):
            self.counters["not_owned"] += 1
            return
        ts_s, total, available = decode_host_stats(payload)
        now_s = time.time()
        self._check_clock(ts_s, now_s, f"host {host}")
        self.fleet.ingest_host(
            host, ts_s=ts_s, total_bytes=total, available_bytes=available, recv_s=now_s
        )
        self.counters["host_stats"] += 1

    def _reject(self, reason: str, message: str, topic: str, *, count: int = 1) -> None:
        self._rejections.warn(
            reason,
            "rejected message: %s",
            message,
            count=count,
            extra={"reason": reason, "topic": topic[:200]},
        )

    def stop_ingest(self) -> None:
        """Take in nothing more: messages still arriving and batches still queued are dropped.

        Only sets a flag, so a signal handler may call it while the event loop is busy.
        """
        self._stopping = True

    # -- control -------------------------------------------------------------------------------

    async def _apply_one(self, change: TargetChange) -> bool:
        try:
            await call_adapter(
                self.adapter.set_target(change),
                adapter_timeout_s=self.settings.controller.adapter_timeout_s,
                what="set_target",
                guest_id=change.guest_id,
            )
        except AdapterError as error:  # a buggy plugin adapter's error too: it never stops a tick
            kind = type(error).__name__
            self._adapter_failures.warn(
                kind,
                "target not applied: %s",
                error,
                extra={"guest": change.guest_id, "host": change.host_id, "error": kind},
            )
            return False
        return True

    async def apply(self, changes: Sequence[TargetChange]) -> list[TargetChange]:
        """Apply ``changes`` concurrently; count, log and return the ones the adapter accepted
        (the step that decided them commits them to the fleet).

        A fixed pool of ``controller.adapter_concurrency`` workers, not a task per change: a
        tick that changes 75,000 guests would otherwise hold 75,000 tasks and timers at once.
        Each call still has its own timeout, so one slow guest holds up one worker only.
        """
        if not changes:
            return []
        results = [False] * len(changes)
        queue = iter(enumerate(changes))

        async def worker() -> None:
            for i, change in queue:
                results[i] = await self._apply_one(change)
                # An adapter call that completes without suspending (dry-run, a publish that
                # only buffers) would otherwise apply the whole tick in one event-loop turn.
                await asyncio.sleep(0)

        workers = min(self.settings.controller.adapter_concurrency, len(changes))
        await asyncio.gather(*(worker() for _ in range(workers)))
        done = [c for c, ok in zip(changes, results, strict=True) if ok]
        for start in range(0, len(done), RECORD_CHUNK):
            self._record(done[start : start + RECORD_CHUNK])
            await asyncio.sleep(0)
        self.counters["targets_failed"] += len(changes) - len(done)
        return done

    def _record(self, done: Sequence[TargetChange]) -> None:
        """Count targets the adapter accepted; log each as a decision."""
        self.counters["targets_applied"] += len(done)
        log_decisions = decisions.isEnabledFor(logging.INFO)
        what = "target %s" if self.adapter.applies else "target (dry run, not applied) %s"
        for change in done:
            self.decisions[change.policy] += 1
            if log_decisions:  # formatting 75,000 lines nobody reads costs more than the tick
                decisions.info(
                    what,
                    describe(change),
                    extra={
                        "host": change.host_id,
                        "guest": change.guest_id,
                        "old_pages": change.previous_pages,
                        "new_pages": change.num_pages,
                        "policy": change.policy,
                        "reason": change.reason,
                    },
                )

    async def tick_once(self) -> TickResult:
        self.flush()
        now_s = time.time()
        self._follow_membership()
        gone = self.fleet.expire(now_s)
        if gone:
            log.info("forgot %d silent guests", len(gone), extra={"ttl_s": self.fleet.ttl_s})
        result = (await self._step(now_s, tick=True)).tick
        assert result is not None  # a step with the tick has its result
        self.metrics.tick_duration.observe(result.duration_s)
        self.ticks += 1
        # Keep a summary, not the fleet view, decision and changes (tens of MiB at 100k guests).
        self.last_tick = dataclasses.replace(result, changes=[], view=None, decision=None)
        if result.error is not None:
            self.counters["policy_errors"] += 1
            log.error(
                "policy failed, holding every target this tick: %s",
                result.error,
                extra={"policy": self.driver.policy_name},
            )
        self.publish_metrics()
        return result

    async def _step(self, now_s: float, *, tick: bool) -> StepResult:
        """Run a control step with the emergencies waiting, through the adapter."""
        urgent, self._emergency_slots = self._emergency_slots, set()
        step = await drive_step(self.driver.step(now_s, urgent, tick=tick), self.apply)
        if step.emergencies:
            self.counters["emergency_deflates"] += len(step.emergencies)
        return step

    def publish_metrics(self) -> None:
        """Hand the metrics endpoint a snapshot of now (see :mod:`autoscaler.service.metrics`)."""
        self.flush()  # so that the guests counted and their memory agree
        self.metrics.publish(
            MetricsSnapshot.of(
                self.stats, self.fleet, self.link, adapter=self.settings.adapter.kind
            )
        )

    def _follow_membership(self) -> None:
        """After the replica set changed, stop steering the guests of hosts now owned elsewhere."""
        membership = self.membership
        if membership is None or membership.changes == self._membership_changes:
            return
        self._membership_changes = membership.changes
        fleet = self.fleet
        hosts = [i for i, host in enumerate(fleet.hosts) if host and not membership.owns(host)]
        slots = np.flatnonzero(fleet.active & np.isin(fleet.host_idx, hosts))
        if slots.size:
            fleet.forget(slots)
            log.info(
                "handed %d guests over to other replicas",
                slots.size,
                extra={"replicas": sorted(membership.live)},
            )

    async def _refresh_presence(self, membership: Membership) -> None:
        """Keep our presence fresh and forget replicas whose presence went stale."""
        if not self.link.connected.is_set():
            # Nobody's presence reaches us now; expiring them all would make this replica
            # take every host. The broker redelivers the retained ones on reconnect.
            return
        with contextlib.suppress(MqttUnavailable):  # lost meanwhile: the reconnect publishes
            await self.link.refresh_presence()
        membership.expire()

    async def _tick_loop(self) -> None:
        await self.link.connected.wait()
        # The interval is read before each wait: a reload changes it.
        await every(lambda: self.settings.controller.interval_s, self.tick_once)

    async def _emergency_loop(self) -> None:
        while True:
            await self._emergency_event.wait()
            self._emergency_event.clear()
            self.flush()
            await self._step(time.time(), tick=False)

    def reload(self, settings: Settings) -> None:
        """Apply a re-read configuration: policy, its parameters, guards and timing.

        The new policy is built and validated before anything changes, so an invalid
        configuration raises (:class:`~autoscaler.plugins.PluginError`) and the running one
        stays. Broker, adapter and fleet sizing need a restart; a change there is logged and
        ignored. A reloaded policy starts with fresh state.
        """
        policy = create_policy(settings.policy.name, settings.policy.params)
        for section in ("mqtt", "adapter", "metrics"):
            if getattr(settings, section) != getattr(self.settings, section):
                log.warning("configuration section [%s] changed: restart to apply it", section)
        kept = {
            name: getattr(self.settings.controller, name)
            for name in ("max_guests", "history_len", "guest_ttl_s")
        }
        if any(getattr(settings.controller, k) != v for k, v in kept.items()):
            log.warning("controller.max_guests/history_len/guest_ttl_s need a restart")
        controller = settings.controller.model_copy(update=kept)
        self.settings = self.settings.model_copy(
            update={
                "policy": settings.policy,
                "guards": settings.guards,
                "controller": controller,
                "log": settings.log,
            }
        )
        self.policy = policy
        self.driver = TickDriver(
            self.fleet,
            policy,
            settings.guards,
            stale_after_s=controller.stale_after_s,
            clock=time.time,
        )
        # Ingest reads the guards (emergencies, headroom, trouble) and the tick interval (the
        # reaction time) from the fleet; shares are kept per slot.
        self.fleet.guards = settings.guards
        self.fleet.tick_interval_s = controller.interval_s
        self.fleet.set_shares(settings.guards.shares)
        logging.getLogger().setLevel(settings.log.level.upper())
        log.info("configuration reloaded", extra={"policy": repr(policy)})

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever); then shut down within the configured time."""
        stop = stop or asyncio.Event()
        await self.adapter.start(
            AdapterContext(
                self.settings,
                self.link,
                adapter_timeout_s=self.settings.controller.adapter_timeout_s,
            )
        )
        if self.settings.metrics.port:
            self.metrics.serve(self.settings.metrics.port, self.settings.metrics.host)
        log.info(
            "controller started",
            extra={
                "policy": repr(self.policy),
                "adapter": self.settings.adapter.kind,
                "interval_s": self.settings.controller.interval_s,
            },
        )
        tasks = [
            ("mqtt", self.link.run()),
            ("tick", self._tick_loop()),
            ("emergency", self._emergency_loop()),
        ]
        if self.settings.metrics.port:
            tasks.append(("metrics", every(SNAPSHOT_INTERVAL_S, self.publish_metrics)))
        if (membership := self.membership) is not None:
            refresh = functools.partial(self._refresh_presence, membership)
            tasks.append(
                ("presence", every(membership.refresh_interval_s, refresh, delay_first=True))
            )
        tasks.append(("batches", self._batch_loop()))
        try:
            await run_until(stop, *tasks, on_stop=self.stop_ingest)
        finally:
            self.metrics.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.link.say_goodbye()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.settings.controller.shutdown_timeout_s / 2):
                    await self.adapter.close()
            log.info("controller stopped", extra=dict(self.counters))
