"""MQTT ingest benchmark: how many stats messages a second the controller takes in.

Starts its own mosquitto on a free loopback port, then runs three phases, each with a fresh
broker and fresh processes (publisher, subscriber and broker never share a GIL):

a. ``bare``: a plain paho-mqtt subscriber (``loop_forever``, counts messages on
   ``balloon/v1/guest/+/+/stats``) receives a flood of ``--messages`` stats payloads that a
   paho publisher sends at QoS 0 as fast as it can. This is the ceiling that Python, paho and
   mosquitto allow on this machine.
b. ``controller``: the same flood into a real :class:`autoscaler.service.controller.Controller`
   (dry-run adapter, one tick an hour so that only ingest runs); the rate counts messages that
   reached the fleet (``counters["ingested"]``), and the table gives its ratio to the bare rate.
c. ``sustained``: the publisher paced at ``--rate`` (10,000/s: 10,000 guests reporting every
   second) for ``--duration`` seconds; the controller must ingest every message. Reports sent,
   ingested, lost, the largest backlog seen, how long the backlog took to drain after the
   publisher stopped, and the CPU share of the controller, the broker and the publisher.

Payloads are the README's example (six stats), one guest ``h{k}/g{i}`` after the other over
``--guests`` guests (100 per host), with ``ts`` advancing one second per guest per round so
that every sample is newer than the guest's previous one (rates exist, nothing is out of order).

Run: ``.venv/bin/python -m bench.ingest [--duration 60] [--messages 200000] [--guests 10000]``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.harness import (
    DEFAULT_CONTROLLER,
    GIB,
    GUESTS_PER_HOST,
    HOST,
    POLL_S,
    STATS_FILTER,
    TOPIC_PREFIX,
    BenchError,
    DropWatcher,
    SharedCount,
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
from bench.sysload import CpuSample, Load, describe_machine, print_table, wait_for_quiet

# -- payloads --------------------------------------------------------------------------------------


class Payloads:
    """Realistic stats payloads (the README's example), one guest after another.

    Message ``n`` goes to guest ``n % guests``; its ``ts`` is ``t0 + n / guests``, so each guest's
    samples are exactly one second apart and always newer than the last (no out-of-order
    rejects). Memory figures differ per guest and move a little from round to round;
    ``major-faults`` is cumulative and grows, so the controller computes real rates.
    """

    def __init__(self, guests: int, t0_s: float, seed: int = 1) -> None:
        import orjson

        self._dumps = orjson.dumps
        self.guests = guests
        self.t0_s = t0_s
        rng = random.Random(seed)
        self.topics = [
            f"{TOPIC_PREFIX}/guest/h{j // GUESTS_PER_HOST}/g{j}/stats" for j in range(guests)
        ]
        self.ram = [(2, 4, 8, 16)[j % 4] * GIB for j in range(guests)]
        self.available_share = [rng.uniform(0.15, 0.70) for _ in range(guests)]
        self.fault_rate = [rng.randint(0, 50) for _ in range(guests)]

    def make(self, n: int) -> tuple[str, bytes]:
        j = n % self.guests
        round_ = n // self.guests
        ram = self.ram[j]
        # A slow wobble of +-2 % of RAM around the guest's usual available memory.
        available = int(ram * (self.available_share[j] + 0.02 * ((round_ % 7) - 3) / 3))
        payload = {
            "ts": self.t0_s + n / self.guests,
            "ram_bytes": ram,
            "num_pages": 0,
            "actual": 0,
            "stats": {
                "free-memory": available // 2,
                "total-memory": ram,
                "available-memory": available,
                "major-faults": 120 + round_ * self.fault_rate[j],
                "swap-in": 0,
                "oom-kills": 0,
            },
        }
        return self.topics[j], self._dumps(payload)


# -- workers ---------------------------------------------------------------------------------------


def run_publisher(
    port: int,
    count: int,
    guests: int,
    rate: float,
    sent: SharedCount,
    done: Any,
    results: Any,
) -> None:
    """Publish ``count`` payloads at QoS 0: as fast as paho allows (``rate`` 0) or paced."""
    worker_init()
    client = paho_client(f"bench-pub-{os.getpid()}")
    connect(client, port)
    payloads = Payloads(guests, t0_s=time.time())
    make, publish = payloads.make, client.publish
    published = failed = 0
    cpu0 = time.process_time()
    start = time.monotonic()
    if rate <= 0:
        for n in range(count):
            topic, payload = make(n)
            if publish(topic, payload, qos=0).rc == 0:
                published += 1
            else:
                failed += 1
            if n % 1000 == 999:
                # Without its network thread paho only reads when asked: serve the socket.
                client.loop(0)
                sent.value = published
    else:
        # Absolute schedule in 10 ms steps: each step sends what is due since ``start``, so
        # a late step catches up instead of drifting (and the rate stays exact over a minute).
        step_s = 0.01
        next_s = start
        n = 0
        while n < count:
            due = min(count, int((time.monotonic() - start) * rate) + 1)
            while n < due:
                topic, payload = make(n)
                if publish(topic, payload, qos=0).rc == 0:
                    published += 1
                else:
                    failed += 1
                n += 1
            client.loop(0)
            sent.value = published
            next_s += step_s
            delay = next_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    # Publishing queues in paho when the socket is full: flush before calling it done.
    deadline = time.monotonic() + 120.0
    while client.want_write() and time.monotonic() < deadline:
        client.loop(0.05)
    end = time.monotonic()
    cpu = time.process_time() - cpu0
    sent.value = published
    done.set()
    with contextlib.suppress(Exception):
        client.disconnect()
        client.loop(0.1)
    results.put(
        (
            "publisher",
            {
                "published": published,
                "failed": failed,
                "unflushed": client.want_write(),
                "start": start,
                "end": end,
                "cpu_s": cpu,
            },
        )
    )


@dataclass
class _Tally:
    count: int = 0
    first: float = 0.0
    last: float = 0.0


@dataclass(frozen=True)
class SubscriberJob:
    """What every subscriber worker gets: where to listen, when to stop and where to report."""

    port: int
    expected: int
    idle_s: float
    timeout_s: float
    ready: Any
    publisher_done: Any
    received: SharedCount
    results: Any


def run_bare_subscriber(job: SubscriberJob) -> None:
    """A bare paho subscriber on ``loop_forever`` that only counts (the reference)."""
    worker_init()
    tally = _Tally()
    monotonic = time.monotonic

    def on_message(_client: Any, _userdata: Any, _message: Any) -> None:
        now = monotonic()
        if tally.count == 0:
            tally.first = now
        tally.count += 1
        tally.last = now

    def on_subscribe(*_args: Any) -> None:
        job.ready.set()

    client = paho_client(f"bench-bare-{os.getpid()}")
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    connect(client, job.port)
    client.subscribe(STATS_FILTER, qos=1)
    cpu = {"start": 0.0, "end": 0.0}

    def watchdog() -> None:
        # A thread, not a callback: it must notice when messages stop coming at all.
        deadline = monotonic() + job.timeout_s
        while True:
            time.sleep(0.05)
            job.received.value = tally.count
            now = monotonic()
            done = tally.count >= job.expected
            idle = job.publisher_done.is_set() and now - max(tally.last, tally.first) > job.idle_s
            if done or idle or now > deadline:
                cpu["end"] = time.process_time()
                client.disconnect()
                return

    cpu["start"] = time.process_time()
    threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
    client.loop_forever()
    job.results.put(
        (
            "subscriber",
            {
                "received": tally.count,
                "ingested": tally.count,
                "rejected": {},
                "first": tally.first,
                "last": tally.last,
                "cpu_s": cpu["end"] - cpu["start"],
                "cpu_window_s": None,
            },
        )
    )


def run_controller_subscriber(
    job: SubscriberJob,
    tick_interval_s: float,
    max_guests: int,
    profile_path: str | None,
    controller_spec: str,
) -> None:
    """A real Controller (dry-run adapter); reports what reached the fleet."""
    worker_init()
    import asyncio

    async def main() -> dict[str, Any]:
        from autoscaler.config import load_settings

        controller_class = load_controller_class(controller_spec)
        settings = load_settings(
            None,
            mqtt={"host": HOST, "port": job.port},
            # 3600 s by default: one tick at start, on an empty fleet, then ingest only.
            controller={"interval_s": tick_interval_s, "max_guests": max_guests},
            adapter={"kind": "dry-run"},
        )
        controller = controller_class(settings)
        stop = asyncio.Event()
        runner = asyncio.create_task(controller.run(stop), name="controller")
        counters, rejected = controller.counters, controller.rejected
        try:
            async with asyncio.timeout(15):
                await controller.link.connected.wait()  # set once subscribed
            job.ready.set()
            monotonic = time.monotonic
            deadline = monotonic() + job.timeout_s
            first = last = 0.0
            cpu_first = cpu_last = 0.0
            seen = 0
            # Sampling the counters every 10 ms costs far less than one message's handling
            # and keeps the handler itself unwrapped (what is measured is what runs).
            while True:
                await asyncio.sleep(POLL_S)
                now = monotonic()
                total = counters["ingested"] + sum(rejected.values())
                if total != seen:
                    if seen == 0:
                        first, cpu_first = now - POLL_S / 2, time.process_time()
                    seen = total
                    last, cpu_last = now, time.process_time()
                    job.received.value = total
                if total >= job.expected:
                    break
                if job.publisher_done.is_set() and now - max(last, first) > job.idle_s:
                    break
                if now > deadline or runner.done():
                    break
        finally:
            await stop_controller(stop, runner)
        return {
            "received": counters["messages"],
            "ingested": counters["ingested"],
            "rejected": dict(rejected),
            "first": first,
            "last": last,
            "cpu_s": cpu_last - cpu_first,
            "cpu_window_s": last - first,
            "ticks": controller.ticks,
            "fleet": len(controller.fleet),
        }

    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        fields = profiler.runcall(asyncio.run, main())
        profiler.dump_stats(profile_path)
    else:
        fields = asyncio.run(main())
    job.results.put(("subscriber", fields))


# -- phases ----------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    published: int
    received: int
    ingested: int
    rejected: dict[str, int]
    publish_s: float
    receive_s: float
    drain_s: float
    max_backlog: int
    subscriber_cpu_s: float
    subscriber_cpu_window_s: float
    publisher_cpu_s: float
    broker_cpu_s: float
    broker_dropped: int | None
    load: Load
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ingested / self.receive_s if self.receive_s > 0 else float("nan")

    @property
    def publish_rate(self) -> float:
        return self.published / self.publish_s if self.publish_s > 0 else float("nan")

    @property
    def cpu_us_per_message(self) -> float:
        """Receiver CPU per message: unlike msg/s, it hardly moves when other work shares the
        machine, so it is the number to compare between runs."""
        return self.subscriber_cpu_s / self.ingested * 1e6 if self.ingested else float("nan")

    @property
    def lost(self) -> int:
        return self.published - self.ingested - sum(self.rejected.values())


def run_phase(
    name: str,
    *,
    subscriber: Callable[..., None],
    subscriber_args: tuple[Any, ...],
    count: int,
    guests: int,
    rate: float,
    max_queued: int,
    idle_s: float,
    timeout_s: float,
    verbose: bool = False,
    quiet_wait_s: float = 0.0,
) -> PhaseResult:
    """One broker, one subscriber process, one publisher process; collect both reports."""
    ctx = mp.get_context("spawn")  # fresh interpreters: nothing inherited from this process
    results = ctx.Queue()
    ready, publisher_done = ctx.Event(), ctx.Event()
    sent = ctx.Value("q", 0, lock=False)
    received = ctx.Value("q", 0, lock=False)
    processes: list[Any] = []
    if quiet_wait_s > 0 and not wait_for_quiet(quiet_wait_s):
        print(f"  {name}: the machine did not get quiet within {quiet_wait_s:g} s; running anyway")
    cpu_start = CpuSample.now()
    with mosquitto(max_queued) as broker:
        drops = DropWatcher(broker.port)
        try:
            sub = ctx.Process(
                target=subscriber,
                args=(
                    SubscriberJob(
                        broker.port,
                        count,
                        idle_s,
                        timeout_s,
                        ready,
                        publisher_done,
                        received,
                        results,
                    ),
                    *subscriber_args,
                ),
                name=f"{name}-subscriber",
                daemon=True,
            )
            processes.append(sub)
            sub.start()
            if not ready.wait(timeout=30):
                raise BenchError(f"{name}: the subscriber did not subscribe within 30 s")
            broker_cpu0 = broker.cpu_s()
            pub = ctx.Process(
                target=run_publisher,
                args=(broker.port, count, guests, rate, sent, publisher_done, results),
                name=f"{name}-publisher",
                daemon=True,
            )
            processes.append(pub)
            pub.start()
            if verbose:  # pids, for attaching a profiler such as py-spy to a worker
                print(f"  {name}: subscriber pid {sub.pid}, publisher pid {pub.pid}", flush=True)
            reports: dict[str, dict[str, Any]] = {}
            max_backlog = 0
            deadline = time.monotonic() + timeout_s + 60
            while len(reports) < 2:
                try:
                    role, fields = results.get(timeout=0.25)
                    reports[role] = fields
                except queue.Empty:
                    pass
                max_backlog = max(max_backlog, sent.value - received.value)
                for process in processes:
                    role = "publisher" if process is pub else "subscriber"
                    if role not in reports and process.exitcode not in (None, 0):
                        raise BenchError(f"{name}: {process.name} exited with {process.exitcode}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: no result within {timeout_s + 60:.0f} s")
            broker_cpu = broker.cpu_s() - broker_cpu0
            dropped = drops.read()
        except BaseException:
            reap(processes, grace_s=0.0)  # interrupted or failed: stop the workers at once
            raise
        finally:
            drops.close()
        reap(processes, grace_s=10.0)
    load = Load.between(cpu_start, CpuSample.now())
    p, s = reports["publisher"], reports["subscriber"]
    return PhaseResult(
        name=name,
        published=p["published"],
        received=s["received"],
        ingested=s["ingested"],
        rejected=s["rejected"],
        publish_s=p["end"] - p["start"],
        receive_s=s["last"] - s["first"],
        drain_s=max(0.0, s["last"] - p["end"]),
        max_backlog=max_backlog,
        subscriber_cpu_s=s["cpu_s"],
        subscriber_cpu_window_s=s["cpu_window_s"] or (s["last"] - s["first"]),
        publisher_cpu_s=p["cpu_s"],
        broker_cpu_s=broker_cpu,
        broker_dropped=dropped,
        load=load,
        extra={k: v for k, v in s.items() if k in ("ticks", "fleet")},
    )


# -- report ----------------------------------------------------------------------------------------


def versions() -> str:
    from importlib.metadata import version

    return f"paho-mqtt {version('paho-mqtt')}, {mosquitto_version()}"


def pct(cpu_s: float, wall_s: float) -> str:
    return f"{100 * cpu_s / wall_s:.0f}%" if wall_s > 0 else "-"


def report_flood(bare: PhaseResult | None, ctrl: PhaseResult | None) -> None:
    runs = [r for r in (bare, ctrl) if r is not None]
    print(f"\nFlood: {runs[0].published:,} messages, QoS 0, as fast as the publisher can send")
    headers = [
        "receiver", "published", "publish/s", "received", "ingested", "rejected", "lost",
        "receive s", "msg/s", "receiver CPU", "CPU µs/msg", "broker dropped",
    ]  # fmt: skip
    rows = []
    for r in runs:
        rows.append(
            [
                "bare paho" if r is bare else "controller",
                f"{r.published:,}",
                f"{r.publish_rate:,.0f}",
                f"{r.received:,}",
                f"{r.ingested:,}",
                f"{sum(r.rejected.values()):,}",
                f"{r.lost:,}",
                f"{r.receive_s:.2f}",
                f"{r.rate:,.0f}",
                pct(r.subscriber_cpu_s, r.subscriber_cpu_window_s),
                f"{r.cpu_us_per_message:.1f}",
                "?" if r.broker_dropped is None else f"{r.broker_dropped:,}",
            ]
        )
    print_table(headers, rows)
    if bare is not None and ctrl is not None:
        print(
            f"controller / bare: {ctrl.rate / bare.rate:.2f} in msg/s, "
            f"{bare.cpu_us_per_message / ctrl.cpu_us_per_message:.2f} in CPU per message"
        )
    if ctrl is not None:
        print(
            "one free core would let the controller ingest about "
            f"{1e6 / ctrl.cpu_us_per_message:,.0f} msg/s"
        )
    for r in runs:
        print(f"{r.name} phase: {r.load.describe()}")


def report_sustained(r: PhaseResult, rate: float, duration_s: float) -> None:
    print(f"\nSustained: {rate:,.0f} messages/s for {duration_s:g} s (QoS 0)")
    headers = [
        "sent", "ingested", "lost", "rejected", "ingest msg/s", "max backlog", "drain s",
        "controller CPU", "CPU µs/msg", "broker CPU", "publisher CPU", "broker dropped",
    ]  # fmt: skip
    wall = r.publish_s
    rows = [
        [
            f"{r.published:,}",
            f"{r.ingested:,}",
            f"{r.lost:,}",
            f"{sum(r.rejected.values()):,}",
            f"{r.rate:,.0f}",
            f"{r.max_backlog:,}",
            f"{r.drain_s:.2f}",
            pct(r.subscriber_cpu_s, r.subscriber_cpu_window_s),
            f"{r.cpu_us_per_message:.1f}",
            pct(r.broker_cpu_s, wall),
            pct(r.publisher_cpu_s, wall),
            "?" if r.broker_dropped is None else f"{r.broker_dropped:,}",
        ]
    ]
    print_table(headers, rows)
    print(
        "CPU shares are of one core over the phase; max backlog = messages sent but not yet\n"
        "ingested (dropped ones included), sampled every 0.25 s; drain = last ingest after the\n"
        "publisher's last send."
    )
    print(f"sustained phase: {r.load.describe()}")


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="flood size (a, b)")
    parser.add_argument("--guests", type=int, default=10_000, help="distinct guests to cycle")
    parser.add_argument("--duration", type=float, default=60.0, help="sustained phase, seconds")
    parser.add_argument("--rate", type=float, default=10_000.0, help="sustained messages/s")
    parser.add_argument(
        "--sustained-queue",
        type=int,
        default=0,
        help="mosquitto max_queued_messages in the sustained phase (default: 10 s of traffic)",
    )
    parser.add_argument(
        "--phases", default="bare,controller,sustained", help="comma-separated subset to run"
    )
    parser.add_argument("--verbose", action="store_true", help="print worker pids")
    add_common_args(
        parser,
        tick_interval_help=(
            "controller.interval_s in the sustained phase (3600: ingest only; 10: production)"
        ),
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="write a cProfile of the controller's flood phase"
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.guests < 1 or args.duration <= 0 or args.rate <= 0:
        parser.error("--messages, --guests, --duration and --rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM must unwind like Ctrl-C so that the finally blocks stop mosquitto and workers.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    phases = set(args.phases.split(","))
    max_guests = max(args.guests, 100_000)
    idle_s = 3.0
    print(f"Ingest benchmark on {describe_machine()}, {versions()}")
    print(
        f"payload: README example, {len(Payloads(1, 0.0).make(0)[1])} bytes; "
        f"{args.guests:,} guests, {GUESTS_PER_HOST} per host"
    )
    if args.controller != DEFAULT_CONTROLLER:
        print(f"controller class: {args.controller}")
    # A flood can sit whole in the broker while the subscriber catches up: allow all of it.
    flood_queue = args.messages + 1000
    # Flood time limit: generous for a subscriber as slow as 1,000 messages/s.
    flood_timeout_s = 30.0 + args.messages / 1000
    common = {
        "guests": args.guests,
        "rate": 0.0,
        "max_queued": flood_queue,
        "idle_s": idle_s,
        "verbose": args.verbose,
        "quiet_wait_s": args.quiet_wait,
    }
    bare = ctrl = None
    if "bare" in phases:
        bare = run_phase(
            "bare",
            subscriber=run_bare_subscriber,
            subscriber_args=(),
            count=args.messages,
            timeout_s=flood_timeout_s,
            **common,
        )
        print(f"  bare paho: {bare.rate:,.0f} msg/s")
    if "controller" in phases:
        ctrl = run_phase(
            "controller",
            subscriber=run_controller_subscriber,
            subscriber_args=(3600.0, max_guests, args.profile, args.controller),
            count=args.messages,
            timeout_s=flood_timeout_s,
            **common,
        )
        print(f"  controller: {ctrl.rate:,.0f} msg/s")
    if bare is not None or ctrl is not None:
        report_flood(bare, ctrl)
    if "sustained" in phases:
        count = int(args.rate * args.duration)
        # 10 s of traffic: room for a stall as long as a control tick on a big fleet, and
        # still a bound, so a controller that falls behind for good shows up as loss.
        sustained_queue = args.sustained_queue or int(args.rate * 10)
        sustained = run_phase(
            "sustained",
            subscriber=run_controller_subscriber,
            subscriber_args=(args.tick_interval, max_guests, None, args.controller),
            count=count,
            guests=args.guests,
            rate=args.rate,
            max_queued=sustained_queue,
            idle_s=idle_s,
            timeout_s=args.duration * 3 + 30,
            verbose=args.verbose,
            quiet_wait_s=args.quiet_wait,
        )
        report_sustained(sustained, args.rate, args.duration)
        print(
            f"mosquitto max_queued_messages: flood {flood_queue:,}, sustained {sustained_queue:,};"
            f" controller.interval_s in the sustained phase: {args.tick_interval:g}"
            f" ({sustained.extra.get('ticks', '?')} ticks)"
        )
        if sustained.lost:
            return 1
    return 0


if __name__ == "__main__":
    exit_with(main, "ingest")
