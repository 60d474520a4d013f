"""The ``balloon-autoscaler`` command line."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from autoscaler import __version__
from autoscaler.config import ConfigError, Settings, load_settings, redacted
from autoscaler.logs import setup_logging
from autoscaler.plugins import PluginError, available_policies, create_adapter, create_policy

CONFIG_HELP = (
    "TOML configuration file (see config.example.toml). Environment variables "
    "BALLOON_AUTOSCALER_<SECTION>__<KEY> override it."
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BALLOON_AUTOSCALER_CONFIG",
    help=CONFIG_HELP,
)


def fail(message: str) -> NoReturn:
    """A usage or configuration problem: say what, exit 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def load(config_path: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config_path, **overrides)
    except ConfigError as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="balloon-autoscaler")
def main() -> None:
    """Policy-driven memory-balloon autoscaler for virtual machines.

    Guests report virtio-balloon statistics over MQTT; the controller predicts each guest's
    memory pressure with a pluggable policy and moves its balloon so idle memory goes back to
    the host and no guest is starved.
    """


@main.command()
@config_option
@click.option("--policy", "policy_name", help="Policy to use (overrides policy.name).")
@click.option("--adapter", "adapter_kind", help="Adapter to use (overrides adapter.kind).")
def run(config_path: Path | None, policy_name: str | None, adapter_kind: str | None) -> None:
    """Run the controller daemon.

    Subscribes to guest stats on the MQTT broker, decides every controller.interval_s and
    applies targets through the configured adapter. SIGTERM or Ctrl-C stops it gracefully
    (a second one exits at once). Configuration errors exit with status 2.
    """
    from autoscaler.controller import Controller, install_signal_handlers

    overrides: dict[str, Any] = {}
    settings = load(config_path)
    if policy_name is not None:
        overrides["policy"] = settings.policy.model_copy(update={"name": policy_name})
    if adapter_kind is not None:
        overrides["adapter"] = settings.adapter.model_copy(update={"kind": adapter_kind})
    if overrides:
        settings = settings.model_copy(update=overrides)
    setup_logging(settings.log.level, settings.log.format)
    try:
        policy = create_policy(settings.policy.name, settings.policy.params)
        adapter = create_adapter(settings.adapter.kind, settings.adapter.params)
    except PluginError as exc:
        fail(str(exc))

    async def serve() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await Controller(settings, policy=policy, adapter=adapter).run(stop)

    asyncio.run(serve())


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration, the policy and the adapter; print the effective settings.

    Secrets are masked. Exits 0 when everything resolves, 2 otherwise.
    """
    settings = load(config_path)
    try:
        policy = create_policy(settings.policy.name, settings.policy.params)
        create_adapter(settings.adapter.kind, settings.adapter.params)
    except PluginError as exc:
        fail(str(exc))
    data = redacted(settings)
    data["policy"]["resolved"] = repr(policy)
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    click.echo("configuration OK", err=True)


@main.command()
@click.option("--verbose", "-v", is_flag=True, help="Also show each policy's parameters.")
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
            for key, value in policy.get_params().items():
                click.echo(f"{'':<14}{key} = {value!r}")
