"""Simulation outputs: summary files, a terminal table and plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from autoscaler.extras import require
from autoscaler.sim.simulate import PolicyRun, Replay, allocations_table

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Annotation

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # key, heading, format
    ("reclaimed_gib_per_guest", "reclaimed GiB/guest", "{:.2f}"),
    ("reclaimed_pct", "reclaimed %", "{:.1f}"),
    ("relative_slack", "rel. slack", "{:.3f}"),
    ("under_provisioned_pct", "under-prov. %", "{:.2f}"),
    ("deficit_gib_h", "deficit GiB·h", "{:.1f}"),
    ("severe_events", "severe", "{:d}"),
    ("changes_per_guest_day", "changes/guest-day", "{:.1f}"),
)


def table_text(runs: Sequence[PolicyRun]) -> str:
    """A fixed-width table of the headline metrics, one row per policy."""
    headings = ["policy", *(heading for _, heading, _ in COLUMNS)]
    rows = [
        [run.label, *(fmt.format(run.metrics.get(key, 0)) for key, _, fmt in COLUMNS)]
        for run in runs
    ]
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headings, *rows, strict=True)
    ]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(headings, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def write_outputs(
    out_dir: Path,
    replay: Replay,
    runs: Sequence[PolicyRun],
    *,
    meta: dict[str, Any],
    plots: bool = True,
    plot_guests: int = 4,
) -> list[Path]:
    """Write summary.json, summary.csv, allocations.parquet and, with ``plots``, the PNG plots
    into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    summary = {
        "meta": meta,
        "policies": {run.label: run.metrics for run in runs},
    }
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    written.append(path)

    path = out_dir / "summary.csv"
    keys = sorted({key for run in runs for key in run.metrics})
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["policy", *keys])
        for run in runs:
            writer.writerow([run.label, *(run.metrics.get(key, "") for key in keys)])
    written.append(path)

    path = out_dir / "allocations.parquet"
    pq.write_table(allocations_table(replay, runs), path, compression="zstd")
    written.append(path)

    if plots:
        written.extend(plot(out_dir, replay, runs, plot_guests))
    return written


GIB = 2**30
DAY_S = 86_400.0
ZERO_SHARE_FLOOR = 1e-3
"""Where a policy that never under-provisioned sits on the log axis (%): 0 has no place there."""


def require_plotting() -> None:
    """Raise :class:`~autoscaler.extras.MissingExtra` unless matplotlib is installed."""
    require("matplotlib", "sim", "plotting (simulate's tradeoff.png and guests.png)")


def plot(out_dir: Path, replay: Replay, runs: Sequence[PolicyRun], guests: int) -> list[Path]:
    """Reclaimed vs under-provisioned per policy; demand and allocation of a few guests."""
    require_plotting()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    written = []
    fig = tradeoff_figure(runs)
    path = out_dir / "tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    per_guest = guests_figure(replay, runs, guests)
    if per_guest is not None:
        path = out_dir / "guests.png"
        per_guest.savefig(path, dpi=110)
        plt.close(per_guest)
        written.append(path)
    return written


def tradeoff_figure(runs: Sequence[PolicyRun]) -> Figure:
    """Memory reclaimed against under-provisioning (log axis), one labelled point per policy;
    every label kept whole inside the canvas."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    under = np.array([run.metrics.get("under_provisioned_pct", 0.0) for run in runs], dtype=float)
    reclaimed = [run.metrics.get("reclaimed_pct", 0.0) for run in runs]
    positive = under[under > 0]
    floor = min(ZERO_SHARE_FLOOR, float(positive.min()) / 3) if len(positive) else ZERO_SHARE_FLOOR
    # Policies with the same numbers share a point and one label listing them all, one a line.
    points: dict[tuple[float, float], list[str]] = {}
    for run, x, y in zip(runs, under.tolist(), reclaimed, strict=True):
        points.setdefault((x, y), []).append(run.label)
    labels = []
    for (x, y), names in points.items():
        zero = x <= 0
        ax.scatter([floor if zero else x], [y], s=60, marker="<" if zero else "o")
        labels.append(
            ax.annotate(
                "\n".join(f"{name} (0 %)" if zero else name for name in names),
                (floor if zero else x, y),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
        )
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)
    ax.set_xlabel("under-provisioned samples (%, log scale)  ← better")
    ax.set_ylabel("memory reclaimed (% of provisioned)  better →")
    ax.set_title("Policies: memory reclaimed vs pressure caused")
    ax.grid(alpha=0.3, which="both")
    _labels_inside(fig, ax, labels)
    return fig


def _labels_inside(fig: Figure, ax: Axes, labels: list[Annotation]) -> None:
    """Move each point's label, whole, inside the canvas: to the left of its point when it
    would leave on the right, then shifted as far as it must be; below it at the top."""
    for label in labels:
        label.set_in_layout(False)  # the layout sizes the axes; the labels then find room
    fig.tight_layout()
    fig.canvas.draw()
    canvas = fig.bbox
    pad = 4.0  # pixels
    points = 72.0 / fig.dpi
    for label in labels:
        box = label.get_window_extent()
        dx, dy = 6.0, 4.0
        if box.x1 > canvas.x1 - pad:
            label.set_horizontalalignment("right")
            dx = -6.0
            box = box.translated(-box.width - 12.0 / points, 0.0)
        if box.x0 < canvas.x0 + pad:  # too wide for either side: shift it in
            dx += (canvas.x0 + pad - box.x0) * points
        elif box.x1 > canvas.x1 - pad:
            dx -= (box.x1 - canvas.x1 + pad) * points
        if box.y1 > canvas.y1 - pad:
            label.set_verticalalignment("top")
            dy = -4.0
        label.set_position((dx, dy))


def busiest_day(demand: np.ndarray, step_s: float) -> slice:
    """The day-long window of ``demand`` in which it moves most (sum of its changes); the whole
    series when it is shorter than a day."""
    steps = len(demand)
    window = max(round(DAY_S / step_s), 2) if step_s > 0 else steps
    if steps <= window:
        return slice(0, steps)
    moves = np.nan_to_num(np.abs(np.diff(demand)))
    total = np.concatenate([[0.0], np.cumsum(moves)])
    scores = total[window - 1 :] - total[: len(total) - window + 1]
    start = int(np.argmax(scores))
    return slice(start, start + window)


def data_extent(demand: np.ndarray) -> slice:
    """From a guest's first to its last sample on the grid."""
    valid = np.flatnonzero(~np.isnan(demand))
    return slice(int(valid[0]), int(valid[-1]) + 1) if len(valid) else slice(0, 0)


def within(values: np.ndarray, extent: slice) -> np.ndarray:
    """``values`` with NaN outside ``extent``, so a line stops where the guest's data stops."""
    masked = np.full(len(values), np.nan)
    masked[extent] = values[extent]
    return masked


def guests_figure(replay: Replay, runs: Sequence[PolicyRun], guests: int) -> Figure | None:
    """Demand and each policy's allocation of the guests whose demand varies most: the
    busiest day of each in full, over a thin strip of the whole replay marking that day. The
    legend sits outside the data; lines stop where a guest's data stops."""
    import matplotlib.pyplot as plt

    # The guests whose demand varies most show the policies' differences best.
    with np.errstate(invalid="ignore"):
        spread = np.nanstd(replay.demand_bytes, axis=1) / replay.ram_bytes
    picks = np.argsort(-np.nan_to_num(spread))[: min(guests, len(replay.guests))].tolist()
    if not picks:
        return None
    hours = (replay.grid_s - replay.grid_s[0]) / 3600.0
    fig = plt.figure(figsize=(12, 3.3 * len(picks)), layout="constrained")
    grid = fig.add_gridspec(2 * len(picks), 1, height_ratios=[4, 1] * len(picks))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, g in enumerate(picks):
        main = fig.add_subplot(grid[2 * k])
        strip = fig.add_subplot(grid[2 * k + 1])
        demand = replay.demand_bytes[g]
        extent = data_extent(demand)
        day = busiest_day(demand[extent], replay.step_s)
        day = slice(extent.start + day.start, extent.start + day.stop)
        ram = within(np.full(len(hours), replay.ram_bytes[g] / GIB), extent)
        main.plot(hours[day], demand[day] / GIB, color="black", lw=1.2, label="demand", zorder=3)
        for n, run in enumerate(runs):
            alloc = within(run.alloc_bytes[g], extent)
            main.plot(
                hours[day], alloc[day] / GIB, lw=1.0, color=colors[n % len(colors)], label=run.label
            )
        main.plot(hours[day], ram[day], color="grey", ls=":", lw=0.8, label="RAM")
        main.set_xlim(hours[day.start], hours[max(day.stop - 1, day.start)])
        main.set_ylabel("GiB")
        main.set_title(
            f"{replay.hosts[g]}/{replay.guests[g]}: busiest day, "
            f"hours {hours[day.start]:.0f}–{hours[max(day.stop - 1, day.start)]:.0f}",
            fontsize=9,
            loc="left",
        )
        main.grid(alpha=0.3)
        strip.plot(hours, within(demand, extent) / GIB, color="black", lw=0.4)
        strip.plot(hours, ram, color="grey", ls=":", lw=0.6)
        strip.axvspan(hours[day.start], hours[max(day.stop - 1, day.start)], color="C1", alpha=0.3)
        strip.set_xlim(hours[0], hours[-1] if len(hours) > 1 else 1.0)
        strip.set_yticks([])
        strip.tick_params(axis="x", labelsize=7)
        strip.set_ylabel("all", fontsize=7, rotation=0, ha="right", va="center")
    strip.set_xlabel("hours since the start of the replay")
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    return fig
