"""Importers that turn public VM memory traces into recordings
(:mod:`autoscaler.recordings.recording`).

Bitbrains GWA-T-12 "Rnd" (``bitbrains-rnd-2013-08.csv.gz`` in the directory of public traces
that ``$BALLOON_TRACES_DIR`` names, see the README beside it) is a long-format CSV
``vm_id,timestamp_s,mem_capacity_kb,mem_usage_kb,cpu_cores,cpu_usage_pct``. Each row becomes one
sample of guest ``vm<vm_id>`` on host ``bitbrains``:

- ``ram_bytes`` = capacity KiB x 1024 (per row: capacity changes over time are kept);
- ``demand_bytes`` = usage KiB x 1024, usage clipped to capacity;
- ``total-memory`` = ``ram_bytes``; ``available-memory`` = ``ram_bytes - demand_bytes``;
- every other stat, ``num_pages`` and ``actual`` are null (the trace has no balloon).

The trace's quirks are handled, and counted in :class:`ImportSummary`. A dropped row is
counted under the first of these reasons that applies, in this order:

1. unparseable: wrong number of fields, or a needed field that is not a plain non-negative
   number (empty, text, negative, absurdly long);
2. zero usage: the monitoring took no sample (about 9% of the rows);
3. zero capacity: the VM's size was unknown (VM 265 reports usage with capacity 0 for half
   the month); without a size there is no ``ram_bytes``, and inventing one would put made-up
   numbers into the recording;
4. duplicate ``(vm_id, timestamp_s)``: the last row in file order is kept. Rows dropped for
   the reasons above are not candidates: a zero-usage row that repeats a real sample's
   timestamp must not shadow that sample (the raw file has such pairs).

Kept rows whose usage exceeds capacity are clipped to capacity and counted. The whole file
is processed with vectorised pyarrow/numpy operations; the only Python callback is pyarrow's
handler for malformed rows, which runs once per malformed row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from tqdm import tqdm

from autoscaler.recordings.recording import RecordingError, write_recording

if TYPE_CHECKING:
    from pyarrow._csv import InvalidRow

TRACES_DIR_ENV: Final = "BALLOON_TRACES_DIR"
"""The environment variable naming the directory of public traces (none by default)."""
BITBRAINS_MONTH: Final = "bitbrains-rnd-2013-08.csv.gz"
"""The Bitbrains month's file name in that directory."""
BITBRAINS_HOST: Final = "bitbrains"
KIB_BYTES: Final = 1024

# The four CSV columns the import needs; the CPU columns are not read at all.
VM_ID: Final = "vm_id"
TIMESTAMP_S: Final = "timestamp_s"
CAPACITY_KIB: Final = "mem_capacity_kb"
USAGE_KIB: Final = "mem_usage_kb"
BITBRAINS_COLUMNS: Final = (VM_ID, TIMESTAMP_S, CAPACITY_KIB, USAGE_KIB)

# Digit limits that keep every later int64 product exact: KiB values below 10^15 times 1024
# stay below 2^63, and Unix seconds need 10 digits until the year 2286.
MAX_ID_DIGITS: Final = 18
MAX_KIB_DIGITS: Final = 15
TIMESTAMP_PATTERN: Final = r"^[0-9]{1,12}(\.[0-9]{1,9})?$"

# pyarrow.csv reads blocks of this size in parallel; larger blocks are faster, smaller ones
# make the progress bar move more smoothly. 4 MiB of CSV is ~100,000 rows.
CSV_BLOCK_BYTES: Final = 4 << 20

# Compression is chosen from the file name, as pyarrow does when given a path; the import
# opens the file itself so that the progress bar can follow the compressed bytes read.
COMPRESSION_BY_SUFFIX: Final[dict[str, Literal["gzip", "bz2", "zstd"]]] = {
    ".gz": "gzip",
    ".bz2": "bz2",
    ".zst": "zstd",
}

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
if TYPE_CHECKING:
    BoolColumn = pa.BooleanArray | pa.ChunkedArray[pa.BooleanScalar]


class TraceError(RecordingError):
    """A trace file that cannot be imported at all (unreadable, or missing columns)."""


def find_trace(name: str = BITBRAINS_MONTH) -> Path | None:
    """``$BALLOON_TRACES_DIR/name`` if the variable is set and the file is there, else None."""
    directory = os.environ.get(TRACES_DIR_ENV)
    if not directory:
        return None
    path = Path(directory) / name
    return path if path.is_file() else None


@dataclass(frozen=True, slots=True)
class ImportSummary:
    """What an import read, dropped, fixed and wrote. Row counts add up:
    ``rows_in == rows_out + unparseable_rows + zero_usage_rows + zero_capacity_rows +
    duplicate_rows``.
    """

    rows_in: int
    rows_out: int
    guests: int
    unparseable_rows: int
    zero_usage_rows: int
    zero_capacity_rows: int
    duplicate_rows: int
    clipped_usage_rows: int
    """Kept rows whose usage was above capacity, clipped to capacity."""
    capacity_changed_guests: int
    """Guests whose capacity (``ram_bytes``) is not the same in all their kept rows."""
    start_ts_s: float | None
    """First and last kept timestamp; None if no row was kept."""
    end_ts_s: float | None

    @property
    def span_s(self) -> float:
        if self.start_ts_s is None or self.end_ts_s is None:
            return 0.0
        return self.end_ts_s - self.start_ts_s

    def to_text(self) -> str:
        """A short human-readable report, a few lines."""
        if self.start_ts_s is not None and self.end_ts_s is not None:
            start = datetime.fromtimestamp(self.start_ts_s, UTC).strftime("%Y-%m-%d %H:%M")
            end = datetime.fromtimestamp(self.end_ts_s, UTC).strftime("%Y-%m-%d %H:%M")
            span = f"{start} .. {end} UTC ({self.span_s / 86_400:.1f} days)"
        else:
            span = "no samples"
        return "\n".join(
            [
                f"rows: {self.rows_in:,} read, {self.rows_out:,} written; "
                f"{self.guests:,} guests; {span}",
                f"dropped: {self.zero_usage_rows:,} zero usage (no sample), "
                f"{self.zero_capacity_rows:,} zero capacity, "
                f"{self.duplicate_rows:,} duplicate (vm, timestamp), "
                f"{self.unparseable_rows:,} unparseable",
                f"clipped to capacity: {self.clipped_usage_rows:,} rows with usage above it; "
                f"capacity changes over time in {self.capacity_changed_guests:,} guests "
                "(kept per row)",
            ]
        )


def _read_csv_as_text(csv_path: Path, *, progress: bool) -> tuple[pa.Table, int]:
    """Read the needed columns as strings, skipping malformed rows; return (table, skipped).

    Reading as strings, and parsing in :func:`_parse`, is what lets one bad value drop one row:
    typed columns would make pyarrow fail the whole file on the first non-number.
    """
    skipped: list[int] = []

    def skip_malformed(row: InvalidRow) -> Literal["skip"]:
        # Called from pyarrow's reader threads; list.append is atomic under the GIL.
        skipped.append(row.number if row.number is not None else -1)
        return "skip"

    read_options = pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
    parse_options = pcsv.ParseOptions(invalid_row_handler=skip_malformed)
    convert_options = pcsv.ConvertOptions(
        include_columns=list(BITBRAINS_COLUMNS),
        column_types={name: pa.string() for name in BITBRAINS_COLUMNS},
        strings_can_be_null=False,
    )
    compression = COMPRESSION_BY_SUFFIX.get(csv_path.suffix)
    total_bytes = csv_path.stat().st_size
    batches: list[pa.RecordBatch] = []
    with (
        pa.OSFile(str(csv_path), "rb") as raw,
        tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="reading",
            disable=not progress,
        ) as bar,
    ):
        stream = pa.CompressedInputStream(raw, compression) if compression else raw
        try:
            reader = pcsv.open_csv(
                stream,  # type: ignore[arg-type]  # the stubs omit NativeFile, pyarrow takes it
                read_options=read_options,
                parse_options=parse_options,
                convert_options=convert_options,
            )
            for batch in reader:
                batches.append(batch)
                # The compressed position, read ahead a little by pyarrow: good enough for a bar.
                bar.update(min(raw.tell(), total_bytes) - bar.n)
        except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as exc:
            raise TraceError(f"{csv_path}: cannot read as a Bitbrains trace CSV: {exc}") from None
        bar.update(total_bytes - bar.n)
        schema = reader.schema
    return pa.Table.from_batches(batches, schema=schema), len(skipped)


def _valid_number(column: pa.ChunkedArray[pa.StringScalar], max_digits: int) -> BoolColumn:
    """Plain non-negative integers: ASCII digits only, 1 to ``max_digits`` of them."""
    short = pc.less_equal(pc.utf8_length(column), pa.scalar(max_digits, pa.int32()))
    valid: BoolColumn = pc.and_(pc.ascii_is_decimal(column), short)
    return valid


def _parse(text: pa.Table) -> tuple[IntArray, FloatArray, IntArray, IntArray]:
    """Keep the rows whose four fields parse; return (vm_id, ts_s, capacity_kib, usage_kib)."""
    valid = pc.and_(
        pc.and_(
            _valid_number(text[VM_ID], MAX_ID_DIGITS),
            pc.match_substring_regex(text[TIMESTAMP_S], TIMESTAMP_PATTERN),
        ),
        pc.and_(
            _valid_number(text[CAPACITY_KIB], MAX_KIB_DIGITS),
            _valid_number(text[USAGE_KIB], MAX_KIB_DIGITS),
        ),
    )
    rows = text.filter(valid)

    def column(name: str, type_: pa.DataType) -> npt.NDArray[Any]:
        values: npt.NDArray[Any] = rows[name].cast(type_).to_numpy()
        return values

    return (
        column(VM_ID, pa.int64()),
        column(TIMESTAMP_S, pa.float64()),
        column(CAPACITY_KIB, pa.int64()),
        column(USAGE_KIB, pa.int64()),
    )


def _repeated_strings(values: list[str], indices: IntArray) -> pa.Array[Any]:
    """``values[indices]`` as a string array, built without a Python object per row."""
    dictionary = pa.DictionaryArray.from_arrays(indices, pa.array(values, pa.string()))
    decoded: pa.Array[Any] = dictionary.dictionary_decode()
    return decoded


def import_bitbrains(
    csv_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, progress: bool
) -> ImportSummary:
    """Import a Bitbrains GWA-T-12 CSV (plain or compressed) into a one-file recording.

    ``out_path`` is replaced atomically, its parent directories created. ``progress`` shows
    tqdm bars on stderr. Raises :class:`TraceError` if the file is not such a CSV at all;
    bad rows are dropped and counted instead (see the module docstring).
    """
    csv_file = Path(csv_path)
    text, malformed_rows = _read_csv_as_text(csv_file, progress=progress)
    vm_id, ts_s, capacity_kib, usage_kib = _parse(text)
    rows_in = text.num_rows + malformed_rows
    unparseable_rows = rows_in - len(vm_id)
    del text

    def keep(mask: BoolArray) -> None:
        nonlocal vm_id, ts_s, capacity_kib, usage_kib
        vm_id, ts_s, capacity_kib, usage_kib = (
            vm_id[mask],
            ts_s[mask],
            capacity_kib[mask],
            usage_kib[mask],
        )

    zero_usage = usage_kib == 0
    zero_usage_rows = int(zero_usage.sum())
    keep(~zero_usage)
    zero_capacity = capacity_kib == 0
    zero_capacity_rows = int(zero_capacity.sum())
    keep(~zero_capacity)

    # The trace is documented as sorted by (vm_id, timestamp_s); check rather than trust, and
    # sort only if needed. lexsort is stable, so duplicates stay in file order.
    same_vm = vm_id[1:] == vm_id[:-1]
    in_order = (vm_id[1:] > vm_id[:-1]) | (same_vm & (ts_s[1:] >= ts_s[:-1]))
    if not in_order.all():
        order = np.lexsort((ts_s, vm_id))
        vm_id, ts_s, capacity_kib, usage_kib = (
            vm_id[order],
            ts_s[order],
            capacity_kib[order],
            usage_kib[order],
        )
        same_vm = vm_id[1:] == vm_id[:-1]

    # Keep the last of each run of equal (vm_id, timestamp_s): drop a row if the next repeats it.
    repeated_by_next = same_vm & (ts_s[1:] == ts_s[:-1])
    duplicate_rows = int(repeated_by_next.sum())
    last_of_run = np.ones(len(vm_id), dtype=np.bool_)
    last_of_run[:-1] = ~repeated_by_next
    keep(last_of_run)

    over_capacity = usage_kib > capacity_kib
    clipped_usage_rows = int(over_capacity.sum())
    usage_kib = np.minimum(usage_kib, capacity_kib)

    same_vm = vm_id[1:] == vm_id[:-1]
    capacity_changes = same_vm & (capacity_kib[1:] != capacity_kib[:-1])
    capacity_changed_guests = len(np.unique(vm_id[1:][capacity_changes]))

    # vm_id is sorted now: runs of equal ids are the guests, in order.
    rows_out = len(vm_id)
    new_guest = np.append(True, ~same_vm) if rows_out else np.zeros(0, dtype=np.bool_)
    guest_index = np.cumsum(new_guest) - 1
    guest_names = [f"vm{vm}" for vm in vm_id[new_guest].tolist()]  # one per guest, not row

    ram_bytes = capacity_kib * KIB_BYTES
    demand_bytes = usage_kib * KIB_BYTES
    columns: dict[str, object] = {
        "host": _repeated_strings([BITBRAINS_HOST], np.zeros(rows_out, dtype=np.int64)),
        "guest": _repeated_strings(guest_names, guest_index),
        "ts": pa.array(ts_s),
        "ram_bytes": pa.array(ram_bytes),
        "total-memory": pa.array(ram_bytes),
        "available-memory": pa.array(ram_bytes - demand_bytes),
        "demand_bytes": pa.array(demand_bytes.astype(np.float64)),
    }
    out_file = Path(out_path)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=rows_out, unit="rows", desc="writing", disable=not progress) as bar:
        write_recording(
            columns,
            out_file,
            source=f"Bitbrains GWA-T-12 Rnd trace, imported from {csv_file.name}",
            on_rows_written=bar.update,
        )

    return ImportSummary(
        rows_in=rows_in,
        rows_out=rows_out,
        guests=len(guest_names),
        unparseable_rows=unparseable_rows,
        zero_usage_rows=zero_usage_rows,
        zero_capacity_rows=zero_capacity_rows,
        duplicate_rows=duplicate_rows,
        clipped_usage_rows=clipped_usage_rows,
        capacity_changed_guests=capacity_changed_guests,
        start_ts_s=float(ts_s.min()) if rows_out else None,
        end_ts_s=float(ts_s.max()) if rows_out else None,
    )
