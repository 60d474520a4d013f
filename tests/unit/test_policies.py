"""Every registered policy passes the conformance suite; resolution is strict."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from autoscaler.plugins import PluginError, available_policies, create_adapter, create_policy
from autoscaler.policy import Decision, FleetView, GuestDecision, GuestView, PerGuestPolicy, Policy
from autoscaler.testing import (
    CHECKS,
    check_policy,
    parametrize_policy_checks,
    policy_checks,
    synthetic_view,
)


@parametrize_policy_checks(sorted(available_policies()))
def test_registered_policy_conforms(check: Callable[[], None]) -> None:
    check()


class HalfIdle(PerGuestPolicy):
    """A plugin written one guest at a time: take half of what is available."""

    name = "half-idle"

    def __init__(self, *, share: float = 0.5) -> None:
        self.share = share

    def decide_guest(self, guest: GuestView) -> GuestDecision:
        available = guest.stats["available-memory"]
        if available != available:
            return GuestDecision(None, "no stats")
        return GuestDecision(guest.alloc_bytes - self.share * available, "half of available")


@parametrize_policy_checks([(HalfIdle, {"share": 0.25})])
def test_per_guest_plugin_conforms(check: Callable[[], None]) -> None:
    check()


def test_per_guest_plugin_decides() -> None:
    view = synthetic_view(16)
    decision = HalfIdle().decide(view)
    available = view.stat("available-memory")
    known = ~np.isnan(available)
    np.testing.assert_allclose(
        decision.target_bytes[known], (view.alloc_bytes - 0.5 * available)[known]
    )
    assert {decision.reason_text(i) for i in range(16)} == {"half of available", "no stats"}


def test_plugin_by_import_path() -> None:
    policy = create_policy("tests.unit.test_policies:HalfIdle", {"share": 0.3})
    assert isinstance(policy, HalfIdle) and policy.share == 0.3


class Scribbler(Policy):
    def decide(self, view: FleetView) -> Decision:
        view.alloc_bytes[:] = 0
        return Decision.hold(len(view))


class WrongShape(Policy):
    def decide(self, view: FleetView) -> Decision:
        return Decision.hold(len(view) + 1)


class Leaky(Policy):
    def decide(self, view: FleetView) -> Decision:
        with open("/etc/hostname") as file:  # noqa: PTH123 - the builtin is what is checked
            file.read()
        return Decision.hold(len(view))


class Infinite(Policy):
    def decide(self, view: FleetView) -> Decision:
        return dataclasses.replace(
            Decision.hold(len(view)), target_bytes=np.full(len(view), np.inf)
        )


@pytest.mark.parametrize("cls", [Scribbler, WrongShape, Leaky, Infinite])
def test_conformance_catches_broken_policies(cls: type[Policy]) -> None:
    with pytest.raises((AssertionError, ValueError)):
        check_policy(cls)


def test_check_policy_names_the_failed_check() -> None:
    assert [name for name, _ in policy_checks(WrongShape)] == [c.__name__ for c in CHECKS]
    with pytest.raises(AssertionError, match=r"^check_empty_fleet: WrongShape: Decision\."):
        check_policy(WrongShape)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("nope", {}, "unknown policy 'nope'"),
        ("threshold", {"bogus": 1}, "no parameter 'bogus'"),
        ("no_such_module:Thing", {}, "cannot import module 'no_such_module'"),
        ("autoscaler.policy:Nothing", {}, "has no attribute 'Nothing'"),
        ("autoscaler.config:Settings", {}, "not a Policy subclass"),
        ("threshold", {"high_watermark": "high"}, "policy 'threshold'"),
    ],
)
def test_resolution_errors_name_the_problem(
    name: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(PluginError, match=message):
        create_policy(name, params)


def test_adapters_resolve() -> None:
    assert create_adapter("dry-run").kind == "dry-run"
    with pytest.raises(PluginError, match="unknown adapter 'qmpx'"):
        create_adapter("qmpx")
