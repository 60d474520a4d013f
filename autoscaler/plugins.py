"""Resolve policies and adapters by name, strictly, at start-up.

A name is, in this order: a built-in alias (``threshold``), an import path ``module:Class``, or
the name of an installed entry point (groups ``balloon_autoscaler.policies`` and
``balloon_autoscaler.adapters``). A class object is accepted as is. Anything that cannot be
resolved or constructed raises :class:`PluginError` with the name and the cause — never a
warning and a silent fallback.

Exceptions::

    PluginError         a policy or adapter that cannot be found, imported or constructed
    └── ModelError      a model file or card the regressor policy cannot use (policies.regressor)

A policy that fails while deciding is another matter: the tick holds every target and reports
it as a :class:`~autoscaler.tick.PolicyError`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError

from autoscaler.extras import MissingExtra
from autoscaler.policy import Policy

if TYPE_CHECKING:
    from autoscaler.adapters.base import Adapter

POLICY_GROUP: Final = "balloon_autoscaler.policies"
ADAPTER_GROUP: Final = "balloon_autoscaler.adapters"

POLICY_ALIASES: Final[dict[str, str]] = {
    "threshold": "policies.threshold:ThresholdPolicy",
    "static": "policies.static:StaticPolicy",
    "mom": "policies.mom:MomPolicy",
    "proxmox": "policies.proxmox:ProxmoxPolicy",
    "vpa": "policies.vpa:VpaPolicy",
    "regressor": "policies.regressor:RegressorPolicy",
}
ADAPTER_ALIASES: Final[dict[str, str]] = {
    "dry-run": "autoscaler.adapters.dry_run:DryRunAdapter",
    "mqtt": "autoscaler.adapters.mqtt:MqttAdapter",
    "qmp": "autoscaler.adapters.qmp:QmpAdapter",
    "libvirt": "autoscaler.adapters.libvirt:LibvirtAdapter",
    "firecracker": "autoscaler.adapters.firecracker:FirecrackerAdapter",
}

T = TypeVar("T")


class PluginError(Exception):
    """A policy or adapter that cannot be found, imported or constructed."""


def import_from_string(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PluginError(f"{spec!r} is not of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except MissingExtra as exc:
        raise PluginError(str(exc)) from exc
    except Exception as exc:
        raise PluginError(f"cannot import module {module_name!r}: {exc!r}") from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _resolve(kind: str, name: str | type[T], aliases: dict[str, str], group: str) -> object:
    if isinstance(name, type):
        return name
    if name in aliases:
        return import_from_string(aliases[name])
    if ":" in name:
        return import_from_string(name)
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except MissingExtra as exc:
                raise PluginError(str(exc)) from exc
            except Exception as exc:
                raise PluginError(f"{kind} entry point {name!r} failed to load: {exc!r}") from exc
    known = ", ".join(sorted(available(group, aliases))) or "none"
    raise PluginError(f"unknown {kind} {name!r} (known: {known}; or give 'module:Class')")


def available(group: str, aliases: dict[str, str]) -> dict[str, str]:
    """Every resolvable name → where it comes from."""
    names = {name: spec for name, spec in aliases.items()}
    for ep in entry_points(group=group):
        names.setdefault(ep.name, ep.value)
    return names


def available_policies() -> dict[str, str]:
    return available(POLICY_GROUP, POLICY_ALIASES)


def _construct(kind: str, label: str, cls: object, base: type[T], params: dict[str, Any]) -> T:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"{kind} {label!r} resolved to {cls!r}, not a {base.__name__} subclass")
    signature = inspect.signature(cls)
    accepts_any = any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown and not accepts_any:
        takes = ", ".join(signature.parameters) or "no parameters"
        raise PluginError(f"{kind} {label!r} has no parameter {unknown[0]!r} (takes: {takes})")
    _check_param_types(kind, label, cls, params)
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise PluginError(f"{kind} {label!r}: {exc}") from exc


_PARAM_CHECK: Final = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
"""Parameters come from TOML, the environment or the command line: a string is not a number
there, true is not 1, and NaN or infinity is never a usable threshold."""


def _check_param_types(kind: str, label: str, cls: type, params: dict[str, Any]) -> None:
    """Each parameter against its annotation in ``cls.__init__``; a parameter without a usable
    annotation is left to the class itself."""
    try:
        parameters = inspect.signature(cls, eval_str=True).parameters
    except Exception:  # a plugin's annotation that cannot be resolved: nothing to check against
        return
    for name, value in params.items():
        parameter = parameters.get(name)
        if parameter is None or parameter.annotation in (inspect.Parameter.empty, Any):
            # Untyped (or taken by **kwargs): still, no parameter is meant to be NaN or infinite.
            if isinstance(value, float) and not math.isfinite(value):
                raise PluginError(
                    f"{kind} {label!r}: parameter {name!r} must be finite, not {value}"
                )
            continue
        try:
            TypeAdapter(parameter.annotation, config=_PARAM_CHECK).validate_python(value)
        except PydanticSchemaGenerationError:
            continue
        except ValidationError as exc:
            expected = inspect.formatannotation(parameter.annotation)
            problem = exc.errors()[0]["msg"].lower()
            raise PluginError(
                f"{kind} {label!r}: parameter {name!r} must be {expected}, not {value!r} "
                f"({problem})"
            ) from None


@dataclass(frozen=True)
class ParameterDoc:
    """One constructor parameter of a policy, as ``policies -v`` shows it."""

    name: str
    type: str
    default: str
    description: str


def _size_text(value_bytes: float) -> str:
    """A byte count in the largest binary unit it reaches: ``100 MiB``, ``1.5 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value_bytes) >= size:
            return f"{value_bytes / size:.4g} {unit}"
    return f"{value_bytes:.4g} bytes"


def describe_parameters(cls: type[Policy]) -> list[ParameterDoc]:
    """Each keyword parameter of ``cls`` with its type, its default (a ``None`` default as what
    it means, from :attr:`Policy.param_unset`) and its line of :attr:`Policy.param_docs`."""
    docs = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        annotation = parameter.annotation
        if annotation is inspect.Parameter.empty:
            type_text = "any"
        else:
            type_text = (
                annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
            )
        if parameter.default is inspect.Parameter.empty:
            default = "(required)"
        elif parameter.default is None:
            default = f"({cls.param_unset.get(name, 'unset')})"
        else:
            default = repr(parameter.default)
            if name.endswith("_bytes") and isinstance(parameter.default, int | float):
                # 104857600 reads as nothing; the value to type stays first, its size after it.
                default += f" ({_size_text(float(parameter.default))})"
        description = cls.param_docs.get(name, "(no description)")
        docs.append(ParameterDoc(name, type_text, default, description))
    return docs


def create_policy(name: str | type[Policy], params: dict[str, Any] | None = None) -> Policy:
    """Resolve, construct and validate a policy; :class:`PluginError` on any problem."""
    label = name if isinstance(name, str) else name.__name__
    cls = _resolve("policy", name, POLICY_ALIASES, POLICY_GROUP)
    policy = _construct("policy", label, cls, Policy, dict(params or {}))  # type: ignore[type-abstract]
    try:
        policy.validate()
    except (TypeError, ValueError) as exc:
        raise PluginError(f"policy {label!r}: {exc}") from exc
    return policy


def create_adapter(name: str | type[Adapter], params: dict[str, Any] | None = None) -> Adapter:
    from autoscaler.adapters.base import Adapter

    label = name if isinstance(name, str) else name.__name__
    cls = _resolve("adapter", name, ADAPTER_ALIASES, ADAPTER_GROUP)
    return _construct("adapter", label, cls, Adapter, dict(params or {}))  # type: ignore[type-abstract]
