"""The ``balloon-autoscaler`` command line."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import orjson

from autoscaler import __version__
from autoscaler.config import (
    CONFIG_ENV,
    MAX_RUN_ENV,
    SIM_MAX_STEPS_ENV,
    ConfigError,
    PolicySettings,
    Settings,
    load_settings,
    redacted,
)
from autoscaler.extras import MissingExtra
from autoscaler.plugins import (
    PluginError,
    available_policies,
    create_adapter,
    create_policy,
    describe_parameters,
)
from autoscaler.service.logs import setup_logging

if TYPE_CHECKING:
    from autoscaler.adapters.base import Adapter
    from autoscaler.policy import Policy

log = logging.getLogger("autoscaler.cli")

CONFIG_HELP = (
    "TOML configuration file (see config.example.toml). Environment variables "
    "BALLOON_AUTOSCALER_<SECTION>__<KEY> override it."
)
POSITIVE = click.FloatRange(min=0, min_open=True)
"""A quantity that must be above zero: a rate, a size, a duration."""

SHORT_SPAN_S = 3600.0
"""Below this, `simulate` warns that its per-day figures are extrapolated."""

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    help=CONFIG_HELP,
)


progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bars on stderr [default: only when stderr is a terminal; otherwise one "
    "line per finished stage].",
)


def want_progress(progress: bool | None) -> bool:
    """Progress bars redraw with carriage returns: only a terminal shows them as bars."""
    return sys.stderr.isatty() if progress is None else progress


def fail(message: str) -> NoReturn:
    """A usage or configuration problem: say what, exit 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def max_run_s() -> float | None:
    """The run-time cap of the long-running commands (``BALLOON_AUTOSCALER_MAX_RUN_S``), if set.

    Read before anything starts, so a bad value exits 2 like any configuration error.
    """
    raw = os.environ.get(MAX_RUN_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        fail(f"{MAX_RUN_ENV}={raw!r}: a number of seconds above 0, or unset")
    return value


def capped(duration_s: float | None, cap_s: float | None) -> float | None:
    """The shorter of a command's own ``--duration`` and the run-time cap."""
    limits = [s for s in (duration_s, cap_s) if s is not None]
    return min(limits) if limits else None


def stop_after(cap_s: float | None) -> None:
    """In a running event loop: once ``cap_s`` has passed, stop as SIGTERM would (the signal
    handlers of ``install_signal_handlers`` take it from there, shutdown timeout included)."""
    if cap_s is None:
        return

    def expire() -> None:
        log.info("%s: %g s have passed, stopping", MAX_RUN_ENV, cap_s)
        signal.raise_signal(signal.SIGTERM)

    asyncio.get_running_loop().call_later(cap_s, expire)


def load(config_path: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config_path, **overrides)
    except ConfigError as exc:
        fail(str(exc))


def configured_plugins(settings: Settings) -> tuple[Policy, Adapter]:
    """The configured policy and adapter (``policy.*``, ``adapter.*``); exit 2 if either fails."""
    try:
        policy = create_policy(settings.policy.name, settings.policy.params)
        adapter = create_adapter(settings.adapter.kind, settings.adapter.params)
    except PluginError as exc:
        fail(str(exc))
    return policy, adapter


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=f"{MAX_RUN_ENV}=SECONDS stops run, agent, record and demo after that many seconds, "
    "as SIGTERM would (with --duration, the shorter wins): a bound for smoke tests.",
)
@click.version_option(__version__, prog_name="balloon-autoscaler")
def main() -> None:
    """Policy-driven memory-balloon autoscaler for virtual machines.

    Guests report virtio-balloon statistics over MQTT; the controller predicts each guest's
    memory pressure with a pluggable policy and moves its balloon so idle memory goes back to
    the host and no guest is starved.
    """


@main.command()
@config_option
@click.option(
    "--policy",
    "policy_spec",
    metavar="NAME[,key=value...]",
    help="Policy to use, parameters after commas, as simulate and demo take it (overrides "
    "policy.name; its parameters are added to policy.params of the same policy, or replace "
    "them for another one).",
)
@click.option("--adapter", "adapter_kind", help="Adapter to use (overrides adapter.kind).")
def run(config_path: Path | None, policy_spec: str | None, adapter_kind: str | None) -> None:
    """Run the controller daemon.

    Subscribes to guest stats on the MQTT broker, decides every controller.interval_s and
    applies targets through the configured adapter. SIGTERM or Ctrl-C stops it gracefully
    within controller.shutdown_timeout_s (a second one exits at once); SIGHUP re-reads the
    configuration (policy, parameters, guards) and keeps the running one if the new one is
    invalid. Configuration errors exit with status 2.
    """
    # A SIGHUP (systemctl reload) that arrives before the reload handler is installed would
    # end the process as if it had exited cleanly, and systemd would not restart it. Nothing
    # runs yet that a reload could change, so it is ignored until then.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from autoscaler.service.controller import Controller
    from autoscaler.service.lifecycle import install_signal_handlers

    spec = parse_policy_spec(policy_spec) if policy_spec is not None else None
    cap_s = max_run_s()

    def with_flags(settings: Settings) -> Settings:
        # Command-line flags win over the file, at start-up and on every reload.
        overrides: dict[str, Any] = {}
        if spec is not None:
            overrides["policy"] = with_policy_spec(settings.policy, *spec)
        if adapter_kind is not None:
            overrides["adapter"] = settings.adapter.model_copy(update={"kind": adapter_kind})
        return settings.model_copy(update=overrides) if overrides else settings

    settings = with_flags(load(config_path))
    setup_logging(settings.log.level, settings.log.format)
    policy, adapter = configured_plugins(settings)

    async def serve() -> None:
        stop = asyncio.Event()
        controller = Controller(settings, policy=policy, adapter=adapter)

        def reload() -> None:
            # Re-read the same file and environment; a bad configuration keeps the running one.
            try:
                controller.reload(with_flags(load_settings(config_path)))
            except (ConfigError, PluginError) as exc:
                log.error("configuration reload rejected, keeping the running one: %s", exc)

        install_signal_handlers(
            stop,
            on_reload=reload,
            on_stop=controller.stop_ingest,
            shutdown_timeout_s=lambda: controller.settings.controller.shutdown_timeout_s,
        )
        stop_after(cap_s)
        await controller.run(stop)

    asyncio.run(serve())


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration, the policy and the adapter; print the effective settings.

    Secrets are masked. Exits 0 when everything resolves, 2 otherwise.
    """
    settings = load(config_path)
    policy, _ = configured_plugins(settings)
    data = redacted(settings)
    data["policy"]["resolved"] = repr(policy)
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    click.echo("configuration OK", err=True)


@main.command()
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Also show each policy's parameters: default, type and what each sets.",
)
def policies(verbose: bool) -> None:
    """List the policies that can be named in policy.name."""
    for name, origin in sorted(available_policies().items()):
        click.echo(f"{name:<12} {origin}")
        if verbose:
            try:
                policy = create_policy(name)
            except PluginError as exc:
                click.echo(f"{'':<12} (cannot load: {exc})")
                continue
            for doc in describe_parameters(type(policy)):
                click.echo(f"{'':<14}{doc.name} = {doc.default}  [{doc.type}]")
                click.echo(f"{'':<16}{doc.description}")


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[,key=value…]`` → (name, params); values are TOML scalars, else strings."""
    name, *pairs = spec.split(",")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--policy {spec!r}: parameters are key=value, got {pair!r}")
        try:
            params[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            params[key.strip()] = raw.strip()
    return name.strip(), params


def policy_from_spec(spec: str) -> Policy:
    """The policy a ``--policy NAME[,key=value...]`` option names; exit 2 if there is none."""
    name, params = parse_policy_spec(spec)
    try:
        return create_policy(name, params)
    except PluginError as exc:
        fail(str(exc))


def with_policy_spec(settings: PolicySettings, name: str, params: dict[str, Any]) -> PolicySettings:
    """``--policy NAME,key=value…`` over policy.name and policy.params: the parameters of the
    configured policy stay unless named again; another policy gets only the given ones."""
    merged = {**settings.params, **params} if name == settings.name else dict(params)
    return settings.model_copy(update={"name": name, "params": merged})


@main.command("import-trace")
@click.option(
    "--format",
    "trace_format",
    type=click.Choice(["bitbrains"]),
    default="bitbrains",
    show_default=True,
    help="Trace format.",
)
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@progress_option
def import_trace(trace_format: str, source: Path, out: Path, progress: bool | None) -> None:
    """Turn a public VM trace into a recording (Parquet) that `simulate` and `train` read.

    bitbrains: the GWA-T-12 CSV (vm_id, timestamp_s, mem_capacity_kb, mem_usage_kb, ...);
    demand = usage, RAM = capacity. Rows without a sample, duplicates and usage above capacity
    are dropped or fixed, and the summary says how many.
    """
    from autoscaler.recordings.traces import TraceError, import_bitbrains

    try:
        summary = import_bitbrains(source, out, progress=want_progress(progress))
    except TraceError as exc:
        fail(str(exc))
    click.echo(summary.to_text())
    click.echo(f"wrote {out}")


@main.command()
@click.argument("recording", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--policy",
    "policy_specs",
    multiple=True,
    metavar="NAME[,key=value...]",
    help="Policy to compare (repeat for several); parameters after commas. Default: threshold.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("simulation"),
    show_default=True,
    help="Directory for summary.json/csv, allocations.parquet and plots.",
)
@config_option
@click.option("--step", "step_s", type=POSITIVE, help="Time step in seconds [default: median].")
@click.option("--host-gib", type=POSITIVE, default=256.0, show_default=True, help="Host memory.")
@click.option(
    "--overcommit",
    type=POSITIVE,
    default=1.5,
    show_default=True,
    help="Guests are placed on a simulated host until their RAM adds up to --host-gib × this.",
)
@click.option(
    "--inflate-mib-s",
    type=POSITIVE,
    default=256.0,
    show_default=True,
    help="Balloon inflate rate of a simulated guest.",
)
@click.option(
    "--deflate-mib-s",
    type=POSITIVE,
    default=1024.0,
    show_default=True,
    help="Balloon deflate rate of a simulated guest.",
)
@click.option(
    "--severe-share",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.10,
    show_default=True,
    help="Deficit share of demand that counts as a severe (OOM-class) event.",
)
@click.option("--guests", "max_guests", type=click.IntRange(min=1), help="Only the first N guests.")
@click.option(
    "--plots/--no-plots",
    default=True,
    show_default=True,
    help="Write tradeoff.png and guests.png (needs the sim extra: matplotlib).",
)
@click.option(
    "--max-steps",
    type=click.IntRange(min=1),
    envvar=SIM_MAX_STEPS_ENV,
    show_envvar=True,
    help="Only the first N time steps (a short run, e.g. for smoke tests).",
)
@progress_option
def simulate(
    recording: Path,
    policy_specs: tuple[str, ...],
    out_dir: Path,
    config_path: Path | None,
    step_s: float | None,
    host_gib: float,
    overcommit: float,
    inflate_mib_s: float,
    deflate_mib_s: float,
    severe_share: float,
    max_guests: int | None,
    plots: bool,
    max_steps: int | None,
    progress: bool | None,
) -> None:
    """Replay a recording through policies, closed loop, and compare them side by side.

    Each policy runs with the guards of the configuration (guards.*) through the same tick
    driver as the daemon; simulated guests follow its targets and report the pressure a real
    guest would. Prints a table and writes summary.json, summary.csv, allocations.parquet,
    tradeoff.png and guests.png (unless --no-plots) into --out.
    """
    import time

    from tqdm import tqdm

    from autoscaler.recordings.recording import RecordingError, read_recording
    from autoscaler.sim.report import require_plotting, table_text, write_outputs
    from autoscaler.sim.simulate import (
        SimulationSettings,
        replay_from_recording,
        settings_dict,
        simulate_policy,
    )

    if plots:
        # Before the simulation, which can take minutes, rather than after it.
        try:
            require_plotting()
        except MissingExtra as exc:
            fail(f"{exc}; or pass --no-plots")
    settings = load(config_path)
    policies = [(spec, policy_from_spec(spec)) for spec in policy_specs or ("threshold",)]
    sim = SimulationSettings(
        step_s=step_s,
        host_bytes=host_gib * 2**30,
        overcommit=overcommit,
        inflate_rate_bps=inflate_mib_s * 2**20,
        deflate_rate_bps=deflate_mib_s * 2**20,
        severe_share=severe_share,
        history_len=settings.controller.history_len,
    )
    try:
        table = read_recording(recording)
    except RecordingError as exc:
        fail(str(exc))
    replay = replay_from_recording(table, sim)
    if max_guests is not None:
        replay = replay.first_guests(max_guests)
    if max_steps is not None:
        replay = replay.first_steps(max_steps)
    guests_n, steps = replay.demand_bytes.shape
    click.echo(
        f"{guests_n} guests, {steps} steps of {replay.step_s:.0f} s "
        f"({steps * replay.step_s / 86400:.1f} days)",
        err=True,
    )
    span_s = steps * replay.step_s
    if span_s < SHORT_SPAN_S:
        click.echo(
            f"warning: the scored span is only {span_s:.0f} s; per-day figures "
            "(changes/guest-day) are extrapolated from it to 86,400 s",
            err=True,
        )
    bars = want_progress(progress)
    runs = []
    for label, policy in policies:
        started = time.perf_counter()
        with tqdm(total=steps, desc=f"{label:<14}", unit="step", disable=not bars) as bar:
            run = simulate_policy(
                replay, policy, settings.guards, sim, label=label, progress=bar.update
            )
        run.metrics["wall_s"] = time.perf_counter() - started
        if not bars:
            click.echo(f"{label}: {steps} steps in {run.metrics['wall_s']:.1f} s", err=True)
        runs.append(run)
    click.echo(table_text(runs))
    written = write_outputs(
        out_dir,
        replay,
        runs,
        plots=plots,
        meta={
            "recording": str(recording),
            "guests": guests_n,
            "steps": steps,
            "step_s": replay.step_s,
            "simulation": settings_dict(sim),
            "guards": settings.guards.model_dump(),
            "policies": {label: repr(policy) for label, policy in policies},
        },
    )
    click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


@main.command()
@config_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Recording directory (Parquet part files; pandas and polars read it directly).",
)
@click.option("--duration", "duration_s", type=POSITIVE, help="Stop after this many seconds.")
@click.option(
    "--flush-s", type=POSITIVE, default=5.0, show_default=True, help="Write a part file this often."
)
def record(
    config_path: Path | None, out_dir: Path, duration_s: float | None, flush_s: float
) -> None:
    """Record every guest's stats from the broker into a recording for `simulate` and `train`.

    A crash loses at most --flush-s seconds. SIGTERM or Ctrl-C stops cleanly.
    """
    from autoscaler.service.lifecycle import install_signal_handlers
    from autoscaler.service.recorder import Recorder

    duration_s = capped(duration_s, max_run_s())
    settings = load(config_path)
    setup_logging(settings.log.level, settings.log.format)

    async def serve() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await Recorder(settings, out_dir, flush_interval_s=flush_s).run(stop, duration_s)

    asyncio.run(serve())


@main.command()
@config_option
@click.option(
    "--mode",
    type=click.Choice(["host", "guest"]),
    help="host: read local guests through a device adapter and apply their targets; "
    "guest: publish this machine's /proc stats (overrides agent.mode).",
)
def agent(config_path: Path | None, mode: str | None) -> None:
    """Publish guest stats to the broker and, in host mode, apply the targets sent back.

    Host mode needs a device adapter (adapter.kind = qmp, libvirt or firecracker); guest mode
    runs inside a VM or container. SIGTERM or Ctrl-C stops it gracefully (a second one exits at
    once). Configuration errors exit with status 2.
    """
    from autoscaler.service.agent import AgentConfigError, create_agent
    from autoscaler.service.lifecycle import install_signal_handlers

    cap_s = max_run_s()
    settings = load(config_path)
    if mode is not None:
        settings = settings.model_copy(
            update={"agent": settings.agent.model_copy(update={"mode": mode})}
        )
    setup_logging(settings.log.level, settings.log.format)
    try:
        daemon = create_agent(settings)
    except AgentConfigError as exc:
        fail(str(exc))

    async def serve() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        stop_after(cap_s)
        await daemon.run(stop)

    asyncio.run(serve())


@main.command()
@click.option(
    "--policy",
    "policy_spec",
    default="threshold",
    show_default=True,
    metavar="NAME[,key=value...]",
    help="Policy the controller runs; parameters after commas.",
)
@click.option(
    "--guests",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Simulated guests (at most the trace's VMs).",
)
@click.option(
    "--speed",
    type=POSITIVE,
    default=300.0,
    show_default=True,
    help="Simulated seconds per second of wall time (300: one 300 s trace step a second).",
)
@click.option(
    "--duration",
    "duration_s",
    type=POSITIVE,
    help="Stop after this many seconds [default: at Ctrl-C].",
)
@click.option(
    "--trace",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Bitbrains CSV to replay [default: $BALLOON_TRACES_DIR/bitbrains-rnd-2013-08.csv.gz "
    "if it is there, else the built-in generator].",
)
@click.option(
    "--synthetic",
    is_flag=True,
    help="Use the built-in generator even if the Bitbrains trace is there.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seeds the generator and the VM pick."
)
def demo(
    policy_spec: str,
    guests: int,
    speed: float,
    duration_s: float | None,
    trace: Path | None,
    synthetic: bool,
    seed: int,
) -> None:
    """Everything embedded: MQTT broker, simulated fleet, controller and a live view.

    Nothing to install or configure: a broker runs in this process on a free loopback port,
    simulated guests replay the Bitbrains trace (--guests of its VMs) or a built-in mix of idle,
    diurnal, bursty and growing guests, publish their stats and obey the targets that the real
    controller sends over MQTT. A terminal shows a live table; a pipe gets a status line every
    two seconds. --duration or Ctrl-C ends it with a summary.
    """
    try:
        from autoscaler.demo.app import DemoOptions
        from autoscaler.demo.app import main as run_demo
    except MissingExtra as exc:
        fail(str(exc))
    from autoscaler.recordings.traces import TraceError, find_trace

    if trace is not None and synthetic:
        fail("--trace and --synthetic exclude each other")
    policy = policy_from_spec(policy_spec)
    options = DemoOptions(
        guests=guests,
        speed=speed,
        duration_s=capped(duration_s, max_run_s()),
        trace=None if synthetic else trace or find_trace(),
        seed=seed,
    )
    try:
        run_demo(options, policy)
    except TraceError as exc:
        fail(str(exc))


@main.command()
@click.argument("recording", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Model path without suffix: writes OUT.skops and its card OUT.json.",
)
@config_option
@click.option(
    "--horizon-s",
    type=POSITIVE,
    default=300.0,
    show_default=True,
    help="Predict each guest's peak demand over this many seconds ahead.",
)
@click.option(
    "--quantile",
    type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
    default=0.9,
    show_default=True,
    help="Quantile of the peak.",
)
@click.option(
    "--margin",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    show_default=True,
    help="Share added to the predicted peak (the policy's default, kept in the card).",
)
@click.option(
    "--headroom-mib",
    type=click.FloatRange(min=0),
    default=128.0,
    show_default=True,
    help="Fixed headroom added to the predicted peak (the policy's default, kept in the card).",
)
@click.option(
    "--validation-days",
    type=POSITIVE,
    default=7.0,
    show_default=True,
    help="The last days of the recording, held out for validation.",
)
@click.option(
    "--warmup-days",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Simulated (not scored) before the validation days, so every policy has history.",
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=1),
    default=400_000,
    show_default=True,
    help="Training samples drawn from the training days (and at most as many validation ones).",
)
@click.option(
    "--max-iter", type=click.IntRange(min=1), default=150, show_default=True, help="Trees."
)
@click.option(
    "--max-leaf-nodes",
    type=click.IntRange(min=2),
    default=15,
    show_default=True,
    help="Leaves per tree at most.",
)
@click.option(
    "--min-samples-leaf",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Training samples per leaf at least.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Row sampling seed.")
@click.option(
    "--replace-shipped",
    is_flag=True,
    help="Allow --out in the package's own models directory, to retrain a shipped model.",
)
@progress_option
def train(
    recording: Path,
    out: Path,
    config_path: Path | None,
    horizon_s: float,
    quantile: float,
    margin: float,
    headroom_mib: float,
    validation_days: float,
    warmup_days: float,
    max_rows: int,
    max_iter: int,
    max_leaf_nodes: int,
    min_samples_leaf: int,
    seed: int,
    replace_shipped: bool,
    progress: bool | None,
) -> None:
    """Train the learned policy (`regressor`) on a recording and validate it on later days.

    Splits by time (the last --validation-days are never trained on), fits a quantile
    HistGradientBoostingRegressor of each guest's peak demand over --horizon-s, saves it with
    skops as OUT.skops with its model card OUT.json, then reports on the validation days:
    pinball loss, coverage, and the simulator's metrics for regressor, threshold and vpa side
    by side. Use the model with policy.params.model_path = "OUT.skops".
    """
    import contextlib
    import shlex
    import time
    from collections.abc import Iterator

    from tqdm import tqdm

    from autoscaler.learn.train import TrainingError, TrainSettings
    from autoscaler.learn.train import train as train_model
    from autoscaler.recordings.recording import RecordingError
    from autoscaler.sim.report import table_text
    from autoscaler.sim.simulate import SimulationSettings
    from policies.regressor import ModelError, shipped_models_dir

    shipped_dir = shipped_models_dir().resolve()
    if out.resolve().parent == shipped_dir and not replace_shipped:
        fail(
            f"--out {out} is in the package's own models directory ({shipped_dir}), whose "
            "models are listed as shipped; write elsewhere (--out my-models/NAME) and name "
            "the model by its path in policy.params.model_path, or pass --replace-shipped to "
            "retrain a shipped model"
        )
    settings = load(config_path)
    train_settings = TrainSettings(
        horizon_s=horizon_s,
        quantile=quantile,
        margin=margin,
        headroom_bytes=headroom_mib * 2**20,
        validation_days=validation_days,
        warmup_days=warmup_days,
        max_rows=max_rows,
        max_iter=max_iter,
        max_leaf_nodes=max_leaf_nodes,
        min_samples_leaf=min_samples_leaf,
        seed=seed,
    )
    try:
        train_settings.validate()
    except ValueError as exc:
        fail(str(exc))

    bars = want_progress(progress)

    @contextlib.contextmanager
    def bar(stage: str, total: int) -> Iterator[tqdm[Any]]:
        started = time.perf_counter()
        with tqdm(total=total, desc=f"{stage:<18}", disable=not bars) as b:
            yield b
        if not bars:
            click.echo(f"{stage}: done in {time.perf_counter() - started:.1f} s", err=True)

    # Every training option, spelled out in declaration order, so the card says exactly how to
    # make the model again whatever defaults a later version has.
    context = click.get_current_context()
    options = [
        f"--{param.name.replace('_', '-')}={context.params[param.name]}"
        for param in context.command.params
        if param.name
        and param.name not in ("recording", "out", "config_path", "replace_shipped", "progress")
    ]
    command = shlex.join(
        ["balloon-autoscaler", "train", str(recording), "--out", str(out), *options]
    )
    sim = SimulationSettings(history_len=settings.controller.history_len)
    try:
        report = train_model(
            recording,
            out,
            train_settings,
            guards=settings.guards,
            sim=sim,
            progress=bar,
            log=lambda line: click.echo(line, err=True),
            command=command,
        )
    except (TrainingError, RecordingError, ModelError) as exc:
        fail(str(exc))
    p = {key: report.prediction.get(key, float("nan")) for key in ("pinball_loss", "coverage")}
    covered = report.prediction.get("coverage_with_margin", float("nan"))
    click.echo(
        f"validation days: pinball loss {p['pinball_loss']:.5f} (q={quantile}); "
        f"coverage {100 * p['coverage']:.2f}% (real peaks at or under the prediction), "
        f"{100 * covered:.2f}% under the allocation (with margin and headroom)"
    )
    click.echo(table_text(report.runs))
    click.echo(
        f"wrote {report.model_path} ({report.model_bytes / 1024:.0f} KiB) and "
        f"{report.card_path}; fit {report.fit_s:.0f} s, total {report.total_s:.0f} s"
    )
