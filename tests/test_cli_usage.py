"""The command line as a user meets it: output in pipes, bad inputs, help texts."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from autoscaler.cli import main
from tests.test_simulate import small_recording


def test_simulate_in_a_pipe_writes_one_plain_line_per_policy(tmp_path: Path) -> None:
    recording = small_recording(tmp_path / "r.parquet", guests=2, steps=120)
    result = CliRunner().invoke(
        main,
        [
            *("simulate", str(recording), "--out", str(tmp_path / "out")),
            *("--policy", "threshold", "--policy", "static"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    done = [line for line in result.stderr.splitlines() if " steps in " in line]
    assert [line.split(":")[0] for line in done] == ["threshold", "static"]


def test_simulate_on_a_csv_says_it_is_not_a_recording(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("vm_id,timestamp_s,mem_capacity_kb,mem_usage_kb\n1,0,1024,512\n")
    result = CliRunner().invoke(main, ["simulate", str(trace)])
    assert result.exit_code == 2
    assert (
        f"{trace} is not a recording (a Parquet file written by `record` or `import-trace`); "
        "to replay a trace, convert it with import-trace"
    ) in result.stderr
    assert "footer" not in result.output
