"""Scale-out: two controller replicas split one fleet, and one takes over when the other dies."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import aiomqtt
import orjson

from autoscaler.adapters.dry_run import DryRunAdapter
from autoscaler.config import load_settings
from autoscaler.service.cluster import Membership
from autoscaler.service.controller import Controller
from autoscaler.wire import encode_presence
from tests.helpers import PROGRAM, REPO, Broker, poll_until, running
from tests.helpers.data import stats_message

GIB = 2**30
HOSTS = [f"host{i:02d}" for i in range(24)]


def test_rendezvous_ownership_is_shared_and_moves_little() -> None:
    a, b, c = Membership("a", "p"), Membership("b", "p"), Membership("c", "p")
    online = encode_presence(time.time(), 30.0)
    for m in (a, b, c):
        for other in ("a", "b", "c"):
            m.handle(f"p/controller/{other}/alive", online)
    owners = {h: a.owner(h) for h in HOSTS}
    assert all(b.owner(h) == c.owner(h) == owners[h] for h in HOSTS)  # everyone agrees
    assert set(owners.values()) == {"a", "b", "c"}
    a.handle("p/controller/c/alive", b"offline")
    moved = [h for h in HOSTS if a.owner(h) != owners[h]]
    assert moved == [h for h in HOSTS if owners[h] == "c"]  # only c's hosts move
    a.handle("p/controller/a/alive", b"offline")  # a stale will of our own never evicts us
    assert "a" in a.live
    for bogus in (
        "p/controller/x/y/alive",
        "p/controller//alive",
        f"p/controller/{'z' * 200}/alive",
    ):
        a.handle(bogus, online)  # not a replica id: no share of the hosts
    assert a.live == {"a", "b"}


async def publish_round(broker: Broker, prefix: str, ts: float) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        for host in HOSTS:
            await pub.publish(f"{prefix}/guest/{host}/vm/stats", stats_message(ts), qos=1)


def steered_by_subprocess(log_path: Path) -> set[str]:
    hosts = set()
    # The last line may be half written while replica b runs: only whole lines count.
    for line in log_path.read_text().split("\n")[:-1]:
        record = json.loads(line)
        if record["logger"] == "autoscaler.decisions":
            hosts.add(record["host"])
    return hosts


async def test_two_replicas_split_the_fleet_and_survive_a_death(
    mosquitto: Broker, tmp_path: Path
) -> None:
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "b.toml"
    config.write_text(
        f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\ntopic_prefix = "{prefix}"\n'
        '[controller]\ninterval_s = 0.3\nreplica_id = "b"\n[log]\nformat = "json"\n'
    )
    log_path = tmp_path / "b.log"
    with log_path.open("w") as log_file:
        replica_b = subprocess.Popen(  # noqa: ASYNC220 - returns at once; runs beside the loop
            [*PROGRAM, "run", "--config", str(config)], stderr=log_file, cwd=REPO
        )
    adapter = DryRunAdapter()
    settings = load_settings(
        None,
        mqtt={"host": mosquitto.host, "port": mosquitto.port, "topic_prefix": prefix},
        controller={"interval_s": 0.3, "replica_id": "a"},
    )
    replica_a = Controller(settings, adapter=adapter)
    try:
        async with running(replica_a):
            membership = replica_a.membership
            assert membership is not None
            await poll_until(
                lambda: membership.live == {"a", "b"}, 20, what="replica b to announce itself"
            )
            now = time.time()
            await publish_round(mosquitto, prefix, now - 10)
            await publish_round(mosquitto, prefix, now - 5)

            def steered_a() -> set[str]:
                return {host for host, _ in adapter.targets}

            await poll_until(
                lambda: steered_a() | steered_by_subprocess(log_path) == set(HOSTS),
                20,
                what="every host steered by one replica or the other",
            )
            steered_b = steered_by_subprocess(log_path)
            # b may have steered its hosts before a has read the last of their samples.
            await poll_until(
                lambda: replica_a.counters["not_owned"] >= 2 * len(steered_b),
                10,
                what="replica a to skip both samples of each of b's hosts",
            )
            assert steered_a() and steered_b
            assert steered_a().isdisjoint(steered_b)  # no guest steered by two replicas
            assert steered_a() | steered_b == set(HOSTS)  # and none forgotten
            assert replica_a.counters["not_owned"] == 2 * len(steered_b)

            replica_b.send_signal(signal.SIGKILL)  # no goodbye: the broker's will announces it
            replica_b.wait(timeout=10)
            await poll_until(
                lambda: membership.live == {"a"}, 15, what="replica a to notice b's death"
            )
            await publish_round(mosquitto, prefix, now - 2)
            await publish_round(mosquitto, prefix, now - 1)
            await poll_until(
                lambda: steered_a() == set(HOSTS), 20, what="replica a to steer every host"
            )
    finally:
        if replica_b.poll() is None:
            replica_b.kill()
            replica_b.wait()


async def test_a_retained_ghost_presence_holds_hosts_no_longer_than_its_ttl(
    mosquitto: Broker,
) -> None:
    """A replica that died without its will (or a presence left by hand) stays retained on the
    broker; it must lose its hosts once its TTL has passed, and an ``online`` without a time
    (an older version's) must not take any."""
    prefix = f"ghost-{uuid.uuid4().hex[:8]}"
    ghost_ttl_s = 2.0
    ghosts = {
        f"{prefix}/controller/ghost/alive": orjson.dumps(
            {"state": "online", "ts": time.time(), "ttl_s": ghost_ttl_s}
        ),
        f"{prefix}/controller/old/alive": b"online",
    }
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
        for topic, payload in ghosts.items():
            await pub.publish(topic, payload, qos=1, retain=True)
    adapter = DryRunAdapter()
    settings = load_settings(
        None,
        mqtt={"host": mosquitto.host, "port": mosquitto.port, "topic_prefix": prefix},
        controller={"interval_s": 0.2, "replica_id": "a", "presence_ttl_s": 1.0},
    )
    controller = Controller(settings, adapter=adapter)
    membership = controller.membership
    assert membership is not None
    try:
        async with running(controller):
            await poll_until(lambda: "ghost" in membership.live, 5, what="the ghost's presence")
            assert membership.live == {"a", "ghost"}  # the untimed "online" counts for nothing
            waited_s = await poll_until(
                lambda: membership.live == {"a"}, 10, what="the ghost to expire"
            )
            # Expiry is checked every third of our own TTL.
            assert waited_s <= ghost_ttl_s + settings.controller.presence_ttl_s / 3 + 0.5
            now = time.time()
            await publish_round(mosquitto, prefix, now - 2)
            await publish_round(mosquitto, prefix, now - 1)
            await poll_until(
                lambda: {host for host, _ in adapter.targets} == set(HOSTS),
                10,
                what="every host steered by the one live replica",
            )
    finally:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            for topic in ghosts:
                await pub.publish(topic, b"", qos=1, retain=True)
