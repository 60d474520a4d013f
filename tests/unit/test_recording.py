"""Recording format: schema, writer (flushing, crash safety), reader validation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from autoscaler.recordings import recording
from autoscaler.recordings.recording import (
    FORMAT_NAME,
    RECORDING_SCHEMA,
    GuestSeries,
    RecordingError,
    RecordingWriter,
    batch_to_table,
    median_step_s,
    read_recording,
    write_recording,
)
from autoscaler.stats import STAT_NAMES
from tests.helpers import poll_until_sync

REPO_ROOT = Path(__file__).resolve().parents[2]
GIB = 1 << 30


def sample(**fields: object) -> dict[str, object]:
    """One valid row, with ``fields`` added or replaced."""
    return {"host": "h1", "guest": "g1", "ts": 1000.0, "ram_bytes": 4 * GIB, **fields}


def test_schema_columns_and_metadata() -> None:
    assert len(STAT_NAMES) == 16
    assert RECORDING_SCHEMA.names == [
        "host",
        "guest",
        "ts",
        "ram_bytes",
        "num_pages",
        "actual",
        *STAT_NAMES,
        "demand_bytes",
    ]
    assert RECORDING_SCHEMA.field("ts").type == pa.float64()
    assert RECORDING_SCHEMA.field("demand_bytes").type == pa.float64()
    assert all(RECORDING_SCHEMA.field(name).type == pa.int64() for name in STAT_NAMES)
    assert RECORDING_SCHEMA.metadata == {
        b"format": b"balloon-autoscaler-recording",
        b"format_version": b"1",
    }


def test_writer_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    with RecordingWriter(out, source="unit test", flush_interval_s=None) as writer:
        # Rows as dicts: absent keys are null.
        writer.append(
            [
                sample(ts=1.0, num_pages=10, actual=8, **{"free-memory": GIB, "swap-in": 0}),
                sample(ts=2.0, **{"oom-kills": 2**62}),
            ]
        )
        writer.flush()
        # Columns, numpy with NaN for missing values, as the stats code keeps them.
        writer.append(
            {
                "host": ["h1", "h1"],
                "guest": ["g2", "g2"],
                "ts": np.array([3.0, 4.5]),
                "ram_bytes": np.array([GIB, GIB], dtype=np.uint32),
                "available-memory": np.array([5.0e8, np.nan]),
                "demand_bytes": [1.5e8, None],
            }
        )
        # An Arrow table.
        writer.append(pa.table({"host": ["h2"], "guest": ["g3"], "ts": [5], "ram_bytes": [GIB]}))
    assert writer.parts_written == 2
    assert writer.rows_written == 5
    assert sorted(p.name for p in out.iterdir()) == [
        "part-00000001.parquet",
        "part-00000002.parquet",
    ]

    table = read_recording(out)
    assert table.schema.equals(RECORDING_SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"format"] == FORMAT_NAME.encode()
    assert table.schema.metadata[b"source"] == b"unit test"
    rows = table.to_pylist()
    assert [row["ts"] for row in rows] == [1.0, 2.0, 3.0, 4.5, 5.0]
    assert [row["guest"] for row in rows] == ["g1", "g1", "g2", "g2", "g3"]
    assert rows[0]["num_pages"] == 10
    assert rows[0]["actual"] == 8
    assert rows[0]["free-memory"] == GIB
    assert rows[0]["swap-in"] == 0
    assert rows[0]["demand_bytes"] is None
    assert rows[1]["oom-kills"] == 2**62  # exact: never went through float64
    assert rows[1]["num_pages"] is None
    assert rows[2]["available-memory"] == 500_000_000
    assert rows[3]["available-memory"] is None
    assert rows[2]["demand_bytes"] == 1.5e8
    assert rows[4]["host"] == "h2"


def test_directory_is_readable_by_pyarrow_dataset(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    with RecordingWriter(out, source="s", flush_interval_s=None) as writer:
        for i in range(3):
            writer.append([sample(ts=float(i))])
            writer.flush()
    table = ds.dataset(out, format="parquet").to_table()
    assert table.sort_by("ts")["ts"].to_pylist() == [0.0, 1.0, 2.0]


def test_flush_interval_makes_rows_readable_before_close(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    writer = RecordingWriter(out, source="s", flush_interval_s=0.05)
    try:
        writer.append([sample(ts=1.0), sample(ts=2.0)])
        # No flush() and no close(): the background flush alone must publish the rows.
        poll_until_sync(lambda: read_recording(out).num_rows == 2, 10, what="2 rows readable")
        assert writer.buffered_rows == 0
        writer.append([sample(ts=3.0)])
        poll_until_sync(lambda: read_recording(out).num_rows == 3, 10, what="3 rows readable")
    finally:
        writer.close()
    assert writer.parts_written == 2


def test_crash_keeps_rows_flushed_before_it(tmp_path: Path) -> None:
    """A writer process killed without closing: the rows flushed so far are all readable."""
    out = tmp_path / "rec"
    script = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from autoscaler.recordings.recording import RecordingWriter

        out = Path({str(out)!r})
        writer = RecordingWriter(out, source="crash test", flush_interval_s=1.0)
        row = {{"host": "h", "guest": "g", "ram_bytes": 1 << 30}}
        writer.append([{{**row, "ts": float(i)}} for i in range(3)])
        while not any(out.glob("part-*.parquet")):
            time.sleep(0.01)
        # Buffered, not yet flushed: lost in the crash, which is the documented window.
        writer.append([{{**row, "ts": 99.0}}])
        os._exit(3)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=60
    )
    assert result.returncode == 3, result.stderr.decode()
    table = read_recording(out)
    assert table["ts"].to_pylist() == [0.0, 1.0, 2.0]
    assert table.schema.metadata[b"source"] == b"crash test"
    # The directory holds nothing but complete part files.
    assert [p.name for p in out.iterdir()] == ["part-00000001.parquet"]


def test_leftover_temporary_file_is_ignored_and_cleaned(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    with RecordingWriter(out, source="s", flush_interval_s=None) as writer:
        writer.append([sample(ts=1.0)])
    # What a crash in the middle of a flush leaves: a partial file beside the directory.
    leftover = tmp_path / ".rec.part-00000002.parquet.tmp"
    leftover.write_bytes(b"PAR1 half a file")
    assert read_recording(out).num_rows == 1
    with RecordingWriter(out, source="s", flush_interval_s=None) as writer:
        assert not leftover.exists()
        writer.append([sample(ts=2.0)])
    # Reopening continues the numbering: the recording grows, nothing is overwritten.
    assert sorted(p.name for p in out.iterdir()) == [
        "part-00000001.parquet",
        "part-00000002.parquet",
    ]
    assert read_recording(out)["ts"].to_pylist() == [1.0, 2.0]


def test_flushes_when_buffer_is_full(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    writer = RecordingWriter(out, source="s", flush_interval_s=None, max_buffered_rows=3)
    writer.append([sample(ts=1.0), sample(ts=2.0)])
    assert writer.parts_written == 0
    writer.append([sample(ts=3.0)])
    assert writer.parts_written == 1
    assert writer.buffered_rows == 0
    writer.close()
    assert writer.parts_written == 1  # nothing left to flush: no empty part


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    writer = RecordingWriter(tmp_path / "rec", source="s")
    writer.close()
    writer.close()
    with pytest.raises(RecordingError, match="closed"):
        writer.append([sample()])


def test_background_flush_failure_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recording, "_write_parquet_atomically", fail)
    writer = RecordingWriter(tmp_path / "rec", source="s", flush_interval_s=0.02)
    writer.append([sample()])
    poll_until_sync(lambda: writer._flush_error is not None, 10, what="the flush to fail")
    with pytest.raises(RecordingError, match="No space left"):
        writer.append([sample()])
    with pytest.raises(RecordingError, match="No space left"):
        writer.close()


def test_empty_directory_is_an_empty_recording(tmp_path: Path) -> None:
    with RecordingWriter(tmp_path / "rec", source="s"):
        table = read_recording(tmp_path / "rec")
    assert table.num_rows == 0
    assert table.schema.equals(RECORDING_SCHEMA, check_metadata=False)


def test_write_recording_single_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rec.parquet"
    path.parent.mkdir()
    written: list[int] = []
    write_recording(
        [sample(ts=float(i)) for i in range(5)],
        path,
        source="one file",
        row_group_rows=2,
        on_rows_written=written.append,
    )
    assert written == [2, 2, 1]
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    assert read_recording(path)["ts"].to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [p.name for p in path.parent.iterdir()] == ["rec.parquet"]

    write_recording([], path, source="empty")
    empty = read_recording(path)
    assert empty.num_rows == 0
    assert empty.schema.metadata[b"source"] == b"empty"


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([sample(num_pages=1.5)], r"'num_pages'.*truncated"),
        ([sample(ts=None)], r"'ts' has 1 null"),
        ([sample(ts=float("nan"))], r"'ts' has 1 null"),
        ([sample(ts="yesterday")], r"'ts' is string, expected double"),
        ([sample(ram_bytes=True)], r"'ram_bytes' is bool"),
        ([sample(free_memory=1)], r"unknown columns: free_memory"),
        ([{"host": "h", "guest": "g"}], r"missing columns: ts, ram_bytes"),
        ({"host": ["h"], "guest": ["g", "g"], "ts": [1.0], "ram_bytes": [1]}, r"lengths"),
        ({"host": "h", "guest": ["g"], "ts": [1.0], "ram_bytes": [1]}, r"'host'.*sequence"),
        ([sample(ts=2**60 + 1)], r"'ts'.*not in range"),
        ([("h", "g", 1.0, 1)], r"rows must be mappings"),
    ],
)
def test_invalid_batches_are_rejected(batch: recording.Batch, match: str) -> None:
    with pytest.raises(RecordingError, match=match):
        batch_to_table(batch)


def test_invalid_batch_leaves_writer_usable(tmp_path: Path) -> None:
    with RecordingWriter(tmp_path / "rec", source="s", flush_interval_s=None) as writer:
        with pytest.raises(RecordingError):
            writer.append([sample(), sample(num_pages="many")])
        writer.append([sample()])
    assert read_recording(tmp_path / "rec").num_rows == 1


def write_plain(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


def valid_table() -> pa.Table:
    return batch_to_table([sample(ts=1.0), sample(ts=2.0)])


def test_read_rejects_missing_columns(tmp_path: Path) -> None:
    path = write_plain(tmp_path / "x.parquet", valid_table().drop_columns(["oom-kills", "ts"]))
    with pytest.raises(RecordingError, match=r"missing columns: ts, oom-kills"):
        read_recording(path)


def test_read_rejects_wrong_types_with_pandas_hint(tmp_path: Path) -> None:
    table = valid_table()
    table = table.set_column(
        table.schema.get_field_index("num_pages"),
        "num_pages",
        pa.array([1.0, None], pa.float64()),
    )
    table = table.set_column(
        table.schema.get_field_index("guest"), "guest", pa.array([1, 2], pa.int32())
    )
    path = write_plain(tmp_path / "x.parquet", table)
    with pytest.raises(RecordingError) as excinfo:
        read_recording(path)
    message = str(excinfo.value)
    assert "column 'guest' is int32, expected string" in message
    assert "column 'num_pages' is double, expected int64" in message
    assert "dtype_backend='pyarrow'" in message


def test_read_rejects_nulls_in_required_columns(tmp_path: Path) -> None:
    table = valid_table()
    schema = pa.schema([field.with_nullable(True) for field in table.schema])
    table = table.cast(schema)
    table = table.set_column(
        table.schema.get_field_index("ram_bytes"), "ram_bytes", pa.array([1, None], pa.int64())
    )
    path = write_plain(tmp_path / "x.parquet", table)
    with pytest.raises(RecordingError, match="'ram_bytes' has 1 null"):
        read_recording(path)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({b"format": b"something-else", b"format_version": b"1"}, "something-else"),
        ({b"format": FORMAT_NAME.encode(), b"format_version": b"2"}, "newer"),
        ({b"format": FORMAT_NAME.encode(), b"format_version": b"one"}, "invalid format_version"),
    ],
)
def test_read_rejects_other_formats_and_versions(
    tmp_path: Path, metadata: dict[bytes, bytes], match: str
) -> None:
    table = valid_table().replace_schema_metadata(metadata)
    path = write_plain(tmp_path / "x.parquet", table)
    with pytest.raises(RecordingError, match=match):
        read_recording(path)


def test_read_accepts_compatible_files(tmp_path: Path) -> None:
    """What other tools write: no metadata, large_string, narrower ints, no demand_bytes."""
    table = valid_table().drop_columns(["demand_bytes"]).replace_schema_metadata(None)
    table = table.set_column(0, "host", table["host"].cast(pa.large_string()))
    table = table.set_column(
        table.schema.get_field_index("actual"), "actual", pa.array([7, None], pa.int32())
    )
    table = table.append_column("note", pa.array(["a", "b"]))
    path = write_plain(tmp_path / "x.parquet", table)
    result = read_recording(path)
    assert result.column_names == [*RECORDING_SCHEMA.names, "note"]
    assert result.schema.field("host").type == pa.string()
    assert result["actual"].to_pylist() == [7, None]
    assert result["demand_bytes"].null_count == 2
    assert result["note"].to_pylist() == ["a", "b"]


def test_read_rejects_non_parquet_and_missing_paths(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("vm_id,timestamp_s\n1,2\n")
    with pytest.raises(RecordingError, match=r"is not a recording .* import-trace"):
        read_recording(path)
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(RecordingError, match="not a readable Parquet recording"):
        read_recording(damaged)
    with pytest.raises(FileNotFoundError):
        read_recording(tmp_path / "nothing-here")


def test_median_step_counts_gaps_within_a_guest_only() -> None:
    ts = np.array([0.0, 10.0, 20.0, 1000.0, 1030.0])
    assert median_step_s(ts, np.array([True, False, False, True, False])) == 10.0
    assert median_step_s(ts[:1], np.array([True])) == 60.0  # no guest with two samples
    table = pa.table(
        {"host": ["h"] * 5, "guest": ["a", "a", "a", "b", "b"], "ts": ts, "ram_bytes": [2**30] * 5}
    )
    assert GuestSeries(table).step_s == 10.0
