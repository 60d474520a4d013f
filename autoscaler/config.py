"""Configuration: one TOML file, overridden by ``BALLOON_AUTOSCALER_*`` environment variables.

Every option lives here with its default; ``config.example.toml`` documents each one and a test
checks the two agree. Unknown keys are errors (a typo must not silently keep a default).
Nested keys use ``__`` in the environment: ``BALLOON_AUTOSCALER_MQTT__PORT=1884``.

Exceptions::

    ConfigError             the configuration cannot be used; the message names the key
    └── AgentConfigError    the agent cannot run with it (service.agent)
"""

from __future__ import annotations

import difflib
import os
import socket
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from autoscaler.stats import HISTORY_CHANNELS, N_STATS

ENV_PREFIX = "BALLOON_AUTOSCALER_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
"""The configuration file, for every command that takes ``--config``."""
MAX_RUN_ENV = f"{ENV_PREFIX}MAX_RUN_S"
"""Seconds after which ``run``, ``agent``, ``record`` and ``demo`` stop as SIGTERM would stop
them: a bound for smoke tests of the long-running commands."""
SIM_MAX_STEPS_ENV = f"{ENV_PREFIX}SIM_MAX_STEPS"
"""``simulate --max-steps``: a short replay for smoke tests."""
COMMAND_LINE_ENV = frozenset({CONFIG_ENV, MAX_RUN_ENV, SIM_MAX_STEPS_ENV})
"""Variables under the prefix that the command line reads; they name no settings section."""
MAX_BYTES = 2**50
"""No memory amount beyond 1 PiB is meant (the stats wire contract's bound for a guest's RAM)."""
DAY_S = 86_400.0
FLEET_MEMORY_BUDGET_BYTES = 4 * 2**30
"""What the fleet's tables may take: ``controller.max_guests`` × ``history_len`` must fit."""


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


class _Section(BaseModel):
    # No setting takes NaN or infinity: an infinite interval never ticks, an infinite timeout
    # never fires, and NaN compares false with every bound.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """``true`` is not a number, though pydantic would read it as 1."""
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if field is not None and field.annotation in (int, float) and _is_boolean(value):
                    raise ValueError(f"{key} must be a number, not {str(value).lower()}")
        return data


def _is_boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _not_boolean(value: Any) -> Any:
    if _is_boolean(value):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


def _not_a_path_segment(value: str) -> str:
    if value in (".", ".."):
        raise ValueError(f"{value!r} is not an id (it names a directory)")
    return value


class MqttSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = "balloon/v1"
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_id: str | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(0.5, ge=0.01, le=3600)
    reconnect_max_s: float = Field(30.0, ge=0.01, le=3600)


class ControllerSettings(_Section):
    interval_s: float = Field(10.0, ge=0.01, le=3600)
    stale_after_s: float = Field(60.0, ge=0.1, le=DAY_S)
    max_guests: int = Field(100_000, ge=1, le=1_000_000)
    guest_ttl_s: float = Field(600.0, ge=1, le=7 * DAY_S)
    history_len: int = Field(32, ge=2, le=4096)
    adapter_timeout_s: float = Field(5.0, ge=0.01, le=600)
    adapter_concurrency: int = Field(64, ge=1, le=10_000)
    shutdown_timeout_s: float = Field(5.0, ge=0.1, le=600)
    replica_id: Annotated[str, AfterValidator(_not_a_path_segment)] = Field(
        "", pattern=r"^[A-Za-z0-9._-]{0,128}$"
    )
    presence_ttl_s: float = Field(30.0, ge=1, le=3600)
    max_clock_skew_s: float = Field(30.0, gt=0, le=86_400.0)
    max_batch_guests: int = Field(1024, ge=1, le=16_384)


class PolicySettings(_Section):
    name: str = "threshold"
    params: dict[str, Any] = Field(default_factory=dict)


class GuardSettings(_Section):
    floor_bytes: int = Field(256 * 2**20, ge=0, le=MAX_BYTES)
    floor_share: float = Field(0.10, ge=0, le=1)
    ceiling_share: float = Field(1.0, gt=0, le=1)
    max_inflate_bps: float = Field(32 * 2**20, ge=0, le=2**40)
    max_inflate_share_per_s: float = Field(0.003, ge=0, le=1)
    max_deflate_step_bytes: int = Field(64 * 2**30, ge=0, le=MAX_BYTES)
    max_deflate_step_share: float = Field(1.0, ge=0, le=1)
    dead_band_bytes: int = Field(16 * 2**20, ge=0, le=MAX_BYTES)
    dead_band_share: float = Field(0.01, ge=0, le=1)
    emergency_swap_in_bps: float = Field(64 * 2**20, gt=0, le=2**40)
    emergency_deflate_share: float = Field(0.25, gt=0, le=1)
    emergency_deflate_bytes: int = Field(512 * 2**20, ge=0, le=MAX_BYTES)
    emergency_min_interval_s: float = Field(10.0, ge=0, le=3600)
    emergency_available_bytes: int = Field(32 * 2**20, ge=0, le=MAX_BYTES)
    emergency_major_faults_ps: float = Field(2000.0, gt=0, le=1e9)
    device_latency_s: float = Field(2.0, ge=0, le=600)
    headroom_min_bytes: int = Field(64 * 2**20, ge=0, le=MAX_BYTES)
    headroom_max_share: float = Field(0.25, ge=0, le=1)
    headroom_factor: float = Field(1.5, ge=1, le=100)
    prior_growth_bps: float = Field(16 * 2**20, ge=0, le=2**40)
    growth_half_life_s: float = Field(3600.0, gt=0, le=30 * 86_400)
    trouble_hold_s: float = Field(900.0, ge=0, le=7 * 86_400)
    trouble_half_life_s: float = Field(7200.0, gt=0, le=30 * 86_400)
    host_budget_share: float = Field(0.0, ge=0, le=1)
    host_budget_headroom_share: float = Field(0.10, ge=0, le=1)
    shares: dict[
        str, Annotated[float, BeforeValidator(_not_boolean), Field(gt=0, le=1_000_000)]
    ] = Field(default_factory=dict)


class MqttAdapterSettings(_Section):
    qos: int = Field(1, ge=0, le=2)
    retain: bool = True


class QmpSettings(_Section):
    socket_glob: str = "/run/qemu/*.qmp"
    stats_interval_s: int = Field(1, ge=1, le=3600)


class LibvirtSettings(_Section):
    uri: str = "qemu:///system"
    stats_interval_s: int = Field(1, ge=1, le=3600)


class FirecrackerSettings(_Section):
    socket_glob: str = "/run/firecracker/*.sock"
    stats_interval_s: int = Field(1, ge=1, le=3600)


class AdapterSettings(_Section):
    kind: str = "dry-run"
    params: dict[str, Any] = Field(default_factory=dict)
    mqtt: MqttAdapterSettings = MqttAdapterSettings()
    qmp: QmpSettings = QmpSettings()
    libvirt: LibvirtSettings = LibvirtSettings()
    firecracker: FirecrackerSettings = FirecrackerSettings()


class AgentSettings(_Section):
    mode: Literal["host", "guest"] = "host"
    host_id: str = Field(default_factory=socket.gethostname)
    guest_id: str = Field(default_factory=socket.gethostname)
    interval_s: float = Field(2.0, ge=0.1, le=3600)
    ram_bytes: int = Field(0, ge=0, le=MAX_BYTES)
    batch: bool = False
    adapter_timeout_s: float = Field(5.0, ge=0.01, le=600)
    shutdown_timeout_s: float = Field(5.0, ge=0.1, le=600)


class MetricsSettings(_Section):
    port: int = Field(0, ge=0, le=65535)
    host: str = "0.0.0.0"


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    mqtt: MqttSettings = MqttSettings()
    controller: ControllerSettings = ControllerSettings()
    policy: PolicySettings = PolicySettings()
    guards: GuardSettings = GuardSettings()
    adapter: AdapterSettings = AdapterSettings()
    agent: AgentSettings = AgentSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.mqtt.reconnect_max_s < self.mqtt.reconnect_min_s:
            raise ValueError("mqtt.reconnect_max_s must be >= mqtt.reconnect_min_s")
        if (self.mqtt.tls_cert is None) != (self.mqtt.tls_key is None):
            raise ValueError("mqtt.tls_cert and mqtt.tls_key go together")
        return self

    @model_validator(mode="after")
    def _fleet_fits_memory(self) -> Settings:
        needed = fleet_bytes(self.controller.max_guests, self.controller.history_len)
        if needed > FLEET_MEMORY_BUDGET_BYTES:
            raise ValueError(
                f"controller.max_guests × controller.history_len would take {needed / 2**30:.1f} "
                f"GiB of fleet tables, more than {FLEET_MEMORY_BUDGET_BYTES // 2**30} GiB: "
                "lower one of them"
            )
        return self


def fleet_bytes(max_guests: int, history_len: int) -> int:
    """What a full fleet's per-guest tables take: the history (float32) and the float64 stats
    and rates dominate; the other columns are a few float64 each."""
    history = history_len * len(HISTORY_CHANNELS) * 4
    stats_and_rates = 2 * N_STATS * 8
    other_columns = 22 * 8
    return max_guests * (history + stats_and_rates + other_columns)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (TOML, optional), then the environment; ``overrides`` win over both."""
    if path is not None:
        try:
            with path.open("rb") as file:
                tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None

    _check_environment()

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    try:
        loaded = _FromFile(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    except SettingsError as exc:
        raise ConfigError(
            f"invalid configuration in the environment: {exc}: {exc.__cause__}"
        ) from None
    return Settings.model_construct(
        **{name: getattr(loaded, name) for name in Settings.model_fields}
    )


def _check_environment() -> None:
    """A misspelt section in a variable name would otherwise be silently ignored."""
    sections = {name.upper() for name in Settings.model_fields}
    for variable in os.environ:
        # Names are matched regardless of case, as pydantic-settings reads them.
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in COMMAND_LINE_ENV:
            continue
        section = name[len(ENV_PREFIX) :].split("__", 1)[0]
        if section not in sections:
            names = sorted(s.lower() for s in sections)
            raise ConfigError(
                f"environment variable {variable}: no configuration section {section.lower()!r}"
                f"{did_you_mean(section.lower(), names)} (sections: {', '.join(names)})"
            )


def _section_keys(loc: tuple[int | str, ...]) -> list[str] | None:
    """The keys the section at ``loc`` allows, or None where any key goes (a parameter table)."""
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:
            return None
        model = sections[0]
    return list(model.model_fields)


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    """``"; did you mean PREFIX+X?"`` for the closest of ``choices``, or nothing when none is."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for error in exc.errors():
        loc = error["loc"]
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"]
        keys = _section_keys(loc[:-1]) if error["type"] == "extra_forbidden" and loc else None
        if keys is not None:
            section = ".".join(str(part) for part in loc[:-1])
            suggestion = did_you_mean(str(loc[-1]), keys, f"{section}." if section else "")
            listing = f"keys of {section}" if section else "sections"
            message = "unknown key" + (suggestion or f" ({listing}: {', '.join(keys)})")
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with secrets masked, for ``check-config`` and logs."""
    data: dict[str, Any] = settings.model_dump(mode="json")  # SecretStr dumps as "**********"
    return data
