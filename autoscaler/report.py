"""Simulation outputs: summary files, a terminal table and plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from autoscaler.simulate import PolicyRun, Replay, allocations_table

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
    plot_guests: int = 4,
) -> list[Path]:
    """Write summary.json, summary.csv, allocations.parquet and the PNG plots into ``out_dir``."""
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

    written.extend(plot(out_dir, replay, runs, plot_guests))
    return written


def plot(out_dir: Path, replay: Replay, runs: Sequence[PolicyRun], guests: int) -> list[Path]:
    """Reclaimed vs under-provisioned per policy; demand and allocation of a few guests."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for run in runs:
        x = run.metrics.get("under_provisioned_pct", 0.0)
        y = run.metrics.get("reclaimed_pct", 0.0)
        ax.scatter([x], [y], s=60)
        ax.annotate(run.label, (x, y), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("under-provisioned samples (%)  ← better")
    ax.set_ylabel("memory reclaimed (% of provisioned)  better →")
    ax.set_title("Policies: memory reclaimed vs pressure caused")
    ax.grid(alpha=0.3)
    path = out_dir / "tradeoff.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # The guests whose demand varies most show the policies' differences best.
    with np.errstate(invalid="ignore"):
        spread = np.nanstd(replay.demand_bytes, axis=1) / replay.ram_bytes
    picks = np.argsort(-np.nan_to_num(spread))[: min(guests, len(replay.guests))]
    if len(picks):
        hours = (replay.grid_s - replay.grid_s[0]) / 3600.0
        fig, axes = plt.subplots(len(picks), 1, figsize=(10, 2.4 * len(picks)), sharex=True)
        for ax, g in zip(np.atleast_1d(axes), picks.tolist(), strict=True):
            gib = 2**30
            ax.plot(hours, replay.demand_bytes[g] / gib, color="black", lw=0.8, label="demand")
            for run in runs:
                ax.plot(hours, run.alloc_bytes[g] / gib, lw=0.8, label=run.label)
            ax.axhline(replay.ram_bytes[g] / gib, color="grey", ls=":", lw=0.8, label="RAM")
            ax.set_ylabel("GiB")
            ax.set_title(f"{replay.hosts[g]}/{replay.guests[g]}", fontsize=9)
        np.atleast_1d(axes)[0].legend(fontsize=7, ncol=len(runs) + 2, loc="upper right")
        np.atleast_1d(axes)[-1].set_xlabel("hours")
        fig.tight_layout()
        path = out_dir / "guests.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
