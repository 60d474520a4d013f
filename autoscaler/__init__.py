"""balloon-autoscaler: a policy-driven memory-balloon autoscaler for virtual machines.

The pieces, in the order data flows through them: :mod:`autoscaler.wire` (MQTT topics and
payload validation), :mod:`autoscaler.stats` (stat names and units), :mod:`autoscaler.fleet`
(columnar per-guest state), :mod:`autoscaler.policy` (the policy contract),
:mod:`autoscaler.guards` (safety post-processing), :mod:`autoscaler.tick` (the tick driver),
:mod:`autoscaler.adapters` (applying targets) and :mod:`autoscaler.service.controller` (the
daemon).
"""

from autoscaler.adapters.base import (
    Adapter,
    AdapterContext,
    AdapterError,
    AdapterTimeout,
    GuestUnavailable,
    Target,
    TargetRejected,
)
from autoscaler.config import ConfigError, Settings, load_settings
from autoscaler.fleet import Fleet
from autoscaler.plugins import PluginError, create_adapter, create_policy
from autoscaler.policy import Decision, FleetView, GuestDecision, GuestView, PerGuestPolicy, Policy
from autoscaler.stats import PAGE_BYTES, STAT_NAMES, StatsSample
from autoscaler.tick import TargetChange, TickDriver, TickResult
from autoscaler.wire import PayloadError
from autoscaler.wire import decode_guest_stats as parse_stats_payload

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterContext",
    "AdapterError",
    "AdapterTimeout",
    "ConfigError",
    "Decision",
    "Fleet",
    "FleetView",
    "GuestDecision",
    "GuestUnavailable",
    "GuestView",
    "PAGE_BYTES",
    "PayloadError",
    "PerGuestPolicy",
    "PluginError",
    "Policy",
    "STAT_NAMES",
    "Settings",
    "StatsSample",
    "Target",
    "TargetChange",
    "TargetRejected",
    "TickDriver",
    "TickResult",
    "__version__",
    "create_adapter",
    "create_policy",
    "load_settings",
    "parse_stats_payload",
]
