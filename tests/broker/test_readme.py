"""Every ``sh`` and ``python`` block of README.md runs as written.

The shell blocks run with ``bash -euo pipefail`` in a scratch copy of the repository (its
``git ls-files``), in README order, as a user would run them one after the other: the install
block creates the ``.venv`` that later blocks use, Quick start's ``balloon.toml`` is used by
"Record, import, simulate". The copy sits beside a link to ``../shared``, so the trace paths of
the README resolve as in a clone. Selecting one item runs the blocks before it first.

What the blocks cannot say is given through the environment, never by editing them: a private
mosquitto (``BALLOON_AUTOSCALER_MQTT__PORT``, and a ``mosquitto_pub`` options file under
``XDG_CONFIG_HOME``), a run-time cap for the daemons (``BALLOON_AUTOSCALER_MAX_RUN_S``) and a
short replay for ``simulate`` (``BALLOON_AUTOSCALER_SIM_MAX_STEPS``).

The Python blocks of "Writing a policy plugin" become ``mypkg/policies.py`` and a test file that
pytest runs, so the example policy passes ``check_policy``. A block that cannot run on a test
machine carries ``<!-- not run by tests/broker/test_readme.py: REASON -->`` right before its
fence and is listed in :data:`NOT_RUN`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pytest

from autoscaler.testing import CHECKS
from tests.helpers import REPO, Broker, start_broker

pytestmark = pytest.mark.readme

README = REPO / "README.md"
SHARED = REPO.parent / "shared"
RUNNABLE = ("sh", "python")
NOT_RUN_MARKER = re.compile(r"<!-- not run by tests/broker/test_readme\.py: (?P<reason>[^>]+?) -->")

NOT_RUN = {
    ("Running against real VMs", "qemu-system-x86_64"): "needs a guest disk image",
    ("Development", ".ci/run"): "installs system packages and runs the whole test suite",
    ("Development", "scripts/test"): "is the test command itself",
}
"""(section, the block's first word) of every block that is not run; nothing else may be."""

MAX_RUN_S = {
    "Try it: the demo": 8.0,
    # Long enough for two samples, the tick that decides on them and one more tick.
    "Quick start": 24.0,
    "Record, import, simulate": 3.0,
}
"""``BALLOON_AUTOSCALER_MAX_RUN_S`` per section: how long its daemons run."""

SIM_MAX_STEPS = 288
"""One day of the Bitbrains month's 300 s steps: the whole month takes minutes per policy."""

PLUGIN_MODULES = {"Writing a policy plugin": "mypkg/policies.py"}
"""Where each section's Python block that is not a test goes, relative to the plugin root."""

BLOCK_TIMEOUT_S = 600.0
"""The first install downloads the dependencies if pip has no cache of them."""

DECISION = re.compile(
    r"target \(dry run, not applied\) host-a/vm-1: num_pages 0 → \d+ "
    r"\(allocation 4\.00 → [0-3]\.\d\d GiB\) \[threshold\] idle: available 75% > "
    r"high watermark 30%"
)
"""The decision line Quick start shows for its idle guest."""


@dataclass
class Block:
    section: str
    index: int
    """1-based, among the section's sh and python blocks."""
    lang: str
    text: str
    line: int
    not_run: str | None = None
    """Why the block is not run, from the marker before its fence."""

    @property
    def id(self) -> str:
        return f"{re.sub(r'[^a-z0-9]+', '-', self.section.lower()).strip('-')}-{self.index}"

    @property
    def first_word(self) -> str:
        return self.text.split(maxsplit=1)[0] if self.text.strip() else ""


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` that are sh or python, with the heading above each."""
    blocks: list[Block] = []
    section = ""
    counts: dict[str, int] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            section = heading.group(1).strip()
        fence = re.match(r"(`{3,})\s*([\w+-]*)", line)
        if not fence:
            i += 1
            continue
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), None
        )
        assert end is not None, f"README.md:{i + 1}: the fence is never closed"
        lang = fence.group(2)
        if lang in RUNNABLE:
            counts[section] = counts.get(section, 0) + 1
            marker = NOT_RUN_MARKER.fullmatch(lines[i - 1].strip()) if i else None
            blocks.append(
                Block(
                    section,
                    counts[section],
                    lang,
                    "\n".join(lines[i + 1 : end]) + "\n",
                    i + 1,
                    marker.group("reason") if marker else None,
                )
            )
        i = end + 1
    return blocks


BLOCKS = parse_blocks(README.read_text())
RUN = [block for block in BLOCKS if block.not_run is None]


def test_only_the_listed_blocks_are_not_run() -> None:
    marked = {(b.section, b.first_word): b.not_run for b in BLOCKS if b.not_run is not None}
    assert marked == NOT_RUN, (
        "blocks with a not-run marker must be exactly the NOT_RUN ones; a new block must run"
    )
    stray = [
        n + 1
        for n, line in enumerate(README.read_text().splitlines())
        if "not run by tests/broker/test_readme.py" in line
    ]
    assert len(stray) == len(NOT_RUN), f"markers away from a fence, lines {stray}"


def test_the_readme_decision_example_has_the_shape_of_a_decision_line() -> None:
    assert DECISION.search(README.read_text()), "Quick start's example decision line"


@dataclass
class Scratch:
    """A copy of the repository that the blocks run in, in README order."""

    root: Path
    repo: Path
    env: dict[str, str]
    broker: Broker
    done: dict[int, str | None] = field(default_factory=dict)
    """Index into RUN of each block run so far → None, or why it failed."""
    daemons: dict[int, subprocess.Popen[str]] = field(default_factory=dict)
    logs: list[TextIO] = field(default_factory=list)

    def run_through(self, position: int) -> None:
        """Run every block before ``position`` that has not run, then check they all passed."""
        for earlier in range(position):
            if earlier not in self.done:
                try:
                    run_block(self, earlier)
                    self.done[earlier] = None
                except BaseException as exc:  # a failure, a skip: later blocks depend on it
                    self.done[earlier] = f"{RUN[earlier].id}: {exc}"
            if self.done[earlier] is not None:
                pytest.skip(f"an earlier block did not run: {self.done[earlier]}")

    def block_env(self, block: Block) -> dict[str, str]:
        env = dict(self.env)
        cap_s = MAX_RUN_S.get(block.section)
        if cap_s is not None:
            env["BALLOON_AUTOSCALER_MAX_RUN_S"] = str(cap_s)
        return env


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scratch]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout: {listed.stderr.strip()}")
    root = tmp_path_factory.mktemp("readme")
    repo = root / "repo"
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file():  # deleted in the work tree but still listed
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    broker = start_broker(root)
    # mosquitto_pub reads default options from $XDG_CONFIG_HOME/mosquitto_pub.
    config_home = root / "config"
    config_home.mkdir()
    (config_home / "mosquitto_pub").write_text(f"-h {broker.host}\n-p {broker.port}\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.upper().startswith("BALLOON_AUTOSCALER_")
        and key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env |= {
        "XDG_CONFIG_HOME": str(config_home),
        "BALLOON_AUTOSCALER_MQTT__PORT": str(broker.port),
        "BALLOON_AUTOSCALER_SIM_MAX_STEPS": str(SIM_MAX_STEPS),
    }
    state = Scratch(root, repo, env, broker)
    yield state
    for daemon in state.daemons.values():
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    for log in state.logs:
        log.close()
    broker.stop()


@pytest.mark.slow
@pytest.mark.parametrize("position", range(len(RUN)), ids=[block.id for block in RUN])
def test_block_runs(scratch: Scratch, position: int) -> None:
    if position in scratch.done:  # run already, for a block after it that was selected first
        failure = scratch.done[position]
        if failure is not None:
            pytest.fail(failure)
        return
    scratch.run_through(position)
    try:
        run_block(scratch, position)
    except BaseException as exc:
        scratch.done[position] = f"{RUN[position].id}: {exc}"
        raise
    scratch.done[position] = None


def run_block(scratch: Scratch, position: int) -> None:
    block = RUN[position]
    if "../shared/" in block.text and not SHARED.is_dir():
        pytest.skip(f"README.md:{block.line} reads ../shared, and {SHARED} is not there")
    daemon = re.search(r"balloon-autoscaler (run|agent|record|demo)\b", block.text)
    assert daemon is None or block.section in MAX_RUN_S, (
        f"README.md:{block.line} starts `{daemon and daemon.group(0)}`: give its section "
        "a run-time cap in MAX_RUN_S"
    )
    if block.lang == "python":
        run_python(scratch, block)
    elif re.search(r"balloon-autoscaler run\b", block.text):
        start_daemon(scratch, position)
    elif block.first_word == "mosquitto_pub":
        publish_to_daemon(scratch, position)
    else:
        result = run_sh(scratch, block)
        check_output(scratch, block, result.stdout + result.stderr)


def bash_command(scratch: Scratch, block: Block) -> list[str]:
    """Writes ``block`` to a script in the scratch root; returns the strict bash line to run it."""
    script = scratch.root / f"{block.id}.sh"
    script.write_text(block.text)
    return ["bash", "-euo", "pipefail", str(script)]


def run_sh(scratch: Scratch, block: Block) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        bash_command(scratch, block),
        cwd=scratch.repo,
        env=scratch.block_env(block),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"README.md:{block.line} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def check_output(scratch: Scratch, block: Block, output: str) -> None:
    """What the README says each block does, beyond exiting 0."""
    repo = scratch.repo
    if "balloon-autoscaler demo" in block.text:
        assert "demo summary: threshold on 50 guests" in output, output
        assert "memory reclaimed" in output, output
    if "balloon-autoscaler --help" in block.text:
        assert "Policy-driven memory-balloon autoscaler" in output, output
        assert "BALLOON_AUTOSCALER_MAX_RUN_S" in output, output
    if "import-trace" in block.text:
        assert (repo / "bitbrains.parquet").is_file(), output
    if "balloon-autoscaler simulate" in block.text:
        written = {path.name for path in (repo / "sim").iterdir()}
        assert written >= {
            "summary.json",
            "summary.csv",
            "allocations.parquet",
            "tradeoff.png",
            "guests.png",
        }, written
        assert "regressor,model_path=bitbrains-2013-08-safe" in output, output


def start_daemon(scratch: Scratch, position: int) -> None:
    """Run a block that ends in a daemon in the background; it stops on its own (run-time cap).

    The commands before the daemon must succeed first: the daemon starts only when they did.
    """
    block = RUN[position]
    command = bash_command(scratch, block)
    log = (scratch.root / f"{block.id}.log").open("w")
    scratch.logs.append(log)
    daemon = subprocess.Popen(
        command,
        cwd=scratch.repo,
        env=scratch.block_env(block),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    scratch.daemons[position] = daemon
    deadline = time.monotonic() + 60
    while "connected to MQTT broker" not in daemon_output(scratch, position):
        assert daemon.poll() is None, (
            f"README.md:{block.line} exited {daemon.returncode} before it connected:\n"
            + daemon_output(scratch, position)
        )
        assert time.monotonic() < deadline, daemon_output(scratch, position)
        time.sleep(0.1)
    assert "configuration OK" in daemon_output(scratch, position)


def daemon_output(scratch: Scratch, position: int) -> str:
    return (scratch.root / f"{RUN[position].id}.log").read_text()


def publish_to_daemon(scratch: Scratch, position: int) -> None:
    """Publish twice (samples need distinct seconds), then find the decision line in the log of
    the section's daemon, which must then stop on its own with status 0."""
    block = RUN[position]
    started = [p for p in scratch.daemons if RUN[p].section == block.section]
    assert started, f"README.md:{block.line}: no daemon runs in {block.section!r} to receive it"
    daemon = scratch.daemons[started[-1]]
    for _ in range(2):
        run_sh(scratch, block)
        time.sleep(1.1)
    cap_s = MAX_RUN_S[block.section]
    try:
        daemon.wait(timeout=cap_s + 15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the daemon did not stop after BALLOON_AUTOSCALER_MAX_RUN_S={cap_s}")
    output = daemon_output(scratch, started[-1])
    assert daemon.returncode == 0, output
    decisions = [line for line in output.splitlines() if "autoscaler.decisions" in line]
    assert decisions, output
    assert DECISION.search(decisions[0]), decisions[0]
    assert "rejected" not in output, output


def run_python(scratch: Scratch, block: Block) -> None:
    """A policy module goes into its package; a test block is run by pytest against it."""
    plugin = scratch.root / "plugin"
    if "def test_" not in block.text:
        module = PLUGIN_MODULES.get(block.section)
        assert module is not None, (
            f"README.md:{block.line}: say in PLUGIN_MODULES where this block's module goes"
        )
        path = plugin / module
        path.parent.mkdir(parents=True, exist_ok=True)
        for package in path.relative_to(plugin).parents:
            (plugin / package / "__init__.py").touch()
        path.write_text(block.text)
        return
    test_file = plugin / f"test_{block.id.replace('-', '_')}.py"
    test_file.write_text(block.text)
    env = dict(scratch.env) | {"PYTHONPATH": str(plugin)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=plugin,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"README.md:{block.line}:\n{result.stdout}\n{result.stderr}"
    # One test item per conformance check, all passing (parametrize_policy_checks).
    assert re.search(rf"\b{len(CHECKS)} passed\b", result.stdout), result.stdout
    assert "failed" not in result.stdout, result.stdout
