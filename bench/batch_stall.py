"""How long a burst of host-agent batches holds the controller's event loop.

Starts a private mosquitto and a real :class:`autoscaler.service.controller.Controller`
(dry-run adapter, no ticks after the first), lets one guest report normally, then has
``--batches`` host agents (``mosquitto_pub`` processes, no shared GIL) each publish one batch
of ``--guests`` guests at once, and right after them an OOM kill of the first guest. Prints the
longest event-loop stall seen during the burst (a 1 ms ticker's largest overshoot), how long the
burst took to drain, and how long the OOM kill waited for its emergency target.

Run: ``.venv/bin/python -m bench.batch_stall [--batches 20] [--guests 25000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from autoscaler.adapters.dry_run import DryRunAdapter
from autoscaler.config import load_settings
from autoscaler.service.controller import Controller
from tests.helpers import poll_until, start_broker
from tests.helpers.data import guest_sample, host_batch

GIB = 2**30
VICTIM_BALLOON = GIB // 4096  # an emergency deflate needs a balloon to deflate


async def ticker(lags_s: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        lags_s.append(time.perf_counter() - started - 0.001)


async def burst(port: int, prefix: str, batches: int, batch: Path, extra: Path) -> Burst:
    """A shell that, once told to go, runs one ``mosquitto_pub`` per host agent and then one for
    ``extra`` (a single guest's stats). Forked before the measurement: forking a process of this
    size is itself a stall of the event loop."""
    agents = " & ".join(
        f"mosquitto_pub -p {port} -q 1 -t {prefix}/host/h{k}/batch -f {batch}"
        for k in range(batches)
    )
    single = f"mosquitto_pub -p {port} -q 1 -t {prefix}/guest/victim/g/stats -f {extra}"
    return await asyncio.create_subprocess_exec(
        "bash", "-c", f"read go; {agents} & {single} & wait", stdin=asyncio.subprocess.PIPE
    )


Burst = asyncio.subprocess.Process


async def go(process: Burst) -> None:
    assert process.stdin is not None
    process.stdin.write(b"go\n")
    await process.stdin.drain()
    await process.wait()


def write_round(workdir: Path, name: str, guests: int, ts_s: float, oom_kills: int) -> int:
    batch = host_batch(guests, ts_s)
    (workdir / f"{name}.json").write_bytes(batch)
    victim = orjson.dumps(guest_sample(ts_s, oom_kills=oom_kills, balloon_pages=VICTIM_BALLOON))
    (workdir / f"{name}-victim.json").write_bytes(victim)
    return len(batch)


async def measure(
    controller: Controller,
    adapter: DryRunAdapter,
    port: int,
    prefix: str,
    batches: int,
    workdir: Path,
    name: str,
) -> tuple[list[float], float, float]:
    """One burst: the loop's stalls, seconds to the victim's target and to the burst's end."""
    seen = controller.counters["messages"]
    process = await burst(
        port, prefix, batches, workdir / f"{name}.json", workdir / f"{name}-victim.json"
    )
    lags_s: list[float] = []
    watch = asyncio.Event()
    watcher = asyncio.create_task(ticker(lags_s, watch))
    started = time.perf_counter()
    await go(process)
    await poll_until(
        lambda: ("victim", "g") in adapter.targets or name == "warm",
        600,
        what="the emergency",
        interval_s=0.005,
    )
    emergency_s = time.perf_counter() - started
    await poll_until(
        lambda: controller.counters["messages"] >= seen + batches + 1 and not controller._batches,
        600,
        what="every message",
        interval_s=0.005,
    )
    await asyncio.sleep(0.1)  # the last chunk, if any, is being stored
    drained_s = time.perf_counter() - started
    watch.set()
    await watcher
    return lags_s, emergency_s, drained_s


async def main(batches: int, guests: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="batch-stall-"))
    broker = start_broker(workdir)
    prefix = f"stall-{uuid.uuid4().hex[:8]}"
    settings = load_settings(
        None,
        mqtt={"host": broker.host, "port": broker.port, "topic_prefix": prefix},
        controller={"interval_s": 3600.0, "max_guests": 1_000_000},
    )
    adapter = DryRunAdapter()
    controller = Controller(settings, adapter=adapter)
    now = time.time()
    # A first round makes every guest known (the fleet grows its tables once), the second is
    # measured: hosts reporting as usual, the victim with an OOM kill.
    size = write_round(workdir, "warm", guests, now - 5, 0)
    write_round(workdir, "measured", guests, now, 1)
    stop = asyncio.Event()
    run = asyncio.create_task(controller.run(stop))
    try:
        await asyncio.wait_for(controller.link.connected.wait(), 10)
        for name in ("warm", "measured"):
            lags_s, emergency_s, drained_s = await measure(
                controller, adapter, broker.port, prefix, batches, workdir, name
            )
        print(
            f"{batches} batches x {guests} guests ({size / 2**20:.1f} MiB each): "
            f"longest loop stall {max(lags_s) * 1e3:.1f} ms, "
            f"stalls > 50 ms: {sum(lag > 0.05 for lag in lags_s)}, "
            f"emergency target after {emergency_s:.2f} s, burst over after {drained_s:.1f} s; "
            f"messages {controller.counters['messages']}, "
            f"ingested {controller.counters['ingested']}, rejected {dict(controller.rejected)}"
        )
    finally:
        stop.set()
        await asyncio.wait_for(run, 30)
        broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--guests", type=int, default=25_000)
    args = parser.parse_args()
    asyncio.run(main(args.batches, args.guests))
