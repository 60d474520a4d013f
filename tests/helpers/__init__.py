"""Helpers shared by the tests (fixtures stay in ``tests/conftest.py``).

:func:`start_broker` starts a real mosquitto on a free loopback port; :func:`poll_until` (and
:func:`probe_until`, :func:`poll_until_sync`) wait for a condition with a deadline and fail the
test naming what they waited for; :func:`running` runs a controller (or a recorder, an agent)
connected to its broker for the length of a ``with`` block; :data:`PROGRAM` runs the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import numpy as np
import orjson
import pytest

from autoscaler.adapters.base import Adapter, DeviceAdapter, GuestReading, Target
from autoscaler.config import Settings, load_settings
from autoscaler.service.controller import Controller
from autoscaler.service.mqtt import MqttLink
from autoscaler.stats import STAT_INDEX
from autoscaler.tick import TargetChange

REPO = Path(__file__).resolve().parents[2]
PROGRAM = [sys.executable, "-m", "autoscaler"]
"""The command line, as a subprocess."""


def start_program(
    config: Path,
    *,
    stdout: int = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Starts ``balloon-autoscaler run --config CONFIG`` with its log on a text stderr pipe."""
    return subprocess.Popen(
        [*PROGRAM, "run", "--config", str(config)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


@contextlib.contextmanager
def reaped(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Kills ``process`` on the way out if it still runs, and collects its exit."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def read_until(stream: IO[str], needle: str, lines: list[str], timeout_s: float = 20.0) -> str:
    """Reads ``stream`` into ``lines`` up to the first line holding ``needle``; returns it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = stream.readline()
        lines.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not logged within {timeout_s} s:\n{''.join(lines)}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen[bytes]
    config: Path

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def start(self) -> None:
        self.process = _spawn(self.config)
        wait_for_port(self.port)


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto; .ci/run does this)")
    return found


def _spawn(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [mosquitto_binary(), "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_broker(directory: Path, extra: str = "") -> Broker:
    port = free_port()
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_queued_messages 100000\n{extra}"
    )
    broker = Broker("127.0.0.1", port, _spawn(config), config)
    wait_for_port(port)
    return broker


# -- waiting ---------------------------------------------------------------------------------------

T = TypeVar("T")


async def poll_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout_s: float,
    *,
    what: str,
    interval_s: float = 0.05,
    last_seen: Callable[[], object] | None = None,
) -> float:
    """Seconds until ``condition()`` (awaited if it returns an awaitable) is true.

    Fails the test, naming ``what`` (and ``last_seen()`` if given), when it is still false after
    ``timeout_s``. The condition is checked once more at the deadline, never only before it.
    """
    started_s = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started_s
        waited_s = time.monotonic() - started_s
        if waited_s >= timeout_s:
            seen = f"; last seen: {last_seen()!r}" if last_seen is not None else ""
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}{seen}", pytrace=False)
        await asyncio.sleep(min(interval_s, timeout_s - waited_s))


async def probe_until(
    probe: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    timeout_s: float,
    *,
    what: str,
    interval_s: float = 0.2,
) -> T:
    """The first value of ``probe()`` that is ``ok``; as :func:`poll_until` otherwise."""
    last: list[T] = []

    async def check() -> bool:
        last[:] = [await probe()]
        return ok(last[0])

    await poll_until(
        check,
        timeout_s,
        what=what,
        interval_s=interval_s,
        last_seen=lambda: last[0] if last else "nothing",
    )
    return last[0]


def poll_until_sync(
    condition: Callable[[], bool], timeout_s: float, *, what: str, interval_s: float = 0.01
) -> float:
    """:func:`poll_until` for tests that do not run in an event loop."""
    started_s = time.monotonic()
    while not condition():
        waited_s = time.monotonic() - started_s
        if waited_s >= timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}", pytrace=False)
        time.sleep(min(interval_s, timeout_s - waited_s))
    return time.monotonic() - started_s


# -- running a controller --------------------------------------------------------------------------


class Service(Protocol):
    """A controller, recorder or agent: an MQTT link, and ``run(stop)`` until ``stop`` is set."""

    @property
    def link(self) -> MqttLink: ...

    def run(self, stop: asyncio.Event) -> Coroutine[Any, Any, None]: ...


@contextlib.asynccontextmanager
async def running(
    service: Service, *, connect: bool = True, timeout_s: float = 10.0
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``service`` for the ``with`` block, connected to its broker first (``connect``).

    On the way out ``stop`` is set and the run awaited (cancelled and awaited after
    ``timeout_s``), so the block's assertions after it see a stopped service. An error the run
    ended with is raised, unless the block itself failed.
    """
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop), name=f"running {type(service).__name__}")
    failed = False
    try:
        if connect:
            connected = asyncio.create_task(service.link.connected.wait())
            await asyncio.wait(
                {connected, task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not connected.done():
                connected.cancel()
                await asyncio.wait({connected})
                if task.done():
                    task.result()  # raises what the run failed with
                    pytest.fail(f"{type(service).__name__} ended before it connected")
                pytest.fail(f"{type(service).__name__} not connected within {timeout_s} s")
        yield task
    except BaseException:
        failed = True
        raise
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout_s)
        except Exception:
            if not failed:
                raise


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a helper task and wait until it has ended; an error it ended with is raised."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        task.result()


# -- adapters --------------------------------------------------------------------------------------


def target_change(guest_id: str, num_pages: int, ram_bytes: int = 512 * 2**20) -> Target:
    """A target for ``guest_id`` on host ``h``, as a tick would hand it to an adapter."""
    return Target(
        host_id="h",
        guest_id=guest_id,
        num_pages=num_pages,
        ram_bytes=ram_bytes,
        policy="test",
        reason="test",
        ts_s=time.time(),
    )


async def wait_actual(
    adapter: DeviceAdapter, guest_id: str, pages: int, timeout_s: float = 30.0
) -> float:
    """Seconds until the device reports a balloon of ``pages`` (4 KiB pages)."""
    started_s = time.monotonic()
    await probe_until(
        lambda: adapter.read(guest_id),
        lambda r: r.actual_pages == pages,
        timeout_s,
        what=f"{guest_id}: a balloon of {pages} pages",
        interval_s=0.1,
    )
    return time.monotonic() - started_s


async def reading_after(
    adapter: DeviceAdapter, guest_id: str, wall_s: float, timeout_s: float = 15.0
) -> GuestReading:
    """The first reading with stats the guest sent after wall-clock ``wall_s``."""
    return await probe_until(
        lambda: adapter.read(guest_id),
        # last-update is whole seconds; a later second means after wall_s.
        lambda r: r.ts_s > wall_s and not np.isnan(r.values[STAT_INDEX["free-memory"]]),
        timeout_s,
        what=f"{guest_id}: stats sent after {wall_s:.1f}",
    )


def broker_settings(
    broker: Broker, prefix: str, *, mqtt: dict[str, Any] | None = None, **sections: Any
) -> Settings:
    """Settings that reach ``broker`` under ``prefix``; ``mqtt`` and ``sections`` override."""
    return load_settings(
        None,
        mqtt={"host": broker.host, "port": broker.port, "topic_prefix": prefix, **(mqtt or {})},
        **sections,
    )


def metered_controller(broker: Broker, prefix: str) -> tuple[Controller, int]:
    """A controller on ``broker`` under ``prefix``, ticking every 0.2 s, with its Prometheus
    endpoint on a free loopback port (returned with it)."""
    port = free_port()
    settings = broker_settings(
        broker,
        prefix,
        controller={"interval_s": 0.2},
        metrics={"port": port, "host": "127.0.0.1"},
    )
    return Controller(settings), port


def idle_fleet_tick(adapter: Adapter, guests: int) -> tuple[Controller, list[TargetChange]]:
    """A controller (no broker) fed one idle 4 GiB sample of each of ``guests`` guests, and the
    changes of a tick half a minute later, when every one of them is inflated a step."""
    gib = 2**30
    controller = Controller(load_settings(None), adapter=adapter)
    now = time.time()
    stats = {"total-memory": 4 * gib, "available-memory": 3 * gib}
    for i in range(guests):
        sample = {"ts": now, "ram_bytes": 4 * gib, "actual": 0, "stats": stats}
        topic = f"balloon/v1/guest/h{i // 100}/g{i}/stats"
        controller.handle_message(topic, orjson.dumps(sample))
    controller.flush()
    changes = controller.driver.tick(now + 30).changes
    assert len(changes) == guests
    return controller, changes
