"""Bitbrains trace import: mapping, quirk handling and counts, the real shared trace."""

from __future__ import annotations

import gzip
import itertools
import random
from pathlib import Path

import pytest

from autoscaler.recordings.recording import read_recording
from autoscaler.recordings.traces import (
    BITBRAINS_MONTH,
    TRACES_DIR_ENV,
    ImportSummary,
    TraceError,
    find_trace,
    import_bitbrains,
)
from autoscaler.stats import STAT_NAMES

HEADER = "vm_id,timestamp_s,mem_capacity_kb,mem_usage_kb,cpu_cores,cpu_usage_pct"
# One row per line, each quirk present; the comment says what the importer must do with it.
QUIRKY_ROWS = [
    ("1,100,1000,200,2,5.0", "kept"),
    ("1,400,1000,0,2,5.0", "zero usage: no sample"),
    ("1,700,1000,300,2,5.0", "duplicate of the next row: dropped"),
    ("1,700,1000,350,2,5.0", "kept, the last of its duplicates"),
    ("1,1000,1000,1500,2,5.0", "kept, usage clipped to capacity"),
    ("2,100,2000,500,1,1.0", "kept"),
    ("2,400,4000,600,1,1.0", "kept, capacity changed"),
    ("2,700,0,100,0,0", "zero capacity"),
    ("2,1000,4000,700,1,1.0", "kept"),
    ("2,1000,0,0,0,0", "zero usage; repeats a real sample's timestamp and must not shadow it"),
    ("garbage", "unparseable: wrong number of fields"),
    ("3,abc,1000,10,1,1.0", "unparseable timestamp"),
    ("3,1300,,10,1,1.0", "unparseable: empty capacity"),
    ("3,1300,-5,10,1,1.0", "unparseable: negative capacity"),
    ("3,1600,1000,10,1,1.0", "kept"),
]
EXPECTED_SUMMARY = ImportSummary(
    rows_in=15,
    rows_out=7,
    guests=3,
    unparseable_rows=4,
    zero_usage_rows=2,
    zero_capacity_rows=1,
    duplicate_rows=1,
    clipped_usage_rows=1,
    capacity_changed_guests=1,
    start_ts_s=100.0,
    end_ts_s=1600.0,
)
# (guest, ts, capacity KiB, usage KiB) of the rows that must come out, in order.
EXPECTED_ROWS = [
    ("vm1", 100.0, 1000, 200),
    ("vm1", 700.0, 1000, 350),
    ("vm1", 1000.0, 1000, 1000),
    ("vm2", 100.0, 2000, 500),
    ("vm2", 400.0, 4000, 600),
    ("vm2", 1000.0, 4000, 700),
    ("vm3", 1600.0, 1000, 10),
]


def write_csv(path: Path, lines: list[str]) -> Path:
    text = "\n".join([HEADER, *lines]) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["trace.csv", "trace.csv.gz"])
def test_import_handles_each_quirk(tmp_path: Path, name: str) -> None:
    csv_path = write_csv(tmp_path / name, [line for line, _ in QUIRKY_ROWS])
    out = tmp_path / "out" / "bitbrains.parquet"
    summary = import_bitbrains(csv_path, out, progress=False)
    assert summary == EXPECTED_SUMMARY
    assert summary.rows_in == (
        summary.rows_out
        + summary.unparseable_rows
        + summary.zero_usage_rows
        + summary.zero_capacity_rows
        + summary.duplicate_rows
    )

    table = read_recording(out)
    assert table.schema.metadata[b"source"].decode().endswith(name)
    rows = table.to_pylist()
    assert [
        (row["guest"], row["ts"], row["ram_bytes"] // 1024, int(row["demand_bytes"]) // 1024)
        for row in rows
    ] == EXPECTED_ROWS
    for row in rows:
        assert row["host"] == "bitbrains"
        assert row["total-memory"] == row["ram_bytes"]
        assert row["available-memory"] == row["ram_bytes"] - row["demand_bytes"]
        assert row["num_pages"] is None
        assert row["actual"] is None
        others = set(STAT_NAMES) - {"total-memory", "available-memory"}
        assert all(row[stat] is None for stat in others)
    assert [p.name for p in out.parent.iterdir()] == ["bitbrains.parquet"]


def test_import_does_not_rely_on_sorted_input(tmp_path: Path) -> None:
    lines = [line for line, _ in QUIRKY_ROWS]
    # Shuffle, but keep the two rows of the duplicate pair in file order: "keep the last".
    first, second = lines.pop(2), lines.pop(2)
    random.Random(7).shuffle(lines)
    lines[3:3] = [first]
    lines.append(second)
    csv_path = write_csv(tmp_path / "shuffled.csv", lines)
    summary = import_bitbrains(csv_path, tmp_path / "out.parquet", progress=False)
    assert summary == EXPECTED_SUMMARY
    table = read_recording(tmp_path / "out.parquet")
    assert list(zip(table["guest"].to_pylist(), table["ts"].to_pylist(), strict=True)) == [
        (guest, ts) for guest, ts, _, _ in EXPECTED_ROWS
    ]
    assert table["demand_bytes"].to_pylist()[1] == 350 * 1024


def test_summary_text() -> None:
    text = EXPECTED_SUMMARY.to_text()
    assert "15 read, 7 written; 3 guests" in text
    assert "1970-01-01 00:01 .. 1970-01-01 00:26 UTC" in text
    assert "2 zero usage" in text
    assert "1 zero capacity" in text
    assert "1 duplicate" in text
    assert "4 unparseable" in text
    assert "clipped to capacity: 1 rows" in text
    assert "capacity changes over time in 1 guests" in text
    assert len(text.splitlines()) == 3


def test_import_of_no_usable_rows(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "t.csv", ["1,100,1000,0,1,1.0"])
    summary = import_bitbrains(csv_path, tmp_path / "out.parquet", progress=False)
    assert summary.rows_out == 0
    assert summary.guests == 0
    assert summary.start_ts_s is None
    assert summary.span_s == 0.0
    assert "no samples" in summary.to_text()
    assert read_recording(tmp_path / "out.parquet").num_rows == 0


@pytest.mark.parametrize(
    "content",
    [
        "",
        "vm_id,timestamp_s,mem_usage_kb\n1,100,5\n",
    ],
    ids=["empty file", "missing capacity column"],
)
def test_import_rejects_files_that_are_not_the_trace(tmp_path: Path, content: str) -> None:
    csv_path = tmp_path / "t.csv"
    csv_path.write_text(content)
    with pytest.raises(TraceError, match="cannot read as a Bitbrains trace"):
        import_bitbrains(csv_path, tmp_path / "out.parquet", progress=False)
    assert not (tmp_path / "out.parquet").exists()


def test_progress_bars_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = write_csv(tmp_path / "t.csv", [line for line, _ in QUIRKY_ROWS])
    import_bitbrains(csv_path, tmp_path / "out.parquet", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "reading" in captured.err
    assert "writing" in captured.err


def test_real_trace_first_rows(tmp_path: Path, bitbrains_trace: Path) -> None:
    rows_wanted = 3000
    with gzip.open(bitbrains_trace, "rt") as trace:
        header = next(trace).strip()
        lines = [line.rstrip("\n") for line in itertools.islice(trace, rows_wanted)]
    assert header == HEADER
    csv_path = write_csv(tmp_path / "head.csv", lines)
    summary = import_bitbrains(csv_path, tmp_path / "head.parquet", progress=False)
    assert summary.rows_in == rows_wanted
    assert summary.unparseable_rows == 0
    assert summary.rows_out > 0.8 * rows_wanted
    table = read_recording(tmp_path / "head.parquet")
    first = table.slice(0, 1).to_pylist()[0]
    # The file's first line: 1,1375308176,8388608,1308620,2,12.767
    assert first["guest"] == "vm1"
    assert first["ts"] == 1375308176.0
    assert first["ram_bytes"] == 8 * 1024**3
    assert first["demand_bytes"] == 1308620 * 1024
    assert first["available-memory"] == (8388608 - 1308620) * 1024


@pytest.mark.slow
def test_real_trace_whole_month(tmp_path: Path, bitbrains_trace: Path) -> None:
    """The whole shared month (about 4 s here), with the counts it gives today."""
    summary = import_bitbrains(bitbrains_trace, tmp_path / "bitbrains.parquet", progress=False)
    assert summary == ImportSummary(
        rows_in=4_337_555,
        rows_out=3_949_008,
        guests=500,
        unparseable_rows=0,
        zero_usage_rows=381_152,
        zero_capacity_rows=7_393,
        duplicate_rows=2,
        clipped_usage_rows=83,
        capacity_changed_guests=248,
        start_ts_s=1_375_308_176.0,
        end_ts_s=1_377_899_901.0,
    )


def test_the_traces_directory_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TRACES_DIR_ENV, raising=False)
    assert find_trace() is None
    monkeypatch.setenv(TRACES_DIR_ENV, str(tmp_path))
    assert find_trace() is None  # the directory without the file
    (tmp_path / BITBRAINS_MONTH).write_bytes(b"")
    assert find_trace() == tmp_path / BITBRAINS_MONTH
