"""Checkpoint files: named numpy arrays plus a JSON header, written atomically, read defensively.

The format is a NumPy ``.npz`` (a zip archive of ``.npy`` files) read with
``allow_pickle=False``, so loading a file can never run code. The header (``header.json`` in
the archive) names the format, its version and what wrote it; arrays of object dtype are refused
when saving and cannot load. A file is written to a temporary name in the same directory,
flushed to disk, and renamed over the old one: a crash leaves the old checkpoint or the new one,
never half of either.

Whatever is wrong with a file — missing, truncated, corrupted, another program's, another
version — :func:`load` raises :class:`CheckpointError` with the reason; the caller logs it and
starts cold. Checking what the arrays mean (shapes, which columns) is the caller's job.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

FORMAT: Final = "balloon-autoscaler-checkpoint"
HEADER: Final = "header.json"


class CheckpointError(Exception):
    """A checkpoint cannot be used: the message says which file and why."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    header: dict[str, Any]
    """What the writer put in the header, plus ``format`` and ``version``."""
    arrays: dict[str, np.ndarray]


def save(path: Path, arrays: dict[str, np.ndarray], *, version: int, **header: Any) -> int:
    """Write ``arrays`` and ``header`` to ``path`` atomically; returns the file's size in bytes.

    Raises :class:`ValueError` for an array of object dtype or a name that is not a plain
    identifier (both would make the file unreadable without pickle)."""
    for name, array in arrays.items():
        if not name.isidentifier():
            raise ValueError(f"checkpoint array name {name!r} is not an identifier")
        if array.dtype.hasobject:
            raise ValueError(f"checkpoint array {name!r} has object dtype; not storable")
    meta = {"format": FORMAT, "version": version, **header}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            # Stored, not deflated: history is mostly small integers already, and saving 100,000
            # guests must not hold the event loop's thread pool for seconds.
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
                archive.writestr(HEADER, orjson.dumps(meta))
                for name, array in arrays.items():
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.ascontiguousarray(array))
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load(path: Path, *, version: int) -> Checkpoint:
    """Read a checkpoint written by :func:`save` with the same ``version``.

    Raises :class:`CheckpointError` naming the file and the reason for anything else."""
    try:
        with zipfile.ZipFile(path) as archive:
            try:
                meta = orjson.loads(archive.read(HEADER))
            except KeyError:
                raise CheckpointError(f"{path}: not a checkpoint (no {HEADER})") from None
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a {FORMAT} file")
            if meta.get("version") != version:
                raise CheckpointError(
                    f"{path}: checkpoint version {meta.get('version')!r}, this version reads "
                    f"{version}"
                )
            arrays: dict[str, np.ndarray] = {}
            for info in archive.infolist():
                if info.filename == HEADER:
                    continue
                name = info.filename.removesuffix(".npy")
                # Straight from the archive member: no second copy of a large array in memory.
                # The member's CRC is checked as it is read to the end.
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint") from None
    except (OSError, zipfile.BadZipFile, ValueError, orjson.JSONDecodeError, EOFError) as error:
        # zipfile reports a truncated or corrupted archive (bad CRC, short member) as
        # BadZipFile or OSError; numpy a bad .npy header as ValueError.
        raise CheckpointError(f"{path}: unreadable checkpoint: {error}") from None
    return Checkpoint(header=meta, arrays=arrays)
