"""What the MQTT benchmarks share: a private mosquitto on a free loopback port, paho clients,
worker processes that die with their parent, and the controller under test."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import getpass
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

if TYPE_CHECKING:
    import asyncio

    from autoscaler.service.controller import Controller

HOST: Final = "127.0.0.1"
TOPIC_PREFIX: Final = "balloon/v1"
STATS_FILTER: Final = f"{TOPIC_PREFIX}/guest/+/+/stats"
GUESTS_PER_HOST: Final = 100
GIB: Final = 2**30
PR_SET_PDEATHSIG: Final = 1
DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"
POLL_S: Final = 0.01
"""How often the controller process samples its counters (the rate's time resolution)."""
DEFAULT_CONTROLLER: Final = "autoscaler.service.controller:Controller"

SharedCount = ctypes.c_longlong  # what multiprocessing Value("q", lock=False) returns


class BenchError(Exception):
    """The benchmark could not run (broker did not start, a worker died or timed out)."""


def exit_with(main: Callable[[], int], name: str) -> NoReturn:
    """Run a benchmark's ``main`` and exit with its status: 2 if it could not run, 130 if
    interrupted."""
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"{name} benchmark failed: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -- the controller under test ------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, *, tick_interval_help: str) -> None:
    """The options ``ingest.py`` and ``emergency.py`` share: ``--tick-interval``,
    ``--quiet-wait`` and ``--controller``."""
    parser.add_argument("--tick-interval", type=float, default=3600.0, help=tick_interval_help)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each phase, wait up to S seconds for other processes to leave the CPUs",
    )
    parser.add_argument(
        "--controller",
        default=DEFAULT_CONTROLLER,
        metavar="MODULE:CLASS",
        help="controller class to measure (a patched subclass, to try a fix)",
    )


def load_controller_class(spec: str) -> type[Controller]:
    """The controller class ``spec`` (``module:Class``) names; BenchError unless it is a
    :class:`autoscaler.service.controller.Controller` or a subclass."""
    from autoscaler.service.controller import (
        Controller,  # here: the bare workers need no autoscaler
    )

    module, _, name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise BenchError(f"cannot load controller class {spec!r}: {exc}") from None
    if not (isinstance(found, type) and issubclass(found, Controller)):
        raise BenchError(f"{spec} is not a Controller subclass")
    return found


async def stop_controller(stop: asyncio.Event, runner: asyncio.Task[None]) -> None:
    """Stop the controller that ``runner`` runs (``controller.run(stop)``), waiting up to 10 s.

    Raises BenchError if it failed: a controller that died must fail the phase, not pass as a
    slow one.
    """
    import asyncio

    stop.set()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await runner
    if runner.done() and not runner.cancelled() and runner.exception() is not None:
        raise BenchError(f"the controller failed: {runner.exception()!r}")


# -- process hygiene -------------------------------------------------------------------------------


def die_with_parent() -> None:
    """Have Linux SIGTERM this process if the benchmark's main process dies, even by SIGKILL.

    Without it, an interrupted run would leave a mosquitto or a flooding publisher behind.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_init() -> None:
    """Common start of every worker process."""
    die_with_parent()
    # Ctrl-C goes to the whole process group: only the main process handles it (and stops us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (works for mosquitto too)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # Fields after "(comm)": state is [0], utime [11], stime [12] (man 5 proc: 14 and 15).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- broker ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Broker:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_s(self) -> float:
        return cpu_seconds(self.process.pid)


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BenchError("mosquitto is not installed (apt-get install -y mosquitto)")
    return found


@contextlib.contextmanager
def mosquitto(max_queued_messages: int) -> Iterator[Broker]:
    """A private mosquitto on a free loopback port, stopped (and its files removed) on exit.

    ``max_queued_messages``: since mosquitto 2.0 this per-client limit also applies to QoS 0
    messages to a connected client (mosquitto's ChangeLog, 2.0.0). Its default, 1,000, is a tenth
    of a second of traffic at 10,000 messages/s: a flood, or any pause of the subscriber longer
    than that (a garbage collection, a control tick), makes the broker drop messages silently,
    and the benchmark would measure drops instead of the subscriber's speed. Each phase sets it
    to what that phase needs; the table shows mosquitto's own count of dropped messages.
    """
    binary = mosquitto_binary()
    with tempfile.TemporaryDirectory(prefix="bench-mosquitto-") as tmp:
        for _attempt in range(3):  # the free port can be taken between probe and bind: retry
            port = free_port()
            config = Path(tmp, "mosquitto.conf")
            log = Path(tmp, "mosquitto.log")
            config.write_text(
                f"listener {port} {HOST}\n"
                "allow_anonymous true\n"
                # Run as whoever runs the benchmark. As root, mosquitto would otherwise switch
                # to the "mosquitto" user, which cannot write the log in our private directory
                # and which clears the parent-death signal set below.
                f"user {getpass.getuser()}\n"
                "persistence false\n"
                f"max_queued_messages {max_queued_messages}\n"
                "sys_interval 1\n"
                f"log_dest file {log}\n"
                "log_type error\nlog_type warning\n"
            )
            process = subprocess.Popen(
                [binary, "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # Safe here: the main process starts mosquitto before any thread.
                preexec_fn=die_with_parent,
                # Out of the terminal's process group: Ctrl-C reaches only the main process,
                # which stops the broker after the workers.
                start_new_session=True,
            )
            try:
                if wait_for_port(port, process, timeout_s=5.0):
                    break
            except BaseException:
                stop_process(process)
                raise
            stop_process(process)
        else:
            detail = log.read_text() if log.exists() else ""
            raise BenchError(f"mosquitto did not start: {detail.strip()}")
        try:
            yield Broker(port, process, log)
        finally:
            stop_process(process)


def wait_for_port(port: int, process: subprocess.Popen[bytes], *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


# -- MQTT helpers (paho) ---------------------------------------------------------------------------


def paho_client(client_id: str) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)


def connect(client: Any, port: int, *, timeout_s: float = 10.0) -> None:
    """Connect a paho client without its network thread and wait for the CONNACK."""
    connected = threading.Event()

    def on_connect(*_args: Any) -> None:
        connected.set()

    client.on_connect = on_connect
    client.connect(HOST, port, keepalive=120)
    deadline = time.monotonic() + timeout_s
    while not connected.is_set():
        if time.monotonic() > deadline:
            raise BenchError(f"no CONNACK from {HOST}:{port}")
        client.loop(0.05)


class DropWatcher:
    """Follows mosquitto's count of dropped messages (``$SYS/broker/publish/messages/dropped``).

    mosquitto republishes a $SYS value only when it changes, retained but with a 60 s expiry:
    asking once at the end of a long phase finds nothing. So a client subscribes when the broker
    starts and keeps the latest value (paho's network thread; a few messages in all).
    """

    def __init__(self, port: int) -> None:
        self.value: int | None = None
        self._client = paho_client(f"bench-sys-{os.getpid()}-{port}")
        self._client.on_message = self._on_message
        connect(self._client, port)
        self._client.subscribe(DROPPED_TOPIC, qos=0)
        self._client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        text = message.payload.decode(errors="replace")
        if text.isdigit():
            self.value = int(text)

    def read(self) -> int | None:
        """The count now: waits one sys_interval (1 s) for the broker's next update."""
        time.sleep(1.2)
        return self.value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()


def reap(processes: list[Any], *, grace_s: float) -> None:
    """Wait up to ``grace_s`` for each worker to finish, then SIGTERM it, then SIGKILL it."""
    for process in processes:
        if process.pid is None:  # never started
            continue
        process.join(timeout=grace_s)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def mosquitto_version() -> str:
    with contextlib.suppress(OSError, BenchError, subprocess.SubprocessError):
        out = subprocess.run(
            [mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        return out.splitlines()[0].strip()
    return "mosquitto (version unknown)"
