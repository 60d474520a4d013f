"""Control-tick and in-process ingest benchmark: what one tick and one message cost.

For fleets of 1,000 / 10,000 / 100,000 guests filled with realistic random samples (two per
guest, five seconds apart, so that rates exist), it times:

- ``TickDriver.tick(now)``: fleet view, threshold policy, guards and the list of target
  changes, as the controller runs it every ``controller.interval_s``; median and p99 over
  ``--repeats`` runs (nothing is committed, so every run does the same work);
- the parts on their own: ``fleet_view``, ``ThresholdPolicy.decide`` and ``apply_guards``;
- ingest per message, in-process (no MQTT): ``decode_guest_stats`` and storing the sample on
  its own (``autoscaler.testing.ingest``: ``Fleet.slot_for`` and a one-row
  ``Fleet.ingest_batch``), for a guest's first sample (slot allocation) and its second (rates),
  and the controller's whole ``handle_message`` path when messages arrive one per event-loop
  turn (as paho delivers them) or several per turn;
- the fleet's memory at the largest size: numpy buffers, everything the ``Fleet`` holds, RSS
  growth, and with ``--tracemalloc`` the exact held and peak figures (slow).

Samples look like a Linux 6.12 guest's (all 16 stats): 2–32 GiB guests, balloons of 0–30 %
of RAM, available memory spread from 3 % to 80 %, a few guests under swap, fault or reclaim
pressure. Run: ``.venv/bin/python -m bench.tick [--sizes 1000,10000,100000] [--repeats 30]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import orjson

from autoscaler.config import GuardSettings, load_settings
from autoscaler.fleet import Fleet
from autoscaler.guards import apply_guards
from autoscaler.plugins import create_policy
from autoscaler.service.controller import Controller
from autoscaler.stats import N_STATS, PAGE_BYTES, STAT_INDEX, STAT_NAMES
from autoscaler.testing import ingest
from autoscaler.tick import TickDriver, fleet_view
from autoscaler.wire import decode_guest_stats
from bench import sysload
from bench.sysload import CpuSample, Load, describe_machine

GIB: Final = 2**30
GUESTS_PER_HOST: Final = 100
INTERVAL_S: Final = 5.0
"""Seconds between a guest's samples (agent.interval_s default)."""
STALE_AFTER_S: Final = 60.0
TOPIC_PREFIX: Final = "balloon/v1"
GAUGES: Final = ("free-memory", "total-memory", "available-memory", "disk-caches")
PAYLOAD_STATS: Final = (*GAUGES, *(name for name in STAT_NAMES if name not in GAUGES))
"""The stats of a payload, in its order: the gauges, then the cumulative stats."""
PAYLOAD_COLUMNS: Final = [STAT_INDEX[name] for name in PAYLOAD_STATS]


# -- realistic samples -----------------------------------------------------------------------------


@dataclass
class Population:
    """Per-guest constants of a random fleet, and its cumulative counters as they advance."""

    hosts: list[str]
    guests: list[str]
    ram: np.ndarray
    balloon_pages: np.ndarray
    available_share: np.ndarray
    free_share: np.ndarray
    counters: np.ndarray
    """float64[n, 16]: cumulative stats (gauge columns unused)."""
    rates: np.ndarray
    """float64[n, 16]: per-second growth of each cumulative stat."""

    @classmethod
    def random(cls, n: int, rng: np.random.Generator) -> Population:
        ram = rng.choice(np.array([2, 4, 8, 16, 32]) * GIB, size=n).astype(np.float64)
        balloon_pages = np.floor(rng.uniform(0.0, 0.3, n) * ram / PAGE_BYTES)
        rates = np.zeros((n, N_STATS))
        # Background activity every guest has: page faults, a little file I/O, kswapd work.
        rates[:, STAT_INDEX["minor-faults"]] = rng.gamma(2.0, 2000.0, n)
        rates[:, STAT_INDEX["major-faults"]] = rng.gamma(1.0, 5.0, n)
        rates[:, STAT_INDEX["async-scans"]] = rng.gamma(1.0, 4096.0 * 20, n)
        rates[:, STAT_INDEX["async-reclaims"]] = rates[:, STAT_INDEX["async-scans"]] * 0.8
        # A few guests under pressure, so that every branch of the policy has work.
        swapping = rng.random(n) < 0.05
        rates[swapping, STAT_INDEX["swap-in"]] = rng.uniform(0.5, 20.0, swapping.sum()) * 2**20
        rates[swapping, STAT_INDEX["swap-out"]] = rng.uniform(0.5, 20.0, swapping.sum()) * 2**20
        faulting = rng.random(n) < 0.02
        rates[faulting, STAT_INDEX["major-faults"]] = rng.uniform(200.0, 3000.0, faulting.sum())
        reclaiming = rng.random(n) < 0.02
        rates[reclaiming, STAT_INDEX["direct-scans"]] = 4 * 2**20
        rates[reclaiming, STAT_INDEX["direct-reclaims"]] = (
            rng.uniform(0.2, 8.0, reclaiming.sum()) * 2**20
        )
        counters = rng.uniform(0.0, 1e6, (n, N_STATS)).round()
        counters[:, STAT_INDEX["oom-kills"]] = 0
        counters[:, STAT_INDEX["alloc-stalls"]] = 0
        return cls(
            hosts=[f"h{j // GUESTS_PER_HOST}" for j in range(n)],
            guests=[f"g{j}" for j in range(n)],
            ram=ram,
            balloon_pages=balloon_pages,
            available_share=rng.uniform(0.03, 0.80, n),
            free_share=rng.uniform(0.1, 0.6, n),
            counters=counters,
            rates=rates,
        )

    def __len__(self) -> int:
        return len(self.guests)

    def topic(self, j: int) -> str:
        return f"{TOPIC_PREFIX}/guest/{self.hosts[j]}/{self.guests[j]}/stats"

    def next_values(self, rng: np.random.Generator, interval_s: float) -> np.ndarray:
        """One more sample per guest, ``interval_s`` after the last: float64[n, 16] stats.

        Advances the counters; :meth:`payloads` builds its JSON from these values, and
        ``bench/policy_ticks.py`` stores them directly (``Fleet.ingest_batch``).
        """
        n = len(self)
        self.counters += np.round(self.rates * interval_s * rng.uniform(0.5, 1.5, (n, 1)))
        # Guests with no balloon under deflate-on-oom look the same either way; with it off,
        # the balloon has left MemTotal (the common case, virtio_balloon without the feature).
        total = self.ram - self.balloon_pages * PAGE_BYTES
        wobble = rng.normal(0.0, 0.01, n)
        available = np.floor(total * np.clip(self.available_share + wobble, 0.01, 0.95))
        free = np.floor(available * self.free_share)
        values = self.counters.copy()
        for name, column in zip(GAUGES, (free, total, available, available - free), strict=True):
            values[:, STAT_INDEX[name]] = column
        return values

    def payloads(self, ts_s: np.ndarray, rng: np.random.Generator) -> list[bytes]:
        """One wire payload per guest at ``ts_s``; advances the counters to that time."""
        values = self.next_values(rng, INTERVAL_S)
        rows = values[:, PAYLOAD_COLUMNS].astype(np.int64).tolist()
        ram = self.ram.astype(np.int64).tolist()
        pages = self.balloon_pages.astype(np.int64).tolist()
        ts = ts_s.tolist()
        return [
            orjson.dumps(
                {
                    "ts": ts[j],
                    "ram_bytes": ram[j],
                    "num_pages": pages[j],
                    "actual": pages[j],
                    "stats": dict(zip(PAYLOAD_STATS, rows[j], strict=True)),
                }
            )
            for j in range(len(self))
        ]


def sample_times(n: int, now_s: float, round_: int, rounds: int) -> np.ndarray:
    """Sample times of round ``round_`` of ``rounds``, ``INTERVAL_S`` apart for each guest.

    Guests are spread over the interval (agents are not in step); the last round lies within
    ``INTERVAL_S`` before ``now_s``, so nothing is stale.
    """
    phase = (np.arange(n) * 0.6180339887) % 1.0 * INTERVAL_S
    return now_s - (rounds - round_) * INTERVAL_S + phase


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]
    """CPU time of this thread: what the work costs, however busy the machine is."""


def timed(function: Callable[[], object], repeats: int) -> Timing:
    """Wall and CPU times of ``repeats`` calls, after one warm-up; the GC is off meanwhile."""
    function()
    timing = Timing([], [])
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            cpu, wall = time.thread_time(), time.perf_counter()
            function()
            timing.wall.append(time.perf_counter() - wall)
            timing.cpu.append(time.thread_time() - cpu)
    finally:
        gc.enable()
    return timing


def p99(times: Sequence[float]) -> float:
    """99th percentile, nearest rank (with few runs this is the slowest one)."""
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(np.ceil(0.99 * len(ordered))) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def rss_bytes() -> tuple[int, int]:
    """Resident set size now and its high-water mark (VmRSS, VmHWM), bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    sysload.print_table(headers, rows)


# -- ingest ----------------------------------------------------------------------------------------


@dataclass
class IngestCost:
    parse_us: float
    store_us: float


def ingest_round(fleet: Fleet, pop: Population, payloads: list[bytes], now_s: float) -> IngestCost:
    """Parse then store one sample per guest; CPU µs per message for each step."""
    gc.collect()
    gc.disable()  # the GC runs on its own schedule in the daemon; here it would add noise
    try:
        start = time.process_time()
        samples = [decode_guest_stats(p, now_s=now_s) for p in payloads]
        parsed = time.process_time()
        for host, guest, sample in zip(pop.hosts, pop.guests, samples, strict=True):
            ingest(fleet, host, guest, sample, now_s)
        stored = time.process_time()
    finally:
        gc.enable()
    n = len(payloads)
    return IngestCost((parsed - start) / n * 1e6, (stored - parsed) / n * 1e6)


def build_fleet(
    n: int, now_s: float, seed: int
) -> tuple[Fleet, list[IngestCost], dict[str, float]]:
    """A fleet of ``n`` guests with two samples each; ingest costs and RSS growth."""
    rng = np.random.default_rng(seed)
    pop = Population.random(n, rng)
    rounds = [pop.payloads(sample_times(n, now_s, r, 2), rng) for r in range(2)]
    gc.collect()
    rss0, peak0 = rss_bytes()
    fleet = Fleet(max_guests=max(n, 100_000), epoch_s=now_s - 3600.0)
    costs = [ingest_round(fleet, pop, payloads, now_s) for payloads in rounds]
    gc.collect()
    rss1, peak1 = rss_bytes()
    if len(fleet) != n:
        raise RuntimeError(f"fleet holds {len(fleet)} guests, expected {n}")
    return fleet, costs, {"rss": rss1 - rss0, "rss_peak": peak1 - peak0}


def controller_path_us(n: int, per_turn: Sequence[int], seed: int) -> dict[int, float]:
    """CPU µs per message through ``Controller.handle_message`` with ``k`` messages per loop turn.

    The controller stores samples in a batch scheduled for the end of the event-loop turn in
    which they arrived. paho reads one QoS 0 packet per readable event, so over MQTT a turn holds
    one message; the larger ``k`` show what the same code costs when turns carry more.
    """
    rng = np.random.default_rng(seed)
    pop = Population.random(n, rng)
    topics = [pop.topic(j) for j in range(n)]
    rounds = 1 + len(per_turn)
    now_s = time.time()
    settings = load_settings(None, controller={"max_guests": max(n, 100_000)})
    results: dict[int, float] = {}

    async def run() -> None:
        controller = Controller(settings)
        handle = controller.handle_message
        for round_ in range(rounds):
            payloads = pop.payloads(sample_times(n, now_s, round_, rounds), rng)
            k = per_turn[round_ - 1] if round_ else 1
            gc.collect()
            gc.disable()
            start = time.process_time()
            for first in range(0, n, k):
                for j in range(first, min(first + k, n)):
                    handle(topics[j], payloads[j])
                await asyncio.sleep(0)  # end of the turn: the scheduled store runs
            # A store on a timer rather than at the end of the turn would run by now (sleeping
            # costs no CPU time, which is what is measured).
            await asyncio.sleep(0.05)
            elapsed = time.process_time() - start
            gc.enable()
            if round_:  # round 0 fills the fleet (slot allocation); later rounds are steady
                results[k] = elapsed / n * 1e6
        ingested = controller.counters["ingested"]
        if ingested != n * rounds or controller.rejected:
            raise RuntimeError(f"ingested {ingested}, rejected {dict(controller.rejected)}")

    asyncio.run(run())
    return results


# -- memory ----------------------------------------------------------------------------------------


def deep_size(obj: object, seen: set[int] | None = None) -> int:
    """Bytes held by ``obj`` and everything it refers to (``sys.getsizeof``, walked)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return sys.getsizeof(obj)  # header, plus the buffer when the array owns it
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set | frozenset):
        size += sum(deep_size(item, seen) for item in obj)
    return size


def fleet_memory(fleet: Fleet) -> dict[str, float]:
    """What the fleet holds: its numpy columns, and everything (ids, slot table) walked."""
    arrays = sum(v.nbytes for v in vars(fleet).values() if isinstance(v, np.ndarray))
    return {"arrays": arrays, "walked": deep_size(vars(fleet))}


def traced_build(n: int, now_s: float, seed: int) -> dict[str, float]:
    """Held and peak memory of building a fleet, by tracemalloc (numpy reports to it).

    Exact, but tracing every allocation makes the build about seven times slower.
    """
    rng = np.random.default_rng(seed)
    pop = Population.random(n, rng)
    rounds = [pop.payloads(sample_times(n, now_s, r, 2), rng) for r in range(2)]
    gc.collect()
    tracemalloc.start()
    fleet = Fleet(max_guests=max(n, 100_000), epoch_s=now_s - 3600.0)
    for payloads in rounds:
        for host, guest, raw in zip(pop.hosts, pop.guests, payloads, strict=True):
            ingest(fleet, host, guest, decode_guest_stats(raw, now_s=now_s), now_s)
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"traced": current, "peak": peak}


# -- main ------------------------------------------------------------------------------------------


def time_fleet(n: int, now_s: float, args: argparse.Namespace) -> dict[str, list[str]]:
    """Build a fleet of ``n`` guests and time its tick; table rows for this size."""
    fleet, (first, second), rss = build_fleet(n, now_s, args.seed)
    guards = GuardSettings()
    policy = create_policy("threshold")
    driver = TickDriver(fleet, policy, guards, stale_after_s=STALE_AFTER_S)
    result = driver.tick(now_s)
    if result.error is not None:
        raise RuntimeError(f"policy failed: {result.error}")
    tick = timed(lambda: driver.tick(now_s), args.repeats)
    quiet = "-"
    if "explain" in inspect.signature(TickDriver).parameters:
        # The same tick without formatting a reason text per change (what the simulator runs).
        silent = TickDriver(fleet, policy, guards, stale_after_s=STALE_AFTER_S, explain=False)
        quiet = ms(statistics.median(timed(lambda: silent.tick(now_s), args.repeats).cpu))
    view = fleet_view(fleet, now_s)
    decision = policy.decide(view)
    parts = [
        timed(lambda: fleet_view(fleet, now_s), args.repeats),
        timed(lambda: policy.decide(view), args.repeats),
        timed(
            lambda: apply_guards(view, decision.target_bytes, guards, stale_after_s=STALE_AFTER_S),
            args.repeats,
        ),
    ]
    tick_cpu = statistics.median(tick.cpu)
    rest = max(0.0, tick_cpu - sum(statistics.median(t.cpu) for t in parts))
    changes = len(result.changes)
    rows = {
        "tick": [
            f"{n:,}",
            f"{changes:,}",
            ms(statistics.median(tick.wall)),
            ms(p99(tick.wall)),
            ms(tick_cpu),
            ms(p99(tick.cpu)),
            quiet,
            ms(rest),
            f"{rest / max(1, changes) * 1e6:.1f}",
        ],
        "parts": [f"{n:,}"] + [f"{ms(statistics.median(t.cpu))} / {ms(p99(t.cpu))}" for t in parts],
        "ingest": [
            f"{n:,}",
            f"{first.parse_us:.1f}",
            f"{first.store_us:.1f}",
            f"{second.parse_us:.1f}",
            f"{second.store_us:.1f}",
            f"{second.parse_us + second.store_us:.1f}",
        ],
    }
    memory = {**fleet_memory(fleet), **rss}
    rows["memory"] = [f"{memory[k]:.0f}" for k in ("arrays", "walked", "rss", "rss_peak")]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="fleet sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measurement")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also trace the largest build (slow, exact)"
    )
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not sizes or sizes[0] < 1 or args.repeats < 1:
        parser.error("--sizes and --repeats must be positive")

    print(f"Tick benchmark on {describe_machine()}, numpy {np.__version__}")
    cpu_start = CpuSample.now()
    now_s = time.time()
    # Largest first: its RSS growth is measured before this process has freed big arrays.
    rows = {n: time_fleet(n, now_s, args) for n in reversed(sizes)}

    print_table(
        f"TickDriver.tick (threshold policy + guards), {args.repeats} runs, ms",
        [
            "guests", "changes", "wall median", "wall p99", "CPU median", "CPU p99",
            "CPU no reasons", "changes part", "µs/change",
        ],
        [rows[n]["tick"] for n in sizes],
    )  # fmt: skip
    print(
        "wall = elapsed (how long the event loop is blocked); CPU = this thread's CPU time, the\n"
        "same on a quiet machine and steady on a busy one. no reasons = explain=False (no reason\n"
        "text per change). changes part = CPU medians of tick − fleet_view − decide − guards:\n"
        "the per-change Python loop that builds TargetChange objects."
    )
    print_table(
        "Parts of the tick, CPU median / p99 ms",
        ["guests", "fleet_view", "policy.decide", "apply_guards"],
        [rows[n]["parts"] for n in sizes],
    )
    print_table(
        "Ingest in-process, CPU µs per message (decode_guest_stats, Fleet.ingest)",
        ["guests", "1st parse", "1st store", "2nd parse", "2nd store", "2nd total"],
        [rows[n]["ingest"] for n in sizes],
    )
    print("1st = a guest's first sample (slot allocated); 2nd = with a previous one (rates).")

    per_turn = [1, 8, 64, 512]
    n_path = min(10_000, sizes[-1])
    path = controller_path_us(n_path, per_turn, args.seed)
    print_table(
        f"Controller.handle_message, {n_path:,} guests, CPU µs per message (no MQTT)",
        ["messages per loop turn", *(str(k) for k in per_turn)],
        [["µs/message", *(f"{path[k]:.1f}" for k in per_turn)]],
    )
    print("Over MQTT a loop turn carries one message (paho reads one QoS 0 packet per event).")

    n_mem = sizes[-1]
    memory = dict(
        zip(("arrays", "walked", "rss", "rss_peak"), map(float, rows[n_mem]["memory"]), strict=True)
    )
    measures = [
        ("numpy columns (nbytes)", "arrays"),
        ("everything the Fleet holds (walked)", "walked"),
        ("RSS growth while building", "rss"),
        ("RSS high-water growth", "rss_peak"),
    ]
    if args.tracemalloc:
        memory.update(traced_build(n_mem, now_s, args.seed))
        measures += [("tracemalloc, held", "traced"), ("tracemalloc, peak", "peak")]
    mib = 2**20
    print_table(
        f"Fleet memory at {n_mem:,} guests (two samples each)",
        ["measure", "MiB", "bytes/guest"],
        [[name, f"{memory[k] / mib:.1f}", f"{memory[k] / n_mem:,.0f}"] for name, k in measures],
    )
    print(f"\nDuring this run: {Load.between(cpu_start, CpuSample.now()).describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
