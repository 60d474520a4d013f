"""What every long-running process needs around its work: periodic tasks, a stop, signals.

- :func:`every`: call a function at a fixed rate, without drift;
- :func:`run_until`: run named tasks until a stop event is set, then cancel them;
- :func:`install_signal_handlers`: SIGTERM/SIGINT stop gracefully (a second one exits at once,
  a watchdog bounds the graceful stop), SIGHUP reloads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised inside a task group to cancel its tasks on shutdown."""


async def every(
    interval_s: float | Callable[[], float],
    step: Callable[[], object],
    *,
    delay_first: bool = False,
) -> None:
    """Call ``step`` (awaiting it if it returns an awaitable) every ``interval_s``, forever.

    The schedule is fixed-rate: each call is due one interval after the previous one was due,
    not after it finished, so the time a step takes does not add up. After a stall longer
    than an interval the missed calls are skipped, not run back to back. ``interval_s`` may be
    a function, read before each wait (a reload may change it). The first call is at once, or
    one interval from now with ``delay_first``.
    """

    def interval() -> float:
        return interval_s() if callable(interval_s) else interval_s

    next_s = time.monotonic()
    if delay_first:
        next_s += interval()
        await asyncio.sleep(next_s - time.monotonic())
    while True:
        result = step()
        if inspect.isawaitable(result):
            await result
        next_s = max(next_s + interval(), time.monotonic())
        await asyncio.sleep(next_s - time.monotonic())


async def run_until(
    stop: asyncio.Event,
    *tasks: tuple[str, Coroutine[Any, Any, None]],
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Run coroutines as named tasks until ``stop`` is set (then call ``on_stop``), and cancel
    them; one that fails first ends the others and raises."""
    try:
        async with asyncio.TaskGroup() as group:
            for name, coroutine in tasks:
                group.create_task(coroutine, name=name)
            await group.create_task(stop.wait(), name="stop")
            if on_stop is not None:
                on_stop()
            raise _Stop
    except* _Stop:
        pass


def install_signal_handlers(
    stop: asyncio.Event,
    on_reload: Callable[[], None] | None = None,
    *,
    on_stop: Callable[[], None] | None = None,
    on_exit: Callable[[], object] | None = None,
    shutdown_timeout_s: Callable[[], float] | None = None,
) -> None:
    """First SIGTERM/SIGINT: ``on_stop``, then a graceful stop, cut short by an exit after
    ``shutdown_timeout_s()`` if given. Second: ``on_exit``, then exit at once. SIGHUP:
    ``on_reload``.

    The stop signals get Python-level handlers (:func:`signal.signal`), not the event loop's:
    those run between two bytecodes of whatever the main thread does, so a second signal and the
    timeout work while the loop is busy, and ``on_stop`` (which must only set a flag) at once.
    """
    loop = asyncio.get_running_loop()
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        name = signal.Signals(signum).name
        if stopping:
            log.warning("second %s, exiting now", name)
            if on_exit is not None:
                on_exit()
            os._exit(128 + signum)
        stopping = True
        log.info("%s received, shutting down", name)
        if on_stop is not None:
            on_stop()
        if shutdown_timeout_s is not None:
            _exit_after(shutdown_timeout_s(), 128 + signum)
        loop.call_soon_threadsafe(stop.set)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)


def _exit_after(timeout_s: float, status: int) -> None:
    """Exit the process with ``status`` after ``timeout_s`` unless it has ended by then.

    A thread, not a loop timer: the loop may be what keeps the shutdown from finishing. The
    service manager's stop timeout would otherwise kill the process (see deploy/).
    """

    def expire() -> None:
        log.error("shutdown took longer than %g s, exiting now", timeout_s)
        os._exit(status)

    watchdog = threading.Timer(timeout_s, expire)
    watchdog.daemon = True
    watchdog.start()
