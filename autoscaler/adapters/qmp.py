"""QEMU QMP adapter: one QMP unix socket per guest, on this machine.

Settings: ``adapter.qmp.socket_glob`` (one socket per guest; guest id = file name without
``.qmp``) and ``adapter.qmp.stats_interval_s``. Every QMP call for a guest runs under the
adapter timeout of the process that started it (``agent.adapter_timeout_s`` in the host agent).

QMP commands and their units:

- ``query-memory-size-summary`` → ``base-memory`` + ``plugged-memory``: the guest RAM in bytes
  that QEMU's balloon arithmetic is relative to (``ram_bytes``).
- ``balloon {"value": N}``: N is the target *guest RAM* in bytes, so the balloon is
  ``ram − N``; we send ``N = ram − num_pages × 4096``. QEMU refuses N ≤ 0 and caps N above RAM.
- ``query-balloon`` and the ``BALLOON_CHANGE`` event: ``actual`` guest RAM in bytes, so the
  balloon holds ``(ram − actual) / 4096`` pages. QEMU does not report the target it was given,
  so the adapter remembers the last one it sent.
- ``qom-set <balloon> guest-stats-polling-interval N`` (seconds) makes QEMU ask the guest driver
  for stats every N s; ``qom-get <balloon> guest-stats`` returns them (bytes or counts) with
  ``last-update``, the host wall-clock second they arrived (0: none yet). An unsupported stat
  reads as 2^64−1.

Connections are opened lazily, one per guest, and kept. A guest whose QEMU went away (the
socket refuses, or the connection drops) raises :class:`GuestUnavailable`; its connection is
dropped and the next call tries again. Guests never wait for each other: there is no lock
shared between guests, only a per-guest one around connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Final, TypeVar

from autoscaler.extras import importing

with importing("qemu.qmp", "qmp", "the qmp adapter"):
    from qemu.qmp import ExecuteError, Message, QMPClient, QMPError, Runstate

from autoscaler.adapters.base import (
    AdapterContext,
    AdapterError,
    AdapterTimeout,
    DeviceAdapter,
    GuestReading,
    GuestUnavailable,
    Target,
    TargetRejected,
)
from autoscaler.stats import MAX_NUM_PAGES, PAGE_BYTES, stats_from_qmp
from autoscaler.wire import valid_id

log = logging.getLogger(__name__)

T = TypeVar("T")

SOCKET_SUFFIX: Final = ".qmp"
# Where QEMU puts -device objects: under their id, or numbered when they have none.
DEVICE_CONTAINERS: Final = ("/machine/peripheral", "/machine/peripheral-anon")
# virtio-balloon-pci (and its -transitional/-non-transitional variants), -ccw, and the bare
# virtio-balloon-device used on virtio-mmio machines. The PCI and CCW proxies forward
# guest-stats and guest-stats-polling-interval to the device inside them.
BALLOON_TYPE_PREFIX: Final = "child<virtio-balloon"


def guest_id_of(path: Path) -> str:
    """``/run/qemu/vm-1.qmp`` → ``vm-1``."""
    name = path.name
    return name[: -len(SOCKET_SUFFIX)] if name.endswith(SOCKET_SUFFIX) else path.stem


@dataclass(eq=False)
class _Guest:
    """What the adapter keeps per guest between calls."""

    guest_id: str
    socket_path: Path
    connect_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    client: QMPClient | None = None
    balloon_path: str = ""
    target_pages: int | None = None
    """The last target we sent; QEMU does not report it."""
    actual_bytes: int | None = None
    """Guest RAM after the balloon, from the latest query-balloon or BALLOON_CHANGE event."""

    def on_event(self, event: Message) -> bool:
        """Event filter of the client's default listener: handle the event here, queue nothing.

        Returning False keeps qemu.qmp from queueing the event and from appending it to the
        listener's history, both of which would otherwise grow for as long as the daemon runs.
        """
        if event.get("event") == "BALLOON_CHANGE":
            data = event.get("data")
            actual = data.get("actual") if isinstance(data, dict) else None
            if isinstance(actual, int):
                self.actual_bytes = actual
                log.debug("BALLOON_CHANGE", extra={"guest": self.guest_id, "actual_bytes": actual})
        return False


def _mapping(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise AdapterError(f"unexpected {what} reply: {value!r:.200}")
    return value


def _integer(reply: dict[str, object], key: str, what: str) -> int:
    value = reply.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{what} reply has no integer {key!r}: {reply!r:.200}")
    return value


class QmpAdapter(DeviceAdapter):
    """Reads and sets virtio-balloons of local QEMU guests over QMP (see the module docstring)."""

    kind: ClassVar[str] = "qmp"

    def __init__(self) -> None:
        self._socket_glob = ""
        self._stats_interval_s = 5
        self._timeout_s = 5.0
        self._guests: dict[str, _Guest] = {}

    async def start(self, context: AdapterContext) -> None:
        settings = context.settings
        self._socket_glob = settings.adapter.qmp.socket_glob
        self._stats_interval_s = settings.adapter.qmp.stats_interval_s
        self._timeout_s = context.adapter_timeout_s
        # qemu.qmp logs every refused connection at error level with a traceback; the callers
        # count and rate-limit those failures themselves, so only its critical messages (bugs
        # in the library) stay. An explicitly configured level is left alone.
        qmp_logger = logging.getLogger("qemu.qmp")
        if qmp_logger.level == logging.NOTSET:
            qmp_logger.setLevel(logging.CRITICAL)

    async def close(self) -> None:
        guests = list(self._guests.values())
        await asyncio.gather(*(self._drop(guest) for guest in guests))

    # -- discovery -------------------------------------------------------------------------------

    def _scan(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        # One absolute pattern from the settings: Path.glob only takes patterns relative to a path.
        for name in sorted(glob.glob(self._socket_glob)):  # noqa: PTH207
            path = Path(name)
            guest_id = guest_id_of(path)
            if valid_id(guest_id):
                found[guest_id] = path
            else:
                log.debug("ignoring socket with an unusable guest id", extra={"path": name})
        return found

    async def discover(self) -> list[str]:
        found = self._scan()
        for guest_id in list(self._guests):
            guest = self._guests[guest_id]
            if found.get(guest_id) != guest.socket_path:
                # The socket is gone (QEMU quit) or now belongs to a new QEMU: forget the old one.
                del self._guests[guest_id]
                await self._drop(guest)
        for guest_id, path in found.items():
            if guest_id not in self._guests:
                self._guests[guest_id] = _Guest(guest_id, path)
        return list(found)

    def _guest(self, guest_id: str) -> _Guest:
        guest = self._guests.get(guest_id)
        if guest is None:
            path = self._scan().get(guest_id)
            if path is None:
                raise GuestUnavailable(
                    f"no QMP socket for guest {guest_id!r} in {self._socket_glob}",
                    guest_id=guest_id,
                )
            guest = self._guests[guest_id] = _Guest(guest_id, path)
        return guest

    # -- connection ------------------------------------------------------------------------------

    async def _client(self, guest: _Guest) -> QMPClient:
        async with guest.connect_lock:
            client = guest.client
            if client is not None and client.runstate == Runstate.RUNNING:
                return client
            if client is not None:
                await self._drop(guest)
            client = QMPClient(guest.guest_id)
            client.events.event_filter = guest.on_event
            guest.client = client
            try:
                await client.connect(str(guest.socket_path))
                guest.balloon_path = await self._find_balloon(client, guest.guest_id)
                # Once per connection: QEMU keeps the interval, but a new QEMU behind the same
                # socket starts without one.
                await client.execute(
                    "qom-set",
                    {
                        "path": guest.balloon_path,
                        "property": "guest-stats-polling-interval",
                        "value": self._stats_interval_s,
                    },
                )
                # A new connection may lead to a new QEMU (same name, restarted VM) whose
                # balloon has no target: what we sent before is no longer known to be in force.
                guest.target_pages = None
            except BaseException:
                await self._drop(guest)
                raise
            log.debug(
                "connected to QMP",
                extra={"guest": guest.guest_id, "balloon": guest.balloon_path},
            )
            return client

    @staticmethod
    async def _find_balloon(client: QMPClient, guest_id: str) -> str:
        """QOM path of the guest's balloon device (query-balloon does not say)."""
        for container in DEVICE_CONTAINERS:
            try:
                children = await client.execute("qom-list", {"path": container})
            except ExecuteError:
                continue  # a container this QEMU did not create
            if not isinstance(children, list):
                continue
            for child in children:
                if not isinstance(child, dict):
                    continue
                child_type, name = child.get("type"), child.get("name")
                if (
                    isinstance(child_type, str)
                    and isinstance(name, str)
                    and child_type.startswith(BALLOON_TYPE_PREFIX)
                ):
                    return f"{container}/{name}"
        raise GuestUnavailable("the guest has no virtio-balloon device", guest_id=guest_id)

    async def _drop(self, guest: _Guest) -> None:
        client, guest.client = guest.client, None
        if client is None:
            return
        # disconnect() re-raises whatever ended the connection (EOFError when QEMU died): that is
        # why we are here, and the caller reports it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await client.disconnect()

    async def _call(
        self, guest_id: str, what: str, operation: Callable[[_Guest, QMPClient], Awaitable[T]]
    ) -> T:
        """Run ``operation`` on the guest's connection under the timeout, with typed errors."""
        guest = self._guest(guest_id)
        try:
            async with asyncio.timeout(self._timeout_s):
                client = await self._client(guest)
                return await operation(guest, client)
        except TimeoutError:
            # A QEMU that does not answer may have a wedged connection: start afresh next time.
            await self._drop(guest)
            raise AdapterTimeout(
                f"{what}: no answer within {self._timeout_s:g} s", guest_id=guest_id
            ) from None
        except ExecuteError as exc:
            raise AdapterError(f"{what}: QEMU refused: {exc}", guest_id=guest_id) from exc
        except (QMPError, OSError, EOFError) as exc:
            await self._drop(guest)
            raise GuestUnavailable(
                f"{what}: QMP connection to {guest.socket_path} failed: {exc!r}",
                guest_id=guest_id,
            ) from exc

    @staticmethod
    async def _ram_bytes(client: QMPClient) -> int:
        # Balloon sizes are relative to the current RAM, hot-plugged DIMMs included.
        summary = _mapping(await client.execute("query-memory-size-summary"), "memory size")
        plugged = summary.get("plugged-memory", 0)
        return _integer(summary, "base-memory", "memory size") + (
            plugged if isinstance(plugged, int) else 0
        )

    # -- the adapter interface -------------------------------------------------------------------

    async def read(self, guest_id: str) -> GuestReading:
        async def operation(guest: _Guest, client: QMPClient) -> GuestReading:
            balloon_reply, ram_bytes, stats_reply = await asyncio.gather(
                client.execute("query-balloon"),
                self._ram_bytes(client),
                client.execute("qom-get", {"path": guest.balloon_path, "property": "guest-stats"}),
            )
            actual_bytes = _integer(_mapping(balloon_reply, "query-balloon"), "actual", "balloon")
            guest.actual_bytes = actual_bytes
            stats = _mapping(stats_reply, "guest-stats")
            last_update_s = stats.get("last-update")
            if isinstance(last_update_s, int | float) and last_update_s > 0:
                values = stats_from_qmp(stats)
                ts_s = float(last_update_s)
            else:
                # The driver has not reported yet (not bound, or no polling so far).
                values = stats_from_qmp({})
                ts_s = time.time()
            return GuestReading(
                guest_id=guest.guest_id,
                ts_s=ts_s,
                ram_bytes=ram_bytes,
                actual_pages=max(0, ram_bytes - actual_bytes) // PAGE_BYTES,
                num_pages=guest.target_pages,
                values=values,
            )

        return await self._call(guest_id, "read", operation)

    async def set_target(self, target: Target) -> None:
        if not 0 <= target.num_pages <= MAX_NUM_PAGES:
            raise TargetRejected(
                f"num_pages {target.num_pages} is not a u32", guest_id=target.guest_id
            )

        async def operation(guest: _Guest, client: QMPClient) -> None:
            ram_bytes = await self._ram_bytes(client)
            ram_pages = ram_bytes // PAGE_BYTES
            if target.num_pages > ram_pages:
                raise TargetRejected(
                    f"num_pages {target.num_pages} exceeds the guest's {ram_pages} pages of RAM",
                    guest_id=target.guest_id,
                )
            # QEMU refuses a target of 0 bytes: a balloon of all of RAM becomes all but one
            # page (the guest driver stops well before either anyway).
            value_bytes = max(ram_bytes - target.num_pages * PAGE_BYTES, PAGE_BYTES)
            try:
                await client.execute("balloon", {"value": value_bytes})
            except ExecuteError as exc:
                raise TargetRejected(str(exc), guest_id=target.guest_id) from exc
            guest.target_pages = math.ceil((ram_bytes - value_bytes) / PAGE_BYTES)

        await self._call(target.guest_id, "balloon", operation)

    # -- for tools and tests ---------------------------------------------------------------------

    def last_actual_bytes(self, guest_id: str) -> int | None:
        """Guest RAM after the balloon as last seen (query-balloon or BALLOON_CHANGE event)."""
        guest = self._guests.get(guest_id)
        return guest.actual_bytes if guest is not None else None


__all__ = ["QmpAdapter", "guest_id_of"]
