"""Optional dependencies: the core works without them, and each missing one names its extra.

Each test runs the command line in a fresh interpreter whose imports of the optional packages
fail as if they were not installed (a meta-path finder that raises ImportError for them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.data import small_recording

OPTIONAL = ("qemu", "httpx", "libvirt", "matplotlib", "amqtt", "rich")
"""Top-level modules of every extra (pyproject.toml)."""

BLOCKER = """
import sys

BLOCKED = frozenset(sys.argv[1].split(","))


class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, Blocked())
from autoscaler.cli import main

main(args=sys.argv[2:], prog_name="balloon-autoscaler")
"""


def cli_without(
    blocked: tuple[str, ...], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``balloon-autoscaler ARGS`` with the ``blocked`` top-level modules made unimportable."""
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, ",".join(blocked), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize(
    ("kind", "module", "extra"),
    [
        ("qmp", "qemu", "qmp"),
        ("firecracker", "httpx", "firecracker"),
        ("libvirt", "libvirt", "libvirt"),
    ],
)
def test_an_adapter_without_its_extra_names_the_pip_install(
    kind: str, module: str, extra: str
) -> None:
    done = cli_without((module,), "check-config", env={"BALLOON_AUTOSCALER_ADAPTER__KIND": kind})
    assert done.returncode == 2, done.stderr
    assert f"the {kind} adapter needs" in done.stderr
    assert f"pip install 'balloon-autoscaler[{extra}]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["amqtt", "rich"])
def test_the_demo_without_its_extra_names_the_pip_install(module: str) -> None:
    done = cli_without((module,), "demo", "--synthetic", "--duration", "1")
    assert done.returncode == 2, done.stderr
    assert f"the demo needs {module}: pip install 'balloon-autoscaler[demo]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_simulation_plots_without_matplotlib_name_the_pip_install(tmp_path: Path) -> None:
    recording = small_recording(tmp_path / "r.parquet")
    done = cli_without(("matplotlib",), "simulate", str(recording), "--out", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr
    assert "plotting (simulate's tradeoff.png and guests.png) needs matplotlib" in done.stderr
    assert "pip install 'balloon-autoscaler[sim]'" in done.stderr
    assert "--no-plots" in done.stderr
    assert not (tmp_path / "o").exists()


def test_the_core_runs_without_any_extra(tmp_path: Path) -> None:
    done = cli_without(OPTIONAL, "--help")
    assert done.returncode == 0, done.stderr
    for command in ("run", "agent", "record", "simulate", "check-config", "demo"):
        done = cli_without(OPTIONAL, command, "--help")
        assert done.returncode == 0, (command, done.stderr)

    done = cli_without(
        OPTIONAL, "check-config", env={"BALLOON_AUTOSCALER_ADAPTER__KIND": "dry-run"}
    )
    assert done.returncode == 0, done.stderr

    recording = small_recording(tmp_path / "r.parquet")
    out = tmp_path / "out"
    done = cli_without(
        OPTIONAL,
        "simulate",
        str(recording),
        "--policy",
        "threshold",
        "--policy",
        "regressor",
        "--out",
        str(out),
        "--no-plots",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in out.iterdir()) == [
        "allocations.parquet",
        "summary.csv",
        "summary.json",
    ]
