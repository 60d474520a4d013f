"""The installed ``balloon-autoscaler`` program, run as an operator would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import autoscaler
from tests.helpers import PROGRAM, REPO, Broker, read_until, reaped, start_program


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROGRAM, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def test_public_names_are_sorted_and_importable() -> None:
    assert autoscaler.__all__ == sorted(set(autoscaler.__all__))
    for name in autoscaler.__all__:
        assert hasattr(autoscaler, name), name


def test_help_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "check-config", "policies"):
        assert command in result.stdout
    run_help = run_cli("run", "--help")
    assert "--config" in run_help.stdout and "SIGTERM" in run_help.stdout


def test_policies_lists_threshold_with_parameters() -> None:
    result = run_cli("policies", "-v")
    assert result.returncode == 0
    assert "threshold" in result.stdout
    assert "high_watermark = 0.3" in result.stdout


def test_unknown_policy_exits_2_naming_it() -> None:
    result = run_cli("run", env={"BALLOON_AUTOSCALER_POLICY__NAME": "nope"})
    assert result.returncode == 2
    assert "unknown policy 'nope'" in result.stderr


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[controller]\ninterval_s = -1\n")
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "controller.interval_s" in result.stderr


def test_run_logs_json_and_stops_cleanly_on_sigterm(mosquitto: Broker, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\ntopic_prefix = "cli-test"\n'
        '[controller]\ninterval_s = 0.5\n[log]\nformat = "json"\n'
    )
    process = start_program(config, stdout=subprocess.PIPE)
    lines: list[str] = []
    with reaped(process):
        assert process.stderr is not None
        read_until(process.stderr, "connected to MQTT broker", lines)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=10)
        elapsed_s = time.monotonic() - started
    assert process.returncode == 0, rest
    assert elapsed_s < 5.0
    records = [json.loads(line) for line in [*lines, *rest.splitlines()] if line.strip()]
    messages = [r["msg"] for r in records]
    assert "controller started" in messages
    assert "controller stopped" in messages
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)


def test_sighup_reloads_policy_and_rejects_a_bad_config(mosquitto: Broker, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    base = (
        f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\ntopic_prefix = "hup"\n'
        '[log]\nformat = "json"\n'
    )
    config.write_text(base)
    process = start_program(config)
    lines: list[str] = []
    with reaped(process):
        assert process.stderr is not None
        read_until(process.stderr, "connected to MQTT broker", lines)
        config.write_text(base + "[policy.params]\nhigh_watermark = 0.45\n")
        process.send_signal(signal.SIGHUP)
        reloaded = json.loads(read_until(process.stderr, "configuration reloaded", lines))
        assert "high_watermark=0.45" in reloaded["policy"]

        config.write_text(base + "[policy.params]\nlow_watermark = 0.9\n")
        process.send_signal(signal.SIGHUP)
        rejected = json.loads(read_until(process.stderr, "reload rejected", lines))
        assert "low_watermark" in rejected["msg"]
        assert process.poll() is None  # still running, on the previous configuration

        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    assert process.returncode == 0


def test_sighup_while_starting_is_ignored_not_fatal(mosquitto: Broker, tmp_path: Path) -> None:
    """``systemctl reload`` right after a start: a SIGHUP that arrives while ``run`` still reads
    its configuration (here: while it waits on a FIFO for it) must not end the daemon."""
    config = tmp_path / "config.fifo"
    os.mkfifo(config)
    process = start_program(
        config,
        env={
            **os.environ,
            "BALLOON_AUTOSCALER_MQTT__HOST": mosquitto.host,
            "BALLOON_AUTOSCALER_MQTT__PORT": str(mosquitto.port),
            "BALLOON_AUTOSCALER_MQTT__TOPIC_PREFIX": "hup-at-start",
        },
    )
    lines: list[str] = []
    with reaped(process):
        with config.open("w") as fifo:  # opens once run() opens the file: past its first line
            process.send_signal(signal.SIGHUP)
            fifo.write("# nothing to change\n")
        assert process.stderr is not None
        read_until(process.stderr, "connected to MQTT broker", lines)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
    assert process.returncode == 0, "".join(lines)
