"""What machine a benchmark ran on, and what else kept it busy meanwhile.

The numbers of a benchmark on a shared 2-core machine mean little without the second part:
another process's test run takes a core away from the publisher, broker and subscriber.
``/proc/stat`` counts busy time machine-wide, including processes this one cannot see (other
containers); subtracting this process tree's own CPU time leaves what others used.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def describe_machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}"


@dataclass(frozen=True)
class CpuSample:
    """Machine-wide busy and stolen CPU time (/proc/stat) and this process tree's own."""

    wall: float
    busy_s: float
    steal_s: float
    ours_s: float

    @classmethod
    def now(cls) -> CpuSample:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
        hz = os.sysconf("SC_CLK_TCK")
        own = resource.getrusage(resource.RUSAGE_SELF)
        # Children count once reaped: the phase's workers and mosquitto are, before the end.
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            wall=time.monotonic(),
            busy_s=(user + nice + system + irq + softirq) / hz,
            steal_s=steal / hz,
            ours_s=own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
        )


@dataclass(frozen=True)
class Load:
    """What else ran during a phase, in cores: a benchmark on a shared machine must say so."""

    busy_cores: float
    others_cores: float
    steal_cores: float

    @classmethod
    def between(cls, start: CpuSample, end: CpuSample) -> Load:
        wall = max(end.wall - start.wall, 1e-9)
        busy = (end.busy_s - start.busy_s) / wall
        ours = (end.ours_s - start.ours_s) / wall
        return cls(busy, max(0.0, busy - ours), (end.steal_s - start.steal_s) / wall)

    def describe(self) -> str:
        text = (
            f"machine busy {self.busy_cores:.2f} of {os.cpu_count()} cores, other processes "
            f"{self.others_cores:.2f}, stolen by the hypervisor {self.steal_cores:.2f}"
        )
        if self.others_cores > 0.1 or self.steal_cores > 0.1:
            text += "  <- disturbed: rerun on a quiet machine"
        return text


def wait_for_quiet(max_wait_s: float, *, below_cores: float = 0.15, settle_s: float = 2.0) -> bool:
    """Wait until others keep the machine busy less than ``below_cores`` for ``settle_s``.

    Returns whether it got quiet within ``max_wait_s``. Meant to be called while this process
    tree is idle, between phases.
    """
    deadline = time.monotonic() + max_wait_s
    quiet_since: float | None = None
    previous = CpuSample.now()
    while True:
        time.sleep(0.5)
        current = CpuSample.now()
        load = Load.between(previous, current)
        previous = current
        if load.others_cores < below_cores:
            quiet_since = quiet_since or current.wall
            if current.wall - quiet_since >= settle_s:
                return True
        else:
            quiet_since = None
        if current.wall > deadline:
            return False


def print_table(headers: list[str], rows: list[list[str]], left: int = 1) -> None:
    """Print ``rows`` under ``headers`` in aligned columns: the first ``left`` columns
    left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
