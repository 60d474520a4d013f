"""The simulator's plots: what each line shows and that every label is whole on the canvas."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text

from autoscaler.sim.report import busiest_day, guests_figure, tradeoff_figure
from autoscaler.sim.simulate import PolicyRun, Replay

GIB = 2**30
STEP_S = 600.0
STEPS = int(720 * 3600 / STEP_S)  # a month
LONG_LABELS = (
    "threshold",
    "threshold(inflate_step_share=0.02, deflate_headroom_share=0.15)",
    "quantile-regressor(model=models/bitbrains-q90.skops, quantile=0.9)",
)
ENDS_AT = STEPS // 2 - 7
"""The last step with data of the guest whose data stops half-way."""


def month() -> tuple[Replay, list[PolicyRun]]:
    rng = np.random.default_rng(3)
    guests = 4
    ram = np.array([4, 8, 16, 8], dtype=float) * GIB
    t = np.arange(STEPS) * STEP_S
    demand = np.empty((guests, STEPS))
    for g in range(guests):
        wave = 0.3 + (0.05 + 0.05 * g) * np.sin(2 * np.pi * t / 86_400 + g)
        demand[g] = ram[g] * (wave + 0.02 * rng.standard_normal(STEPS))
    demand[0] = ram[0] * (0.5 + 0.4 * np.sin(2 * np.pi * t / 86_400))  # the most variable
    demand = np.clip(demand, 0.05 * ram[:, None], ram[:, None])
    demand[0, ENDS_AT + 1 :] = np.nan
    replay = Replay(
        ["h"] * guests,
        [f"vm-{g:04d}" for g in range(guests)],
        ram,
        1_700_000_000.0 + t,
        demand,
    )
    runs = []
    for k, label in enumerate(LONG_LABELS):
        # like the simulator: after its data ends a guest keeps its last allocation
        alloc = np.minimum(demand * (1.1 + 0.1 * k), ram[:, None])
        alloc[0, ENDS_AT + 1 :] = alloc[0, ENDS_AT]
        runs.append(
            PolicyRun(
                label,
                alloc,
                np.zeros(guests, dtype=np.int64),
                metrics={"under_provisioned_pct": [0.0, 0.4, 11.0][k], "reclaimed_pct": 30.0 + k},
            )
        )
    return replay, runs


@pytest.fixture
def figures() -> Iterator[list[Figure]]:
    made: list[Figure] = []
    yield made
    for fig in made:
        plt.close(fig)


def assert_texts_whole_and_inside(fig: Figure) -> list[str]:
    """Every text drawn lies within the canvas; returns their strings."""
    fig.canvas.draw()
    canvas = fig.bbox
    undrawn: set[int] = set()  # the labels of ticks beyond the axes' limits
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not low <= tick.get_loc() <= high:
                    undrawn.update((id(tick.label1), id(tick.label2)))
    strings = []
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text() or id(text) in undrawn:
            continue
        box = text.get_window_extent()
        assert canvas.x0 - 0.5 <= box.x0 and box.x1 <= canvas.x1 + 0.5, text.get_text()
        assert canvas.y0 - 0.5 <= box.y0 and box.y1 <= canvas.y1 + 0.5, text.get_text()
        strings.append(text.get_text())
    return strings


def test_guest_lines_stop_where_the_guests_data_stops(figures: list[Figure]) -> None:
    replay, runs = month()
    fig = guests_figure(replay, runs, 3)
    assert fig is not None
    figures.append(fig)
    hours = (replay.grid_s - replay.grid_s[0]) / 3600
    (k,) = [k for k, ax in enumerate(fig.axes) if "h/vm-0000:" in ax.get_title(loc="left")]
    main, strip = fig.axes[k], fig.axes[k + 1]  # each guest: its day, then its month
    for ax in (main, strip):
        lines = [line for line in ax.get_lines() if isinstance(line, Line2D)]
        assert len(lines) >= 2
        for line in lines:
            x = np.asarray(line.get_xdata(), dtype=float)
            y = np.asarray(line.get_ydata(), dtype=float)
            drawn = x[np.isfinite(y)]
            assert len(drawn), line.get_label()
            assert drawn.max() <= hours[ENDS_AT] + 1e-9, line.get_label()
    # a day in full above, the whole month in the strip below
    low, high = main.get_xlim()
    assert high - low == pytest.approx(24 - STEP_S / 3600, abs=STEP_S / 3600)
    assert strip.get_xlim() == pytest.approx((0, hours[-1]))
    # the other guests' lines run to the end of the month
    other = fig.axes[k + 2 if k == 0 else 0]
    assert any(np.isfinite(np.asarray(line.get_ydata())[-1]) for line in other.get_lines())


def test_guest_plot_labels_are_whole_and_the_legend_outside_the_data(
    figures: list[Figure],
) -> None:
    replay, runs = month()
    fig = guests_figure(replay, runs, 4)
    assert fig is not None
    figures.append(fig)
    strings = assert_texts_whole_and_inside(fig)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["demand", *LONG_LABELS, "RAM"]
    assert set(LONG_LABELS) <= set(strings)
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), ax.get_title()


def test_tradeoff_has_a_log_axis_and_whole_labels_inside(figures: list[Figure]) -> None:
    _, runs = month()
    fig = tradeoff_figure(runs)
    figures.append(fig)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    strings = assert_texts_whole_and_inside(fig)
    # a policy that never under-provisioned sits at the axis' floor and says so
    assert f"{LONG_LABELS[0]} (0 %)" in strings
    assert set(LONG_LABELS[1:]) <= set(strings)


def test_policies_with_the_same_numbers_share_one_whole_label(figures: list[Figure]) -> None:
    _, runs = month()
    twin = PolicyRun("threshold,high_watermark=0.9", runs[1].alloc_bytes, runs[1].changes)
    twin.metrics.update(runs[1].metrics)
    fig = tradeoff_figure([*runs, twin])
    figures.append(fig)
    strings = assert_texts_whole_and_inside(fig)
    assert f"{LONG_LABELS[1]}\nthreshold,high_watermark=0.9" in strings


def test_busiest_day_is_the_day_demand_moves_most() -> None:
    steps_per_day = int(86_400 / STEP_S)
    demand = np.full(30 * steps_per_day, 2.0 * GIB)
    busy = slice(17 * steps_per_day + 10, 18 * steps_per_day + 10)
    demand[busy] += GIB * np.sin(np.arange(steps_per_day))
    day = busiest_day(demand, STEP_S)
    assert day.stop - day.start == steps_per_day
    assert abs(day.start - busy.start) <= 1
    assert busiest_day(demand[:50], STEP_S) == slice(0, 50)
