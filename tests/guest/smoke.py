"""Boot the balloon test guest under QEMU (TCG) and check the balloon end to end.

This is the reference for how to drive the guest; see README.md. It needs the
``qemu.qmp`` package, which is not a project dependency, so run it from a
separate virtual environment:

    python3 -m venv /tmp/gvenv && /tmp/gvenv/bin/pip install qemu.qmp
    /tmp/gvenv/bin/python tests/guest/smoke.py [--deflate-on-oom on|off]

Steps: build (or reuse) the guest, boot it daemonized, wait for memhog, read
``query-balloon`` and ``guest-stats``, set the balloon target, make memhog hold
more than what is left, and report what the guest and QEMU did. Exits non-zero
when an expectation fails; prints a JSON summary either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
BALLOON = "/machine/peripheral/balloon0"
STATUS_RE = re.compile(r"^memhog held_mib=(\d+) MemTotal_kb=(-?\d+) MemFree_kb=(-?\d+)")


def build_guest(flavour: str) -> Path:
    """Run build.sh (a no-op when cached) and return its output directory."""
    env = dict(os.environ, KERNEL_FLAVOUR=flavour)
    out = subprocess.run(
        ["bash", str(HERE / "build.sh")], env=env, check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def qemu_command(
    guest: Path, work: Path, memory_mib: int, deflate_on_oom: str, image: str = "vmlinuz"
) -> list[str]:
    """The QEMU command line used by the tests (absolute paths: daemonized QEMU runs in /).

    image is "vmlinuz" (bzImage) or "vmlinux" (uncompressed, PVH boot, faster).
    """
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", str(memory_mib),
        "-smp", "1",
        "-kernel", str(guest / image),
        "-initrd", str(guest / "initramfs.cpio.gz"),
        "-append", "console=ttyS0 quiet panic=-1",
        "-device", f"virtio-balloon-pci,id=balloon0,deflate-on-oom={deflate_on_oom}",
        "-qmp", f"unix:{work}/qmp.sock,server=on,wait=off",
        "-serial", f"file:{work}/console.log",
        "-serial", f"unix:{work}/ctl.sock,server=on,wait=off",
        "-display", "none",
        "-no-reboot",
        "-daemonize",
        "-pidfile", f"{work}/qemu.pid",
    ]  # fmt: skip


class Ctl:
    """The memhog control channel (second serial port): send commands, collect lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._new = asyncio.Event()

    async def connect(self, path: Path) -> None:
        reader, self._writer = await asyncio.open_unix_connection(str(path))
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.lines.append((time.monotonic(), line.decode(errors="replace").strip()))
            self._new.set()

    async def send(self, text: str) -> None:
        assert self._writer is not None
        self._writer.write(text.encode() + b"\n")
        await self._writer.drain()

    async def wait_for(self, pattern: str, within: float, since: int = 0) -> str | None:
        """First line matching pattern at index >= since, or None after `within` seconds."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + within
        seen = since
        while True:
            for _, line in self.lines[seen:]:
                if rx.search(line):
                    return line
            seen = max(seen, len(self.lines))
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), left)

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._writer:
            self._writer.close()


def status(line: str | None) -> dict[str, int]:
    """Parse a memhog status line into its key=value integers."""
    if not line:
        return {}
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", line)}


async def run(args: argparse.Namespace, guest: Path, work: Path) -> dict[str, Any]:
    report: dict[str, Any] = {"deflate_on_oom": args.deflate_on_oom, "failures": []}

    def expect(ok: bool, what: str) -> None:
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            report["failures"].append(what)

    report["guest"] = dict(
        line.split("=", 1) for line in (guest / "info").read_text().splitlines() if "=" in line
    )
    cmd = qemu_command(guest, work, args.memory_mib, args.deflate_on_oom, args.kernel_image)
    report["command"] = " ".join(cmd)
    print("$", report["command"])

    t0 = time.monotonic()
    # With -daemonize, QEMU returns once the VM is set up and running.
    proc = await asyncio.create_subprocess_exec(*cmd)
    if await proc.wait() != 0:
        raise RuntimeError(f"QEMU failed to start (exit {proc.returncode})")
    ctl = Ctl()
    qmp = QMPClient("smoke")
    try:
        await ctl.connect(work / "ctl.sock")
        await qmp.connect(str(work / "qmp.sock"))
        events: list[dict[str, Any]] = []

        async def collect_events() -> None:
            async for event in qmp.events:
                events.append({"t": round(time.monotonic() - t0, 2), **dict(event)})

        event_task = asyncio.create_task(collect_events())

        # Boot: memhog's first line means init, modules and workload are up.
        start = await ctl.wait_for(r"^memhog start", args.boot_timeout)
        report["boot_s"] = round(time.monotonic() - t0, 2)
        expect(start is not None, f"guest booted to memhog in {report['boot_s']} s")
        if start is None:
            return report
        console = (work / "console.log").read_text(errors="replace")
        expect("virtio_balloon driver present" in console, "virtio_balloon driver bound")
        first = status(await ctl.wait_for(STATUS_RE.pattern, 5))
        report["initial_status"] = first

        bal = await qmp.execute("query-balloon")
        report["query_balloon_initial"] = bal
        expect(bal["actual"] == args.memory_mib * MIB, f"query-balloon actual={bal['actual']}")

        # Stats: the driver pushes one set when it binds; polling makes QEMU
        # ask for fresh ones every N seconds (last-update advances).
        stats0 = await qmp.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
        await qmp.execute(
            "qom-set",
            {"path": BALLOON, "property": "guest-stats-polling-interval", "value": 2},
        )
        stats = stats0
        for _ in range(20):
            await asyncio.sleep(0.5)
            stats = await qmp.execute("qom-get", {"path": BALLOON, "property": "guest-stats"})
            if stats["last-update"] > stats0["last-update"]:
                break
        report["guest_stats_before_polling"] = stats0
        report["guest_stats"] = stats
        expect(
            stats["last-update"] > stats0["last-update"] and "stat-free-memory" in stats["stats"],
            f"guest-stats polled: {sorted(stats['stats'])}",
        )

        # Inflate to the target.
        target = args.target_mib * MIB
        t_b = time.monotonic()
        await qmp.execute("balloon", {"value": target})
        actual = bal["actual"]
        while time.monotonic() - t_b < 60:
            actual = (await qmp.execute("query-balloon"))["actual"]
            if actual <= target:
                break
            await asyncio.sleep(0.25)
        report["inflate_s"] = round(time.monotonic() - t_b, 2)
        report["actual_after_inflate_mib"] = actual / MIB
        expect(
            actual <= target, f"balloon inflated to {actual / MIB} MiB in {report['inflate_s']} s"
        )
        # Skip the status line that may have been sampled mid-inflation.
        await ctl.wait_for(STATUS_RE.pattern, 5, since=len(ctl.lines))
        after = status(await ctl.wait_for(STATUS_RE.pattern, 5, since=len(ctl.lines)))
        report["status_after_inflate"] = after
        dropped_free = first["MemFree_kb"] - after["MemFree_kb"]
        dropped_total = first["MemTotal_kb"] - after["MemTotal_kb"]
        want_drop = (args.memory_mib - args.target_mib) * 1024
        expect(dropped_free > 0.9 * want_drop, f"MemFree dropped by {dropped_free} kB")
        if args.deflate_on_oom == "off":
            expect(dropped_total > 0.9 * want_drop, f"MemTotal dropped by {dropped_total} kB")
        else:
            # With deflate-on-oom the driver keeps ballooned pages in MemTotal.
            expect(dropped_total == 0, f"MemTotal unchanged (dropped by {dropped_total} kB)")

        # Pressure: hold more than is left outside the balloon.
        mark = len(ctl.lines)
        t_h = time.monotonic()
        await ctl.send(str(args.hog_mib))
        outcome = await ctl.wait_for(
            rf"^memhog (reached {args.hog_mib}|died)", args.hog_timeout, since=mark
        )
        report["hog_outcome"] = outcome
        report["hog_s"] = round(time.monotonic() - t_h, 2)
        await asyncio.sleep(2)  # let a restarted memhog print its first status
        report["hog_lines"] = [line for _, line in ctl.lines[mark:] if "held_mib" not in line]
        report["status_after_hog"] = status(
            await ctl.wait_for(STATUS_RE.pattern, 5, since=len(ctl.lines))
        )
        report["actual_after_hog_mib"] = (await qmp.execute("query-balloon"))["actual"] / MIB
        report["guest_stats_after_hog"] = await qmp.execute(
            "qom-get", {"path": BALLOON, "property": "guest-stats"}
        )
        oom_kills = report["status_after_hog"].get("oom_kill", -1)
        if args.deflate_on_oom == "on":
            expect(
                outcome == f"memhog reached {args.hog_mib}" and oom_kills == 0,
                f"memhog got {args.hog_mib} MiB without an OOM kill ({outcome!r})",
            )
            expect(
                report["actual_after_hog_mib"] > args.target_mib,
                f"guest deflated itself: actual {report['actual_after_hog_mib']} MiB",
            )
        else:
            expect(
                outcome is not None and "died" in outcome and oom_kills >= 1,
                f"memhog was OOM-killed ({outcome!r}, oom_kill={oom_kills})",
            )
            expect(
                report["actual_after_hog_mib"] <= args.target_mib,
                f"balloon held: actual {report['actual_after_hog_mib']} MiB",
            )
        report["balloon_events"] = events
        event_task.cancel()
        with contextlib.suppress(Exception):
            await qmp.execute("quit")
    finally:
        ctl.close()
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        stop_qemu(work)
    return report


def stop_qemu(work: Path) -> None:
    """Kill QEMU by its pidfile if `quit` did not already end it."""
    pidfile = work / "qemu.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pidfile.read_text())
        for _ in range(20):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deflate-on-oom", choices=["on", "off"], default="on")
    parser.add_argument("--kernel-flavour", default=os.environ.get("KERNEL_FLAVOUR", "6.1"))
    parser.add_argument("--kernel-image", choices=["vmlinuz", "vmlinux"], default="vmlinuz")
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--target-mib", type=int, default=256)
    parser.add_argument("--hog-mib", type=int, default=300)
    parser.add_argument("--boot-timeout", type=float, default=60)
    parser.add_argument("--hog-timeout", type=float, default=120)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (console.log)")
    args = parser.parse_args()

    # Short path: unix socket paths are limited to 107 bytes.
    work = Path(tempfile.mkdtemp(prefix="bguest-"))
    try:
        guest = build_guest(args.kernel_flavour)
        report = asyncio.run(run(args, guest, work))
        report["console_log"] = str(work / "console.log") if args.keep else None
        print(json.dumps(report, indent=2, default=str))
        return 1 if report["failures"] else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
