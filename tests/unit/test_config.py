"""Configuration: config.example.toml against the Settings model, loading, errors, secrets, CLI.

The example file documents every option at its default; these tests keep it from drifting from
``autoscaler/config.py`` (every field present, every value the default, no stale keys) and check
the contract of the loader: the environment overrides the file, unknown keys and bad values are
:class:`ConfigError` naming the key, and the broker password never shows.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_origin

import orjson
import pytest
from click.testing import CliRunner, Result
from pydantic import BaseModel, SecretStr

from autoscaler.cli import main
from autoscaler.config import ENV_PREFIX, ConfigError, Settings, load_settings, redacted
from autoscaler.plugins import create_policy
from policies.threshold import ThresholdPolicy

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
HOSTNAME_FIELDS = frozenset({("agent", "host_id"), ("agent", "guest_id")})
"""Fields whose default is this machine's hostname: commented out in the example."""
PASSWORD = "pw-7Qz!never-shown"

SECTION_LINE = re.compile(r"^\[([A-Za-z0-9_.-]+)\]\s*(?:#.*)?$")
KEY_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<key>[a-z_][a-z0-9_]*)\s*=\s*(?P<value>.+)$")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BALLOON_AUTOSCALER_* variable of the calling shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- reading the example file, comments included ---------------------------------------------


@dataclass(frozen=True)
class ExampleKey:
    section: str
    key: str
    value: Any
    commented: bool
    line: int


@dataclass(frozen=True)
class ExampleFile:
    sections: frozenset[str]
    keys: tuple[ExampleKey, ...]

    def get(self, section: str, key: str) -> ExampleKey | None:
        return next((k for k in self.keys if (k.section, k.key) == (section, key)), None)

    def in_section(self, section: str) -> list[ExampleKey]:
        return [k for k in self.keys if k.section == section]


def parse_example(text: str) -> ExampleFile:
    """Table headers and ``key = value`` lines, counting commented-out ``# key = value`` lines.

    Lines before the first table header are prose (they hold environment-variable examples).
    """
    sections: set[str] = set()
    keys: list[ExampleKey] = []
    section: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if header := SECTION_LINE.match(line):
            section = header[1]
            sections.add(section)
            continue
        match = KEY_LINE.match(line)
        if section is None or match is None:
            continue
        value = tomllib.loads(f"value = {match['value']}")["value"]
        keys.append(ExampleKey(section, match["key"], value, match["comment"] is not None, number))
    return ExampleFile(frozenset(sections), tuple(keys))


@pytest.fixture(scope="module")
def example() -> ExampleFile:
    return parse_example(EXAMPLE.read_text(encoding="utf-8"))


# -- the model's layout ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLayout:
    sections: frozenset[str]
    """Every table: nested models and free-form ``dict`` fields (``policy.params``)."""
    free_form: frozenset[str]
    """Tables whose keys belong to a plugin, not to the model."""
    keys: dict[tuple[str, str], Any]
    """(section, key) → default, for every scalar option."""


def _walk(model: type[BaseModel], section: tuple[str, ...]) -> Iterator[tuple[str, str, Any]]:
    """(kind, dotted name, default) for every field, depth first; kind is section/free/key."""
    for name, field in model.model_fields.items():
        dotted = ".".join((*section, name))
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield "section", dotted, None
            yield from _walk(annotation, (*section, name))
        elif annotation is dict or get_origin(annotation) is dict:
            yield "free", dotted, None
        else:
            yield "key", dotted, field.get_default(call_default_factory=False)


def model_layout() -> ModelLayout:
    walked = list(_walk(Settings, ()))
    free = frozenset(name for kind, name, _ in walked if kind == "free")
    sections = frozenset(name for kind, name, _ in walked if kind == "section") | free
    keys = {}
    for kind, name, default in walked:
        if kind == "key":
            section, _, key = name.rpartition(".")
            keys[(section, key)] = default
    return ModelLayout(sections, free, keys)


def test_model_layout_is_walked() -> None:
    """Guard for the walk itself: it must reach nested sections and free-form tables."""
    layout = model_layout()
    assert {"mqtt", "adapter", "adapter.mqtt", "policy.params", "adapter.params"} <= layout.sections
    assert layout.free_form == {"policy.params", "adapter.params", "guards.shares"}
    assert layout.keys[("mqtt", "port")] == 1883
    assert layout.keys[("adapter.mqtt", "qos")] == 1
    assert ("", "mqtt") not in layout.keys


# -- config.example.toml ---------------------------------------------------------------------


def test_example_loads_with_every_value_at_its_default() -> None:
    loaded = load_settings(EXAMPLE).model_dump()
    defaults = Settings().model_dump()
    for section, key in HOSTNAME_FIELDS:
        del loaded[section][key], defaults[section][key]
    assert loaded == defaults


def test_example_has_every_option_of_every_section(example: ExampleFile) -> None:
    layout = model_layout()
    assert sorted(layout.sections - example.sections) == [], "tables missing from the example"
    present = {(k.section, k.key) for k in example.keys}
    assert sorted(set(layout.keys) - present) == [], "options missing from the example"


def test_example_has_no_stale_keys_or_tables(example: ExampleFile) -> None:
    layout = model_layout()
    assert sorted(example.sections - layout.sections) == []
    stale = [
        f"line {k.line}: {k.section}.{k.key}"
        for k in example.keys
        if k.section not in layout.free_form and (k.section, k.key) not in layout.keys
    ]
    assert stale == []
    assert len({(k.section, k.key) for k in example.keys}) == len(example.keys), "duplicate keys"


def test_example_comments_out_exactly_the_options_without_a_fixed_default(
    example: ExampleFile,
) -> None:
    """None defaults and hostname defaults are commented out; everything else is set."""
    for (section, key), default in model_layout().keys.items():
        entry = example.get(section, key)
        assert entry is not None
        should_comment = default is None or (section, key) in HOSTNAME_FIELDS
        assert entry.commented == should_comment, f"{section}.{key} (line {entry.line})"


def test_example_documents_every_option(example: ExampleFile) -> None:
    """Each option, or each group of adjacent options, comes right after a prose comment."""
    lines = [line.strip() for line in EXAMPLE.read_text(encoding="utf-8").splitlines()]
    for entry in example.keys:
        index = entry.line - 2
        while index >= 0 and KEY_LINE.match(lines[index]):
            index -= 1
        assert index >= 0 and lines[index].startswith("#"), (
            f"{entry.section}.{entry.key} (line {entry.line}) has no comment"
        )


def test_example_lists_the_threshold_parameters_at_their_defaults(example: ExampleFile) -> None:
    params = ThresholdPolicy().get_params()
    listed = example.in_section("policy.params")
    assert all(k.commented for k in listed), "params default to empty: list them commented out"
    assert {k.key: k.value for k in listed} == params


def test_example_adapter_params_table_is_empty(example: ExampleFile) -> None:
    assert example.in_section("adapter.params") == []


def test_uncommenting_every_example_gives_a_valid_configuration(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    lines = []
    seen_section = False
    for line in text.splitlines():
        seen_section = seen_section or bool(SECTION_LINE.match(line.strip()))
        if seen_section and (match := KEY_LINE.match(line.strip())) and match["comment"]:
            line = f"{match['key']} = {match['value']}"
        lines.append(line)
    settings = load_settings(write_toml(tmp_path, "\n".join(lines)))
    assert isinstance(settings.mqtt.password, SecretStr)
    assert settings.mqtt.tls_cert is not None and settings.mqtt.tls_key is not None
    assert settings.policy.params == ThresholdPolicy().get_params()
    policy = create_policy(settings.policy.name, settings.policy.params)
    assert policy.get_params() == ThresholdPolicy().get_params()


# -- sources: file and environment -----------------------------------------------------------


def test_no_file_means_defaults() -> None:
    assert load_settings() == Settings()
    assert load_settings().mqtt.port == 1883


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[mqtt]\nhost = "broker.example"\nport = 1999\n\n'
        "[controller]\ninterval_s = 30.0\n\n"
        "[adapter.mqtt]\nretain = true\n",
    )
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQTT__PORT", "1884")
    monkeypatch.setenv("BALLOON_AUTOSCALER_ADAPTER__MQTT__RETAIN", "false")
    monkeypatch.setenv("BALLOON_AUTOSCALER_LOG__FORMAT", "json")
    settings = load_settings(path)
    assert settings.mqtt.port == 1884  # environment over file
    assert settings.mqtt.host == "broker.example"  # file, where the environment says nothing
    assert settings.controller.interval_s == 30.0
    assert settings.adapter.mqtt.retain is False  # two levels of nesting
    assert settings.log.format == "json"  # environment over default


def test_environment_overrides_the_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQTT__PORT", "1884")
    monkeypatch.setenv("BALLOON_AUTOSCALER_ADAPTER__KIND", "mqtt")
    settings = load_settings(EXAMPLE)
    assert (settings.mqtt.port, settings.adapter.kind) == (1884, "mqtt")


def test_policy_params_from_the_environment_as_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path, "[policy.params]\nlow_watermark = 0.05\n")
    monkeypatch.setenv("BALLOON_AUTOSCALER_POLICY__PARAMS", '{"high_watermark": 0.4}')
    settings = load_settings(path)
    assert settings.policy.params == {"low_watermark": 0.05, "high_watermark": 0.4}


def test_adapter_qos_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option can be set from the environment, whose values are strings."""
    monkeypatch.setenv("BALLOON_AUTOSCALER_ADAPTER__MQTT__QOS", "0")
    assert load_settings().adapter.mqtt.qos == 0


def test_the_cli_config_variable_is_not_an_unknown_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_CONFIG", str(EXAMPLE))
    assert load_settings().mqtt.port == 1883


# -- errors ----------------------------------------------------------------------------------


def assert_error_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    """Loading ``text`` fails, naming ``key`` at the start of a line, and the file."""
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    message = str(caught.value)
    assert re.search(rf"(?m)^\s*{re.escape(key)}:", message), message
    assert str(path) in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[mqtt]\nprot = 1884\n", "mqtt.prot"),
        ("[controller]\ninterval = 5.0\n", "controller.interval"),
        ("[guards]\nfloor_byte = 0\n", "guards.floor_byte"),
        ("[adapter.mqtt]\nretained = false\n", "adapter.mqtt.retained"),
        ("[mqt]\nport = 1884\n", "mqt"),
        ("verbose = true\n", "verbose"),
    ],
)
def test_unknown_key_in_the_file_is_an_error_naming_it(tmp_path: Path, text: str, key: str) -> None:
    assert_error_names_key_and_file(tmp_path, text, key)


@pytest.mark.parametrize("value", ["0", "-1000", "nan", "inf"])
def test_a_guest_share_must_be_a_positive_number(tmp_path: Path, value: str) -> None:
    path = write_toml(tmp_path, f'[guards.shares]\n"db-1" = {value}\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "guards.shares.db-1" in str(caught.value)


def test_unknown_key_in_the_environment_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQTT__PROT", "1884")
    with pytest.raises(ConfigError, match=r"mqtt\.prot"):
        load_settings()


def test_unknown_section_in_the_environment_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A typo in the section must not silently keep the default either."""
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQT__HOST", "broker.example")
    with pytest.raises(ConfigError, match=r"(?i)mqt"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BALLOON_AUTOSCALER_MQTT", "not json"),
        ("BALLOON_AUTOSCALER_POLICY__PARAMS", "{high_watermark: 0.4"),
    ],
)
def test_malformed_structured_environment_value_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError):
        load_settings()


def test_invalid_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[mqtt\nport = 1884\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)
    assert "TOML" in str(caught.value)


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(path) in str(caught.value)


def test_directory_instead_of_a_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)
    assert str(tmp_path) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[controller]\ninterval_s = -1.0\n", "controller.interval_s"),
        ("[controller]\ninterval_s = 0\n", "controller.interval_s"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ("[mqtt]\nport = 0\n", "mqtt.port"),
        ('[mqtt]\nport = "eighteen"\n', "mqtt.port"),
        ("[guards]\nfloor_share = 1.5\n", "guards.floor_share"),
        ("[adapter.mqtt]\nqos = 3\n", "adapter.mqtt.qos"),
        ('[log]\nlevel = "verbose"\n', "log.level"),
        ('[agent]\nmode = "both"\n', "agent.mode"),
    ],
)
def test_invalid_value_is_an_error_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert_error_names_key_and_file(tmp_path, text, key)


def test_invalid_value_from_the_environment_is_an_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_CONTROLLER__INTERVAL_S", "-5")
    with pytest.raises(ConfigError, match=r"controller\.interval_s"):
        load_settings()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[mqtt]\nreconnect_min_s = 10.0\nreconnect_max_s = 1.0\n", "reconnect_max_s"),
        ('[mqtt]\ntls_cert = "/etc/client.pem"\n', "tls_key"),
    ],
)
def test_inconsistent_values_are_errors(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(write_toml(tmp_path, text))


# -- secrets ---------------------------------------------------------------------------------


def _assert_hidden(settings: Settings) -> None:
    assert isinstance(settings.mqtt.password, SecretStr)
    assert settings.mqtt.password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert PASSWORD not in repr(settings.mqtt)
    data = redacted(settings)
    assert data["mqtt"]["password"] == "**********"
    assert PASSWORD not in orjson.dumps(data).decode()
    assert PASSWORD not in settings.model_dump_json()


def test_password_from_the_file_is_secret(tmp_path: Path) -> None:
    path = write_toml(tmp_path, f'[mqtt]\nusername = "balloon"\npassword = "{PASSWORD}"\n')
    _assert_hidden(load_settings(path))


def test_password_from_the_environment_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQTT__PASSWORD", PASSWORD)
    _assert_hidden(load_settings(EXAMPLE))


def test_no_password_stays_none() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.mqtt.password is None
    assert redacted(settings)["mqtt"]["password"] is None


def test_configuration_errors_do_not_echo_the_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write_toml(tmp_path, f'[mqtt]\nport = 70000\npassword = ["{PASSWORD}"]\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "mqtt.password" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    path = write_toml(tmp_path, "[mqtt]\nport = 70000\n")
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQTT__PASSWORD", PASSWORD)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "mqtt.port" in str(caught.value)
    assert PASSWORD not in str(caught.value)


# -- the check-config command ----------------------------------------------------------------


def check_config(*args: str) -> Result:
    return CliRunner().invoke(main, ["check-config", *args], catch_exceptions=False)


def test_check_config_accepts_the_example() -> None:
    result = check_config("--config", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    data = orjson.loads(result.stdout)
    assert data["mqtt"]["port"] == 1883
    assert data["policy"]["resolved"].startswith("ThresholdPolicy(")
    assert "configuration OK" in result.stderr


def test_check_config_shows_environment_overrides_and_masks_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQTT__PORT", "1884")
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQTT__PASSWORD", PASSWORD)
    result = check_config("--config", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    data = orjson.loads(result.stdout)
    assert data["mqtt"]["port"] == 1884
    assert data["mqtt"]["password"] == "**********"


def test_check_config_rejects_an_unknown_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_POLICY__NAME", "nope")
    result = check_config("--config", str(EXAMPLE))
    assert result.exit_code == 2
    assert "'nope'" in result.stderr


def test_check_config_rejects_an_unknown_policy_parameter(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[policy.params]\nbogus = 1\n")
    result = check_config("--config", str(path))
    assert result.exit_code == 2
    assert "'bogus'" in result.stderr


def test_check_config_rejects_low_watermark_above_high_watermark(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[policy.params]\nlow_watermark = 0.5\nhigh_watermark = 0.3\n")
    result = check_config("--config", str(path))
    assert result.exit_code == 2
    assert "low_watermark" in result.stderr
    assert "high_watermark" in result.stderr


def test_check_config_rejects_an_unknown_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[mqtt]\nprot = 1884\n")
    result = check_config("--config", str(path))
    assert result.exit_code == 2
    assert "mqtt.prot" in result.stderr
    assert result.stdout == ""


def test_check_config_rejects_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = check_config("--config", str(path))
    assert result.exit_code == 2
    assert str(path) in result.stderr


def test_check_config_reads_the_config_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_CONFIG", str(EXAMPLE))
    monkeypatch.setenv("BALLOON_AUTOSCALER_LOG__LEVEL", "debug")
    result = check_config()
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout)["log"]["level"] == "debug"


def test_check_config_rejects_an_unknown_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_ADAPTER__KIND", "teleport")
    result = check_config("--config", str(EXAMPLE))
    assert result.exit_code == 2
    assert "'teleport'" in result.stderr


# -- absurd values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[controller]\ninterval_s = inf\n", "controller.interval_s"),  # would never tick
        ("[controller]\ninterval_s = 1e-300\n", "controller.interval_s"),  # would spin a core
        ("[controller]\nstale_after_s = nan\n", "controller.stale_after_s"),
        ("[controller]\nguest_ttl_s = inf\n", "controller.guest_ttl_s"),
        ("[controller]\nadapter_timeout_s = inf\n", "controller.adapter_timeout_s"),
        ("[controller]\nshutdown_timeout_s = inf\n", "controller.shutdown_timeout_s"),
        ("[controller]\npresence_ttl_s = inf\n", "controller.presence_ttl_s"),
        ("[controller]\nmax_guests = 1e12\n", "controller.max_guests"),
        ("[controller]\nadapter_concurrency = 1000000000\n", "controller.adapter_concurrency"),
        ('[controller]\nreplica_id = ".."\n', "controller.replica_id"),
        ("[mqtt]\nreconnect_min_s = inf\nreconnect_max_s = inf\n", "mqtt.reconnect_min_s"),
        ("[mqtt]\nkeepalive_s = 1000000\n", "mqtt.keepalive_s"),
        ("[guards]\nemergency_min_interval_s = inf\n", "guards.emergency_min_interval_s"),
        ("[guards]\nemergency_swap_in_bps = inf\n", "guards.emergency_swap_in_bps"),
        ("[guards]\nfloor_bytes = 1e30\n", "guards.floor_bytes"),
        ("[adapter.qmp]\nstats_interval_s = 100000000\n", "adapter.qmp.stats_interval_s"),
        ("[agent]\ninterval_s = inf\n", "agent.interval_s"),
        ("[agent]\nadapter_timeout_s = inf\n", "agent.adapter_timeout_s"),
    ],
)
def test_absurd_values_are_errors_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert_error_names_key_and_file(tmp_path, text, key)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[guards]\nfloor_share = true\n", "floor_share"),
        ("[controller]\nmax_guests = true\n", "max_guests"),
        ('[guards.shares]\n"db-1" = true\n', "guards.shares.db-1"),
    ],
)
def test_true_is_not_a_number(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)) as caught:
        load_settings(write_toml(tmp_path, text))
    assert "not true" in str(caught.value)


def test_fleet_tables_must_fit_the_memory_budget(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[controller]\nmax_guests = 100000\nhistory_len = 4096\n")
    with pytest.raises(ConfigError, match=r"max_guests × controller\.history_len .* GiB"):
        load_settings(path)
    load_settings(write_toml(tmp_path, "[controller]\nmax_guests = 1000\nhistory_len = 4096\n"))


def test_an_absurd_keepalive_exits_2_from_run_naming_it(tmp_path: Path) -> None:
    """It used to pass the settings and crash the MQTT client with a traceback (exit 1)."""
    path = write_toml(tmp_path, "[mqtt]\nkeepalive_s = 1000000\n")
    result = CliRunner().invoke(main, ["run", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "mqtt.keepalive_s" in result.stderr


def test_a_lower_case_variable_with_a_typo_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("balloon_autoscaler_mqqt__port", "1884")
    with pytest.raises(ConfigError, match="balloon_autoscaler_mqqt__port"):
        load_settings()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[policy.params]\nhigh_watermark = "0.4"\n', "'high_watermark' must be float"),
        ("[policy.params]\nhigh_watermark = nan\n", "'high_watermark' must be float"),
        ("[policy.params]\nlow_watermark = true\n", "'low_watermark' must be float"),
        (
            '[policy]\nname = "vpa"\n[policy.params]\nhalf_life_s = "1d"\n',
            "'half_life_s' must be float",
        ),
        (
            '[policy]\nname = "tests.unit.test_policies:HalfIdle"\n[policy.params]\nshare = inf\n',
            "'share' must be float",
        ),
    ],
)
def test_a_wrong_typed_policy_parameter_is_an_error_naming_it(
    tmp_path: Path, text: str, words: str
) -> None:
    result = check_config("--config", str(write_toml(tmp_path, text)))
    assert result.exit_code == 2
    assert words in result.stderr


def test_a_wrong_typed_policy_parameter_on_the_command_line_exits_2() -> None:
    args = ["demo", "--policy", "threshold,high_watermark=abc", "--synthetic", "--duration", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "parameter 'high_watermark' must be float, not 'abc'" in result.stderr


def test_an_untyped_policy_parameter_must_still_be_finite(tmp_path: Path) -> None:
    text = '[policy]\nname = "tests.unit.test_config:Untyped"\n[policy.params]\nlimit = inf\n'
    result = check_config("--config", str(write_toml(tmp_path, text)))
    assert result.exit_code == 2
    assert "parameter 'limit' must be finite" in result.stderr


class Untyped(ThresholdPolicy):
    """A plugin whose parameters have no annotation."""

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = params


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[mqtt]\nhostt = "b"\n', "mqtt.hostt: unknown key; did you mean mqtt.host?"),
        ("[guards]\nfloor_byte = 0\n", "guards.floor_byte: unknown key; did you mean guards."),
        ("[mqt]\nport = 1884\n", "mqt: unknown key; did you mean mqtt?"),
        ("[mqtt]\nzzz = 1\n", "mqtt.zzz: unknown key (keys of mqtt: host, port,"),
    ],
)
def test_an_unknown_key_in_the_file_suggests_the_closest(
    tmp_path: Path, text: str, line: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_toml(tmp_path, text))
    assert line in str(caught.value)


def test_an_unknown_key_in_the_environment_suggests_the_closest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQTT__PROT", "1884")
    with pytest.raises(ConfigError, match=r"mqtt\.prot: unknown key; did you mean mqtt\.port\?"):
        load_settings()
    monkeypatch.delenv("BALLOON_AUTOSCALER_MQTT__PROT")
    monkeypatch.setenv("BALLOON_AUTOSCALER_MQT__PORT", "1884")
    with pytest.raises(ConfigError, match=r"'mqt'; did you mean mqtt\?"):
        load_settings()
