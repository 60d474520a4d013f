"""The systemd units in deploy/ are valid and start the right commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

UNITS = sorted((REPO / "deploy").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies_with_systemd(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    program = Path(sys.executable).parent / "balloon-autoscaler"
    text = unit.read_text().replace("/opt/balloon-autoscaler/bin/balloon-autoscaler", str(program))
    copy = tmp_path / unit.name
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


@pytest.mark.parametrize(
    ("unit", "command"),
    [("balloon-autoscaler.service", "run"), ("balloon-autoscaler-agent.service", "agent")],
)
def test_unit_runs_the_command_with_a_config(unit: str, command: str) -> None:
    text = (REPO / "deploy" / unit).read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert f"balloon-autoscaler {command} --config /etc/balloon-autoscaler/" in exec_start
    assert "RestartPreventExitStatus=2" in text
