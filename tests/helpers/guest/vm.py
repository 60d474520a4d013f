"""Boot, drive and stop test guests (README.md beside this file) from pytest.

Each guest gets, in one short per-test directory (Unix socket paths are limited to 107 bytes):
``<name>.qmp`` (QMP, so the QMP adapter's ``socket_glob`` finds it), ``<name>.ctl`` (memhog's
control line), ``<name>.console`` (ttyS0) and ``<name>.pid``. QEMU runs daemonized under TCG;
a :class:`GuestSet` boots all its guests at once and kills them when it closes, whatever
happened in between (and, failing that, when the interpreter exits).

Booting costs 2.5–6 s per guest under TCG (more when several boot together on 2 cores), so
tests share a few guests per module rather than booting one per test.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

from autoscaler.config import Settings, load_settings

HERE = Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"
STATUS_PATTERN = r"^memhog held_mib="

_live_pids: set[int] = set()


def guest_image_dir(flavour: str = "6.1") -> Path:
    """Build the guest if needed (``build.sh``) and return its directory.

    Skips the calling test when QEMU is not installed (``.ci/run`` installs it).
    """
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86; .ci/run does it)")
    out = subprocess.run(
        ["bash", str(HERE / "build.sh")],
        env={**os.environ, "KERNEL_FLAVOUR": flavour},
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class GuestSpec:
    name: str
    memory_mib: int = 512
    deflate_on_oom: bool = True
    flavour: str | None = None
    """Kernel series (``6.1``, ``6.12``); None: the :class:`GuestSet`'s choice."""
    kernel: str | None = None
    """``vmlinux`` or ``vmlinuz``; None: the :class:`GuestSet`'s choice."""
    page_cache_mib: int = 0
    """Clean page cache the guest starts with (``pagecache_mib=`` on the kernel command line):
    something for reclaim to take, so that the scan/reclaim counters can move."""


@dataclass
class Guest:
    """One booted guest and the files that reach it."""

    spec: GuestSpec
    directory: Path
    boot_s: float = 0.0
    pid: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def qmp_path(self) -> Path:
        return self.directory / f"{self.name}.qmp"

    @property
    def ctl_path(self) -> Path:
        return self.directory / f"{self.name}.ctl"

    @property
    def console_path(self) -> Path:
        return self.directory / f"{self.name}.console"

    @property
    def pid_path(self) -> Path:
        return self.directory / f"{self.name}.pid"

    @property
    def ram_bytes(self) -> int:
        return self.spec.memory_mib * 2**20

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self, image: Path, kernel: str) -> list[str]:
        """The README's QEMU command line (absolute paths: daemonized QEMU runs in /)."""
        deflate = "on" if self.spec.deflate_on_oom else "off"
        append = "console=ttyS0 quiet panic=-1"
        if self.spec.page_cache_mib:
            append += f" pagecache_mib={self.spec.page_cache_mib}"
        return [
            QEMU,
            "-accel", "tcg",
            "-name", self.name,
            "-m", str(self.spec.memory_mib),
            "-smp", "1",
            "-kernel", str(image / (self.spec.kernel or kernel)),
            "-initrd", str(image / "initramfs.cpio.gz"),
            "-append", append,
            "-device", f"virtio-balloon-pci,id=balloon0,deflate-on-oom={deflate}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-serial", f"file:{self.console_path}",
            "-serial", f"unix:{self.ctl_path},server=on,wait=off",
            "-display", "none",
            "-no-reboot",
            "-daemonize",
            "-pidfile", str(self.pid_path),
        ]  # fmt: skip

    def alive(self) -> bool:
        if not self.pid:
            return False
        try:
            # A daemonized QEMU is reparented; until someone reaps it, a dead one is a zombie.
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        return state not in ("Z", "X")

    def kill(self, timeout_s: float = 5.0) -> None:
        """SIGKILL QEMU (as a crash would) and wait until it is gone."""
        if not self.pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        _live_pids.discard(self.pid)


class GuestSet:
    """Boots guests together; a context manager that always kills them and removes their files."""

    def __init__(
        self,
        specs: list[GuestSpec],
        *,
        flavour: str = "6.1",
        kernel: str = "vmlinux",
        boot_timeout_s: float = 90.0,
        wait: bool = True,
    ) -> None:
        """``wait=False`` returns as soon as QEMU runs, before the guest kernel is up."""
        self.specs = specs
        self.wait = wait
        self.flavour = flavour
        # vmlinux boots through PVH, skipping the kernel's decompression under emulation.
        self.kernel = kernel
        self.boot_timeout_s = boot_timeout_s
        self.directory = Path(tempfile.mkdtemp(prefix="bg-", dir="/tmp"))
        self.guests: dict[str, Guest] = {s.name: Guest(s, self.directory) for s in specs}

    @property
    def socket_glob(self) -> str:
        return str(self.directory / "*.qmp")

    def __getitem__(self, name: str) -> Guest:
        return self.guests[name]

    def __enter__(self) -> GuestSet:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def boot(self) -> None:
        flavours = {spec.flavour or self.flavour for spec in self.specs}
        images = {flavour: guest_image_dir(flavour) for flavour in sorted(flavours)}
        started = time.monotonic()
        for guest in self.guests.values():
            image = images[guest.spec.flavour or self.flavour]
            # With -daemonize QEMU returns once the VM runs (about 60 ms).
            result = subprocess.run(
                guest.command(image, self.kernel), capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise RuntimeError(f"QEMU for {guest.name} failed: {result.stderr.strip()}")
            guest.pid = int(guest.pid_path.read_text())
            _live_pids.add(guest.pid)
        waiting = set(self.guests) if self.wait else set()
        deadline = started + self.boot_timeout_s
        while waiting:
            for name in sorted(waiting):
                guest = self.guests[name]
                if "memhog start" in guest.console():
                    guest.boot_s = time.monotonic() - started
                    waiting.discard(name)
                elif not guest.alive():
                    raise RuntimeError(f"{name} died while booting:\n{guest.console()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sorted(waiting)} did not boot in {self.boot_timeout_s} s")
            time.sleep(0.05)

    def close(self) -> None:
        for guest in self.guests.values():
            guest.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


@atexit.register
def _kill_leftovers() -> None:
    # Normally GuestSet.close has done this; this catches an interpreter that stops early.
    for pid in list(_live_pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def parse_status(line: str) -> dict[str, int]:
    """``memhog held_mib=0 MemTotal_kb=468416 …`` → its key=value integers."""
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}


@dataclass
class Memhog:
    """memhog's control line (the guest's ttyS1): send MiB counts, read its lines.

    QEMU drops what the guest writes while no client is connected, so connect before sending.
    """

    guest: Guest
    lines: list[tuple[float, str]] = field(default_factory=list)
    _reader_task: asyncio.Task[None] | None = None
    _writer: asyncio.StreamWriter | None = None
    _new: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Memhog:
        reader, self._writer = await asyncio.open_unix_connection(str(self.guest.ctl_path))
        self._reader_task = asyncio.create_task(
            self._read(reader), name=f"memhog:{self.guest.name}"
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.lines.append((time.monotonic(), line.decode(errors="replace").strip()))
            self._new.set()

    async def send(self, mib: int) -> None:
        """Ask memhog to hold exactly ``mib`` MiB."""
        assert self._writer is not None, "use `async with Memhog(guest)`"
        self._writer.write(f"{mib}\n".encode())
        await self._writer.drain()

    async def wait_for(self, pattern: str, timeout_s: float, *, since: int = 0) -> str | None:
        """The first line at index >= ``since`` matching ``pattern``, or None after the timeout."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        seen = since
        while True:
            for _, line in self.lines[seen:]:
                if regex.search(line):
                    return line
            seen = max(seen, len(self.lines))
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    async def status(self, timeout_s: float = 5.0) -> dict[str, int]:
        """The next status line (MemTotal_kb, MemFree_kb, oom_kill …) printed from now on."""
        line = await self.wait_for(STATUS_PATTERN, timeout_s, since=len(self.lines))
        if line is None:
            raise TimeoutError(f"no memhog status line from {self.guest.name} in {timeout_s} s")
        return parse_status(line)

    def died(self) -> bool:
        return any("memhog died" in line for _, line in self.lines)


def boot_guests(specs: list[GuestSpec], *, flavour: str = "6.1") -> Iterator[GuestSet]:
    """Boots ``specs`` for a module's tests and prints each boot time; kills them afterwards."""
    with GuestSet(specs, flavour=flavour) as booted:
        print("booted in", {name: round(g.boot_s, 1) for name, g in booted.guests.items()})
        yield booted


def qmp_settings(guests: GuestSet) -> Settings:
    """Settings for the QMP adapter on ``guests``, polling balloon stats every second."""
    return load_settings(
        None,
        adapter={"kind": "qmp", "qmp": {"socket_glob": guests.socket_glob, "stats_interval_s": 1}},
    )
