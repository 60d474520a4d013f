"""The adapter interface: an async ``set_target`` that raises typed errors.

:class:`Adapter` applies targets; :class:`DeviceAdapter` also lists and reads local guests
(QMP, libvirt, Firecracker), for the host agent.

Exceptions::

    AdapterError            anything an adapter could not do for one guest
    ├── GuestUnavailable    the guest or its device is gone or unreachable (retried next tick)
    ├── AdapterTimeout      the device did not answer in time
    └── TargetRejected      the device refused the value

An adapter receives a :class:`Target`: which guest, the balloon size in 4 KiB pages, and the
policy and reason behind it (for adapters that pass them on, such as MQTT target commands).

The controller calls ``set_target`` for many guests at once, each under its own timeout, so one
slow or dead guest never holds up the others; a failed target is not recorded and is proposed
again on the next tick.

Timeouts: an adapter bounds its own calls (QMP by :attr:`AdapterContext.adapter_timeout_s`,
Firecracker and libvirt by their ``call_timeout_s``) and cleans up when one expires (a wedged
connection is dropped). Callers run each call through :func:`call_adapter`, whose safety timeout,
:func:`safety_timeout_s`, is longer, so it only catches an adapter that does not bound itself.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, TypeVar

import numpy as np

from autoscaler.stats import PAGE_BYTES

if TYPE_CHECKING:
    from autoscaler.config import Settings
    from autoscaler.service.mqtt import MqttLink

T = TypeVar("T")

SAFETY_FACTOR: Final = 1.5
SAFETY_MARGIN_S: Final = 1.0


@dataclass(slots=True)
class Target:
    """A balloon target for one guest: ``num_pages`` 4 KiB pages in its balloon.

    Adapters read it and never change it. Not frozen on purpose: a frozen dataclass sets each
    field through ``object.__setattr__``, which triples the cost of building the tens of
    thousands a large tick hands over.
    """

    host_id: str
    guest_id: str
    num_pages: int
    ram_bytes: int
    """The guest's boot RAM as last reported (a device may know better: libvirt asks it)."""
    policy: str
    """Name of the policy that chose the target (``emergency`` for an emergency deflate)."""
    reason: str
    ts_s: float
    """When the target was decided."""

    @property
    def target_bytes(self) -> int:
        """The guest allocation this target leaves: ``ram − num_pages × 4096``."""
        return self.ram_bytes - self.num_pages * PAGE_BYTES


class AdapterError(Exception):
    """Base of adapter errors; ``guest_id`` names the guest when known."""

    def __init__(self, message: str, *, guest_id: str = "") -> None:
        super().__init__(message)
        self.guest_id = guest_id


class GuestUnavailable(AdapterError):
    """The guest or its control socket is gone or unreachable."""


class AdapterTimeout(AdapterError):
    """The device did not answer in time."""


class TargetRejected(AdapterError):
    """The device refused the target."""


@dataclass(frozen=True)
class AdapterContext:
    """What an adapter may use from the running program."""

    settings: Settings
    mqtt: MqttLink | None = None
    adapter_timeout_s: float = 5.0
    """How long one adapter call may take: the starting process's setting
    (``controller.adapter_timeout_s`` or ``agent.adapter_timeout_s``)."""


class Adapter(abc.ABC):
    """Applies balloon targets to guests. Subclasses take keyword parameters only."""

    kind: ClassVar[str] = ""
    applies: ClassVar[bool] = True
    """False for an adapter that only pretends (dry run): the decision log says "not applied"."""

    async def start(self, context: AdapterContext) -> None:  # noqa: B027 - optional hook
        """Open connections; called once before the first target."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once at shutdown."""

    @abc.abstractmethod
    async def set_target(self, target: Target) -> None:
        """Apply ``target.num_pages`` to the guest; raise an :class:`AdapterError` on failure."""


@dataclass(frozen=True, slots=True)
class GuestReading:
    """What a local device reports for one guest, in wire units."""

    guest_id: str
    ts_s: float
    ram_bytes: int
    """Boot RAM (maximum allocation)."""
    actual_pages: int | None
    """Balloon size in 4 KiB pages, if the device says."""
    num_pages: int | None
    """The balloon target in force, in 4 KiB pages, if known."""
    values: np.ndarray
    """float64[16] stats in tag order (``autoscaler.stats.STAT_NAMES``), NaN where missing."""


class DeviceAdapter(Adapter):
    """An adapter for devices on this machine, which can also be listed and read.

    The host agent uses it to find local guests, publish their stats and apply the targets
    addressed to them; the controller can use it directly when it runs on the host.
    """

    @abc.abstractmethod
    async def discover(self) -> list[str]:
        """Ids of the guests present now (a vanished guest simply drops out)."""

    @abc.abstractmethod
    async def read(self, guest_id: str) -> GuestReading:
        """Current balloon and stats of one guest; :class:`GuestUnavailable` if it is gone."""


def safety_timeout_s(adapter_timeout_s: float) -> float:
    """The outer bound on one adapter call: enough for the adapter's own timeout to fire first
    and for it to clean up (drop the connection) before the caller gives up on it."""
    return SAFETY_FACTOR * adapter_timeout_s + SAFETY_MARGIN_S


async def call_adapter(
    call: Awaitable[T], *, adapter_timeout_s: float, what: str, guest_id: str = ""
) -> T:
    """Await one adapter call under :func:`safety_timeout_s`; every failure an AdapterError.

    A timeout of the safety bound becomes :class:`AdapterTimeout`, an :class:`AdapterError` is
    passed on (given ``guest_id`` if it has none), and any other exception — a bug in a plugin
    adapter — is wrapped in an :class:`AdapterError`, so that callers handle one type.
    Cancellation is not caught.
    """
    timeout_s = safety_timeout_s(adapter_timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            return await call
    except TimeoutError:
        raise AdapterTimeout(
            f"{what}: no answer within {timeout_s:g} s", guest_id=guest_id
        ) from None
    except AdapterError as exc:
        if not exc.guest_id:
            exc.guest_id = guest_id
        raise
    except Exception as exc:
        raise AdapterError(f"{what}: {exc!r}", guest_id=guest_id) from exc
