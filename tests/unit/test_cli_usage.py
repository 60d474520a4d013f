"""The command line as a user meets it: output in pipes, bad inputs, help texts."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from autoscaler.cli import main
from tests.helpers.data import small_recording


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


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("demo", "--guests", "0"),
        ("demo", "--guests", "-3"),
        ("demo", "--speed", "0"),
        ("simulate", "--guests", "0"),
        ("simulate", "--step", "-300"),
        ("simulate", "--host-gib", "0"),
        ("simulate", "--overcommit", "-1"),
        ("simulate", "--inflate-mib-s", "0"),
        ("simulate", "--severe-share", "1.5"),
        ("record", "--flush-s", "0"),
        ("record", "--duration", "-1"),
        ("train", "--quantile", "1"),
        ("train", "--max-iter", "0"),
        ("train", "--validation-days", "0"),
        ("train", "--headroom-mib", "-1"),
    ],
)
def test_numeric_options_out_of_range_exit_2_naming_the_option(
    tmp_path: Path, command: str, option: str, value: str
) -> None:
    recording = tmp_path / "r.parquet"
    recording.write_bytes(b"")
    args = {
        "demo": ["demo"],
        "simulate": ["simulate", str(recording)],
        "record": ["record", "--out", str(tmp_path / "rec")],
        "train": ["train", str(recording), "--out", str(tmp_path / "m")],
    }[command]
    result = CliRunner().invoke(main, [*args, option, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output


def test_simulate_warns_that_a_short_recording_extrapolates_per_day_figures(
    tmp_path: Path,
) -> None:
    short = small_recording(tmp_path / "short.parquet", guests=2, steps=10)
    result = CliRunner().invoke(main, ["simulate", str(short), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "warning: the scored span is only" in result.stderr
    assert "extrapolated" in result.stderr
    hours = small_recording(tmp_path / "hours.parquet", guests=2, steps=120)
    result = CliRunner().invoke(main, ["simulate", str(hours), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "extrapolated" not in result.stderr


def test_train_refuses_to_write_into_the_shipped_models_directory(tmp_path: Path) -> None:
    from policies.regressor import shipped_model_names, shipped_models_dir

    recording = small_recording(tmp_path / "r.parquet", guests=1, steps=10)
    before = shipped_model_names()
    out = shipped_models_dir() / "mine"
    result = CliRunner().invoke(main, ["train", str(recording), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "models directory" in result.stderr
    assert "--out my-models/NAME" in result.stderr
    assert shipped_model_names() == before
    assert not out.with_suffix(".json").exists()


def test_run_takes_policy_parameters_as_simulate_and_demo_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import autoscaler.service.controller
    import autoscaler.service.lifecycle

    started: list[Any] = []

    class Recorded:
        def __init__(self, settings: Any, *, policy: Any, adapter: Any) -> None:
            started.append((settings, policy))
            self.settings = settings

        def stop_ingest(self) -> None:
            pass

        async def run(self, stop: Any) -> None:
            pass

    monkeypatch.setattr(autoscaler.service.controller, "Controller", Recorded)
    monkeypatch.setattr(
        autoscaler.service.lifecycle, "install_signal_handlers", lambda *a, **k: None
    )
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # run ignores SIGHUP: not here
    config = tmp_path / "c.toml"
    config.write_text('[policy]\nname = "threshold"\nparams = { low_watermark = 0.15 }\n')
    result = CliRunner().invoke(
        main, ["run", "--config", str(config), "--policy", "threshold,high_watermark=0.5"]
    )
    assert result.exit_code == 0, result.output
    settings, policy = started[0]
    assert settings.policy.name == "threshold"
    assert settings.policy.params == {"low_watermark": 0.15, "high_watermark": 0.5}
    assert policy.get_params()["high_watermark"] == 0.5
    assert policy.get_params()["low_watermark"] == 0.15

    result = CliRunner().invoke(main, ["run", "--config", str(config), "--policy", "vpa"])
    assert result.exit_code == 0, result.output
    assert started[1][0].policy.name == "vpa"
    assert started[1][0].policy.params == {}

    result = CliRunner().invoke(main, ["run", "--policy", "threshold,no_such_knob=1"])
    assert result.exit_code == 2
    assert "no_such_knob" in result.stderr
    assert "unknown policy" not in result.stderr


def test_every_option_of_every_command_has_help() -> None:
    def walk(command: click.Command, path: str) -> list[str]:
        missing = [
            f"{path} {param.opts[0]}"
            for param in command.params
            if isinstance(param, click.Option) and not (param.help or "").strip()
        ]
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                missing += walk(sub, f"{path} {name}")
        return missing

    assert walk(main, "balloon-autoscaler") == []


def test_policies_verbose_shows_default_type_and_description_of_each_parameter() -> None:
    from autoscaler.plugins import describe_parameters
    from policies import mom, proxmox, regressor, threshold, vpa

    result = CliRunner().invoke(main, ["policies", "-v"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "= None" not in result.stdout
    assert any(
        "model_path = (the shipped default model, bitbrains-2013-08)  [str | None]" in line
        for line in lines
    )
    i = next(i for i, line in enumerate(lines) if "high_watermark = 0.3  [float]" in line)
    assert "idle guest is inflated" in lines[i + 1]
    # Sizes in bytes also say what they are in a unit people read.
    assert any("max_change_bytes = 104857600 (100 MiB)  [float]" in line for line in lines)
    assert any("min_bytes = 262144000 (250 MiB)  [float]" in line for line in lines)
    for cls in (
        mom.MomPolicy,
        proxmox.ProxmoxPolicy,
        regressor.RegressorPolicy,
        threshold.ThresholdPolicy,
        vpa.VpaPolicy,
    ):
        docs = describe_parameters(cls)
        assert docs, cls
        for doc in docs:
            assert doc.description != "(no description)", (cls.name, doc.name)
            assert doc.description in result.stdout
            assert doc.default != "(unset)", (cls.name, doc.name)


def test_import_trace_in_a_pipe_draws_no_progress_bars(tmp_path: Path) -> None:
    from tests.unit.test_traces import QUIRKY_ROWS, write_csv

    csv_path = write_csv(tmp_path / "t.csv", [line for line, _ in QUIRKY_ROWS])
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(main, ["import-trace", str(csv_path), str(out)])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    assert "reading" not in result.stderr and out.exists()


@pytest.mark.parametrize("value", ["abc", "0", "-1", "inf", "nan"])
def test_a_bad_run_time_cap_exits_2_naming_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_MAX_RUN_S", value)
    result = CliRunner().invoke(main, ["record", "--out", "unused"])
    assert result.exit_code == 2
    assert "BALLOON_AUTOSCALER_MAX_RUN_S" in result.stderr


def test_the_run_time_cap_and_duration_the_shorter_wins() -> None:
    from autoscaler.cli import capped

    assert capped(None, None) is None
    assert capped(86400.0, 3.0) == 3.0
    assert capped(2.0, 3.0) == 2.0
    assert capped(None, 3.0) == 3.0


def test_the_smoke_test_variables_are_not_taken_for_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_MAX_RUN_S", "5")
    monkeypatch.setenv("BALLOON_AUTOSCALER_SIM_MAX_STEPS", "30")
    recording = small_recording(tmp_path / "r.parquet", guests=2, steps=120)
    result = CliRunner().invoke(main, ["simulate", str(recording), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "2 guests, 30 steps of" in result.stderr
