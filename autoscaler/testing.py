"""Conformance checks for policies, for built-ins and plugins alike.

Plugin authors run the same suite as the built-in policies::

    from autoscaler.testing import parametrize_policy_checks

    @parametrize_policy_checks([MyPolicy])
    def test_my_policy(check) -> None:
        check()

Like scikit-learn's ``parametrize_with_checks``, each named check of :data:`CHECKS` is one test
item and raises ``AssertionError`` with a message naming the policy and the rule it broke;
:func:`check_policy` runs them all in one call.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from autoscaler.fleet import Fleet
from autoscaler.plugins import create_policy
from autoscaler.policy import Decision, FleetView, Policy, PolicyError
from autoscaler.stats import N_STATS, STAT_INDEX, StatsSample
from autoscaler.tick import fleet_view

GIB = 2**30


def sample(
    ts_s: float,
    *,
    ram_bytes: float = 4 * GIB,
    actual_pages: float = 0.0,
    **stats: float,
) -> StatsSample:
    """A :class:`StatsSample` from keyword stats: ``available_memory=…`` is ``available-memory``."""
    values = np.full(N_STATS, np.nan)
    for key, value in stats.items():
        values[STAT_INDEX[key.replace("_", "-")]] = value
    return StatsSample(ts_s, ram_bytes, np.nan, actual_pages, values)


class OutOfOrder(Exception):
    """A sample is not newer than the guest's last one (a duplicate or a reordered message)."""


@dataclass(frozen=True, slots=True)
class IngestResult:
    slot: int
    emergency: bool
    """The sample shows trouble (:data:`~autoscaler.fleet.URGENT_REASONS`) and the guest has a
    balloon to give."""
    rebooted: bool
    """A cumulative counter went down: the guest restarted, rates restart from here."""


def ingest(fleet: Fleet, host: str, guest: str, sample: StatsSample, recv_s: float) -> IngestResult:
    """Store one validated sample as the controller does (:meth:`~Fleet.slot_for`, then
    :meth:`~Fleet.ingest_batch`). Raises :class:`~autoscaler.fleet.FleetFull` or
    :class:`OutOfOrder`."""
    slot = fleet.slot_for(host, guest, recv_s)
    result = fleet.ingest_batch(
        np.array([slot]),
        ts_s=np.array([sample.ts_s]),
        ram_bytes=np.array([sample.ram_bytes]),
        num_pages=np.array([sample.num_pages]),
        actual_pages=np.array([sample.actual_pages]),
        values=sample.values[None, :],
        recv_s=recv_s,
    )
    if result.out_of_order:
        raise OutOfOrder(f"ts {sample.ts_s} is not after the guest's last sample")
    return IngestResult(slot, bool(result.emergency.size), bool(result.reboots))


def synthetic_fleet(n: int = 64, *, now_s: float = 1_700_000_000.0, seed: int = 0) -> Fleet:
    """A fleet of ``n`` guests covering the cases a policy must cope with.

    Idle, busy and thrashing guests, guests with a balloon inflated, a guest with no memory
    stats at all, a guest with a single sample (no rates yet), one that rebooted, and stale ones.
    """
    rng = np.random.default_rng(seed)
    fleet = Fleet(max_guests=max(n, 1), epoch_s=now_s - 3600)
    for i in range(n):
        ram = float(rng.choice([1, 2, 4, 8, 16])) * GIB
        balloon_pages = float(rng.integers(0, int(ram // 4096 // 2)))
        alloc = ram - balloon_pages * 4096
        used = float(rng.uniform(0.05, 1.0)) * alloc
        kind = i % 8
        stale_s = 3600.0 if kind == 7 else 0.0
        first = now_s - 20 - stale_s
        base: dict[str, float] = {
            "total_memory": ram,
            "available_memory": max(alloc - used, 0.0),
            "free_memory": max(alloc - used, 0.0) / 2,
            "disk_caches": max(alloc - used, 0.0) / 2,
            "swap_in": 1e6,
            "major_faults": 1e4,
            "oom_kills": 1,
            "alloc_stalls": 3,
        }
        later = dict(base)
        if kind == 2:  # thrashing
            later.update(
                swap_in=base["swap_in"] + 10 * 2**20 * 10, major_faults=base["major_faults"] + 1e5
            )
        if kind == 3:  # OOM kill and stalls
            later.update(oom_kills=2, alloc_stalls=50)
        if kind == 4:  # rebooted: counters went down
            later.update(swap_in=0, major_faults=10, oom_kills=0, alloc_stalls=0)
        if kind == 5:  # no memory stats at all
            base, later = {}, {}
        host = f"h{i % 4}"
        guest = f"g{i}"
        ingest(
            fleet,
            host,
            guest,
            sample(first, ram_bytes=ram, actual_pages=balloon_pages, **base),
            first,
        )
        if kind != 6:  # kind 6: a single sample, so no rates yet
            second = first + 10
            ingest(
                fleet,
                host,
                guest,
                sample(second, ram_bytes=ram, actual_pages=balloon_pages, **later),
                second,
            )
    for h in range(min(n, 4)):
        fleet.ingest_host(f"h{h}", ts_s=now_s, total_bytes=256 * GIB, available_bytes=64 * GIB)
    return fleet


def synthetic_view(n: int = 64, *, now_s: float = 1_700_000_000.0, seed: int = 0) -> FleetView:
    return fleet_view(synthetic_fleet(n, now_s=now_s, seed=seed), now_s)


def _read_only(view: FleetView) -> FleetView:
    for value in vars(view).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return view


@contextlib.contextmanager
def _no_io() -> Iterator[None]:
    """Make file and network access raise while a policy decides."""
    real_open, real_io_open, real_socket = builtins.open, io.open, socket.socket

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("policies must not do I/O in decide()")

    builtins.open = io.open = refuse
    socket.socket = refuse  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        builtins.open, io.open = real_open, real_io_open
        socket.socket = real_socket  # type: ignore[misc]


def _check_decision(label: str, decision: object, view: FleetView) -> Decision:
    n = len(view)
    assert isinstance(decision, Decision), f"{label}: decide() must return a Decision"
    try:
        decision.validate(n)
    except PolicyError as exc:
        raise AssertionError(f"{label}: {exc}") from None
    for i, text in enumerate(decision.reason_texts(np.arange(n))):
        assert isinstance(text, str) and text, f"{label}: empty reason for guest {i}"
    return decision


@dataclass(frozen=True)
class PolicyUnderTest:
    """A policy (name, ``module:Class`` or class) with its parameters, as the checks get it."""

    policy: str | type[Policy]
    params: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        return self.policy if isinstance(self.policy, str) else self.policy.__name__

    def create(self) -> Policy:
        return create_policy(self.policy, self.params)


def check_parameters(subject: PolicyUnderTest) -> None:
    """__init__ stores the parameters unchanged, and get_params/constructor round-trip."""
    label, instance = subject.label, subject.create()
    got = instance.get_params()
    for key, value in (subject.params or {}).items():
        assert got.get(key) == value, f"{label}: parameter {key!r} not stored as given"
    clone = create_policy(type(instance), got)
    assert clone.get_params() == got, f"{label}: get_params() does not round-trip"


def check_empty_fleet(subject: PolicyUnderTest) -> None:
    """A valid decision on a fleet of no guests."""
    empty = synthetic_view(0)
    with _no_io():
        _check_decision(subject.label, subject.create().decide(empty), empty)


def _decide_varied(subject: PolicyUnderTest) -> tuple[FleetView, Decision]:
    # A varied fleet, read-only so that a policy cannot scribble on shared state.
    view = _read_only(synthetic_view(64))
    with _no_io():
        return view, _check_decision(subject.label, subject.create().decide(view), view)


def check_varied_fleet(subject: PolicyUnderTest) -> None:
    """A valid decision on a varied, read-only fleet, without I/O."""
    _decide_varied(subject)


def check_deterministic(subject: PolicyUnderTest) -> None:
    """A fresh instance decides the same on the same view."""
    view, first = _decide_varied(subject)
    with _no_io():
        again = _check_decision(subject.label, subject.create().decide(view), view)
    np.testing.assert_array_equal(
        first.target_bytes, again.target_bytes, err_msg=f"{subject.label}: not deterministic"
    )


def check_no_stats_not_inflated(subject: PolicyUnderTest) -> None:
    """Guests without memory stats are never given a made-up target below their allocation."""
    view, first = _decide_varied(subject)
    no_stats = np.isnan(view.stats).all(axis=1)
    shrunk = no_stats & (first.target_bytes < view.alloc_bytes)
    assert not shrunk.any(), f"{subject.label}: inflates a guest it has no memory stats for"


def check_subset_independent(subject: PolicyUnderTest) -> None:
    """A subset of the fleet gets the same decisions as in the whole fleet (no cross-talk
    through row order), for policies that do not weigh guests against each other."""
    if subject.create().host_aware:
        return
    view, first = _decide_varied(subject)
    rows = np.arange(0, len(view), 3)
    with _no_io():
        sub = _check_decision(
            subject.label, subject.create().decide(view.subset(rows)), view.subset(rows)
        )
    np.testing.assert_array_equal(
        sub.target_bytes, first.target_bytes[rows], err_msg=f"{subject.label}: depends on row order"
    )


PolicyCheck = Callable[[PolicyUnderTest], None]
CHECKS: tuple[PolicyCheck, ...] = (
    check_parameters,
    check_empty_fleet,
    check_varied_fleet,
    check_deterministic,
    check_no_stats_not_inflated,
    check_subset_independent,
)
"""Every conformance check, in the order :func:`check_policy` runs them."""


def policy_checks(
    policy: str | type[Policy], params: dict[str, Any] | None = None
) -> Iterator[tuple[str, Callable[[], None]]]:
    """Each check of :data:`CHECKS` by name, bound to the policy, ready to run."""
    subject = PolicyUnderTest(policy, params)
    for check in CHECKS:
        yield check.__name__, functools.partial(check, subject)


def check_policy(policy: str | type[Policy], params: dict[str, Any] | None = None) -> None:
    """Run every conformance check on a policy (name, ``module:Class`` or class); the first
    that fails raises ``AssertionError`` prefixed with the check's name."""
    for name, run in policy_checks(policy, params):
        try:
            run()
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


_Test = TypeVar("_Test", bound=Callable[..., Any])


def parametrize_policy_checks(
    policies: Iterable[str | type[Policy] | tuple[str | type[Policy], dict[str, Any]]],
) -> Callable[[_Test], _Test]:
    """A pytest decorator giving the test one item per policy and check, so that a failing
    check does not hide the others; the test takes ``check`` and calls it::

        @parametrize_policy_checks(["threshold", (MyPolicy, {"share": 0.25})])
        def test_conformance(check) -> None:
            check()
    """
    import pytest  # only test code calls this: pytest is not a dependency of the package

    items: list[Any] = []
    for entry in policies:
        policy, params = entry if isinstance(entry, tuple) else (entry, None)
        label = PolicyUnderTest(policy, params).label
        suffix = "" if not params else "," + ",".join(f"{k}={v}" for k, v in params.items())
        items.extend(
            pytest.param(run, id=f"{label}{suffix}-{name}")
            for name, run in policy_checks(policy, params)
        )
    mark: Callable[[_Test], _Test] = pytest.mark.parametrize("check", items)
    return mark
