"""Checkpoint files: round trip, atomic replacement, and every way a file can be unusable."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from autoscaler import checkpoint
from autoscaler.checkpoint import CheckpointError


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "guest_id": np.array(["vm-1", "vm-2", "vm-ü"]),
        "peaks": rng.integers(0, 65535, size=(3, 288), dtype=np.uint16),
        "first_s": np.array([1.7e9, np.nan, 1.7e9 + 5]),
    }


def test_a_round_trip_gives_back_every_array_and_the_header(tmp_path: Path) -> None:
    path = tmp_path / "state" / "replica-a.ckpt"
    size = checkpoint.save(path, sample_arrays(), version=3, saved_at_s=12.5, replica="a")
    assert size == path.stat().st_size > 3 * 288 * 2
    loaded = checkpoint.load(path, version=3)
    assert loaded.header["replica"] == "a" and loaded.header["saved_at_s"] == 12.5
    for name, array in sample_arrays().items():
        np.testing.assert_array_equal(loaded.arrays[name], array)
        assert loaded.arrays[name].dtype == array.dtype
    assert list(tmp_path.joinpath("state").iterdir()) == [path]  # no temporary left behind


def test_saving_replaces_the_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, {"a": np.zeros(10)}, version=1)
    checkpoint.save(path, {"b": np.ones(4)}, version=1)
    assert set(checkpoint.load(path, version=1).arrays) == {"b"}


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, {"a": np.arange(3)}, version=1)
    with pytest.raises(ValueError, match="object dtype"):
        checkpoint.save(path, {"a": np.arange(3), "bad": np.array([{}], dtype=object)}, version=1)
    np.testing.assert_array_equal(checkpoint.load(path, version=1).arrays["a"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


def test_names_that_are_not_identifiers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="identifier"):
        checkpoint.save(tmp_path / "c.ckpt", {"../x": np.zeros(1)}, version=1)


def written(tmp_path: Path) -> Path:
    path = tmp_path / "c.ckpt"
    checkpoint.save(path, sample_arrays(), version=2)
    return path


def test_a_truncated_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = written(tmp_path)
    data = path.read_bytes()
    for keep in (0, 10, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=r"c\.ckpt: unreadable checkpoint"):
            checkpoint.load(path, version=2)


def test_a_corrupted_array_is_an_error(tmp_path: Path) -> None:
    path = written(tmp_path)
    data = bytearray(path.read_bytes())
    at = data.index(b"peaks.npy") + 200  # inside the peaks member's data
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        checkpoint.load(path, version=2)


def test_another_version_is_an_error_naming_both(tmp_path: Path) -> None:
    path = written(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint version 2, this version reads 3"):
        checkpoint.load(path, version=3)


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ({"other.txt": b"hello"}, "no header.json"),
        ({"header.json": b'{"format": "something-else", "version": 2}'}, "not a balloon"),
        ({"header.json": b"[1, 2]"}, "not a balloon"),
        ({"header.json": b"{not json"}, "unreadable checkpoint"),
    ],
)
def test_a_foreign_file_is_an_error(tmp_path: Path, members: dict[str, bytes], reason: str) -> None:
    path = tmp_path / "c.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(CheckpointError, match=reason):
        checkpoint.load(path, version=2)


def test_a_pickled_array_never_loads(tmp_path: Path) -> None:
    path = written(tmp_path)
    with zipfile.ZipFile(path, "a") as archive, archive.open("evil.npy", "w") as member:
        np.lib.format.write_array(member, np.array([{}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        checkpoint.load(path, version=2)


def test_no_file_and_not_a_zip_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.ckpt", version=1)
    (tmp_path / "text.ckpt").write_text("state")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        checkpoint.load(tmp_path / "text.ckpt", version=1)
