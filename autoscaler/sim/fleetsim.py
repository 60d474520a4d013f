"""A simulated fleet on MQTT: guests that publish stats and obey target commands, as agents do.

:class:`FleetSim` drives the simulator's own guest model (:class:`~autoscaler.sim.simulate.
SimulatedGuests`: balloons move at a finite rate, pressure shows when demand exceeds the
allocation) with a :class:`~autoscaler.sim.simulate.Replay` of demand, in compressed time:
every ``step_s / speed`` seconds of wall time it advances one replay step, then publishes each
guest's stats on ``{prefix}/guest/{host}/{guest}/stats`` and each simulated host's memory on
``{prefix}/host/{host}/stats`` (the payloads real agents send). It subscribes to
``{prefix}/guest/+/+/target`` and hands every target command to the guest model, so whatever
controller listens on the broker closes the loop through MQTT exactly as it would with real
host agents. At the end of the replay it starts over.

Timestamps are wall-clock time, as a real agent's are: the controller judges staleness and
computes rates against its own clock. Rates are therefore per wall second, and a replay step
lasts ``step_s / speed`` wall seconds, so the controller sees pressure signals ``speed`` times
stronger than in :func:`~autoscaler.sim.simulate.simulate_policy`, where a step lasts ``step_s``.

:func:`synthetic_replay` makes a deterministic fleet of varied guests (idle, diurnal, bursty,
growing) for when no trace is at hand.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from autoscaler.config import MqttSettings
from autoscaler.service.lifecycle import every, run_until
from autoscaler.service.mqtt import MqttLink, MqttUnavailable
from autoscaler.sim.simulate import (
    Replay,
    SimulatedGuests,
    SimulationSettings,
    place_on_hosts,
)
from autoscaler.stats import PAGE_BYTES
from autoscaler.wire import (
    PayloadError,
    TopicKind,
    Topics,
    decode_target,
    encode_guest_stats,
    encode_host_stats,
)

log = logging.getLogger(__name__)

GIB: Final = 2**30
KINDS: Final = ("idle", "diurnal", "bursty", "growing")
"""The built-in generator's guest kinds, assigned round-robin so that any fleet size mixes them."""
ACTIVITY_DECAY: Final = 0.8
"""Per step: a guest's activity score halves in about three steps once it settles."""
PUBLISH_TIMEOUT_S: Final = 5.0
MIN_PERIOD_S: Final = 0.05
"""Shortest wall time per step: faster than this the publisher would only queue up work."""


# -- the built-in generator ----------------------------------------------------------------------


def synthetic_replay(
    guests: int, *, seed: int = 0, step_s: float = 300.0, days: float = 7.0
) -> Replay:
    """A deterministic fleet of ``guests`` varied guests, ``days`` long on a ``step_s`` grid.

    Guest ``i`` is of kind ``KINDS[i % 4]``, named ``{kind}-{i:03d}`` on host ``synthetic``:

    - idle: a flat 5–15 % of RAM with a little noise;
    - diurnal: a daily wave between 15–30 % and up to 70 % of RAM, each guest at its own phase;
    - bursty: 10–20 % of RAM, with bursts to 55–90 % lasting 10–30 minutes about every two hours
      (arriving at once, as a batch job or a cache refill does: what a policy must react to);
    - growing: a leak from 15–25 % up to 90 % of RAM over one to three days, then a restart.

    RAM is 2, 4, 8 or 16 GiB. Same arguments, same replay.
    """
    rng = np.random.default_rng(seed)
    steps = max(int(days * 86_400 / step_s), 2)
    t_s = np.arange(steps) * step_s
    ram = rng.choice(np.array([2.0, 4.0, 8.0, 16.0]) * GIB, size=guests, p=[0.3, 0.35, 0.25, 0.1])
    share = np.empty((guests, steps))
    names = []
    for g in range(guests):
        kind = KINDS[g % len(KINDS)]
        names.append(f"{kind}-{g:03d}")
        noise = rng.normal(0.0, 0.005, steps)
        if kind == "idle":
            share[g] = rng.uniform(0.05, 0.15) + noise
        elif kind == "diurnal":
            base, amplitude = rng.uniform(0.15, 0.30), rng.uniform(0.20, 0.40)
            phase = rng.uniform(0.0, 2 * math.pi)
            wave = 0.5 + 0.5 * np.sin(2 * math.pi * t_s / 86_400 + phase)
            share[g] = base + amplitude * wave + 2 * noise
        elif kind == "bursty":
            row = np.full(steps, rng.uniform(0.10, 0.20)) + noise
            k = int(rng.integers(0, 12))
            while k < steps:
                length = int(rng.integers(2, 7))
                row[k : k + length] = rng.uniform(0.55, 0.90)
                k += length + int(rng.exponential(24.0)) + 1
            share[g] = row
        else:  # growing
            start, period_steps = rng.uniform(0.15, 0.25), int(rng.uniform(1, 3) * 86_400 / step_s)
            offset = int(rng.integers(0, period_steps))
            ramp = ((np.arange(steps) + offset) % period_steps) / period_steps
            share[g] = start + (0.90 - start) * ramp + noise
    demand = np.clip(share, 0.02, 1.0) * ram[:, None]
    return Replay(["synthetic"] * guests, names, ram, t_s, demand)


# -- the fleet on MQTT ---------------------------------------------------------------------------


def step_period_s(step_s: float, speed: float) -> float:
    """Wall seconds per replay step of ``step_s`` at ``speed`` (at least ``MIN_PERIOD_S``)."""
    return max(step_s / speed, MIN_PERIOD_S)


@dataclass
class FleetTotals:
    """Running totals over every guest-step so far (the demo's summary numbers)."""

    steps: int = 0
    samples: int = 0
    """Guest-steps with a demand (a guest the trace has no sample for is not counted)."""
    ram_bytes: float = 0.0
    reclaimed_bytes: float = 0.0
    """Sum over guest-steps of RAM − allocation: divided by ``samples`` it is the mean."""
    under_samples: int = 0
    deficit_byte_steps: float = 0.0


class FleetSim:
    """Simulated guests behind an MQTT connection (see the module docstring)."""

    def __init__(
        self,
        replay: Replay,
        mqtt: MqttSettings,
        *,
        speed: float,
        settings: SimulationSettings | None = None,
    ) -> None:
        settings = settings or SimulationSettings()
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        n = len(replay.guests)
        self.replay = replay
        self.step_s = replay.step_s or 300.0
        self.speed = speed
        self.period_s = step_period_s(self.step_s, speed)
        """Wall seconds per replay step."""
        self.topics = Topics(mqtt.topic_prefix)
        self.model = SimulatedGuests(ram_bytes=replay.ram_bytes, settings=settings)
        host_of = place_on_hosts(replay.ram_bytes, settings)
        self.host_of = host_of
        self.host_ids = [f"simhost{h}" for h in range(int(host_of.max()) + 1 if n else 0)]
        self.host_bytes = settings.host_bytes
        self.guest_hosts = [self.host_ids[h] for h in host_of.tolist()]
        self.row_of = {(self.guest_hosts[g], replay.guests[g]): g for g in range(n)}
        self.link = MqttLink(
            mqtt,
            subscriptions=[(self.topics.target_filter(), 1)],
            on_message=self.handle_target,
            name="fleet",
        )
        nan = np.full(n, np.nan)
        self.step = 0
        self.demand_bytes = nan.copy()
        """Each guest's demand at the current step (NaN: no sample in the trace)."""
        self.activity = np.zeros(n)
        """Decayed sum of demand and allocation moves, GiB: what the view ranks guests by."""
        self.last_reason = [""] * n
        """The reason of each guest's last applied target command."""
        self.targets_applied = 0
        self.targets_rejected = 0
        self.targets_duplicate = 0
        self._target_ts: list[float | None] = [None] * n
        self.stats_published = 0
        self.publish_failures = 0
        self.totals = FleetTotals()
        self._previous_alloc = self.model.alloc_bytes.copy()
        self._previous_demand = nan.copy()

    @property
    def alloc_bytes(self) -> np.ndarray:
        return self.model.alloc_bytes

    @property
    def ram_bytes(self) -> np.ndarray:
        return self.model.ram_bytes

    @property
    def sim_elapsed_s(self) -> float:
        """Simulated time since the start of the demo."""
        return self.step * self.step_s

    # -- targets in ------------------------------------------------------------------------------

    def handle_target(self, topic: str, payload: bytes) -> None:
        """Apply one target command (``{"ts", "num_pages", "policy", "reason"}``) to its guest;
        count what does not fit."""
        try:
            kind, host, guest = self.topics.parse(topic)
            if kind is not TopicKind.TARGET:
                raise PayloadError("bad_topic", f"unexpected topic {topic!r}")
            row = self.row_of.get((host, guest))
            if row is None:
                raise PayloadError("unknown_guest", f"no guest {guest!r} on host {host!r}")
            command = decode_target(payload)
            pages = command.num_pages
            ram = int(self.model.ram_bytes[row])
            if pages * PAGE_BYTES > ram:
                raise PayloadError("bad_value", f"num_pages {pages} outside the guest's RAM")
        except PayloadError as exc:
            self.targets_rejected += 1
            log.warning("target command ignored: %s", exc, extra={"topic": topic[:200]})
            return
        previous = round((ram - self.model.target_bytes[row]) / PAGE_BYTES)
        ts_s = command.ts_s
        if pages == previous and ts_s == self._target_ts[row]:
            # The same command again: a QoS 1 redelivery or the retained copy after a
            # reconnect. Applying it is harmless, counting it twice would not be.
            self.targets_duplicate += 1
            return
        self._target_ts[row] = ts_s
        self.model.steer(row, ram - pages * PAGE_BYTES)
        self.targets_applied += 1
        self.last_reason[row] = command.reason

    # -- stats out -------------------------------------------------------------------------------

    def advance(self) -> list[tuple[str, bytes]]:
        """Advance one replay step; return the (topic, payload) messages the fleet sends for it."""
        steps = self.replay.demand_bytes.shape[1]
        demand = self.replay.demand_bytes[:, self.step % steps]
        self.step += 1
        model = self.model
        model.advance(self.step_s, demand)
        self.demand_bytes = demand
        self._account(demand)

        now_s = time.time()
        values = model.stats(demand)
        ram = model.ram_bytes
        actual = np.round((ram - model.alloc_bytes) / PAGE_BYTES).astype(np.int64).tolist()
        target = np.round((ram - model.target_bytes) / PAGE_BYTES).astype(np.int64).tolist()
        messages = []
        for g in np.flatnonzero(~np.isnan(demand)).tolist():
            payload = encode_guest_stats(
                now_s, int(ram[g]), values[g], num_pages=target[g], actual_pages=actual[g]
            )
            topic = self.topics.guest_stats(self.guest_hosts[g], self.replay.guests[g])
            messages.append((topic, payload))
        used = np.bincount(self.host_of, weights=model.alloc_bytes, minlength=len(self.host_ids))
        for h, host in enumerate(self.host_ids):
            payload = encode_host_stats(
                now_s, int(self.host_bytes), int(max(self.host_bytes - used[h], 0.0))
            )
            messages.append((self.topics.host_stats(host), payload))
        return messages

    def _account(self, demand: np.ndarray) -> None:
        alloc = self.model.alloc_bytes
        ram = self.model.ram_bytes
        present = ~np.isnan(demand)
        totals = self.totals
        totals.steps += 1
        totals.samples += int(present.sum())
        totals.ram_bytes += float(ram[present].sum())
        totals.reclaimed_bytes += float((ram - alloc)[present].sum())
        deficit = np.maximum(demand[present] - alloc[present], 0.0)
        totals.under_samples += int((deficit > 0).sum())
        totals.deficit_byte_steps += float(deficit.sum())
        moved = np.abs(alloc - self._previous_alloc) + np.nan_to_num(
            np.abs(demand - self._previous_demand)
        )
        self.activity = ACTIVITY_DECAY * self.activity + moved / GIB
        self._previous_alloc = alloc.copy()
        self._previous_demand = demand.copy()

    async def _publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        # QoS 0, as the wire contract allows for stats: a lost sample is replaced by the next
        # one a step later. One after the other: a QoS 0 publish returns as soon as paho has
        # written it, so concurrent publishes would gain nothing.
        for topic, payload in messages:
            try:
                # The time limit is asyncio.timeout's, not aiomqtt's: on Python 3.11 aiomqtt's
                # (asyncio.wait_for) can swallow a cancellation that arrives just as the
                # publish completes, and shutdown would then wait for this task forever.
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    await self.link.publish(topic, payload, qos=0, timeout_s=math.inf)
            except (MqttUnavailable, TimeoutError):
                self.publish_failures += 1
            else:
                self.stats_published += 1

    async def _publish_loop(self, stop: asyncio.Event, ready: Sequence[asyncio.Event]) -> None:
        await self.link.connected.wait()
        for event in ready:
            await event.wait()

        async def step() -> None:
            if not stop.is_set():  # the task is cancelled soon after
                await self._publish(self.advance())

        # Behind schedule (a slow machine, a huge fleet), steps are dropped, not rushed.
        await every(self.period_s, step)

    async def run(self, stop: asyncio.Event, *, ready: Sequence[asyncio.Event] = ()) -> None:
        """Connect, then publish a step every ``period_s`` once every ``ready`` event is set.

        Returns when ``stop`` is set; the connection is closed on the way out.
        """
        await run_until(
            stop,
            ("fleet-mqtt", self.link.run()),
            ("fleet-publish", self._publish_loop(stop, ready)),
        )
