"""A host agent in batch mode: one message per round, the controller steers every guest.

The device side is the Firecracker API stand-in of tests/firecracker_api.py (Firecracker needs
KVM, which this machine lacks); agent, broker and controller are the real ones.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from autoscaler.adapters.firecracker import FirecrackerAdapter
from autoscaler.agent import HostAgent
from autoscaler.config import load_settings
from autoscaler.controller import Controller
from tests.conftest import Broker
from tests.firecracker_api import FirecrackerApi, MicroVm


async def test_batched_host_agent_and_controller(mosquitto: Broker) -> None:
    prefix = f"batch-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="fcb.", dir="/tmp") as directory:
        run_dir = Path(directory)
        servers = [
            FirecrackerApi(run_dir / f"vm{i}.sock", MicroVm(mem_size_mib=2048)) for i in range(4)
        ]
        settings = load_settings(
            None,
            mqtt={"host": mosquitto.host, "port": mosquitto.port, "topic_prefix": prefix},
            controller={"interval_s": 0.3},
            adapter={
                "kind": "firecracker",
                "firecracker": {"socket_glob": str(run_dir / "*.sock"), "stats_interval_s": 1},
            },
            agent={"mode": "host", "host_id": "fc-host", "interval_s": 0.3, "batch": True},
        )
        agent = HostAgent(settings, FirecrackerAdapter())
        controller_settings = settings.model_copy(
            update={"adapter": settings.adapter.model_copy(update={"kind": "mqtt"})}
        )
        controller = Controller(controller_settings)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(controller.run(stop)), asyncio.create_task(agent.run(stop))]
        try:
            deadline = time.monotonic() + 20
            while not all(server.vm.amount_mib > 0 for server in servers):
                assert time.monotonic() < deadline, "the idle microVMs were never inflated"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # a few more rounds
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            for server in servers:
                server.kill()
    batches = agent.counters["batches_published"]
    samples = agent.counters["stats_published"]
    assert batches >= 2
    assert samples >= 4 * batches - 4  # four guests a round, but for a round cut by the stop
    assert samples - 4 <= controller.counters["ingested"] <= samples  # a last batch may be cut
    assert sum(controller.rejected.values()) == 0
