"""Policy benchmark: what one control tick costs with each built-in policy, and the controller's
memory at 100,000 guests.

For fleets of 1,000 / 10,000 / 100,000 guests built by ``bench/tick.py`` (the same realistic
samples: all 16 stats, 2–32 GiB guests, balloons of 0–30 % of RAM, a few guests under swap,
fault or reclaim pressure; two samples each) plus host stats for every host (``Fleet.ingest_host``:
100 guests a host, RAM overcommitted 1–1.5×, 2–50 % of the host available, so that the
host-aware policies, ``mom`` and ``proxmox``, find hosts under pressure and hosts with room),
it runs every policy of ``autoscaler.plugins.available_policies()`` through ``TickDriver.tick``:

1. the **first tick**, with a fresh policy object (a stateful policy such as ``vpa`` builds its
   state for every guest here);
2. ``--warmup`` rounds (32: a full history window) in which every guest sends one more sample,
   the policy deciding on the last four (``regressor``: samples at its model's interval, 300 s,
   so that its windows look as it expects; every other policy: at the agent's 5 s);
3. up to ``--repeats`` **steady ticks** (fewer, but at least five, once ``--budget`` seconds are
   spent), each after one more sample per guest, as in the daemon. Per tick: ``policy.decide``
   alone (timed inside the tick), ``apply_guards`` on the tick's own view and decision, the
   decision as the tick reports it (fleet view + policy + guards, ``TickResult.duration_s``), and
   the whole tick (wall and CPU).

Policies named by ``--one-thread`` (``regressor``) are measured a second time with OpenMP
limited to one thread: scikit-learn's ``predict`` runs one parallel region per tree, and on a
machine whose other core is busy each region waits for a descheduled thread.

Nothing is committed, so every tick proposes about as many changes as the first one. New samples
are stored with ``Fleet.ingest_batch`` from the arrays that ``tick.py``'s JSON payloads are built
from (``Population.next_values``), since parsing 100,000 JSON payloads per round would make the
run take an hour. A policy that cannot be constructed (or fails to decide) is skipped with a note.

The reference, in the same run: ``threshold`` ticked repeatedly on the same samples, the method
of ``bench/tick.py``.

Controller memory (``--memory-guests``, 100,000 by default), in a fresh process: RSS growth of a
whole ``Controller`` (dry-run adapter) after 100,000 guests × 2 samples through
``Controller.handle_message`` (no broker) and after one ``tick_once`` (decide and apply).

Run: ``.venv/bin/python -m bench.policy_ticks [--sizes 1000,10000,100000] [--repeats 20]
[--budget 15] [--policies threshold,mom] [--memory-guests 100000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Final

import numpy as np

from autoscaler.config import GuardSettings, load_settings
from autoscaler.fleet import Fleet
from autoscaler.guards import apply_guards
from autoscaler.plugins import available_policies, create_policy
from autoscaler.policy import Decision, FleetView, Policy
from autoscaler.service.controller import Controller
from autoscaler.tick import TickDriver, TickResult, fleet_view
from bench.sysload import CpuSample, Load, describe_machine
from bench.tick import (
    GUESTS_PER_HOST,
    INTERVAL_S,
    STALE_AFTER_S,
    Population,
    build_fleet,
    deep_size,
    p99,
    print_table,
    rss_bytes,
    sample_times,
)

TARGET_POLICY: Final = "threshold"
TARGET_GUESTS: Final = 100_000
TARGET_MS: Final = 50.0
"""The issue's bar: deciding (view + policy + guards) for 100,000 guests in under 50 ms."""
MEMORY_TARGET_MIB: Final = 300.0
MIN_TICKS: Final = 5
"""Steady ticks measured even past ``--budget``."""
WARMUP_DECIDES: Final = 4
"""Warm-up rounds (the last ones) on which the policy decides."""
MIB: Final = 2**20


# -- fleet -----------------------------------------------------------------------------------------


def ingest_hosts(fleet: Fleet, pop: Population, now_s: float, seed: int) -> dict[str, float]:
    """Host stats for every host of ``pop``; returns the share of hosts in each pressure band.

    A host's RAM is its guests' RAM over an overcommit ratio of 1–1.5, and 2–50 % of it is
    available: MOM shrinks guests on hosts under 20 % free (critically under 5 %), Proxmox aims
    at 80 % used, so both see hosts on either side of their thresholds.
    """
    rng = np.random.default_rng(seed + 1)
    n = len(pop)
    host_of = np.arange(n) // GUESTS_PER_HOST
    n_hosts = int(host_of[-1]) + 1
    ram = np.bincount(host_of, weights=pop.ram, minlength=n_hosts)
    total = np.floor(ram / rng.uniform(1.0, 1.5, n_hosts))
    share = rng.uniform(0.02, 0.50, n_hosts)
    available = np.floor(total * share)
    for k in range(n_hosts):
        fleet.ingest_host(
            pop.hosts[k * GUESTS_PER_HOST],
            ts_s=now_s,
            total_bytes=float(total[k]),
            available_bytes=float(available[k]),
        )
    return {
        "hosts": n_hosts,
        "critical": float(np.mean(share <= 0.05)),
        "pressure": float(np.mean(share < 0.20)),
    }


class Feeder:
    """Stores one more sample for every guest of a fleet, as a round of agent reports would."""

    def __init__(self, fleet: Fleet, pop: Population, now_s: float, seed: int) -> None:
        self.fleet = fleet
        self.pop = pop
        self.rng = np.random.default_rng(seed + 3)
        slots = [fleet.slot_of(h, g) for h, g in zip(pop.hosts, pop.guests, strict=True)]
        if any(s is None for s in slots):
            raise RuntimeError("a guest of the population is missing from the fleet")
        self.slots = np.array(slots, dtype=np.int64)
        self.ts_s = fleet.ts_s[self.slots].copy()
        self.now_s = now_s

    def advance(self, interval_s: float) -> None:
        """Every guest reports ``interval_s`` after its last sample; ``now_s`` moves as much."""
        values = self.pop.next_values(self.rng, interval_s)
        self.ts_s = self.ts_s + interval_s
        self.now_s += interval_s
        pages = self.pop.balloon_pages
        result = self.fleet.ingest_batch(
            self.slots,
            ts_s=self.ts_s,
            ram_bytes=self.pop.ram,
            num_pages=pages,
            actual_pages=pages,
            values=values,
            recv_s=self.now_s,
        )
        if result.stored != len(self.slots):
            raise RuntimeError(f"stored {result.stored} of {len(self.slots)} samples")


# -- timing ----------------------------------------------------------------------------------------


class TimedPolicy(Policy):
    """Runs another policy and keeps the wall and CPU time of its last ``decide``."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def decide(self, view: FleetView) -> Decision:
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return self.inner.decide(view)
        finally:
            self.wall_s = time.perf_counter() - wall
            self.cpu_s = time.process_time() - cpu


@dataclass
class Samples:
    """Seconds per steady tick, for each measure."""

    decide: list[float] = field(default_factory=list)
    decide_cpu: list[float] = field(default_factory=list)
    guards: list[float] = field(default_factory=list)
    decision: list[float] = field(default_factory=list)
    tick: list[float] = field(default_factory=list)
    tick_cpu: list[float] = field(default_factory=list)
    changes: list[int] = field(default_factory=list)


@dataclass
class PolicyResult:
    label: str
    first_tick_s: float
    first_decide_s: float
    first_changes: int
    steady: Samples
    interval_s: float


def sample_interval_s(policy: Policy) -> float:
    """The sample interval a policy expects: a trained model's step, else the agent's 5 s."""
    card = getattr(policy, "card_", None)
    step = getattr(card, "step_s", None)
    return float(step) if isinstance(step, int | float) and step > 0 else INTERVAL_S


def run_tick(driver: TickDriver, timed: TimedPolicy, now_s: float, samples: Samples) -> None:
    """One tick, timed with the collector off; appends its measures to ``samples``."""
    gc.collect()
    gc.disable()
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        result = driver.tick(now_s)
        tick_s, tick_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        if result.error is not None:
            raise RuntimeError(f"decide failed: {result.error}")
        assert result.view is not None and result.decision is not None
        guards = driver.guards
        wall = time.perf_counter()
        apply_guards(result.view, result.decision.target_bytes, guards, stale_after_s=STALE_AFTER_S)
        guards_s = time.perf_counter() - wall
    finally:
        gc.enable()
    samples.decide.append(timed.wall_s)
    samples.decide_cpu.append(timed.cpu_s)
    samples.guards.append(guards_s)
    samples.decision.append(result.duration_s)
    samples.tick.append(tick_s)
    samples.tick_cpu.append(tick_cpu_s)
    samples.changes.append(len(result.changes))


def one_thread() -> contextlib.AbstractContextManager[object]:
    """OpenMP (and BLAS) limited to one thread, through threadpoolctl (scikit-learn's)."""
    threadpoolctl = importlib.import_module("threadpoolctl")  # untyped: no stubs
    limits: contextlib.AbstractContextManager[object] = threadpoolctl.threadpool_limits(limits=1)
    return limits


def measure_policy(
    name: str, fleet: Fleet, feeder: Feeder, args: argparse.Namespace, *, single: bool = False
) -> PolicyResult | str:
    """Time one policy on ``fleet``; a string says why it was skipped.

    ``single``: with OpenMP and BLAS limited to one thread (a learned policy's ``predict``).
    """
    label = f"{name}, 1 OpenMP thread" if single else name
    try:
        policy = create_policy(name)
        limits = one_thread() if single else contextlib.nullcontext()
    except Exception as exc:
        return f"{label}: skipped, cannot be constructed: {exc}"
    timed = TimedPolicy(policy)
    driver = TickDriver(fleet, timed, GuardSettings(), stale_after_s=STALE_AFTER_S)
    driver.policy_name = policy.name or name
    interval_s = sample_interval_s(policy)
    first = Samples()
    steady = Samples()
    try:
        with limits:
            run_tick(driver, timed, feeder.now_s, first)
            # Warm-up: fill the history windows at the policy's interval; a stateful policy
            # decides on the last rounds (its state then holds them, as in the daemon).
            for round_ in range(args.warmup):
                feeder.advance(interval_s)
                if round_ >= args.warmup - WARMUP_DECIDES:
                    policy.decide(fleet_view(fleet, feeder.now_s))
            deadline = time.monotonic() + args.budget
            for tick in range(args.repeats):
                if tick >= MIN_TICKS and time.monotonic() > deadline:
                    break
                feeder.advance(interval_s)
                run_tick(driver, timed, feeder.now_s, steady)
    except Exception as exc:
        return f"{label}: skipped, failed: {exc!r}"
    return PolicyResult(label, first.tick[0], first.decide[0], first.changes[0], steady, interval_s)


def measure_reference(fleet: Fleet, now_s: float, repeats: int) -> PolicyResult:
    """``threshold`` ticked ``repeats`` times on the same samples (``bench/tick.py``'s method)."""
    policy = create_policy(TARGET_POLICY)
    timed = TimedPolicy(policy)
    driver = TickDriver(fleet, timed, GuardSettings(), stale_after_s=STALE_AFTER_S)
    driver.policy_name = policy.name
    first = Samples()
    run_tick(driver, timed, now_s, first)  # warm-up, as tick.py's timed() does
    samples = Samples()
    for _ in range(repeats):
        run_tick(driver, timed, now_s, samples)
    label = f"{TARGET_POLICY}, same samples (tick.py's method)"
    return PolicyResult(label, first.tick[0], first.decide[0], first.changes[0], samples, 0.0)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def result_row(r: PolicyResult) -> list[str]:
    s = r.steady
    return [
        r.label,
        str(len(s.tick)),
        f"{round(med(s.changes)):,}",
        f"{ms(r.first_tick_s)} ({r.first_changes:,})",
        f"{ms(med(s.decide))} / {ms(p99(s.decide))}",
        ms(med(s.decide_cpu)),
        ms(med(s.guards)),
        f"{ms(med(s.decision))} / {ms(p99(s.decision))}",
        f"{ms(med(s.tick))} / {ms(p99(s.tick))}",
        ms(med(s.tick_cpu)),
    ]


def time_size(
    n: int, names: list[str], args: argparse.Namespace
) -> tuple[list[PolicyResult], list[str], dict[str, float]]:
    now_s = time.time()
    started = time.perf_counter()
    fleet, _costs, _rss = build_fleet(n, now_s, args.seed)
    # build_fleet's population, recreated (same seed, same draws) to continue its samples.
    rng = np.random.default_rng(args.seed)
    pop = Population.random(n, rng)
    last = np.empty(0)
    for _round in range(2):
        last = pop.next_values(rng, INTERVAL_S)
    hosts = ingest_hosts(fleet, pop, now_s, args.seed)
    feeder = Feeder(fleet, pop, now_s, args.seed)
    if not np.array_equal(fleet.stats[feeder.slots], last):
        raise RuntimeError("the recreated population does not match the fleet's last samples")
    hosts["build_s"] = time.perf_counter() - started
    results: list[PolicyResult] = []
    notes: list[str] = []
    reference = None
    single = {p for p in args.one_thread.split(",") if p}
    runs = [(name, False) for name in names] + [(name, True) for name in names if name in single]
    for name, one in runs:
        if name == TARGET_POLICY and not one:
            reference = measure_reference(fleet, feeder.now_s, args.repeats)
        outcome = measure_policy(name, fleet, feeder, args, single=one)
        if isinstance(outcome, str):
            notes.append(outcome)
            print(f"  {n:,} guests: {outcome}", flush=True)
        else:
            results.append(outcome)
            print(
                f"  {n:,} guests: {outcome.label}: tick {ms(med(outcome.steady.tick))} ms",
                flush=True,
            )
    if reference is not None:
        results.append(reference)
    return results, notes, hosts


# -- controller memory -----------------------------------------------------------------------------


def controller_memory(n: int, seed: int) -> dict[str, float]:
    """RSS growth of a whole Controller fed ``n`` guests × 2 samples, then one tick.

    Runs in a fresh process (see :func:`main`), so that the baseline holds nothing but the
    interpreter, the libraries and the sample generator.
    """
    chunk = 1000
    rng = np.random.default_rng(seed)
    pop = Population.random(n, rng)
    now_s = time.time()
    times = [sample_times(n, now_s, r, 2) for r in range(2)]

    def part(first: int) -> Population:
        end = min(first + chunk, n)
        return Population(
            hosts=pop.hosts[first:end],
            guests=pop.guests[first:end],
            ram=pop.ram[first:end],
            balloon_pages=pop.balloon_pages[first:end],
            available_share=pop.available_share[first:end],
            free_share=pop.free_share[first:end],
            counters=pop.counters[first:end],  # a view: the population's counters advance
            rates=pop.rates[first:end],
        )

    settings = load_settings(
        None,
        controller={"max_guests": max(n, 100_000), "interval_s": 3600.0},
        adapter={"kind": "dry-run"},
    )
    out: dict[str, float] = {}

    async def run() -> None:
        # Warm the allocator with one chunk of payloads, as the measured rounds will make.
        part(0).payloads(times[0][:chunk], np.random.default_rng(seed + 9))
        gc.collect()
        rss0, _ = rss_bytes()
        controller = Controller(settings)
        handle = controller.handle_message
        cpu, wall = time.process_time(), time.perf_counter()
        for round_ in range(2):
            for first in range(0, n, chunk):
                piece = part(first)
                payloads = piece.payloads(times[round_][first : first + chunk], rng)
                for j, payload in enumerate(payloads):
                    handle(piece.topic(j), payload)
                await asyncio.sleep(0)
        controller.flush()
        out["ingest_cpu_us"] = (time.process_time() - cpu) / (2 * n) * 1e6
        out["ingest_s"] = time.perf_counter() - wall
        if controller.counters["ingested"] != 2 * n or controller.rejected:
            raise RuntimeError(
                f"ingested {controller.counters['ingested']}, rejected {dict(controller.rejected)}"
            )
        gc.collect()
        out["rss_ingested"] = rss_bytes()[0] - rss0
        wall = time.perf_counter()
        result = await controller.tick_once()
        out["tick_s"] = time.perf_counter() - wall
        out["decide_s"] = result.duration_s
        out["build_s"] = result.build_s
        out["changes"] = len(result.changes)
        out["applied"] = controller.counters["targets_applied"]
        assert controller.last_tick is not None
        out["last_tick"] = tick_result_bytes(controller.last_tick)
        del result
        gc.collect()
        rss, peak = rss_bytes()
        out["rss_ticked"] = rss - rss0
        out["rss_peak"] = peak - rss0
        out["fleet_walked"] = deep_size(vars(controller.fleet))

    asyncio.run(run())
    return out


def tick_result_bytes(result: TickResult) -> float:
    """What a kept TickResult holds: its view's and decision's arrays, and its changes."""
    arrays: list[object] = []
    if result.view is not None:
        arrays += [getattr(result.view, f.name) for f in dataclasses.fields(FleetView)]
    if result.decision is not None:
        d = result.decision
        arrays += [d.target_bytes, d.pressure, d.reason, *d.detail.values()]
    held = sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))
    seen: set[int] = set()
    held += sys.getsizeof(result.changes)
    for change in result.changes:
        held += sys.getsizeof(change)
        for name in change.__slots__:
            value = getattr(change, name)
            if id(value) not in seen:
                seen.add(id(value))
                held += sys.getsizeof(value)
    return float(held)


def report_memory(n: int, memory: dict[str, float]) -> None:
    rows: list[tuple[str, float]] = [
        ("RSS growth after ingest (2 samples a guest)", memory["rss_ingested"]),
        ("RSS growth after one tick_once (decide + apply)", memory["rss_ticked"]),
        ("RSS high-water above the baseline", memory["rss_peak"]),
        ("the Fleet alone (walked)", memory["fleet_walked"]),
        ("Controller.last_tick: view, decision, changes", memory["last_tick"]),
    ]
    print_table(
        f"Controller memory, {n:,} guests via Controller.handle_message (no broker), dry-run "
        "adapter",
        ["measure", "MiB", "bytes/guest"],
        [[name, f"{v / MIB:.1f}", f"{v / n:,.0f}"] for name, v in rows],
    )
    worst = max(memory["rss_ticked"], memory["rss_peak"]) / MIB
    verdict = "met" if worst < MEMORY_TARGET_MIB else "MISSED"
    print(
        f"ingest {memory['ingest_cpu_us']:.1f} CPU µs/message ({memory['ingest_s']:.1f} s for "
        f"{2 * n:,}); tick_once {memory['tick_s'] * 1e3:,.0f} ms: decide "
        f"{memory['decide_s'] * 1e3:.1f} ms, build {memory['build_s'] * 1e3:.0f} ms, "
        f"{memory['changes']:,.0f} changes, {memory['applied']:,.0f} applied by the dry-run "
        "adapter (the rest of tick_once is Controller.apply)"
    )
    print(f"target: under {MEMORY_TARGET_MIB:.0f} MiB at {n:,} guests: {verdict} ({worst:.0f} MiB)")


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="fleet sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=20, help="steady ticks per policy and size")
    parser.add_argument(
        "--warmup", type=int, default=32, help="sample rounds a policy decides on before timing"
    )
    parser.add_argument("--policies", default="", help="comma-separated (default: all built-in)")
    parser.add_argument(
        "--budget",
        type=float,
        default=15.0,
        metavar="S",
        help=f"seconds of steady ticks per policy and size (at least {MIN_TICKS} ticks)",
    )
    parser.add_argument(
        "--one-thread",
        default="regressor",
        metavar="LIST",
        help="policies to measure again with OpenMP limited to one thread (threadpoolctl)",
    )
    parser.add_argument(
        "--memory-guests",
        type=int,
        default=TARGET_GUESTS,
        help="controller memory measurement size (0: skip)",
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s})
    if not sizes or sizes[0] < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--sizes and --repeats must be positive, --warmup not negative")
    names = [p for p in args.policies.split(",") if p] or list(available_policies())

    print(f"Policy benchmark on {describe_machine()}, numpy {np.__version__}")
    print(f"policies: {', '.join(names)}")
    cpu_start = CpuSample.now()

    memory: dict[str, float] | None = None
    if args.memory_guests > 0:
        # A fresh process: its RSS baseline is not inflated by the fleets measured below.
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            memory = pool.submit(controller_memory, args.memory_guests, args.seed).result()

    by_size: dict[int, tuple[list[PolicyResult], list[str], dict[str, float]]] = {}
    for n in sizes:
        by_size[n] = time_size(n, names, args)

    headers = [
        "policy", "ticks", "changes", "first tick (changes)", "decide med / p99", "decide CPU",
        "guards", "decision med / p99", "tick med / p99", "tick CPU",
    ]  # fmt: skip
    for n in sizes:
        results, notes, hosts = by_size[n]
        print_table(
            f"{n:,} guests, {hosts['hosts']:,.0f} hosts: ms per tick (up to {args.repeats} steady "
            f"ticks after {args.warmup} warm-up rounds)",
            headers,
            [result_row(r) for r in results],
        )
        for note in notes:
            print(f"  {note}")
        print(
            f"  hosts under 20 % available (MOM shrinks; Proxmox above its 80 % target): "
            f"{hosts['pressure']:.0%}, at most 5 % (MOM critical): {hosts['critical']:.0%}; "
            f"fleet built in {hosts['build_s']:.1f} s"
        )
        slow = [r for r in results if r.interval_s not in (0.0, INTERVAL_S)]
        for r in slow:
            print(f"  {r.label}: samples {r.interval_s:g} s apart (its model's sample interval)")
    print(
        "\ndecide = policy.decide alone, inside the tick; guards = apply_guards on the tick's\n"
        "view and decision; decision = fleet view + decide + guards (TickResult.duration_s);\n"
        "tick = the whole TickDriver.tick, which also builds one TargetChange per change. Wall\n"
        "times (ms) unless marked CPU (this process's CPU time). first tick = a fresh policy\n"
        "object's first tick (stateful policies build their state there), and its changes;\n"
        "changes = median per steady tick."
    )

    if TARGET_GUESTS in by_size:
        found = [r for r in by_size[TARGET_GUESTS][0] if r.label == TARGET_POLICY]
        if found:
            decision = found[0].steady.decision
            worst = p99(decision) * 1e3
            verdict = "met" if worst < TARGET_MS else "MISSED"
            print(
                f"target: {TARGET_POLICY} decides (view + policy + guards) for "
                f"{TARGET_GUESTS:,} guests in under {TARGET_MS:.0f} ms: {verdict} (median "
                f"{med(decision) * 1e3:.1f} ms, p99 {worst:.1f} ms)"
            )
    if memory is not None:
        report_memory(args.memory_guests, memory)
    print(f"\nDuring this run: {Load.between(cpu_start, CpuSample.now()).describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
