"""The policy contract: one vectorised decision for the whole fleet per control tick.

A policy reads a :class:`FleetView` (numpy columns, one row per guest) and returns a
:class:`Decision`: per guest a proposed allocation in bytes (NaN = hold), a predicted pressure
(predicted demand / allocation: above 1 the guest would be short of memory), and a reason code.
Guards post-process every decision (floors, ceilings, steps, dead band, stale data), so a policy
states what it wants and never needs to repeat safety logic. A policy does no I/O: the same
object runs in the daemon and in the simulator.

Conventions, as in scikit-learn estimators: ``__init__`` takes keyword-only parameters and only
stores them; :meth:`Policy.validate` checks them (called once at start-up); state learned or
carried between ticks ends in ``_``.

For simple plugins, :class:`PerGuestPolicy` turns a per-guest method into a fleet decision.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from autoscaler.config import GuardSettings
from autoscaler.stats import STAT_INDEX


class FleetTables(Protocol):
    """What a view reads from the fleet it was taken from (an :class:`autoscaler.fleet.Fleet`,
    which builds views from its guards, so this module cannot name it)."""

    @property
    def guest_ids(self) -> Sequence[str]: ...

    @property
    def hosts(self) -> Sequence[str]: ...

    @property
    def guards(self) -> GuardSettings: ...

    @property
    def urgent(self) -> np.ndarray:
        """Per slot, why ingest last found the guest urgent (0 = not)."""
        ...

    def ordered_history(self, slots: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class FleetView:
    """A read-only snapshot of the tracked guests at ``now_s``; every array has one row a guest.

    Memory columns are bytes (float64, NaN = unknown). ``stats`` holds the latest raw value of
    each of the 16 stat tags; ``rates`` the per-second rate of each cumulative tag from the last
    two samples (NaN for gauges, for a guest's first sample and after a reboot).
    """

    now_s: float
    slots: np.ndarray
    """Stable row index of each guest in the fleet table (int64)."""
    uid: np.ndarray
    """Changes when a slot is reused by another guest: key per-guest policy state on it."""
    host_index: np.ndarray
    ts_s: np.ndarray
    age_s: np.ndarray
    ram_bytes: np.ndarray
    alloc_bytes: np.ndarray
    """Current allocation: ``ram − actual × 4096``."""
    demand_bytes: np.ndarray
    target_pages: np.ndarray
    """The balloon target in force: the device's report if newer than our last command, else
    our last command (NaN if neither is known)."""
    command_pages: np.ndarray
    """Our last command to the balloon, in pages (NaN if none yet)."""
    stats: np.ndarray
    rates: np.ndarray
    host_total_bytes: np.ndarray
    host_available_bytes: np.ndarray
    shares: np.ndarray
    """Relative weight of each guest when a host's memory is shared out (1000 by default)."""
    reaction_s: np.ndarray
    """Seconds from a change in the guest's demand to memory given back: its sampling
    interval + the tick interval + the device's latency (``guards.device_latency_s``)."""
    growth_bps: np.ndarray
    """The fastest demand growth seen lately (bytes/s, decaying; NaN = none seen yet)."""
    headroom_bytes: np.ndarray
    """Memory the guards keep above demand: growth (at least the prior) × reaction time."""
    trouble_floor_bytes: np.ndarray
    """The guest's floor after trouble (OOM kill, near exhaustion …), decaying; 0 if none."""
    trouble_s: np.ndarray
    """When the guest was last in trouble (-inf if never)."""
    since_s: np.ndarray
    """Start of the guest's observed idleness: our last change of its target, its first sample
    or the last time its demand grew. Inflation is paced per second since then."""
    fleet: FleetTables | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.slots)

    def stat(self, name: str) -> np.ndarray:
        return self.stats[:, STAT_INDEX[name]]

    def rate(self, name: str) -> np.ndarray:
        return self.rates[:, STAT_INDEX[name]]

    def guest_id(self, i: int) -> str:
        return self.fleet.guest_ids[int(self.slots[i])] if self.fleet is not None else str(i)

    def host_id(self, i: int) -> str:
        if self.fleet is None:
            return ""
        return self.fleet.hosts[int(self.host_index[i])]

    def history(self) -> np.ndarray:
        """Each guest's window, oldest first: float32[n, history_len, len(HISTORY_CHANNELS)]."""
        if self.fleet is None:
            raise RuntimeError("this view has no fleet history")
        return self.fleet.ordered_history(self.slots)

    def subset(self, rows: np.ndarray) -> FleetView:
        """The same view restricted to ``rows`` (indices or a boolean mask)."""
        return FleetView(
            now_s=self.now_s,
            slots=self.slots[rows],
            uid=self.uid[rows],
            host_index=self.host_index[rows],
            ts_s=self.ts_s[rows],
            age_s=self.age_s[rows],
            ram_bytes=self.ram_bytes[rows],
            alloc_bytes=self.alloc_bytes[rows],
            demand_bytes=self.demand_bytes[rows],
            target_pages=self.target_pages[rows],
            command_pages=self.command_pages[rows],
            stats=self.stats[rows],
            rates=self.rates[rows],
            host_total_bytes=self.host_total_bytes[rows],
            host_available_bytes=self.host_available_bytes[rows],
            shares=self.shares[rows],
            reaction_s=self.reaction_s[rows],
            growth_bps=self.growth_bps[rows],
            headroom_bytes=self.headroom_bytes[rows],
            trouble_floor_bytes=self.trouble_floor_bytes[rows],
            trouble_s=self.trouble_s[rows],
            since_s=self.since_s[rows],
            fleet=self.fleet,
        )


@dataclass(frozen=True, eq=False)
class Decision:
    """A policy's proposal for every guest of a view (arrays of the view's length).

    ``reason`` indexes ``reasons``; a reason text may use ``str.format`` fields named after the
    arrays in ``detail`` (for example ``"available {available_pct:.0f}% > {high_pct:.0f}%"``).
    Texts are formatted only for guests whose target actually changes.
    """

    target_bytes: np.ndarray
    pressure: np.ndarray
    reason: np.ndarray
    reasons: Sequence[str]
    detail: Mapping[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def hold(cls, n: int, reason: str = "hold") -> Decision:
        return cls(
            target_bytes=np.full(n, np.nan),
            pressure=np.full(n, np.nan),
            reason=np.zeros(n, dtype=np.int16),
            reasons=(reason,),
        )

    def validate(self, n: int) -> None:
        """Check that this is a decision for ``n`` guests; :class:`PolicyError` names what is not.

        ``target_bytes``, ``pressure`` and ``reason`` are arrays of shape ``(n,)``: targets and
        pressure of real numbers, targets finite and ≥ 0 or NaN (hold), reasons integer codes
        into ``reasons``; every ``detail`` entry has one value per guest.
        """
        for name in ("target_bytes", "pressure", "reason"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.shape != (n,):
                shape = getattr(array, "shape", type(array).__name__)
                raise PolicyError(f"Decision.{name} must be an array of shape ({n},), not {shape}")
            integer = np.issubdtype(array.dtype, np.integer)
            if not (integer or (name != "reason" and np.issubdtype(array.dtype, np.floating))):
                wanted = "integers" if name == "reason" else "real numbers"
                raise PolicyError(f"Decision.{name} must hold {wanted}, not {array.dtype}")
        target = self.target_bytes
        bad = np.flatnonzero(np.isinf(target) | (target < 0))
        if bad.size:
            raise PolicyError(
                f"Decision.target_bytes must be finite and >= 0, or NaN to hold: "
                f"{target[bad[0]]} for guest {bad[0]}{_more(bad.size)}"
            )
        bad = np.flatnonzero((self.reason < 0) | (self.reason >= len(self.reasons)))
        if bad.size:
            raise PolicyError(
                f"Decision.reason code {self.reason[bad[0]]} of guest {bad[0]} is not an index "
                f"into Decision.reasons ({len(self.reasons)} texts){_more(bad.size)}"
            )
        for key, values in self.detail.items():
            if np.shape(values) != (n,):
                raise PolicyError(
                    f"Decision.detail[{key!r}] must have shape ({n},), not {np.shape(values)}"
                )

    def reason_texts(self, rows: np.ndarray, *, fill: bool = True) -> list[str]:
        """Reason texts of ``rows``, formatted from ``detail`` (one list conversion per column);
        with ``fill`` false, the bare templates."""
        templates = [self.reasons[code] for code in self.reason[rows].tolist()]
        if not fill or not self.detail or not any("{" in t for t in self.reasons):
            return templates
        columns = {key: np.asarray(values)[rows].tolist() for key, values in self.detail.items()}
        texts = []
        for i, template in enumerate(templates):
            if "{" not in template:
                texts.append(template)
                continue
            try:
                texts.append(template.format(**{k: float(v[i]) for k, v in columns.items()}))
            except Exception:  # a template the detail cannot fill: the bare template
                texts.append(template)
        return texts

    def reason_text(self, i: int) -> str:
        """The reason text of guest ``i`` (see :meth:`reason_texts`)."""
        return self.reason_texts(np.array([i]))[0]


def _more(count: int) -> str:
    return f" (and {count - 1} more)" if count > 1 else ""


class PolicyError(Exception):
    """A policy raised or returned something that is not a decision for this view."""


class Policy(abc.ABC):
    """Base class of every policy. Subclasses implement :meth:`decide`."""

    name: ClassVar[str] = ""
    """Short name used in logs, target commands and metrics (the alias for built-ins)."""
    host_aware: ClassVar[bool] = False
    """True if one guest's decision depends on the other guests (host budgets, shares)."""
    param_docs: ClassVar[Mapping[str, str]] = {}
    """One line per constructor parameter saying what it sets (``policies -v`` shows it)."""
    param_unset: ClassVar[Mapping[str, str]] = {}
    """What a parameter whose default is ``None`` means when left unset."""

    @abc.abstractmethod
    def decide(self, view: FleetView) -> Decision:
        """Propose an allocation for every guest in ``view``. Must not do I/O."""

    def validate(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Check the parameters; raise ``ValueError`` naming the bad one."""

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters and their current values (as scikit-learn's ``get_params``)."""
        signature = inspect.signature(type(self).__init__)
        return {
            name: getattr(self, name)
            for name, parameter in signature.parameters.items()
            if name != "self" and parameter.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


@dataclass(frozen=True, slots=True)
class GuestView:
    """One guest's numbers, for :class:`PerGuestPolicy` (bytes; NaN = unknown)."""

    guest_id: str
    host_id: str
    age_s: float
    ram_bytes: float
    alloc_bytes: float
    demand_bytes: float
    stats: Mapping[str, float]
    rates: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class GuestDecision:
    target_bytes: float | None
    """``None`` holds the current allocation."""
    reason: str
    pressure: float = float("nan")


class PerGuestPolicy(Policy):
    """A policy written one guest at a time: implement :meth:`decide_guest`.

    Convenient for plugins and prototypes; it costs a Python call per guest per tick, so
    fleets of many thousands want a vectorised :meth:`Policy.decide` instead.
    """

    @abc.abstractmethod
    def decide_guest(self, guest: GuestView) -> GuestDecision:
        """Propose an allocation for one guest."""

    def decide(self, view: FleetView) -> Decision:
        from autoscaler.stats import STAT_NAMES

        n = len(view)
        target = np.full(n, np.nan)
        pressure = np.full(n, np.nan)
        reason = np.zeros(n, dtype=np.int16)
        codes: dict[str, int] = {}
        for i in range(n):
            guest = GuestView(
                guest_id=view.guest_id(i),
                host_id=view.host_id(i),
                age_s=float(view.age_s[i]),
                ram_bytes=float(view.ram_bytes[i]),
                alloc_bytes=float(view.alloc_bytes[i]),
                demand_bytes=float(view.demand_bytes[i]),
                stats=dict(zip(STAT_NAMES, view.stats[i].tolist(), strict=True)),
                rates=dict(zip(STAT_NAMES, view.rates[i].tolist(), strict=True)),
            )
            result = self.decide_guest(guest)
            if result.target_bytes is not None:
                target[i] = result.target_bytes
            pressure[i] = result.pressure
            reason[i] = codes.setdefault(result.reason, len(codes))
        reasons = sorted(codes, key=codes.__getitem__) or ["hold"]
        return Decision(target, pressure, reason, reasons)
