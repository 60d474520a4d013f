"""Emergency deflate benchmark: from an oom-kill report to the adapter call, through MQTT.

Starts its own mosquitto on a free loopback port (as ``bench/ingest.py`` does), and in this
process a real :class:`autoscaler.service.controller.Controller` whose adapter records when
``set_target`` is called, with ``controller.interval_s`` = 3600 so that no control tick runs
during the measurement: only the emergency path acts. A publisher in another process (no shared
GIL) sends, for ``--guests`` guests, a baseline sample (balloon at a quarter of RAM, no oom-kill)
and, once all of them are stored, paced at ``--rate`` a second, a sample with ``oom-kills``
incremented: each must make the controller deflate that guest at once.

Per guest it measures, on one clock (``time.perf_counter``, CLOCK_MONOTONIC, which is
system-wide on Linux, so the publisher's and the controller's readings compare):

- **publish → adapter**: the publisher's ``publish`` call to the adapter's ``set_target``,
  end to end through the broker;
- **arrival → adapter**: ``Controller.handle_message`` (a subclass records the arrival) to
  ``set_target``, the controller's own part, and its two pieces: arrival → stored (ingest stores
  samples in batches at most ``FLUSH_DELAY_S`` = 5 ms late; the flush detects the emergency) and
  stored → adapter (the emergency task: guards, target, ``Controller.apply``);
- publish → arrival: the broker and the MQTT clients.

Phases, each with a fresh broker and controller: ``quiet`` (emergency messages only) and
``loaded`` (meanwhile ``--background-rate`` ordinary stats messages a second from
``--background-guests`` other guests, from a third process: the README's payload, as in
``ingest.py``). Percentiles p50 / p90 / p99 / max in ms; the target is publish → adapter p99
under 20 ms.

Run: ``.venv/bin/python -m bench.emergency [--guests 500] [--rate 100] [--background-rate 2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import numpy as np
import orjson

from autoscaler.adapters.base import Adapter, Target
from autoscaler.config import Settings, load_settings
from autoscaler.service.controller import FLUSH_DELAY_S, Controller
from autoscaler.stats import PAGE_BYTES
from bench.harness import (
    DEFAULT_CONTROLLER,
    HOST,
    BenchError,
    add_common_args,
    connect,
    exit_with,
    load_controller_class,
    mosquitto,
    mosquitto_version,
    paho_client,
    reap,
    stop_controller,
    worker_init,
)
from bench.ingest import Payloads
from bench.sysload import CpuSample, Load, describe_machine, print_table, wait_for_quiet

TOPIC_PREFIX: Final = "balloon/v1"
GUESTS_PER_HOST: Final = 100
GIB: Final = 2**30
RAM_BYTES: Final = 8 * GIB
TARGET_P99_MS: Final = 20.0
QUEUE_LIMIT: Final = 100_000
"""mosquitto max_queued_messages: far above what a phase sends, so nothing is dropped."""


# -- the emergency guests --------------------------------------------------------------------------


def emergency_ids(i: int) -> tuple[str, str]:
    """Host and guest id of emergency guest ``i`` (hosts ``e0``, ``e1`` … apart from ``h*``)."""
    return f"e{i // GUESTS_PER_HOST}", f"g{i}"


def emergency_topic(i: int) -> str:
    host, guest = emergency_ids(i)
    return f"{TOPIC_PREFIX}/guest/{host}/{guest}/stats"


def emergency_payload(oom_kills: int) -> bytes:
    """An 8 GiB guest with a quarter of its RAM in the balloon and 3 % available."""
    balloon = RAM_BYTES // 4 // PAGE_BYTES
    total = RAM_BYTES - balloon * PAGE_BYTES
    available = total * 3 // 100
    return orjson.dumps(
        {
            "ts": time.time(),
            "ram_bytes": RAM_BYTES,
            "num_pages": balloon,
            "actual": balloon,
            "stats": {
                "free-memory": available // 2,
                "total-memory": total,
                "available-memory": available,
                "major-faults": 1000 + 100 * oom_kills,
                "swap-in": 0,
                "oom-kills": oom_kills,
            },
        }
    )


# -- worker processes ------------------------------------------------------------------------------


def run_emergency_publisher(
    port: int,
    guests: int,
    rate: float,
    baseline_sent: Any,
    go: Any,
    results: Any,
) -> None:
    """Baseline samples for every guest, then (after ``go``) one oom-kill each, paced."""
    worker_init()
    client = paho_client(f"bench-emergency-{os.getpid()}")
    connect(client, port)
    topics = [emergency_topic(i) for i in range(guests)]
    for i, topic in enumerate(topics):
        client.publish(topic, emergency_payload(0), qos=0)
        if i % 100 == 99:
            client.loop(0)
    while client.want_write():
        client.loop(0.01)
    baseline_sent.set()
    deadline = time.monotonic() + 120.0
    while not go.is_set():
        if time.monotonic() > deadline:
            return
        client.loop(0.01)  # keep the connection served while waiting
    perf_counter = time.perf_counter
    sent: list[float] = []
    start = perf_counter() + 0.01
    for i, topic in enumerate(topics):
        due = start + i / rate
        while (delay := due - perf_counter()) > 0:
            time.sleep(delay)
        payload = emergency_payload(1)
        sent.append(perf_counter())
        client.publish(topic, payload, qos=0)  # paho writes to the socket within this call
        client.loop(0)
    while client.want_write():
        client.loop(0.01)
    with contextlib.suppress(Exception):
        client.disconnect()
        client.loop(0.1)
    results.put(("emergency", sent))


def run_background_publisher(
    port: int, guests: int, rate: float, stop: Any, sent: Any, results: Any
) -> None:
    """Ordinary stats (``ingest.py``'s payloads) at ``rate`` messages a second until ``stop``."""
    worker_init()
    client = paho_client(f"bench-background-{os.getpid()}")
    connect(client, port)
    payloads = Payloads(guests, t0_s=time.time() - 60.0, seed=3)
    step_s = 0.01
    start = time.monotonic()
    next_s = start
    n = 0
    while not stop.is_set():
        due = int((time.monotonic() - start) * rate) + 1
        while n < due:
            topic, payload = payloads.make(n)
            client.publish(topic, payload, qos=0)
            n += 1
        client.loop(0)
        sent.value = n
        next_s += step_s
        delay = next_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - start
    with contextlib.suppress(Exception):
        client.disconnect()
        client.loop(0.1)
    results.put(("background", {"sent": n, "elapsed_s": elapsed}))


# -- the instrumented controller -------------------------------------------------------------------


class RecordingAdapter(Adapter):
    """Applies nothing; records when each emergency target reached it."""

    kind = "bench-recording"

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], float] = {}
        self.other_calls = 0

    async def set_target(self, target: Target) -> None:
        now = time.perf_counter()
        if target.policy == "emergency":
            self.calls.setdefault((target.host_id, target.guest_id), now)
        else:
            self.other_calls += 1


class TimedController(Controller):
    """The real controller, with the arrival time of each topic's latest message and the time
    each slot's latest sample was stored."""

    def __init__(self, settings: Settings, *, adapter: Adapter) -> None:
        super().__init__(settings, adapter=adapter)
        self.arrived: dict[str, float] = {}
        self.stored: dict[int, float] = {}

    def handle_message(self, topic: str, payload: bytes) -> None:
        self.arrived[topic] = time.perf_counter()
        super().handle_message(topic, payload)

    def flush(self) -> None:
        if self._pending_slots:
            now = time.perf_counter()
            for slot in self._pending_slots:
                self.stored[slot] = now
        super().flush()


def controller_class(spec: str) -> type[TimedController]:
    """The instrumented controller, on top of ``spec`` (``module:Class``, a Controller
    subclass that tries a fix) instead of the real one if given."""
    if spec == DEFAULT_CONTROLLER:
        return TimedController
    base = load_controller_class(spec)
    _, _, name = spec.partition(":")
    return cast(type[TimedController], type(f"Timed{name}", (TimedController, base), {}))


# -- a phase ---------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    guests: int
    latencies_ms: dict[str, list[float]]
    applied: int
    background_rate: float
    background_ingested: int
    fleet: int
    ticks: int
    load: Load
    notes: list[str] = field(default_factory=list)


MEASURES: Final = (
    ("publish → adapter (a)", "e2e"),
    ("arrival → adapter (b)", "controller"),
    ("  arrival → stored", "batching"),
    ("  stored → adapter", "emergency_task"),
    ("publish → arrival", "transport"),
)


async def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


async def run_phase(
    name: str, port: int, args: argparse.Namespace, *, background: bool
) -> PhaseResult:
    settings = load_settings(
        None,
        mqtt={"host": HOST, "port": port},
        controller={"interval_s": args.tick_interval, "max_guests": 100_000},
    )
    adapter = RecordingAdapter()
    controller = controller_class(args.controller)(settings, adapter=adapter)
    stop = asyncio.Event()
    runner = asyncio.create_task(controller.run(stop), name="controller")
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    processes: list[Any] = []
    stop_background = ctx.Event()
    background_sent = ctx.Value("q", 0, lock=False)
    notes: list[str] = []
    try:
        await wait_until(controller.link.connected.is_set, 15.0, "the controller to subscribe")
        if background:
            bg = ctx.Process(
                target=run_background_publisher,
                args=(
                    port,
                    args.background_guests,
                    args.background_rate,
                    stop_background,
                    background_sent,
                    results,
                ),
                name="background",
                daemon=True,
            )
            bg.start()
            processes.append(bg)
            # Steady state: every background guest is in the fleet before emergencies start.
            await wait_until(
                lambda: len(controller.fleet) >= args.background_guests,
                30.0 + 2 * args.background_guests / args.background_rate,
                "the background guests to arrive",
            )
        baseline_sent, go = ctx.Event(), ctx.Event()
        publisher = ctx.Process(
            target=run_emergency_publisher,
            args=(port, args.guests, args.rate, baseline_sent, go, results),
            name="emergency",
            daemon=True,
        )
        publisher.start()
        processes.append(publisher)
        fleet = controller.fleet

        def baseline_stored() -> bool:
            for i in range(args.guests):
                slot = fleet.slot_of(*emergency_ids(i))
                if slot is None or math.isnan(fleet.ts_s[slot]):
                    return False
            return True

        await wait_until(baseline_sent.is_set, 30.0, "the baseline samples to be sent")
        await wait_until(baseline_stored, 30.0, "the baseline samples to be stored")
        ingested0 = controller.counters["ingested"]
        cpu_start = CpuSample.now()
        started = time.monotonic()
        go.set()
        duration_s = args.guests / args.rate
        with contextlib.suppress(BenchError):
            await wait_until(
                lambda: len(adapter.calls) >= args.guests, duration_s + 15.0, "emergencies"
            )
        load = Load.between(cpu_start, CpuSample.now())
        elapsed_s = max(1e-9, time.monotonic() - started)
        background_ingested = controller.counters["ingested"] - ingested0 - args.guests
        stop_background.set()
        reports: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        while len(reports) < len(processes):
            try:
                kind, report = await loop.run_in_executor(None, results.get, True, 20.0)
            except queue.Empty:
                raise BenchError("a publisher sent no result") from None
            reports[kind] = report
    finally:
        stop_background.set()
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(reap, processes, grace_s=10.0)
        )
        await stop_controller(stop, runner)

    sent: list[float] = reports["emergency"]
    latencies: dict[str, list[float]] = {key: [] for _, key in MEASURES}
    missing = 0
    for i, published in enumerate(sent):
        host, guest = emergency_ids(i)
        called = adapter.calls.get((host, guest))
        arrived = controller.arrived.get(emergency_topic(i))
        slot = fleet.slot_of(host, guest)
        stored = controller.stored.get(slot) if slot is not None else None
        if called is None or arrived is None or stored is None:
            missing += 1
            continue
        for key, start, end in (
            ("e2e", published, called),
            ("controller", arrived, called),
            ("batching", arrived, stored),
            ("emergency_task", stored, called),
            ("transport", published, arrived),
        ):
            latencies[key].append((end - start) * 1e3)
    if missing:
        notes.append(f"{missing} of {len(sent)} emergencies reached no adapter call")
    if adapter.other_calls:
        notes.append(f"{adapter.other_calls} non-emergency targets (a tick ran)")
    return PhaseResult(
        name=name,
        guests=len(sent),
        latencies_ms=latencies,
        applied=len(adapter.calls),
        background_rate=background_ingested / elapsed_s if background else 0.0,
        background_ingested=background_ingested if background else 0,
        fleet=len(fleet),
        ticks=controller.ticks,
        load=load,
        notes=notes,
    )


def phase(name: str, args: argparse.Namespace, *, background: bool) -> PhaseResult:
    if args.quiet_wait > 0 and not wait_for_quiet(args.quiet_wait):
        print(f"  ({name}: the machine did not get quiet within {args.quiet_wait:g} s)")
    with mosquitto(QUEUE_LIMIT) as broker:
        return asyncio.run(run_phase(name, broker.port, args, background=background))


# -- report ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def report(results: list[PhaseResult], args: argparse.Namespace) -> bool:
    """Prints the table; returns whether every emergency reached the adapter."""
    rows = []
    for r in results:
        label = r.name
        if r.background_ingested:
            label += f" (+{r.background_rate:,.0f} msg/s)"
        for title, key in MEASURES:
            values = r.latencies_ms[key]
            if not values:
                rows.append([label, title, "0", "-", "-", "-", "-"])
                continue
            rows.append(
                [
                    label,
                    title,
                    f"{len(values):,}",
                    *(f"{percentile(values, q):.2f}" for q in (50, 90, 99)),
                    f"{max(values):.2f}",
                ]
            )
            label = ""
    print(
        f"\nEmergency deflate latency, ms: {args.guests:,} guests, one oom-kill each, "
        f"{args.rate:g} a second"
    )
    print_table(["phase", "measure", "n", "p50", "p90", "p99", "max"], rows, left=2)
    print(
        f"(a) end to end through mosquitto; (b) the controller's part, from handle_message; it\n"
        f"stores samples in batches at most FLUSH_DELAY_S = {FLUSH_DELAY_S * 1e3:g} ms late, which "
        "bounds arrival → stored."
    )
    complete = True
    for r in results:
        e2e = r.latencies_ms["e2e"]
        p99 = percentile(e2e, 99) if e2e else math.inf
        ok = p99 < TARGET_P99_MS and r.applied == r.guests
        complete &= r.applied == r.guests
        print(
            f"{r.name}: {r.applied:,} of {r.guests:,} deflated; fleet {r.fleet:,} guests; "
            f"{r.ticks} tick(s); publish → adapter p99 {p99:.1f} ms, target under "
            f"{TARGET_P99_MS:g} ms: {'met' if ok else 'MISSED'}"
        )
        for note in r.notes:
            print(f"  {note}")
        print(f"  {r.load.describe()}")
    return complete


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int, default=500, help="guests that each get one OOM")
    parser.add_argument("--rate", type=float, default=100.0, help="emergency messages a second")
    parser.add_argument("--background-rate", type=float, default=2000.0, help="msg/s (loaded)")
    parser.add_argument(
        "--background-guests",
        type=int,
        default=10_000,
        help="guests behind the background messages (10,000 at 2,000 msg/s: one each 5 s)",
    )
    parser.add_argument("--phases", default="quiet,loaded", help="comma-separated subset")
    add_common_args(
        parser, tick_interval_help="controller.interval_s (3600: no tick during the measurement)"
    )
    args = parser.parse_args(argv)
    if args.guests < 1 or args.rate <= 0 or args.background_rate <= 0:
        parser.error("--guests, --rate and --background-rate must be positive")
    if args.background_guests < 1:
        parser.error("--background-guests must be positive")
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - {"quiet", "loaded"}
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    print(
        f"Emergency benchmark on {describe_machine()}, numpy {np.__version__}, "
        f"{mosquitto_version()}"
    )
    if args.controller != DEFAULT_CONTROLLER:
        print(f"controller class: {args.controller}")
    results = []
    for name in phases:
        result = phase(name, args, background=name == "loaded")
        e2e = result.latencies_ms["e2e"]
        p99 = percentile(e2e, 99) if e2e else math.nan
        print(f"  {name}: {result.applied:,} deflated, publish → adapter p99 {p99:.1f} ms")
        results.append(result)
    # Like ingest.py's lost messages: an emergency that never reached the adapter fails the run.
    return 0 if report(results, args) else 1


if __name__ == "__main__":
    exit_with(main, "emergency")
