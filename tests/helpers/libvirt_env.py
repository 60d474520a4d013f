"""A real libvirtd for the libvirt adapter's tests, and TCG domains that boot the test guest.

The daemons run as root without systemd: ``virtlogd --daemon`` (libvirt's QEMU driver hands each
domain's output to it) and ``libvirtd --daemon``, on their standard sockets under /run/libvirt.
A daemon that already answers is reused and left running; the ones started here are stopped by
:meth:`Daemons.stop`. Packages: ``libvirt-daemon-system libvirt-daemon-driver-qemu`` (the first
creates the ``libvirt-qemu`` user at install), ``qemu-system-x86``, and ``libvirt-python`` in the
virtualenv (built with ``libvirt-dev pkg-config``).

Domains are transient (``createXML``: gone once destroyed) and boot the guest of tests/helpers/guest
(README there): ``<domain type='qemu'>`` (TCG), 512 MiB, the kernel and initramfs from ``build.sh``,
a virtio balloon with a stats period, the console on the first serial port written to a file and
memhog's control line on the second as a unix socket. QEMU runs as root for these domains (a static
DAC label, no relabelling): the guest images live in root's cache, which the ``libvirt-qemu`` user
cannot read.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
RUN_DIR = Path("/run/libvirt")
LIBVIRTD_SOCKET = RUN_DIR / "libvirt-sock"
VIRTLOGD_SOCKET = RUN_DIR / "virtlogd-sock"
SBIN_PATH = "/usr/sbin:/usr/local/sbin:/usr/bin:/bin"


class LibvirtUnavailable(Exception):
    """libvirtd cannot run here; the message says what is missing."""


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=SBIN_PATH)
    if found is None:
        raise LibvirtUnavailable(
            f"{name} is not installed (apt-get install -y libvirt-daemon-system "
            "libvirt-daemon-driver-qemu)"
        )
    return found


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _wait_for(path: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not _answers(path):
        if time.monotonic() > deadline:
            raise LibvirtUnavailable(f"{what} did not open {path} within {timeout_s} s")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says it is gone.
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return False


def _stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.02)


def _start_daemon(name: str, sock: Path, pidfile: Path, timeout_s: float) -> int:
    """Start ``name --daemon``; return its pid once ``sock`` answers."""
    binary = _binary(name)
    result = subprocess.run(
        [binary, "--daemon", "--pid-file", str(pidfile)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise LibvirtUnavailable(
            f"{name} --daemon failed ({result.returncode}): {result.stderr.strip()}"
        )
    _wait_for(sock, timeout_s, name)
    return int(pidfile.read_text().strip())


@dataclass
class Daemons:
    """virtlogd and libvirtd; ``started`` holds the pids this process started (name → pid)."""

    started: dict[str, int] = field(default_factory=dict)
    uri: str = URI

    def stop(self) -> None:
        """Stop the daemons started here, libvirtd first (it talks to virtlogd)."""
        for name in ("libvirtd", "virtlogd"):
            pid = self.started.pop(name, None)
            if pid is not None:
                _stop_pid(pid)

    def restart_libvirtd(self, timeout_s: float = 20.0) -> float:
        """Stop and start the libvirtd started here; returns the seconds it took."""
        began = time.monotonic()
        pid = self.started.pop("libvirtd")
        _stop_pid(pid)
        self.started["libvirtd"] = _start_daemon(
            "libvirtd", LIBVIRTD_SOCKET, Path("/run/libvirtd.pid"), timeout_s
        )
        return time.monotonic() - began


def start_daemons(timeout_s: float = 20.0) -> Daemons:
    """Make sure virtlogd and libvirtd run; raises :class:`LibvirtUnavailable` if they cannot."""
    if os.geteuid() != 0:
        raise LibvirtUnavailable("the system libvirtd needs root")
    _binary("qemu-system-x86_64")
    daemons = Daemons()
    try:
        if not _answers(VIRTLOGD_SOCKET):
            daemons.started["virtlogd"] = _start_daemon(
                "virtlogd", VIRTLOGD_SOCKET, Path("/run/virtlogd.pid"), timeout_s
            )
        if not _answers(LIBVIRTD_SOCKET):
            daemons.started["libvirtd"] = _start_daemon(
                "libvirtd", LIBVIRTD_SOCKET, Path("/run/libvirtd.pid"), timeout_s
            )
    except BaseException:
        daemons.stop()
        raise
    return daemons


def guest_images() -> Path:
    """Build (or reuse) the test guest; returns the directory with vmlinux and the initramfs."""
    result = subprocess.run(
        ["bash", str(REPO / "tests" / "helpers" / "guest" / "build.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"tests/helpers/guest/build.sh failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


@dataclass
class GuestDomain:
    """Files of one test domain (the domain itself lives in libvirtd)."""

    name: str
    workdir: Path

    @property
    def console(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    @property
    def control(self) -> Path:
        return self.workdir / f"{self.name}.ctl"


def domain_xml(
    domain: GuestDomain,
    images: Path,
    *,
    memory_mib: int = 512,
    stats_period_s: int = 2,
    balloon: bool = True,
) -> str:
    """A transient TCG domain that boots the test guest (see the module docstring)."""

    def path(value: Path) -> str:
        return escape(str(value), {"'": "&apos;"})

    memballoon = (
        f"<memballoon model='virtio'><stats period='{stats_period_s}'/></memballoon>"
        if balloon
        else "<memballoon model='none'/>"
    )

    return f"""
<domain type='qemu'>
  <name>{escape(domain.name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{path(images / "vmlinux")}</kernel>
    <initrd>{path(images / "initramfs.cpio.gz")}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{path(domain.console)}'/><target port='0'/></serial>
    <serial type='unix'>
      <source mode='bind' path='{path(domain.control)}'/><target port='1'/>
    </serial>
    {memballoon}
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


STATUS = re.compile(r"memhog held_mib=\d+ MemTotal_kb=(\d+) MemFree_kb=(\d+) MemAvailable_kb=(\d+)")


@dataclass(frozen=True)
class GuestMeminfo:
    """The guest's own /proc/meminfo, from memhog's status line (kB as the kernel prints)."""

    mem_total_kb: int
    mem_free_kb: int
    mem_available_kb: int


class GuestControl:
    """memhog's control line (the guest's ttyS1): commands out, status lines in."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self._sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise
                time.sleep(0.05)
        self._buffer = b""

    def close(self) -> None:
        self._sock.close()

    def _line(self, deadline: float) -> str:
        while b"\n" not in self._buffer:
            self._sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ConnectionError("the guest's control line closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def meminfo(self, timeout_s: float = 30.0) -> GuestMeminfo:
        """The next status line's memory figures (memhog prints one a second)."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = STATUS.search(self._line(deadline))
            if match:
                total, free, available = (int(g) for g in match.groups())
                return GuestMeminfo(total, free, available)
