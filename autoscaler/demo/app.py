"""``balloon-autoscaler demo``: broker, simulated fleet, controller and a live view, in one process.

Nothing to install or configure: an MQTT broker (amqtt) runs in this process on a free loopback
port; a simulated fleet (:class:`~autoscaler.sim.fleetsim.FleetSim`: the simulator's own guest
model) publishes stats per the wire contract and applies the target commands it receives; the real
:class:`~autoscaler.service.controller.Controller` with the ``mqtt`` adapter sits between them.
Demand comes from the Bitbrains trace in ``$BALLOON_TRACES_DIR`` when it is there (imported to a
temporary recording, ``--guests`` of its VMs picked with ``--seed``), else from the built-in
generator (:func:`~autoscaler.sim.fleetsim.synthetic_replay`). Time is compressed: ``--speed``
simulated seconds pass per second of wall time, so one 300 s trace step takes one second by
default.

On a terminal a table shows the busiest guests and fleet totals, refreshed four times a second;
elsewhere (CI, pipes) a plain status line is printed every two seconds. ``--duration`` or
Ctrl-C (or SIGTERM) ends the demo: the fleet, the controller and the broker shut down, the
terminal is restored and a summary is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, NoReturn, Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from autoscaler.extras import importing

with importing("amqtt", "demo", "the demo"):
    from amqtt.adapters import (  # type: ignore[import-untyped]  # amqtt ships no type information
        StreamReaderAdapter,
        StreamWriterAdapter,
    )
    from amqtt.broker import Broker  # type: ignore[import-untyped]
with importing("rich", "demo", "the demo"):
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.live import Live
    from rich.logging import RichHandler
    from rich.table import Table
    from rich.text import Text

from autoscaler.config import MqttSettings, Settings, load_settings
from autoscaler.policy import Policy
from autoscaler.recordings.recording import read_recording
from autoscaler.recordings.traces import import_bitbrains
from autoscaler.service.controller import Controller
from autoscaler.service.lifecycle import install_signal_handlers
from autoscaler.service.logs import setup_logging
from autoscaler.sim.fleetsim import FleetSim, synthetic_replay
from autoscaler.sim.simulate import Replay, replay_from_recording

log = logging.getLogger(__name__)

GIB: Final = 2**30
LISTEN_HOST: Final = "127.0.0.1"
TOPIC_PREFIX: Final = "balloon/v1"
LIVE_REFRESH_S: Final = 0.25
STATUS_EVERY_S: Final = 2.0
SHUTDOWN_TIMEOUT_S: Final = 5.0

# Only what the demo needs: anonymous clients. amqtt's default plugins add a $SYS publisher and
# packet loggers, which cost time on every packet and show nothing the demo uses.
BROKER_CONFIG: Final = {
    "listeners": {"default": {"type": "external"}},
    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
}


# -- options and data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    guests: int = 50
    speed: float = 300.0
    """Simulated seconds per second of wall time."""
    duration_s: float | None = None
    """Stop after this much wall time (data loading not counted); None: until a signal."""
    trace: Path | None = None
    """A Bitbrains CSV to replay; None: the built-in generator."""
    seed: int = 0


def load_replay(options: DemoOptions) -> tuple[Replay, str]:
    """The demand to replay and a short description of where it comes from."""
    if options.trace is None:
        replay = synthetic_replay(options.guests, seed=options.seed)
        return replay, f"built-in generator (idle, diurnal, bursty, growing; seed {options.seed})"
    with tempfile.TemporaryDirectory(prefix="balloon-demo-") as tmp:
        recording = Path(tmp) / "trace.parquet"
        import_bitbrains(options.trace, recording, progress=False)
        table = read_recording(recording)  # read into memory: the directory goes away next
    names = sorted(str(name) for name in pc.unique(table.column("guest")).to_pylist())
    rng = np.random.default_rng(options.seed)
    picked = sorted(rng.choice(len(names), size=min(options.guests, len(names)), replace=False))
    chosen = pa.array([names[i] for i in picked], pa.string())
    # Filtering before the replay is built keeps start-up short: most of the month is not needed.
    replay = replay_from_recording(table.filter(pc.is_in(table.column("guest"), chosen)))
    described = (
        f"Bitbrains trace {options.trace.name} ({len(replay.guests)} of {len(names)} VMs, "
        f"seed {options.seed})"
    )
    return replay, described


# -- the broker ------------------------------------------------------------------------------------


class EmbeddedBroker:
    """An amqtt broker in this process, listening on a free loopback port (``port``).

    The broker's listener is "external": this class binds the socket itself, to port 0, and
    hands each connection to the broker. The port is the one the kernel picked when binding,
    so there is no window in which another program could take a port chosen in advance.
    """

    def __init__(self, host: str = LISTEN_HOST) -> None:
        self.host = host
        self.port = 0
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._broker is not None
        await self._broker.external_connected(
            StreamReaderAdapter(reader), StreamWriterAdapter(writer), "default"
        )

    async def __aenter__(self) -> Self:
        self._broker = Broker(BROKER_CONFIG)
        await self._broker.start()
        self._server = await asyncio.start_server(self._connected, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                await self._broker.shutdown()
        if self._server is not None:
            await self._server.wait_closed()


# -- what the view shows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestRow:
    guest: str
    ram_bytes: float
    demand_bytes: float
    alloc_bytes: float
    reason: str

    @property
    def under(self) -> bool:
        return self.demand_bytes > self.alloc_bytes


@dataclass(frozen=True)
class DemoStatus:
    """One snapshot of the demo: fleet totals, controller counters and the busiest guests."""

    policy: str
    source: str
    guests: int
    wall_s: float
    duration_s: float | None
    sim_elapsed_s: float
    steps: int
    step_s: float
    period_s: float
    ram_bytes: float
    alloc_bytes: float
    """Totals over the guests that have a demand now."""
    under_now: int
    targets_acknowledged: int
    targets_applied: int
    ingested: int
    rejected: int
    emergency_deflates: int
    samples: int
    mean_reclaimed_bytes: float
    mean_reclaimed_pct: float
    under_pct: float
    deficit_gib_h: float
    rows: tuple[GuestRow, ...]

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second achieved (below --speed when the fleet lags)."""
        return self.sim_elapsed_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def reclaimed_bytes(self) -> float:
        return self.ram_bytes - self.alloc_bytes

    @property
    def reclaimed_pct(self) -> float:
        return 100.0 * self.reclaimed_bytes / self.ram_bytes if self.ram_bytes else 0.0


def snapshot(
    fleet: FleetSim,
    controller: Controller,
    *,
    policy: str,
    source: str,
    started_s: float,
    duration_s: float | None,
    rows: int,
) -> DemoStatus:
    demand = fleet.demand_bytes
    alloc = fleet.alloc_bytes
    ram = fleet.ram_bytes
    present = ~np.isnan(demand)
    under = present & (demand > alloc)
    # Under-provisioned guests first, then the ones whose demand or allocation moved most.
    order = np.lexsort((-fleet.activity, ~under))
    order = order[present[order]][:rows]
    totals = fleet.totals
    counters = controller.counters
    return DemoStatus(
        policy=policy,
        source=source,
        guests=len(fleet.replay.guests),
        wall_s=time.monotonic() - started_s,
        duration_s=duration_s,
        sim_elapsed_s=fleet.sim_elapsed_s,
        steps=fleet.step,
        step_s=fleet.step_s,
        period_s=fleet.period_s,
        ram_bytes=float(ram[present].sum()),
        alloc_bytes=float(alloc[present].sum()),
        under_now=int(under.sum()),
        targets_acknowledged=counters["targets_applied"],
        targets_applied=fleet.targets_applied,
        ingested=counters["ingested"],
        rejected=sum(controller.rejected.values()),
        emergency_deflates=counters["emergency_deflates"],
        samples=totals.samples,
        mean_reclaimed_bytes=totals.reclaimed_bytes / totals.samples if totals.samples else 0.0,
        mean_reclaimed_pct=(
            100.0 * totals.reclaimed_bytes / totals.ram_bytes if totals.ram_bytes else 0.0
        ),
        under_pct=100.0 * totals.under_samples / totals.samples if totals.samples else 0.0,
        deficit_gib_h=totals.deficit_byte_steps * fleet.step_s / 3600.0 / GIB,
        rows=tuple(
            GuestRow(
                fleet.replay.guests[g],
                float(ram[g]),
                float(demand[g]),
                float(alloc[g]),
                fleet.last_reason[g],
            )
            for g in order.tolist()
        ),
    )


def guests(n: int) -> str:
    return f"{n} guest" if n == 1 else f"{n} guests"


def sim_clock(seconds: float) -> str:
    """Simulated time elapsed as ``+Dd HH:MM``."""
    minutes = int(seconds // 60)
    return f"+{minutes // 1440}d {minutes // 60 % 24:02d}:{minutes % 60:02d}"


def status_line(status: DemoStatus) -> str:
    """The plain one-line status for terminals that cannot show the live view."""
    return (
        f"[{status.wall_s:6.1f} s] sim {sim_clock(status.sim_elapsed_s)} (×{status.speed:.0f})"
        f" | reclaimed {status.reclaimed_bytes / GIB:.1f} GiB ({status.reclaimed_pct:.1f} %)"
        f" | under-provisioned {status.under_now}"
        f" | targets applied {status.targets_applied}"
        f" | ingested {status.ingested} rejected {status.rejected}"
        f" | emergency deflates {status.emergency_deflates}"
    )


def summary_text(status: DemoStatus) -> str:
    """The summary printed at exit."""
    return "\n".join(
        [
            f"demo summary: {status.policy} on {status.guests} guests, {status.source}",
            f"  ran for               {status.wall_s:.1f} s: {status.steps} steps of "
            f"{status.step_s:.0f} s, {sim_clock(status.sim_elapsed_s)} simulated",
            f"  stats ingested        {status.ingested} (rejected {status.rejected})",
            f"  targets applied       {status.targets_applied} by the guests (controller: "
            f"{status.targets_acknowledged} acknowledged by the broker; "
            f"emergency deflates {status.emergency_deflates})",
            f"  memory reclaimed      now {status.reclaimed_bytes / GIB:.2f} GiB of "
            f"{status.ram_bytes / GIB:.2f} GiB ({status.reclaimed_pct:.1f} %); "
            f"mean over the run {status.mean_reclaimed_bytes / GIB:.2f} GiB per guest "
            f"({status.mean_reclaimed_pct:.1f} %)",
            f"  under-provisioned     now {guests(status.under_now)}; "
            f"{status.under_pct:.2f} % of guest-steps, deficit {status.deficit_gib_h:.2f} GiB·h",
        ]
    )


BAR_WIDTH: Final = 20


def memory_bar(row: GuestRow) -> Text:
    """RAM as a bar: demand █, headroom ▒ (allocated, unused), reclaimed ·; a deficit in red."""

    def cells(nbytes: float) -> int:
        return round(BAR_WIDTH * min(max(nbytes / row.ram_bytes, 0.0), 1.0))

    used, alloc = cells(row.demand_bytes), cells(row.alloc_bytes)
    bar = Text()
    if row.under:
        bar.append("█" * alloc, style="red")
        bar.append("!" * max(used - alloc, 1), style="bold red")
        bar.append("·" * max(BAR_WIDTH - max(used, alloc + 1), 0), style="green")
    else:
        bar.append("█" * used, style="cyan")
        bar.append("▒" * (alloc - used), style="blue")
        bar.append("·" * (BAR_WIDTH - alloc), style="green")
    return bar


SEPARATOR: Final = " · "
REASON_MIN_WIDTH: Final = 12
"""Below this many columns the reason column is dropped rather than shown as a stub."""
TABLE_CHROME_LINES: Final = 4
"""Table lines around the rows: top border, header, header rule, bottom border."""


def packed(phrases: list[Text], width: int, separator: str = SEPARATOR) -> list[Text]:
    """``phrases`` joined by ``separator`` into lines of at most ``width`` cells, breaking only
    between phrases: a number never wraps away from its unit or its label. A phrase wider than
    ``width`` on its own is cut with an ellipsis."""
    lines: list[Text] = []
    line = Text()
    for phrase in phrases:
        if line.cell_len and line.cell_len + len(separator) + phrase.cell_len > width:
            lines.append(line)
            line = Text()
        if line.cell_len:
            line.append(separator)
        line.append_text(phrase)
    if line.cell_len:
        lines.append(line)
    for text in lines:
        text.no_wrap = True
        text.overflow = "ellipsis"
    return lines


@dataclass(frozen=True)
class GuestTable:
    """The guests' table laid out for ``width`` cells: ids and numbers are never cut or wrapped.
    The reason column takes what is left and goes first when there is too little; then the
    memory bar, then RAM."""

    header: tuple[str, ...]
    justify: tuple[bool, ...]
    """True for right-aligned (numeric) columns."""
    cells: tuple[tuple[Text, ...], ...]
    widths: tuple[int, ...]

    @classmethod
    def of(cls, rows: tuple[GuestRow, ...], width: int) -> GuestTable:
        columns: list[tuple[str, bool, list[Text]]] = [
            ("guest", False, [Text(r.guest) for r in rows]),
            ("pressure", True, [pressure_text(r) for r in rows]),
            ("demand", True, [Text(f"{r.demand_bytes / GIB:.2f}") for r in rows]),
            ("alloc", True, [Text(f"{r.alloc_bytes / GIB:.2f}") for r in rows]),
            ("RAM", True, [Text(f"{r.ram_bytes / GIB:.1f}") for r in rows]),
            ("memory", False, [memory_bar(r) for r in rows]),
        ]
        order = ["guest", "RAM", "demand", "alloc", "pressure", "memory"]

        def need(column: tuple[str, bool, list[Text]]) -> int:
            name, _, texts = column
            return max([len(name), *(t.cell_len for t in texts)]) + 2  # padding 1 + 1

        kept = list(columns)
        # borders: one more than the columns; the reason column adds a column and a border
        while len(kept) > 1 and sum(map(need, kept)) + len(kept) + 1 > width:
            kept.pop()  # memory, then RAM, then alloc ...
        used = sum(map(need, kept)) + len(kept) + 1
        reason_width = width - used - 1 - 2
        kept.sort(key=lambda c: order.index(c[0]))
        header = [c[0] for c in kept]
        justify = [c[1] for c in kept]
        widths = [need(c) - 2 for c in kept]
        cells = [c[2] for c in kept]
        if reason_width >= REASON_MIN_WIDTH:
            header.append("last target reason")
            justify.append(False)
            widths.append(min(reason_width, 60))
            cells.append([Text(r.reason) for r in rows])
        return cls(
            header=tuple(header),
            justify=tuple(justify),
            cells=tuple(zip(*cells, strict=True)) if rows else (),
            widths=tuple(widths),
        )

    def table(self, rows: int) -> Table:
        table = Table(expand=False, header_style="bold")
        for name, right, width in zip(self.header, self.justify, self.widths, strict=True):
            table.add_column(
                name,
                justify="right" if right else "left",
                no_wrap=True,
                overflow="ellipsis",
                min_width=width if name != "last target reason" else None,
                max_width=width,
            )
        for cells in self.cells[:rows]:
            table.add_row(*cells)
        return table


def pressure_text(row: GuestRow) -> Text:
    ratio = row.demand_bytes / row.alloc_bytes if row.alloc_bytes else float("inf")
    if row.under:
        return Text(f"UNDER {ratio:.0%}", style="bold red")
    pressure = Text(f"{ratio:.0%}")
    if ratio > 0.9:
        pressure.stylize("yellow")
    return pressure


@dataclass(frozen=True)
class LiveView:
    """The live view: a header of fleet totals over a table of the busiest guests, laid out for
    the width (and height, when known) it is rendered at."""

    status: DemoStatus

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        status = self.status
        left = (
            f"{status.duration_s - status.wall_s:.0f} s left"
            if status.duration_s is not None
            else "Ctrl-C to stop"
        )
        title = packed(
            [
                Text("balloon-autoscaler demo", style="bold"),
                Text(f"policy {status.policy}"),
                Text(f"{status.guests} guests, {status.source}"),
            ],
            width,
        )
        clock = packed(
            [
                Text(
                    f"simulated {sim_clock(status.sim_elapsed_s)} at ×{status.speed:.0f} real time"
                ),
                Text(f"(asked: one {status.step_s:.0f} s step every {status.period_s:.2f} s)"),
                Text(f"wall {status.wall_s:.0f} s, {left}"),
            ],
            width,
        )
        for line in clock:
            line.stylize("dim")
        memory = packed(
            [
                Text.assemble(
                    "reclaimed ",
                    (f"{status.reclaimed_bytes / GIB:.1f} GiB", "bold green"),
                    f" of {status.ram_bytes / GIB:.1f} GiB (",
                    (f"{status.reclaimed_pct:.1f} %", "bold green"),
                    ")",
                ),
                Text.assemble(
                    "under-provisioned ",
                    (guests(status.under_now), "bold red" if status.under_now else "bold"),
                    f" ({status.under_pct:.2f} % of guest-steps so far)",
                ),
            ],
            width,
            separator="   ",
        )
        counts = packed(
            [
                Text(f"targets applied {status.targets_applied}"),
                Text(f"emergency deflates {status.emergency_deflates}"),
                Text(f"messages ingested {status.ingested}"),
                Text(f"rejected {status.rejected}"),
            ],
            width,
        )
        layout = GuestTable.of(status.rows, width)
        legend = [
            Text(f"busiest {{shown}} of {status.guests} guests"),
            Text("sizes in GiB"),
            Text("pressure: demand ÷ allocation"),
        ]
        if "memory" in layout.header:
            legend.append(Text("memory: █ demand ▒ allocated, unused · reclaimed ! short"))
        header = [*title, *clock, *memory, *counts]
        caption_lines = len(packed(legend, width, separator="; "))
        room = options.max_height - len(header) - TABLE_CHROME_LINES - caption_lines
        rows = max(min(len(status.rows), room), 0)  # as many guests as fit under the header
        legend[0] = Text(f"busiest {rows} of {status.guests} guests")
        caption = packed(legend, width, separator="; ")
        for line in caption:
            line.stylize("dim")
        yield from header
        yield layout.table(rows)
        yield from caption


def render(status: DemoStatus) -> RenderableType:
    """The live view of ``status``, laid out when it is rendered."""
    return LiveView(status)


# -- running it ------------------------------------------------------------------------------------


def demo_settings(
    mqtt: MqttSettings, period_s: float, policy: Policy, *, time_scale: float = 1.0
) -> Settings:
    """Controller settings for the embedded broker, scaled to the demo's compressed time.

    The environment (``BALLOON_AUTOSCALER_*``) still sets guards and the like; the broker and
    the timing are the demo's own. The guards count in wall seconds, while the demo plays
    ``time_scale`` simulated seconds per wall second: their rates are scaled up and their
    durations down by it, so that guests are paced, held and given headroom in simulated time,
    as the simulator does.
    """
    settings = _demo_controller(mqtt, period_s, policy)
    guards = settings.guards
    rates = ("max_inflate_bps", "prior_growth_bps", "emergency_swap_in_bps")
    durations = (
        "device_latency_s",
        "emergency_min_interval_s",
        "growth_half_life_s",
        "trouble_hold_s",
        "trouble_half_life_s",
    )
    scaled = {name: getattr(guards, name) * time_scale for name in rates}
    scaled["max_inflate_share_per_s"] = min(guards.max_inflate_share_per_s * time_scale, 1.0)
    scaled["emergency_major_faults_ps"] = guards.emergency_major_faults_ps * time_scale
    scaled |= {name: getattr(guards, name) / time_scale for name in durations}
    return settings.model_copy(update={"guards": guards.model_copy(update=scaled)})


def _demo_controller(mqtt: MqttSettings, period_s: float, policy: Policy) -> Settings:
    return load_settings(
        None,
        mqtt=mqtt,
        controller={
            # Two ticks per replay step: whatever the phase between the fleet's publishing and
            # the controller's clock, each step's stats meet a tick soon after they arrive (the
            # second tick of a step sees the same stats and proposes the same target, which the
            # dead band drops). Bounded to what a person watching can follow.
            "interval_s": min(max(period_s / 2, 0.1), 5.0),
            # A guest that missed three steps is frozen; one silent for twenty is forgotten.
            "stale_after_s": max(3 * period_s, 3.0),
            "guest_ttl_s": max(20 * period_s, 60.0),
        },
        policy={"name": policy.name or type(policy).__name__},
        adapter={"kind": "mqtt"},
    )


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``stop``; whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def run_demo(
    options: DemoOptions,
    policy: Policy,
    replay: Replay,
    source: str,
    *,
    console: Console,
    live: bool,
    echo: Callable[[str], None],
) -> DemoStatus:
    """Run broker, fleet, controller and view until the duration is up or a signal arrives."""
    stop = asyncio.Event()
    # The live view hides the cursor: an exit on a second signal gives it back to the shell.
    install_signal_handlers(stop, on_exit=lambda: console.show_cursor(True))
    label = policy.name or type(policy).__name__
    async with EmbeddedBroker() as broker:
        mqtt = MqttSettings(host=LISTEN_HOST, port=broker.port, topic_prefix=TOPIC_PREFIX)
        fleet = FleetSim(replay, mqtt, speed=options.speed)
        settings = demo_settings(
            mqtt, fleet.period_s, policy, time_scale=fleet.step_s / fleet.period_s
        )
        controller = Controller(settings, policy=policy)
        capped = fleet.period_s > fleet.step_s / options.speed
        speed_note = f" (--speed {options.speed:g} is faster than the demo goes)" if capped else ""
        # Short lines: a terminal of 80 columns shows each whole, the command to copy included.
        ending = f"stops after {options.duration_s:g} s" if options.duration_s else "Ctrl-C to stop"
        echo(
            f"balloon-autoscaler demo: policy {label}, {len(replay.guests)} guests\n"
            f"  demand  {source}\n"
            f"  time    one {fleet.step_s:.0f} s step every {fleet.period_s:.2f} s{speed_note}; "
            f"{ending}\n"
            f"  embedded MQTT broker on {LISTEN_HOST}:{broker.port}, topic prefix {TOPIC_PREFIX}\n"
            f"  watch   mosquitto_sub -p {broker.port} -t '{TOPIC_PREFIX}/#' -v"
        )
        started_s = time.monotonic()

        def status(rows: int) -> DemoStatus:
            return snapshot(
                fleet,
                controller,
                policy=label,
                source=source,
                started_s=started_s,
                duration_s=options.duration_s,
                rows=rows,
            )

        async def view() -> None:
            if not live:
                while not await _stopped_within(stop, STATUS_EVERY_S):
                    echo(status_line(status(0)))
                return
            with Live(console=console, auto_refresh=False, transient=False) as display:
                while True:
                    # Enough guests to fill the terminal (re-read each time: the window may be
                    # resized); the view shows as many as fit under its header.
                    rows = max(console.height, 3)
                    display.update(render(status(rows)), refresh=True)
                    if await _stopped_within(stop, LIVE_REFRESH_S):
                        break

        async def components() -> None:
            async with asyncio.TaskGroup() as group:
                group.create_task(controller.run(stop), name="controller")
                group.create_task(fleet.run(stop, ready=[controller.link.connected]), name="fleet")
                group.create_task(view(), name="view")

        if options.duration_s is not None:
            asyncio.get_running_loop().call_later(options.duration_s, stop.set)
        running = asyncio.create_task(components(), name="demo")
        stopping = asyncio.create_task(stop.wait(), name="demo-stop")
        await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await asyncio.wait([running], timeout=SHUTDOWN_TIMEOUT_S)
        if not running.done():
            _give_up(status(0), echo)
        running.result()  # a component that failed raises here
        return status(0)


def _give_up(status: DemoStatus, echo: Callable[[str], None]) -> NoReturn:
    """Shutdown overran its time limit: report what still runs and exit at once, status 1.

    A task that swallowed its cancellation would also hold up asyncio.run's own clean-up, so
    waiting longer or raising would only hang; the broker dies with the process.
    """
    # Our tasks have names; the broker's unnamed ones (Task-<n>) only wait for the process.
    stuck = sorted(
        name
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task() and not (name := task.get_name()).startswith("Task-")
    )
    echo(summary_text(status))
    log.error(
        "shutdown did not finish within %.0f s; still running: %s",
        SHUTDOWN_TIMEOUT_S,
        ", ".join(stuck),
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def main(options: DemoOptions, policy: Policy) -> None:
    """The ``demo`` command: load the data, run the demo, print the summary."""
    console = Console()
    # Whether stdout itself is a terminal: rich's own test also honours FORCE_COLOR, which CI
    # systems set to get colours in their logs, where a live view would be a mess.
    live = sys.stdout.isatty() and not console.is_dumb_terminal

    def echo(text: str) -> None:
        if live:
            console.print(text, highlight=False)
        else:
            # Flushed line by line: a pipe is block-buffered, and whoever reads it (CI, a test)
            # should see each status as it is printed.
            print(text, flush=True)

    setup_logging("warning")
    if live:
        # Log records go above the live view instead of through it.
        logging.getLogger().handlers[:] = [RichHandler(console=console, show_path=False)]
    # amqtt reports routine events (a client that disconnects, an acknowledgement that crosses
    # a retransmission) as warnings; in a demo nobody can act on them. Its errors still show.
    logging.getLogger("amqtt").setLevel(logging.ERROR)
    if options.trace is not None:
        echo(f"importing {options.trace} …")
    try:
        replay, source = load_replay(options)
    except KeyboardInterrupt:
        # Before the demo runs, Ctrl-C is Python's default: end quietly, as interrupted.
        raise SystemExit(128 + signal.SIGINT) from None
    status = asyncio.run(
        run_demo(options, policy, replay, source, console=console, live=live, echo=echo)
    )
    echo(summary_text(status))
    sys.stdout.flush()
