"""Firecracker adapter: balloon targets and stats through each microVM's API socket.

``adapter.kind = "firecracker"``; settings from ``adapter.firecracker`` (``socket_glob``,
``stats_interval_s``). Each matching unix socket is one Firecracker process serving its HTTP API;
the guest id is the socket's file name without its extension (``/run/firecracker/web-1.sock`` →
``web-1``).

Requests (Firecracker's API spec, ``src/firecracker/swagger/firecracker.yaml``, and
``docs/ballooning.md``):

- ``PATCH /balloon {"amount_mib": N}`` sets the *balloon* size in MiB (not the guest RAM).
  N = floor(num_pages × 4096 / MiB): the guest keeps ``ram − N MiB``, which is never less than
  the allocation the target stands for (``ram − num_pages × 4096``). Rounding up could take up
  to 1 MiB more than the guards allowed, and a target at the floor guard would then sit below
  it; rounding down leaves at most 255 pages (< 1 MiB) unreclaimed. Firecracker answers 204,
  or 400 with ``{"fault_message": …}`` (a balloon larger than the guest's memory, no balloon).
- ``GET /machine-config``: ``mem_size_mib`` is the boot RAM.
- ``GET /balloon``: ``amount_mib`` (the target) and ``stats_polling_interval_s`` as configured;
  0 means statistics were not enabled at boot, and they cannot be enabled afterwards.

  Both can still change before the microVM boots, never after: once the guest's driver has
  accepted the statistics interval (so the microVM is running), the boot RAM and "statistics
  on" are kept for that microVM process, and a read is a single ``GET /balloon/statistics``
  (which also carries the target) instead of three requests.
- ``PATCH /balloon/statistics {"stats_polling_interval_s": N}``: sent once per microVM process
  to make the guest report every ``stats_interval_s``; refused (400) when statistics were off at
  boot or the guest's driver is not up yet, in which case it is tried again on the next read.
- ``GET /balloon/statistics``: ``target_pages`` and ``actual_pages`` (4 KiB pages, the wire's own
  unit), and the guest's stats as the driver sent them, memory in bytes; a stat the guest never
  sent is left out, and Firecracker gives no sample time.

Errors: a 4xx answer to ``PATCH /balloon`` is :class:`TargetRejected` with Firecracker's
``fault_message`` (to a read's ``GET /machine-config`` or ``GET /balloon``, an
:class:`AdapterError`: a microVM without a balloon cannot be read either); a socket that is gone,
refuses connections or drops them is :class:`GuestUnavailable`; no answer within
``call_timeout_s`` is :class:`AdapterTimeout`.

One ``httpx.AsyncClient`` per socket: the transport is bound to one unix socket. A client whose
connection failed or timed out is discarded, so a restarted Firecracker gets a fresh one, and the
per-microVM state (statistics interval set, boot RAM, warnings given) is keyed by the socket
file's inode and change time, which a new process creating its socket anew changes (the inode
number alone is often reused at once), and is dropped when the microVM stops answering.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np

from autoscaler.extras import importing

with importing("httpx", "firecracker", "the firecracker adapter"):
    import httpx

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
from autoscaler.stats import N_STATS, PAGE_BYTES, stats_from_firecracker
from autoscaler.wire import valid_id

log = logging.getLogger(__name__)

_Instance = tuple[str, int, int]
"""One microVM process: guest id, its socket's inode and change time (ns)."""

MIB: Final = 2**20
PAGES_PER_MIB: Final = MIB // PAGE_BYTES


def _int_field(document: object, key: str, where: str, guest_id: str) -> int:
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise AdapterError(
            f"Firecracker {where}: no valid {key!r} in {document!r}", guest_id=guest_id
        )
    return value


def _fault_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    fault = body.get("fault_message") if isinstance(body, dict) else None
    return fault if isinstance(fault, str) else response.text[:500]


def _reading(guest_id: str, ram_bytes: int, num_pages: int) -> GuestReading:
    """A reading without statistics: the target only, balloon size and stats unknown."""
    return GuestReading(
        guest_id=guest_id,
        ts_s=time.time(),
        ram_bytes=ram_bytes,
        actual_pages=None,
        num_pages=num_pages,
        values=np.full(N_STATS, np.nan),
    )


class FirecrackerAdapter(DeviceAdapter):
    """Talks to each Firecracker microVM on this machine through its API socket.

    ``call_timeout_s`` bounds each HTTP request.
    """

    kind: ClassVar[str] = "firecracker"

    def __init__(self, *, call_timeout_s: float = 5.0) -> None:
        if call_timeout_s <= 0:
            raise ValueError("call_timeout_s must be > 0")
        self.call_timeout_s = call_timeout_s
        self._socket_glob = ""
        self._stats_interval_s = 5
        self._sockets: dict[str, Path] = {}
        self._clients: dict[Path, httpx.AsyncClient] = {}
        self._stats_interval_set: set[_Instance] = set()
        self._boot_ram: dict[_Instance, int] = {}
        """Boot RAM in bytes of the running microVMs with statistics on (module docstring)."""
        self._said: set[tuple[_Instance, str]] = set()  # warnings already logged, by topic
        self._skipped: set[Path] = set()

    async def start(self, context: AdapterContext) -> None:
        settings = context.settings.adapter.firecracker
        self._socket_glob = settings.socket_glob
        self._stats_interval_s = settings.stats_interval_s
        self._scan()

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()

    # -- the adapter interface -----------------------------------------------------------------

    async def discover(self) -> list[str]:
        self._scan()
        for path in [p for p in self._clients if p not in self._sockets.values()]:
            await self._discard(path)
        known = (
            {i[0] for i in self._stats_interval_set}
            | {i[0] for i in self._boot_ram}
            | {key[0][0] for key in self._said}
        )
        self._forget(known - self._sockets.keys())
        return sorted(self._sockets)

    async def set_target(self, target: Target) -> None:
        if target.num_pages < 0:
            raise TargetRejected(f"num_pages {target.num_pages} < 0", guest_id=target.guest_id)
        # Rounded down: the balloon never exceeds the target, so the guest never gets less than
        # the allocation it stands for (module docstring).
        amount_mib = target.num_pages // PAGES_PER_MIB
        await self._request(target.guest_id, "PATCH", "/balloon", {"amount_mib": amount_mib})

    async def read(self, guest_id: str) -> GuestReading:
        instance = self._instance(guest_id)
        ram_bytes = self._boot_ram.get(instance)
        num_pages: int | None = None
        if ram_bytes is None:
            machine = await self._request(guest_id, "GET", "/machine-config", refusal=AdapterError)
            ram_bytes = _int_field(machine, "mem_size_mib", "/machine-config", guest_id) * MIB
            num_pages, stats_on = await self._balloon(guest_id)
            if not stats_on:
                self._say_once(
                    instance,
                    "stats-off",
                    "statistics were not enabled at boot (stats_polling_interval_s 0) and cannot "
                    "be enabled now: only the balloon target is reported",
                )
                return _reading(guest_id, ram_bytes, num_pages)
            if await self._set_stats_interval(guest_id, instance):
                self._boot_ram[instance] = ram_bytes
        try:
            statistics = await self._request(guest_id, "GET", "/balloon/statistics")
        except TargetRejected as exc:
            self._say_once(instance, "no-stats", f"no balloon statistics: {exc}")
            if num_pages is None:
                num_pages, _ = await self._balloon(guest_id)
            return _reading(guest_id, ram_bytes, num_pages)
        where = "/balloon/statistics"
        return GuestReading(
            guest_id=guest_id,
            ts_s=time.time(),
            ram_bytes=ram_bytes,
            actual_pages=_int_field(statistics, "actual_pages", where, guest_id),
            num_pages=_int_field(statistics, "target_pages", where, guest_id),
            values=stats_from_firecracker(statistics),
        )

    # -- internals -----------------------------------------------------------------------------

    async def _balloon(self, guest_id: str) -> tuple[int, bool]:
        """``GET /balloon``: the target in pages, and whether statistics were on at boot."""
        balloon = await self._request(guest_id, "GET", "/balloon", refusal=AdapterError)
        num_pages = _int_field(balloon, "amount_mib", "/balloon", guest_id) * PAGES_PER_MIB
        return num_pages, balloon.get("stats_polling_interval_s", 0) != 0  # a dict: checked

    async def _set_stats_interval(self, guest_id: str, instance: _Instance) -> bool:
        """Set the statistics interval once per microVM; whether it is set."""
        if instance in self._stats_interval_set:
            return True
        body = {"stats_polling_interval_s": self._stats_interval_s}
        try:
            await self._request(guest_id, "PATCH", "/balloon/statistics", body)
        except TargetRejected as exc:
            # Statistics off at boot, or the guest's driver not up yet: try again next read.
            self._say_once(instance, "interval", f"cannot set the statistics interval: {exc}")
            return False
        self._stats_interval_set.add(instance)
        return True

    def _say_once(self, instance: _Instance, topic: str, message: str) -> None:
        """Log a warning about a microVM once per topic: reads come every few seconds."""
        key = (instance, topic)
        if key not in self._said:
            self._said.add(key)
            log.warning("Firecracker guest %s: %s", instance[0], message)

    def _scan(self) -> None:
        found: dict[str, Path] = {}
        # The setting is an absolute pattern (/run/firecracker/*.sock); Path.glob takes only
        # relative ones.
        for name in sorted(glob.glob(self._socket_glob)):  # noqa: PTH207
            path = Path(name)
            if not path.is_socket():
                continue
            guest_id = path.stem
            if not valid_id(guest_id) or guest_id in found:
                if path not in self._skipped:
                    self._skipped.add(path)
                    log.warning(
                        "Firecracker socket %s skipped: %s",
                        path,
                        f"guest id {guest_id!r} is taken by {found[guest_id]}"
                        if guest_id in found
                        else "guest ids are 1–128 characters of [A-Za-z0-9._-]",
                    )
                continue
            found[guest_id] = path
        self._sockets = found

    def _socket(self, guest_id: str) -> Path:
        path = self._sockets.get(guest_id)
        if path is None or not path.is_socket():
            self._scan()
            path = self._sockets.get(guest_id)
        if path is None:
            raise GuestUnavailable(
                f"no Firecracker API socket for this guest matches {self._socket_glob}",
                guest_id=guest_id,
            )
        return path

    def _instance(self, guest_id: str) -> _Instance:
        try:
            status = self._socket(guest_id).stat()
        except FileNotFoundError:
            raise GuestUnavailable("Firecracker API socket is gone", guest_id=guest_id) from None
        return guest_id, status.st_ino, status.st_ctime_ns

    def _forget(self, guest_ids: set[str]) -> None:
        self._stats_interval_set = {i for i in self._stats_interval_set if i[0] not in guest_ids}
        self._boot_ram = {i: v for i, v in self._boot_ram.items() if i[0] not in guest_ids}
        self._said = {key for key in self._said if key[0][0] not in guest_ids}

    def _client(self, path: Path) -> httpx.AsyncClient:
        client = self._clients.get(path)
        if client is None:
            client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(path)),
                # The host part is not used on a unix socket; Firecracker's examples say localhost.
                base_url="http://localhost",
                timeout=self.call_timeout_s,
            )
            self._clients[path] = client
        return client

    async def _discard(self, path: Path) -> None:
        client = self._clients.pop(path, None)
        if client is not None:
            await client.aclose()

    async def _request(
        self,
        guest_id: str,
        method: str,
        url: str,
        body: dict[str, int] | None = None,
        *,
        refusal: type[AdapterError] = TargetRejected,
    ) -> Any:
        """One API call; the decoded JSON answer, or None for 204 No Content.

        A 4xx answer raises ``refusal`` with Firecracker's ``fault_message``.
        """
        path = self._socket(guest_id)
        client = self._client(path)
        try:
            async with asyncio.timeout(self.call_timeout_s):
                response = await client.request(method, url, json=body)
        except (TimeoutError, httpx.TimeoutException):
            # A request cut off half-way leaves its connection unusable.
            await self._discard(path)
            raise AdapterTimeout(
                f"Firecracker {method} {url} took longer than {self.call_timeout_s} s",
                guest_id=guest_id,
            ) from None
        except httpx.TransportError as exc:
            await self._discard(path)
            self._forget({guest_id})
            raise GuestUnavailable(
                f"Firecracker API {path} unreachable: {type(exc).__name__}: {exc}",
                guest_id=guest_id,
            ) from exc
        status = response.status_code
        if status >= 400:
            error = refusal if status < 500 else AdapterError
            raise error(
                f"Firecracker {method} {url}: HTTP {status}: {_fault_message(response)}",
                guest_id=guest_id,
            )
        if status == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AdapterError(
                f"Firecracker {method} {url}: not JSON: {response.text[:200]!r}", guest_id=guest_id
            ) from None


__all__ = ["FirecrackerAdapter"]
