"""Recordings: per-guest time series of stats samples, stored as Parquet.

A recording has one row per sample, and every reader and writer keeps to these columns:

- ``host``, ``guest`` (string), ``ts`` (float64 Unix seconds), ``ram_bytes`` (int64, boot RAM):
  required;
- ``num_pages`` (balloon target) and ``actual`` (balloon size), int64 4 KiB pages, nullable;
- one nullable int64 column per virtio-balloon stat, named as in :data:`STAT_NAMES`
  (memory amounts in bytes, counters cumulative since guest boot, null when not reported);
- ``demand_bytes`` (float64, nullable): the guest's memory demand, for traces that carry it
  directly; consumers fall back to ``total-memory - available-memory`` where it is null.

The schema carries file-level metadata: ``format`` (``balloon-autoscaler-recording``),
``format_version`` (``1``) and a free-form ``source``.

A recording is either one Parquet file (:func:`write_recording`, e.g. an imported trace) or a
directory of part files (:class:`RecordingWriter`, a live recorder). Both are read by
:func:`read_recording`, and directly by ``pandas.read_parquet``, ``polars.read_parquet`` and
``pyarrow.dataset``.

Exceptions (all ``ValueError``)::

    RecordingError              a recording, or rows for one, that does not fit the schema
    ├── RecordingWriteError     a part file could not be written; the rows stay buffered
    └── TraceError              a public trace that cannot be imported (recordings.traces)
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias, cast

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from autoscaler.stats import STAT_NAMES

log = logging.getLogger(__name__)
FORMAT_NAME: Final = "balloon-autoscaler-recording"
FORMAT_VERSION: Final = 1

# Metadata keys. Readers that know nothing about them (pandas, polars) simply ignore them.
META_FORMAT: Final = b"format"
META_FORMAT_VERSION: Final = b"format_version"
META_SOURCE: Final = b"source"

REQUIRED_COLUMNS: Final[tuple[str, ...]] = ("host", "guest", "ts", "ram_bytes")

_FIELDS: list[pa.Field[Any]] = [
    pa.field("host", pa.string(), nullable=False),
    pa.field("guest", pa.string(), nullable=False),
    pa.field("ts", pa.float64(), nullable=False),
    pa.field("ram_bytes", pa.int64(), nullable=False),
    pa.field("num_pages", pa.int64()),
    pa.field("actual", pa.int64()),
    *(pa.field(name, pa.int64()) for name in STAT_NAMES),
    pa.field("demand_bytes", pa.float64()),
]
RECORDING_SCHEMA: Final[pa.Schema] = pa.schema(
    _FIELDS,
    metadata={META_FORMAT: FORMAT_NAME.encode(), META_FORMAT_VERSION: str(FORMAT_VERSION).encode()},
)

# Optional columns: a file without them is still a valid recording; read_recording adds them as
# nulls so that every consumer sees the same columns.
OPTIONAL_COLUMNS: Final[frozenset[str]] = frozenset({"demand_bytes"})

# Zstandard: imported traces are mostly null columns and repeated ids, which it packs tightly,
# and pandas, polars and pyarrow all read it.
PARQUET_COMPRESSION: Final = "zstd"
DEFAULT_ROW_GROUP_ROWS: Final = 262_144

PART_PATTERN: Final = re.compile(r"part-(\d+)\.parquet")
# Files are written under a temporary name and renamed once complete. The temporary name is
# hidden and does not end in ".parquet", but that is not enough for a recording directory:
# polars reads *every* file under a directory it is given (and fails on a half-written one),
# so a part's temporary file lives beside the directory, not in it (see RecordingWriter).
TMP_SUFFIX: Final = ".tmp"

if TYPE_CHECKING:
    # pyarrow's classes are generic only in its stubs, so the alias is for the type checker.
    AnyArray: TypeAlias = pa.Array[Any] | pa.ChunkedArray[Any]

Row: TypeAlias = Mapping[str, object]
Columns: TypeAlias = Mapping[str, object]
"""Column name -> values: a list, a numpy array or an Arrow array (NaN and None are null)."""
Batch: TypeAlias = pa.Table | pa.RecordBatch | Columns | Iterable[Row]


class RecordingError(ValueError):
    """A recording, or a batch of rows for one, that does not fit :data:`RECORDING_SCHEMA`."""


class RecordingWriteError(RecordingError):
    """A :class:`RecordingWriter` could not write its part file (disk full, say).

    The rows are still buffered in the writer, and are tried again on the next flush.
    """


def recording_schema(source: str) -> pa.Schema:
    """:data:`RECORDING_SCHEMA` with the ``source`` metadata set."""
    metadata = dict(RECORDING_SCHEMA.metadata or {})
    metadata[META_SOURCE] = source.encode()
    return RECORDING_SCHEMA.with_metadata(metadata)


# --- type checks shared by the writer (incoming batches) and the reader (files) --------------


def _type_fits(actual: pa.DataType, expected: pa.DataType, *, floats_as_ints: bool) -> bool:
    """Whether a column of type ``actual`` can stand for ``expected``.

    Accepted besides the exact type: an all-null column, the other Arrow string types (polars
    writes ``large_string``), narrower integers for int64, any integer for float64 (the cast
    refuses values that float64 cannot hold exactly), and, with ``floats_as_ints``, floats for
    int64 (the cast refuses fractions; NaN was already made null).

    Files get ``floats_as_ints=False``: pandas turns a nullable integer column into float64,
    which rounds counters above 2^53, and such a file is what this check is there to catch.
    Incoming batches get ``True``, since the stats code keeps samples as float64 with NaN.
    """
    if actual == expected or pa.types.is_null(actual):
        return True
    if pa.types.is_string(expected):
        return bool(pa.types.is_large_string(actual) or pa.types.is_string_view(actual))
    if pa.types.is_int64(expected):
        return bool(
            pa.types.is_signed_integer(actual)
            or (pa.types.is_unsigned_integer(actual) and actual.bit_width < 64)
            or (floats_as_ints and pa.types.is_floating(actual))
        )
    if pa.types.is_float64(expected):
        return bool(pa.types.is_integer(actual) or pa.types.is_float32(actual))
    return False


def _check_columns(
    columns: Mapping[str, AnyArray],
    what: str,
    *,
    required: Iterable[str],
    floats_as_ints: bool,
) -> dict[str, AnyArray]:
    """Validate named columns against the schema and cast them to it.

    Columns not in ``required`` may be absent and are then filled with nulls. Raises
    :class:`RecordingError` listing every problem at once, so that a broken file is diagnosed
    in one go.
    """
    problems: list[str] = []
    unknown = sorted(set(columns) - set(RECORDING_SCHEMA.names))
    if unknown:
        problems.append(f"unknown columns: {', '.join(unknown)}")
    missing = [name for name in required if name not in columns]
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        problems.append(f"columns of different lengths: {sorted(lengths)}")
    length = lengths.pop() if len(lengths) == 1 else 0
    out: dict[str, AnyArray] = {}
    for field in RECORDING_SCHEMA:
        values = columns.get(field.name)
        if values is None:
            out[field.name] = pa.nulls(length, field.type)
            continue
        if not _type_fits(values.type, field.type, floats_as_ints=floats_as_ints):
            problems.append(f"column {field.name!r} is {values.type}, expected {field.type}")
            continue
        if not field.nullable and values.null_count:
            problems.append(f"column {field.name!r} has {values.null_count} null values")
            continue
        try:
            out[field.name] = values.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            # A cast that would lose data: 1.5 into int64, 2^60 into float64.
            problems.append(f"column {field.name!r}: {exc}")
    if problems:
        message = f"{what}: {'; '.join(problems)}"
        if not floats_as_ints and any(
            pa.types.is_floating(values.type)
            and pa.types.is_int64(RECORDING_SCHEMA.field(name).type)
            for name, values in columns.items()
            if name in RECORDING_SCHEMA.names
        ):
            message += (
                " (pandas stores nullable integers as float64 unless the frame uses"
                " dtype_backend='pyarrow' or Int64 columns)"
            )
        raise RecordingError(message)
    return out


# --- incoming batches ----------------------------------------------------------------------


def _infer_array(name: str, values: object) -> AnyArray:
    """Turn one column of Python or numpy values into an Arrow array of an inferred type.

    Inferring first and casting later (in :func:`_check_columns`) is deliberate: asking
    pyarrow to build an int64 array straight from Python floats silently truncates 1.5 to 1,
    while a cast from an inferred float64 array refuses. ``from_pandas`` makes NaN a null, which
    is how numpy stats vectors mark missing values.
    """
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values
    if isinstance(values, str | bytes):
        # pyarrow would take a lone string as a one-row column; for a column mapping that is a
        # mistake (a row passed where a batch was expected), not a batch of one.
        raise RecordingError(f"column {name!r}: expected a sequence of values, not {values!r}")
    try:
        array: AnyArray = pa.array(cast("list[Any]", values), from_pandas=True)
        return array
    # OverflowError: an integer beyond int64/uint64, e.g. int(float(2**63 - 1)) == 2**63.
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
        raise RecordingError(f"column {name!r}: cannot convert values: {exc}") from None


def batch_to_table(batch: Batch) -> pa.Table:
    """Validate a batch of samples and convert it to a table of :data:`RECORDING_SCHEMA`.

    ``batch`` is an Arrow table or record batch, a mapping of column name to values, or an
    iterable of row mappings (column name to value; absent keys are null). Values are cast
    only where that is lossless: 1.5 for an int64 column, a string for a number, or a null
    in a required column raise :class:`RecordingError`.
    """
    if isinstance(batch, pa.Table | pa.RecordBatch):
        arrow_columns: dict[str, AnyArray] = dict(
            zip(batch.column_names, batch.columns, strict=True)
        )
    else:
        if isinstance(batch, Mapping):
            raw_columns: Mapping[str, object] = batch
        else:
            rows = list(batch)
            if not all(isinstance(row, Mapping) for row in rows):
                raise RecordingError("batch: rows must be mappings of column name to value")
            names = set().union(*(row.keys() for row in rows)) if rows else set()
            raw_columns = {name: [row.get(name) for row in rows] for name in names}
            if not rows:
                raw_columns = {name: [] for name in REQUIRED_COLUMNS}
        arrow_columns = {name: _infer_array(name, raw) for name, raw in raw_columns.items()}
    columns = _check_columns(arrow_columns, "batch", required=REQUIRED_COLUMNS, floats_as_ints=True)
    return pa.Table.from_arrays(list(columns.values()), schema=RECORDING_SCHEMA)


# --- writing -------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_parquet_atomically(
    table: pa.Table,
    path: Path,
    tmp_path: Path,
    *,
    source: str,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    on_rows_written: Callable[[int], object] | None = None,
) -> None:
    """Write ``table`` to ``tmp_path``, make it durable, then rename it to ``path``.

    The rename is atomic, and it happens only after the footer is written and fsynced, so
    ``path`` is either absent or a complete file, whenever the process or the machine dies.
    """
    schema = recording_schema(source)
    try:
        with tmp_path.open("wb") as sink:
            with pq.ParquetWriter(sink, schema, compression=PARQUET_COMPRESSION) as writer:
                for start in range(0, table.num_rows, row_group_rows):
                    chunk = table.slice(start, row_group_rows)
                    # Metadata aside, the schemas are equal: ParquetWriter compares without it.
                    writer.write_table(chunk, row_group_size=row_group_rows)
                    if on_rows_written is not None:
                        on_rows_written(chunk.num_rows)
            sink.flush()
            os.fsync(sink.fileno())
        tmp_path.replace(path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_recording(
    batch: Batch,
    path: str | os.PathLike[str],
    *,
    source: str,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    on_rows_written: Callable[[int], object] | None = None,
) -> None:
    """Write a whole recording as one Parquet file at ``path`` (replaced atomically).

    ``on_rows_written(n)`` is called after each row group, for progress reporting.
    """
    table = batch_to_table(batch)
    out_path = Path(path)
    tmp_path = out_path.with_name(f".{out_path.name}{TMP_SUFFIX}")
    _write_parquet_atomically(
        table,
        out_path,
        tmp_path,
        source=source,
        row_group_rows=row_group_rows,
        on_rows_written=on_rows_written,
    )


class RecordingWriter:
    """Appends samples to a recording directory, losing at most ~``flush_interval_s`` on a crash.

    Why part files: a Parquet file is readable only once its footer is written, and the footer
    is written when the file is closed, so a single file kept open for a whole recording (even
    one flushed as row groups) is lost entirely if the process dies. Instead, every flush
    writes the rows buffered since the previous flush as a complete, small Parquet file
    ``part-NNNNNNNN.parquet`` (one row group) in the output directory: written to a hidden
    temporary file *beside* the directory (``.<dir name>.part-NNNNNNNN.parquet.tmp``, same
    file system, so the rename is atomic), fsynced, then renamed into it. The directory
    therefore only ever holds complete part files, whenever the process or machine dies; a
    crash can leave one temporary file beside it, which the next writer on the directory
    removes. The directory is the recording: ``pandas.read_parquet(dir)``,
    ``polars.read_parquet(dir)``, ``pyarrow.dataset`` and :func:`read_recording` read it as one
    table (polars needs the directory to hold nothing else, so keep other files out of it).

    Flushes happen every ``flush_interval_s`` on a background thread (so buffered rows are
    written even when no more samples arrive, e.g. just before a crash), when the buffer
    reaches ``max_buffered_rows`` (bounding memory), on :meth:`flush`, and on :meth:`close`.
    A failed flush (disk full, say) keeps its rows buffered and is tried again on the next
    interval; until a flush succeeds, :meth:`append` buffers its rows all the same but raises
    :class:`RecordingWriteError`, so that a caller can stop loudly rather than buffer forever.
    :meth:`close` tries a last flush and raises only if that fails. Pass
    ``flush_interval_s=None`` to flush only on size, :meth:`flush` and :meth:`close`.

    The cost of this design is one file per flush interval (17,280 a day at 5 s); a recording
    meant to be kept for long can be compacted into one file with :func:`read_recording` and
    :func:`write_recording`. Opening a directory that already has parts continues their
    numbering, so a recorder restarted after a crash appends to the same recording. One writer
    per directory at a time.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        source: str,
        flush_interval_s: float | None = 5.0,
        max_buffered_rows: int = 100_000,
    ) -> None:
        if flush_interval_s is not None and flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, not {flush_interval_s}")
        self.out_dir = Path(out_dir)
        self.source = source
        self.flush_interval_s = flush_interval_s
        self.max_buffered_rows = max_buffered_rows
        self.rows_written = 0
        self.parts_written = 0
        self._buffer: list[pa.Table] = []
        self._buffered_rows = 0
        # One lock for the buffer and the file writing: the flush thread and the caller's
        # thread both flush, and part numbers must not be handed out twice.
        self._lock = threading.Lock()
        self._closed = False
        self._flush_error: BaseException | None = None
        self._stop = threading.Event()

        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Resolved, so that out_dir="." still puts temporary files beside it, not in it.
        resolved_dir = self.out_dir.resolve()
        self._tmp_dir = resolved_dir.parent
        self._tmp_prefix = f".{resolved_dir.name}."
        for stale in self._tmp_dir.glob(f"{self._tmp_prefix}part-*{TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)  # a part that a crashed writer did not finish
        numbers = [
            int(match.group(1))
            for path in self.out_dir.iterdir()
            if (match := PART_PATTERN.fullmatch(path.name))
        ]
        self._next_part = max(numbers, default=0) + 1

        self._thread: threading.Thread | None = None
        if flush_interval_s is not None:
            self._thread = threading.Thread(
                target=self._flush_loop, args=(flush_interval_s,), name="recording-flush"
            )
            # Daemon, so that a program that never closes its writer still exits; the rows
            # buffered at that moment are then lost, exactly as in a crash.
            self._thread.daemon = True
            self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def buffered_rows(self) -> int:
        return self._buffered_rows

    def append(self, batch: Batch) -> None:
        """Buffer a batch of samples (see :func:`batch_to_table` for the accepted forms).

        The batch is validated here, so a bad sample raises :class:`RecordingError` in the
        caller (and nothing is buffered) instead of failing a later flush. While flushes fail,
        the batch is buffered and :class:`RecordingWriteError` raised: do not append it again.
        """
        table = batch_to_table(batch)
        with self._lock:
            if self._closed:
                raise RecordingError(f"{self.out_dir}: writer is closed")
            if table.num_rows:
                self._buffer.append(table)
                self._buffered_rows += table.num_rows
            if self._buffered_rows >= self.max_buffered_rows:
                self._try_flush_locked()
            if self._flush_error is not None:
                raise RecordingWriteError(
                    f"{self.out_dir}: flush failed, {self._buffered_rows} rows kept buffered:"
                    f" {self._flush_error}"
                ) from self._flush_error

    def flush(self) -> None:
        """Write the buffered rows as a new part file now (nothing if the buffer is empty).

        Raises :class:`RecordingWriteError` if that fails; the rows stay buffered.
        """
        with self._lock:
            if self._closed:
                raise RecordingError(f"{self.out_dir}: writer is closed")
            self._flush_or_raise_locked()

    def close(self) -> None:
        """Stop the flush thread and write the remaining rows.

        Idempotent once it has succeeded; if the last flush fails it raises
        :class:`RecordingWriteError`, and calling it again tries again.
        """
        if self._closed and not self._buffer:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._closed = True
            self._flush_or_raise_locked()

    def _flush_or_raise_locked(self) -> None:
        if not self._try_flush_locked():
            raise RecordingWriteError(
                f"{self.out_dir}: flush failed, {self._buffered_rows} rows not written:"
                f" {self._flush_error}"
            ) from self._flush_error

    def _try_flush_locked(self) -> bool:
        """Flush; on failure keep the rows and the error (logged once per run of failures)."""
        try:
            self._flush_locked()
        except Exception as exc:
            if self._flush_error is None:
                log.warning(
                    "recording flush failed, rows kept buffered: %s",
                    exc,
                    extra={"out_dir": str(self.out_dir), "buffered_rows": self._buffered_rows},
                )
            self._flush_error = exc
            return False
        return True

    def _flush_locked(self) -> None:
        if not self._buffer:
            self._flush_error = None
            return
        table = pa.concat_tables(self._buffer)
        name = f"part-{self._next_part:08d}.parquet"
        _write_parquet_atomically(
            table,
            self.out_dir / name,
            self._tmp_dir / f"{self._tmp_prefix}{name}{TMP_SUFFIX}",
            source=self.source,
            row_group_rows=max(table.num_rows, 1),
        )
        # The buffer is cleared only once the part is safely on disk: after a failed write
        # (disk full, say) the rows are still there for the next attempt.
        self._next_part += 1
        self._buffer.clear()
        self._buffered_rows = 0
        self.rows_written += table.num_rows
        self.parts_written += 1
        if self._flush_error is not None:
            log.info("recording flush succeeded again", extra={"out_dir": str(self.out_dir)})
            self._flush_error = None

    def _flush_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                if self._closed:
                    return
                # A failure is kept (and reported by the next append) and tried again on the
                # next interval: a full disk may well be cleared up.
                self._try_flush_locked()


# --- reading -------------------------------------------------------------------------------


def _check_metadata(metadata: Mapping[bytes, bytes] | None, what: str) -> None:
    """Reject files of another format or of a newer version; accept files without metadata.

    Files without the metadata are accepted because pandas and polars drop it when a
    recording is filtered and written back; the column check still applies to them.
    """
    if not metadata or META_FORMAT not in metadata:
        return
    name = metadata[META_FORMAT].decode(errors="replace")
    if name != FORMAT_NAME:
        raise RecordingError(f"{what}: format is {name!r}, not {FORMAT_NAME!r}")
    raw_version = metadata.get(META_FORMAT_VERSION, b"")
    try:
        version = int(raw_version)
    except ValueError:
        raise RecordingError(f"{what}: invalid format_version {raw_version!r}") from None
    if version > FORMAT_VERSION:
        raise RecordingError(
            f"{what}: format_version {version} is newer than this program's ({FORMAT_VERSION})"
        )


def _has_parquet_magic(path: Path) -> bool:
    """Whether ``path`` starts as a Parquet file does (a damaged one still does)."""
    with path.open("rb") as file:
        return file.read(4) == b"PAR1"


def read_recording(path: str | os.PathLike[str]) -> pa.Table:
    """Read a recording (one Parquet file, or a directory of them) and validate its schema.

    Returns a table whose first columns are exactly :data:`RECORDING_SCHEMA` (types cast where
    lossless, a missing ``demand_bytes`` added as nulls) and whose metadata is the first
    file's. In a directory, files whose names start with "." or "_" are skipped. Raises
    :class:`RecordingError` naming every missing or mistyped column, and
    :class:`FileNotFoundError` if ``path`` does not exist.
    """
    source = Path(path)
    what = str(source)
    if not source.exists():
        raise FileNotFoundError(f"no recording at {source}")
    try:
        dataset = ds.dataset(source, format="parquet")
        files: Sequence[str] = dataset.files
        if source.is_dir() and not files:
            # A live recorder's directory before its first flush: an empty recording.
            return RECORDING_SCHEMA.empty_table()
        table = dataset.to_table()
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        if source.is_file() and not _has_parquet_magic(source):
            raise RecordingError(
                f"{what} is not a recording (a Parquet file written by `record` or "
                "`import-trace`); to replay a trace, convert it with import-trace"
            ) from None
        raise RecordingError(f"{what}: not a readable Parquet recording: {exc}") from None
    metadata = table.schema.metadata
    _check_metadata(metadata, what)
    recording_columns = {
        name: table[name] for name in table.column_names if name in RECORDING_SCHEMA.names
    }
    # In a file, every column but the optional ones is part of the format, nullable or not: a
    # file without one was not written as a recording, and filling in nulls would hide that.
    file_columns = [name for name in RECORDING_SCHEMA.names if name not in OPTIONAL_COLUMNS]
    columns = _check_columns(recording_columns, what, required=file_columns, floats_as_ints=False)
    extra = [name for name in table.column_names if name not in RECORDING_SCHEMA.names]
    fields = [*RECORDING_SCHEMA, *(table.schema.field(name) for name in extra)]
    schema_metadata: dict[bytes | str, bytes | str] = dict(metadata.items()) if metadata else {}
    return pa.Table.from_arrays(
        [*columns.values(), *(table[name] for name in extra)],
        schema=pa.schema(fields, metadata=schema_metadata),
    )


DEFAULT_STEP_S: Final = 60.0
"""The sampling interval assumed when a recording has no guest with two samples."""


def median_step_s(ts_s: Any, first: Any) -> float:
    """Median time between a guest's consecutive samples, :data:`DEFAULT_STEP_S` if none.

    ``ts_s`` holds the samples grouped by guest, each guest's in time order; ``first`` (bool,
    same length) marks each guest's first sample.
    """
    import numpy as np

    gaps = np.diff(ts_s)[~first[1:]]
    gaps = gaps[gaps > 0]
    return float(np.median(gaps)) if len(gaps) else DEFAULT_STEP_S


class GuestSeries:
    """A recording's samples sorted by guest, then time, with each guest's rows contiguous.

    Samples that repeat a guest's previous timestamp are dropped, as the fleet drops them (out
    of order). Shared by the simulator and the learned policy's training, so both read a
    recording the same way. Sorting works on integer codes of (host, guest): far cheaper than
    comparing millions of strings.
    """

    def __init__(self, table: pa.Table) -> None:
        import numpy as np
        import pyarrow.compute as pc

        from autoscaler.fleet import estimate_demand

        self.table = table
        key = pc.binary_join_element_wise(table.column("host"), table.column("guest"), "\x00")  # type: ignore[call-overload]
        encoded = pc.dictionary_encode(key).combine_chunks()
        ts_all = np.asarray(table.column("ts").to_numpy(), dtype=np.float64)
        codes_all = np.asarray(encoded.indices.to_numpy(), dtype=np.int64)
        order = np.lexsort((ts_all, codes_all))
        codes, ts = codes_all[order], ts_all[order]
        keep = np.r_[True, (codes[1:] != codes[:-1]) | (ts[1:] > ts[:-1])]
        self.order, self.codes, self.ts_s = order[keep], codes[keep], ts[keep]
        self.first = np.r_[True, self.codes[1:] != self.codes[:-1]]
        """True on each guest's first row."""
        self.boundaries = np.flatnonzero(np.r_[self.first, True])
        """Row where each guest starts, and the end."""
        self.ram_bytes = self.column("ram_bytes")
        derived, self.alloc_bytes = estimate_demand(
            self.ram_bytes,
            self.column("actual"),
            total_bytes=self.column("total-memory"),
            available_bytes=self.column("available-memory"),
            free_bytes=self.column("free-memory"),
            caches_bytes=self.column("disk-caches"),
        )
        recorded = self.column("demand_bytes")
        # A trace's own demand column, where present, wins over the estimate from the stats.
        self.demand_bytes = np.where(np.isnan(recorded), derived, recorded)
        firsts = self.order[self.boundaries[:-1]]
        self.hosts = [str(v) for v in table.column("host").take(firsts).to_pylist()]
        self.guests = [str(v) for v in table.column("guest").take(firsts).to_pylist()]

    def __len__(self) -> int:
        return len(self.ts_s)

    @property
    def step_s(self) -> float:
        """Median time between a guest's consecutive samples (see :func:`median_step_s`)."""
        return median_step_s(self.ts_s, self.first)

    def column(self, name: str) -> Any:
        """A column as float64 in series order; NaN where null or absent."""
        import numpy as np

        if name not in self.table.column_names:
            return np.full(len(self.order), np.nan)
        raw = self.table.column(name).to_numpy(zero_copy_only=False)
        return np.asarray(raw, dtype=np.float64)[self.order]
