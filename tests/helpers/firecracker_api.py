"""A stand-in for Firecracker's HTTP API on a unix socket, for tests.

No Firecracker can run here: it needs KVM, and Debian does not package it. This server answers
the requests the Firecracker adapter makes the way Firecracker's API spec says
(``src/firecracker/swagger/firecracker.yaml`` and ``docs/ballooning.md`` in
firecracker-microvm/firecracker):

- ``GET /machine-config`` → 200 ``MachineConfiguration`` (``vcpu_count``, ``mem_size_mib`` …);
- ``GET /balloon`` → 200 ``Balloon`` (``amount_mib``, ``deflate_on_oom``,
  ``stats_polling_interval_s``), 400 when no balloon was configured;
- ``PATCH /balloon`` with ``BalloonUpdate`` (``amount_mib`` only, unknown fields refused) → 204,
  400 when the balloon would be larger than the guest's memory;
- ``PATCH /balloon/statistics`` with ``BalloonStatsUpdate`` → 204, 400 when statistics were off
  at boot (they cannot be turned on or off afterwards);
- both PATCHes → 400 while the guest's balloon driver is not up (``driver_active``);
- ``GET /balloon/statistics`` → 200 ``BalloonStats``: ``target_pages``, ``actual_pages``,
  ``target_mib``, ``actual_mib`` always, the guest's stats (memory in bytes) only once the guest
  has sent them, and the six newer fields (``oom_kill`` … ``direct_reclaim``) only when
  ``newer_stats`` is set; 400 when statistics are off;
- anything else → 400 ``Invalid request method and/or path``.

Errors carry ``{"fault_message": "..."}`` with the texts of Firecracker's error types; their exact
wording differs between Firecracker versions, and the adapter passes them on unchanged. A
simulated guest driver moves the balloon to its target at once (``follow_target``), and the guest
stats follow the balloon, as with deflate-on-oom off (the guest's total memory shrinks).
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

MIB = 2**20
PAGE_BYTES = 4096
PAGES_PER_MIB = MIB // PAGE_BYTES


@dataclass
class MicroVm:
    """The state one Firecracker process would hold; tests change it directly."""

    mem_size_mib: int = 512
    vcpu_count: int = 1
    balloon: bool = True
    amount_mib: int = 0
    deflate_on_oom: bool = False
    stats_polling_interval_s: int = 1
    """As configured before boot: 0 means statistics are off for good."""
    follow_target: bool = True
    actual_pages: int = 0
    driver_active: bool = True
    """Whether the guest's balloon driver is up; until then balloon updates are refused."""
    stats_reported: bool = True
    """Whether the guest driver has sent statistics yet."""
    newer_stats: bool = True
    used_bytes: int = 96 * MIB
    delay_s: float = 0.0
    """Sleep before each answer, to look like a stuck VMM."""
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def statistics(self) -> dict[str, int]:
        if self.follow_target:
            self.actual_pages = self.amount_mib * PAGES_PER_MIB
        stats = {
            "target_pages": self.amount_mib * PAGES_PER_MIB,
            "actual_pages": self.actual_pages,
            "target_mib": self.amount_mib,
            "actual_mib": self.actual_pages // PAGES_PER_MIB,
        }
        if not self.stats_reported:
            return stats
        # Roughly what a small Linux guest reports: the kernel keeps ~40 MiB of the RAM.
        total = self.mem_size_mib * MIB - 40 * MIB - self.actual_pages * PAGE_BYTES
        free = max(0, total - self.used_bytes)
        stats |= {
            "swap_in": 0,
            "swap_out": 0,
            "major_faults": 12,
            "minor_faults": 81_234,
            "free_memory": free,
            "total_memory": total,
            "available_memory": free + 8 * MIB,
            "disk_caches": 10 * MIB,
            "hugetlb_allocations": 0,
            "hugetlb_failures": 0,
        }
        if self.newer_stats:
            stats |= {
                "oom_kill": 1,
                "alloc_stall": 3,
                "async_scan": 4096 * 100,
                "direct_scan": 4096 * 20,
                "async_reclaim": 4096 * 90,
                "direct_reclaim": 4096 * 15,
            }
        return stats


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Firecracker's micro_http
    server_version = "Firecracker API"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.request)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.request)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the base class would print every request to stderr."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        vm = self.server.vm
        if vm.delay_s:
            time.sleep(vm.delay_s)
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            self._fault(f"An error occurred when deserializing the json body of a request: {exc}.")
            return
        with vm.lock:
            vm.requests.append((method, self.path, body))
            self._route(vm, method, self.path, body)

    def _route(self, vm: MicroVm, method: str, path: str, body: Any) -> None:
        if (method, path) == ("GET", "/machine-config"):
            self._json(
                {
                    "vcpu_count": vm.vcpu_count,
                    "mem_size_mib": vm.mem_size_mib,
                    "smt": False,
                    "track_dirty_pages": False,
                    "huge_pages": "None",
                }
            )
        elif path.startswith("/balloon") and not vm.balloon:
            self._fault("No balloon device found.")
        elif (method, path) == ("GET", "/balloon"):
            self._json(
                {
                    "amount_mib": vm.amount_mib,
                    "deflate_on_oom": vm.deflate_on_oom,
                    "stats_polling_interval_s": vm.stats_polling_interval_s,
                }
            )
        elif (
            method == "PATCH"
            and path in ("/balloon", "/balloon/statistics")
            and not (vm.driver_active)
        ):
            self._fault(
                "Balloon update error: Device is inactive, check if balloon driver is enabled "
                "in guest kernel."
            )
        elif (method, path) == ("PATCH", "/balloon"):
            amount_mib = self._field(body, "amount_mib")
            if amount_mib is None:
                return
            if amount_mib > vm.mem_size_mib:
                self._fault("Balloon update error: Amount of pages requested is too large.")
                return
            vm.amount_mib = amount_mib
            self._no_content()
        elif (method, path) == ("GET", "/balloon/statistics"):
            if vm.stats_polling_interval_s == 0:
                self._fault("Statistics for the balloon device are not enabled")
                return
            self._json(vm.statistics())
        elif (method, path) == ("PATCH", "/balloon/statistics"):
            interval_s = self._field(body, "stats_polling_interval_s")
            if interval_s is None:
                return
            if (interval_s == 0) != (vm.stats_polling_interval_s == 0):
                self._fault(
                    "Balloon update error: Cannot enable/disable the statistics after boot."
                )
                return
            vm.stats_polling_interval_s = interval_s
            self._no_content()
        else:
            self._fault(f"Invalid request method and/or path: {method} {path}.")

    def _field(self, body: Any, name: str) -> int | None:
        """The one integer field of an update body, or None after answering 400 (serde's rules:
        the field is required, unknown fields are refused, and it must fit in an unsigned int)."""
        if not isinstance(body, dict) or name not in body:
            self._fault(
                "An error occurred when deserializing the json body of a request: "
                f"missing field `{name}`."
            )
            return None
        unknown = sorted(set(body) - {name})
        if unknown:
            self._fault(
                "An error occurred when deserializing the json body of a request: "
                f"unknown field `{unknown[0]}`, expected `{name}`."
            )
            return None
        value = body[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
            self._fault(
                "An error occurred when deserializing the json body of a request: "
                f"invalid value: {value!r}, expected u32."
            )
            return None
        return value

    def _json(self, document: dict[str, Any]) -> None:
        self._send(200, json.dumps(document).encode())

    def _fault(self, message: str) -> None:
        self._send(400, json.dumps({"fault_message": message}).encode())

    def _no_content(self) -> None:
        self._send(204, b"")

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (a timeout, a closed pool) is not an error of the server."""
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            super().handle_error(request, client_address)

    def __init__(self, path: Path, vm: MicroVm) -> None:
        self.vm = vm
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(str(path), _Handler)


class FirecrackerApi:
    """One fake Firecracker process: its API socket served from a background thread."""

    def __init__(self, path: Path, vm: MicroVm | None = None) -> None:
        self.path = path
        self.vm = vm or MicroVm()
        self._server = _Server(path, self.vm)
        self._thread = threading.Thread(
            # A short poll interval: kill() waits for the loop to notice.
            target=self._server.serve_forever,
            args=(0.02,),
            name=f"firecracker-api {path.name}",
            daemon=True,
        )
        self._thread.start()
        self._running = True

    def requests(self, method: str, path: str) -> list[Any]:
        """Bodies of the requests received for ``method path``, oldest first."""
        with self.vm.lock:
            return [body for m, p, body in self.vm.requests if (m, p) == (method, path)]

    def kill(self, *, unlink: bool = True) -> None:
        """Stop as a crashed process would: connections cut, nobody listening any more.

        ``unlink=False`` leaves the socket file behind, so connecting is refused.
        """
        if self._running:
            self._running = False
            self._server.shutdown()
            self._server.server_close()
            with self._server.connections_lock:
                for connection in self._server.connections:
                    with contextlib.suppress(OSError):  # already closed by the client
                        connection.shutdown(socket.SHUT_RDWR)
            self._thread.join(timeout=5)
        if unlink:
            self.path.unlink(missing_ok=True)
