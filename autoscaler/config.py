"""Configuration: one TOML file, overridden by ``BALLOON_AUTOSCALER_*`` environment variables.

Every option lives here with its default; ``config.example.toml`` documents each one and a test
checks the two agree. Unknown keys are errors (a typo must not silently keep a default).
Nested keys use ``__`` in the environment: ``BALLOON_AUTOSCALER_MQTT__PORT=1884``.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "BALLOON_AUTOSCALER_"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    keepalive_s: int = Field(30, ge=5)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)


class ControllerSettings(_Section):
    interval_s: float = Field(10.0, gt=0)
    stale_after_s: float = Field(60.0, gt=0)
    max_guests: int = Field(100_000, ge=1)
    guest_ttl_s: float = Field(600.0, gt=0)
    history_len: int = Field(32, ge=2, le=4096)
    adapter_timeout_s: float = Field(5.0, gt=0)
    adapter_concurrency: int = Field(64, ge=1)
    shutdown_timeout_s: float = Field(5.0, gt=0)
    replica_id: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,128}$")
    max_clock_skew_s: float = Field(30.0, gt=0, le=86_400.0)
    max_batch_guests: int = Field(1024, ge=1, le=16_384)


class PolicySettings(_Section):
    name: str = "threshold"
    params: dict[str, Any] = Field(default_factory=dict)


class GuardSettings(_Section):
    floor_bytes: int = Field(256 * 2**20, ge=0)
    floor_share: float = Field(0.10, ge=0, le=1)
    ceiling_share: float = Field(1.0, gt=0, le=1)
    max_inflate_step_bytes: int = Field(1 * 2**30, ge=0)
    max_inflate_step_share: float = Field(0.10, ge=0, le=1)
    max_deflate_step_bytes: int = Field(64 * 2**30, ge=0)
    max_deflate_step_share: float = Field(1.0, ge=0, le=1)
    dead_band_bytes: int = Field(16 * 2**20, ge=0)
    dead_band_share: float = Field(0.01, ge=0, le=1)
    emergency_swap_in_bps: float = Field(64 * 2**20, gt=0)
    emergency_deflate_share: float = Field(0.25, gt=0, le=1)
    emergency_deflate_bytes: int = Field(512 * 2**20, ge=0)
    emergency_min_interval_s: float = Field(10.0, ge=0)
    host_budget_share: float = Field(0.0, ge=0, le=1)
    host_budget_headroom_share: float = Field(0.10, ge=0, le=1)
    shares: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict
    )


class MqttAdapterSettings(_Section):
    qos: int = Field(1, ge=0, le=2)
    retain: bool = True


class QmpSettings(_Section):
    socket_glob: str = "/run/qemu/*.qmp"
    stats_interval_s: int = Field(2, ge=1)


class LibvirtSettings(_Section):
    uri: str = "qemu:///system"
    stats_interval_s: int = Field(5, ge=1)


class FirecrackerSettings(_Section):
    socket_glob: str = "/run/firecracker/*.sock"
    stats_interval_s: int = Field(5, ge=1)


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
    interval_s: float = Field(5.0, gt=0)
    ram_bytes: int = Field(0, ge=0)
    batch: bool = False


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
        if not variable.startswith(ENV_PREFIX) or variable == f"{ENV_PREFIX}CONFIG":
            continue
        section = variable[len(ENV_PREFIX) :].split("__", 1)[0]
        if section not in sections:
            raise ConfigError(
                f"environment variable {variable}: no configuration section {section.lower()!r} "
                f"(sections: {', '.join(sorted(s.lower() for s in sections))})"
            )


def _describe(exc: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {key}: {error['msg']}")
    return "\n".join(lines)


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with secrets masked, for ``check-config`` and logs."""
    data: dict[str, Any] = settings.model_dump(mode="json")  # SecretStr dumps as "**********"
    return data
