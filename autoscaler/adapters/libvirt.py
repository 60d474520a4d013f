"""libvirt adapter: balloon targets and guest stats through libvirtd (``adapter.kind = "libvirt"``).

Guest id = domain name; :meth:`LibvirtAdapter.discover` lists the running domains. Settings come
from ``adapter.libvirt`` (``uri``, ``stats_interval_s``).

Units (libvirt speaks KiB, the rest of the autoscaler bytes and 4 KiB pages):

- ``virDomainSetMemoryFlags(KiB, VIR_DOMAIN_AFFECT_LIVE)`` takes the *guest RAM*:
  ``(ram − num_pages × 4096) / 1024``.
- ``memoryStats()`` values are KiB with renames (``autoscaler.stats.LIBVIRT_STAT_KEYS``);
  ``actual`` is the guest RAM now (ram − balloon) in KiB, ``last_update`` the Unix time of the
  guest's last stats push (0 before the driver sent any).
- ``maxMemory()`` is the boot RAM in KiB.

Threads. libvirt-python blocks, so every operation (a lookup plus one or two RPCs) runs as one job
on a small pool of worker threads owned by the adapter, awaited for at most ``call_timeout_s``.
A libvirt connection is thread-safe, so jobs for different domains run in parallel on the one
connection. The pool is private so that a hung libvirtd cannot starve asyncio's default executor,
which the rest of the program uses; a job that times out keeps its worker until libvirt returns,
which the connection's keepalive bounds (a dead daemon is noticed within about 15 s).

Events (balloon changes, domains stopping, the connection closing) need libvirt's event loop. The
adapter uses libvirt's default implementation driven by one daemon thread for the whole process,
not ``libvirtaio``: an event loop implementation cannot be replaced once registered, and
``libvirtaio`` would tie it to the first asyncio loop, which is gone after a restart of the
controller or in the next test.

Per-domain state (whether the stats period was set, the last target, the last balloon event) is
keyed by name *and* libvirt's domain id, which changes each time a domain starts: a domain that is
destroyed and re-created under the same name starts clean.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Final, Protocol, TypeVar

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
from autoscaler.extras import importing
from autoscaler.stats import PAGE_BYTES, stats_from_libvirt
from autoscaler.wire import valid_id

with importing(
    "libvirt-python",
    "libvirt",
    "the libvirt adapter",
    note="it builds against the system's libvirt: apt-get install libvirt-dev pkg-config",
):
    import libvirt  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

T = TypeVar("T")

KIB: Final = 1024
AFFECT_LIVE: Final[int] = libvirt.VIR_DOMAIN_AFFECT_LIVE
KEEPALIVE_INTERVAL_S: Final = 5
"""libvirt keepalive: a probe every 5 s, the connection is closed after 3 unanswered ones."""
KEEPALIVE_COUNT: Final = 3

# Error codes that mean the domain is not there (any more) or not running.
_GONE_CODES: Final = frozenset({libvirt.VIR_ERR_NO_DOMAIN})
# "Not running" shares VIR_ERR_OPERATION_INVALID with refusals such as "no balloon device", so
# that code is told apart by asking whether the domain is still active.
_INVALID_CODE: Final[int] = libvirt.VIR_ERR_OPERATION_INVALID
_CONNECTION_CODES: Final = frozenset(
    {
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
    }
)
# libvirtd's own wait for a domain's job lock ran out: busy, not broken.
_BUSY_CODES: Final = frozenset({libvirt.VIR_ERR_OPERATION_TIMEOUT})
_REJECTED_CODES: Final = frozenset(
    {
        libvirt.VIR_ERR_INVALID_ARG,
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_NO_SUPPORT,
    }
)


class _Domain(Protocol):
    """The part of ``libvirt.virDomain`` used here (libvirt-python ships no type information)."""

    def name(self) -> str: ...
    def ID(self) -> int: ...  # noqa: N802 - libvirt's spelling, as below
    def isActive(self) -> int: ...  # noqa: N802
    def maxMemory(self) -> int: ...  # noqa: N802
    def memoryStats(self) -> dict[str, int]: ...  # noqa: N802
    def setMemoryFlags(self, memory: int, flags: int, /) -> int: ...  # noqa: N802
    def setMemoryStatsPeriod(self, period: int, flags: int, /) -> int: ...  # noqa: N802


class _Connection(Protocol):
    """The part of ``libvirt.virConnect`` used here."""

    def lookupByName(self, name: str, /) -> _Domain: ...  # noqa: N802
    def listAllDomains(self, flags: int, /) -> list[_Domain]: ...  # noqa: N802
    def isAlive(self) -> int: ...  # noqa: N802
    def setKeepAlive(self, interval: int, count: int, /) -> int: ...  # noqa: N802
    def registerCloseCallback(self, cb: Callable[..., None], opaque: object, /) -> int: ...  # noqa: N802
    def unregisterCloseCallback(self) -> int: ...  # noqa: N802
    def domainEventRegisterAny(  # noqa: N802
        self, dom: _Domain | None, event_id: int, cb: Callable[..., None], opaque: object, /
    ) -> int: ...
    def domainEventDeregisterAny(self, callback_id: int, /) -> int: ...  # noqa: N802
    def close(self) -> int: ...


_event_loop_lock = threading.Lock()
_event_loop_running = False


def _ignore_libvirt_error(_context: object, _error: object) -> None:
    """libvirt's default handler prints every error to stderr; ours are raised and logged."""


def _ensure_event_loop() -> None:
    """Register libvirt's default event loop once per process and run it on a daemon thread."""
    global _event_loop_running
    with _event_loop_lock:
        if _event_loop_running:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_running = True


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as exc:  # keep dispatching: one failed poll is not fatal
            log.warning("libvirt event loop: %s", exc)
            time.sleep(1.0)


def _error_code(exc: Any) -> int:
    code = exc.get_error_code()
    return int(code) if code is not None else -1


class LibvirtAdapter(DeviceAdapter):
    """Sets balloon targets with ``virDomainSetMemoryFlags`` and reads ``memoryStats``.

    ``call_timeout_s`` bounds each operation; ``workers`` is the number of threads that may wait
    on libvirtd at once.
    """

    kind: ClassVar[str] = "libvirt"

    def __init__(self, *, call_timeout_s: float = 5.0, workers: int = 4) -> None:
        if call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be > 0")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.call_timeout_s = call_timeout_s
        self._workers = workers
        self._uri = ""
        self._stats_interval_s = 5
        self._executor: ThreadPoolExecutor | None = None
        # Held by a worker while it checks or replaces the connection; never by event callbacks.
        self._connect_lock = threading.Lock()
        self._conn: _Connection | None = None
        self._lost_reason: str | None = None
        self._callback_ids: list[int] = []
        # Written by workers and by the event thread; only plain dict/set operations under it,
        # never a libvirt call, so the event thread cannot be blocked behind a worker's RPC.
        self._state_lock = threading.Lock()
        self._period_set: set[tuple[str, int]] = set()
        self._targets: dict[str, tuple[int, int]] = {}  # name → (domain id, num_pages)
        self._event_actual_kib: dict[str, tuple[int, int]] = {}  # name → (domain id, KiB)
        self._invalid_names: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, context: AdapterContext) -> None:
        settings = context.settings.adapter.libvirt
        self._uri = settings.uri
        self._stats_interval_s = settings.stats_interval_s
        _ensure_event_loop()
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="libvirt")
        try:
            await self._run("", "connect", lambda conn: None)
        except AdapterError as exc:
            # libvirtd may start after the agent (boot order); each call tries again.
            log.warning(
                "libvirt at %s unreachable at start (%s); trying again on each call", self._uri, exc
            )

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            async with asyncio.timeout(self.call_timeout_s):
                await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
        except TimeoutError:
            log.warning("libvirt connection to %s did not close in time", self._uri)
        executor.shutdown(wait=False, cancel_futures=True)

    # -- the adapter interface -----------------------------------------------------------------

    async def discover(self) -> list[str]:
        def list_running(conn: _Connection) -> list[str]:
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            return sorted(str(domain.name()) for domain in domains)

        names = await self._run("", "listAllDomains", list_running)
        ids = []
        for name in names:
            if valid_id(name):
                ids.append(name)
            elif name not in self._invalid_names:
                self._invalid_names.add(name)
                log.warning(
                    "libvirt domain %r skipped: guest ids are 1–128 characters of [A-Za-z0-9._-]",
                    name,
                )
        return ids

    async def set_target(self, target: Target) -> None:
        guest_id = target.guest_id
        if target.num_pages < 0:
            raise TargetRejected(f"num_pages {target.num_pages} < 0", guest_id=guest_id)

        def apply(conn: _Connection) -> None:
            domain = conn.lookupByName(guest_id)
            # The domain's own maximum, not target.ram_bytes: num_pages is the balloon size, and
            # the guest RAM that leaves must come from the RAM the domain really has.
            ram_bytes = int(domain.maxMemory()) * KIB
            target_kib = (ram_bytes - target.num_pages * PAGE_BYTES) // KIB
            if target_kib <= 0:
                # libvirt would read 0 KiB as a request to take all memory from the guest.
                raise TargetRejected(
                    f"num_pages {target.num_pages} leaves no memory of {ram_bytes} bytes",
                    guest_id=guest_id,
                )
            domain.setMemoryFlags(target_kib, AFFECT_LIVE)
            with self._state_lock:
                self._targets[guest_id] = (int(domain.ID()), target.num_pages)

        await self._run(guest_id, "setMemoryFlags", apply, rejecting=True)

    async def read(self, guest_id: str) -> GuestReading:
        """Stats and balloon of a running domain.

        ``num_pages`` is the last target this adapter set for the domain since it started (libvirt
        does not report the target, only the balloon's size), None if there is none.
        """

        def query(conn: _Connection) -> tuple[int, dict[str, int], int]:
            domain = conn.lookupByName(guest_id)
            domain_id = int(domain.ID())
            self._set_stats_period(domain, guest_id, domain_id)
            return domain_id, dict(domain.memoryStats()), int(domain.maxMemory())

        domain_id, raw, max_kib = await self._run(guest_id, "memoryStats", query)
        ram_bytes = max_kib * KIB
        with self._state_lock:
            target = self._targets.get(guest_id)
            event = self._event_actual_kib.get(guest_id)
        # memoryStats asks QEMU for the balloon now; BALLOON_CHANGE events are throttled by QEMU
        # to one a second, so the event value is only the fallback (a domain without 'actual').
        actual_kib = raw.get("actual")
        if actual_kib is None and event is not None and event[0] == domain_id:
            actual_kib = event[1]
        actual_pages = (
            None if actual_kib is None else max(0, ram_bytes - actual_kib * KIB) // PAGE_BYTES
        )
        last_update_s = raw.get("last_update", 0)
        # libvirt leaves out the stats the guest has not sent (QEMU's 2^64−1), measured with 9.0.
        return GuestReading(
            guest_id=guest_id,
            ts_s=float(last_update_s) if last_update_s > 0 else time.time(),
            ram_bytes=ram_bytes,
            actual_pages=actual_pages,
            num_pages=target[1] if target is not None and target[0] == domain_id else None,
            values=stats_from_libvirt(raw),
        )

    def balloon_event_bytes(self, guest_id: str) -> int | None:
        """Guest RAM from the latest BALLOON_CHANGE event of ``guest_id``, None if none seen."""
        with self._state_lock:
            event = self._event_actual_kib.get(guest_id)
        return None if event is None else event[1] * KIB

    # -- worker-thread side --------------------------------------------------------------------

    async def _run(
        self,
        guest_id: str,
        what: str,
        body: Callable[[_Connection], T],
        *,
        rejecting: bool = False,
    ) -> T:
        """Run ``body`` with the connection on a worker thread, for at most ``call_timeout_s``."""
        executor = self._executor
        if executor is None:
            raise GuestUnavailable("libvirt adapter not started", guest_id=guest_id)
        job = asyncio.get_running_loop().run_in_executor(
            executor, self._job, guest_id, what, body, rejecting
        )
        try:
            async with asyncio.timeout(self.call_timeout_s):
                return await job
        except TimeoutError:
            raise AdapterTimeout(
                f"libvirt {what} took longer than {self.call_timeout_s} s", guest_id=guest_id
            ) from None

    def _job(
        self, guest_id: str, what: str, body: Callable[[_Connection], T], rejecting: bool
    ) -> T:
        conn = self._connection(guest_id)
        try:
            return body(conn)
        except libvirt.libvirtError as exc:
            raise self._translate(conn, exc, guest_id, what, rejecting=rejecting) from exc

    def _translate(
        self, conn: _Connection, exc: Any, guest_id: str, what: str, *, rejecting: bool
    ) -> AdapterError:
        code = _error_code(exc)
        message = f"libvirt {what}: {exc}"
        if code in _GONE_CODES or (code == _INVALID_CODE and not self._active(conn, guest_id)):
            self._forget(guest_id)
            return GuestUnavailable(message, guest_id=guest_id)
        if code in _CONNECTION_CODES or not self._alive(conn):
            self._mark_lost(conn, str(exc))
            return GuestUnavailable(message, guest_id=guest_id)
        if code in _BUSY_CODES:
            return AdapterTimeout(message, guest_id=guest_id)
        if rejecting and (code in _REJECTED_CODES or code == _INVALID_CODE):
            return TargetRejected(message, guest_id=guest_id)
        return AdapterError(message, guest_id=guest_id)

    @staticmethod
    def _alive(conn: _Connection) -> bool:
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _active(self, conn: _Connection, guest_id: str) -> bool:
        try:
            return bool(conn.lookupByName(guest_id).isActive())
        except libvirt.libvirtError:
            return False

    def _set_stats_period(self, domain: _Domain, guest_id: str, domain_id: int) -> None:
        key = (guest_id, domain_id)
        with self._state_lock:
            if key in self._period_set:
                return
        try:
            domain.setMemoryStatsPeriod(self._stats_interval_s, AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            if _error_code(exc) in _GONE_CODES or not domain.isActive():
                raise
            # No balloon device, or a driver that cannot: stats then depend on the domain's own
            # <stats period>. Said once per domain start, not on every read.
            log.warning("libvirt domain %s: cannot set the stats period: %s", guest_id, exc)
        with self._state_lock:
            self._period_set.add(key)

    def _connection(self, guest_id: str) -> _Connection:
        with self._connect_lock:
            with self._state_lock:
                lost_reason = self._lost_reason
            conn = self._conn
            if conn is not None and lost_reason is None:
                return conn
            if conn is not None:
                log.warning("reconnecting to libvirt at %s after: %s", self._uri, lost_reason)
                self._drop(conn)
            try:
                conn = self._open()
            except libvirt.libvirtError as exc:
                raise GuestUnavailable(
                    f"cannot connect to libvirt at {self._uri}: {exc}", guest_id=guest_id
                ) from exc
            log.info("connected to libvirt at %s", self._uri)
            self._conn = conn
            with self._state_lock:
                self._lost_reason = None
            return conn

    def _open(self) -> _Connection:
        conn: _Connection = libvirt.open(self._uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
            conn.registerCloseCallback(self._on_close, None)
            self._callback_ids = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, self._on_balloon_change, None
                ),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                ),
            ]
        except libvirt.libvirtError:
            conn.close()
            raise
        return conn

    def _mark_lost(self, conn: object, reason: str) -> None:
        # A late failure on a connection already replaced says nothing about the current one.
        if conn is not self._conn:
            return
        with self._state_lock:
            first = self._lost_reason is None
            if first:
                self._lost_reason = reason
        if first:
            log.warning("libvirt connection to %s lost: %s", self._uri, reason)

    def _drop(self, conn: _Connection) -> None:
        """Release a connection; on a dead one every call fails, which is fine here."""
        self._conn = None
        callback_ids, self._callback_ids = self._callback_ids, []
        for callback_id in callback_ids:
            self._quietly(conn.domainEventDeregisterAny, callback_id)
        self._quietly(conn.unregisterCloseCallback)
        self._quietly(conn.close)
        with self._state_lock:
            # Events were missed while disconnected: nothing learnt from them is trusted.
            self._event_actual_kib.clear()

    @staticmethod
    def _quietly(call: Callable[..., object], *args: object) -> None:
        try:
            call(*args)
        except libvirt.libvirtError as exc:
            log.debug("libvirt cleanup: %s", exc)

    def _disconnect(self) -> None:
        with self._connect_lock:
            if self._conn is not None:
                self._drop(self._conn)

    def _forget(self, guest_id: str) -> None:
        with self._state_lock:
            self._period_set = {key for key in self._period_set if key[0] != guest_id}
            self._targets.pop(guest_id, None)
            self._event_actual_kib.pop(guest_id, None)

    # -- event-thread side (libvirt calls these from the "libvirt-events" thread) ----------------

    def _on_close(self, conn: Any, reason: int, _opaque: object) -> None:
        # reason: VIR_CONNECT_CLOSE_REASON_ERROR 0, EOF 1 (libvirtd went away), KEEPALIVE 2.
        self._mark_lost(conn, f"closed by libvirtd (close reason {reason})")

    def _on_balloon_change(self, conn: Any, domain: Any, actual_kib: int, _opaque: object) -> None:
        # The domain's name and id first: no libvirt call under the state lock (see __init__).
        name, domain_id = str(domain.name()), int(domain.ID())
        with self._state_lock:
            self._event_actual_kib[name] = (domain_id, int(actual_kib))

    def _on_lifecycle(
        self, conn: Any, domain: Any, event: int, _detail: int, _opaque: object
    ) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            self._forget(str(domain.name()))


__all__ = ["LibvirtAdapter"]
