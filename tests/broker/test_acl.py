"""The shipped ACL (deploy/mosquitto.acl) against a real mosquitto.

Everything is real: a mosquitto process with ``allow_anonymous false``, a password file made with
mosquitto_passwd (users ``host1``, ``host2``, ``controller``) and ``acl_file`` pointing at the
repository's deploy/mosquitto.acl, and real MQTT 3.1.1 clients (aiomqtt, plus a raw socket for a
connection that drops without DISCONNECT so the broker fires its will). One more test checks that
README.md shows the same rules as the file.

With MQTT 3.1.1 mosquitto acknowledges a refused publish and drops it silently, so a negative check
never relies on a timeout: after the messages that must not arrive, the test sends an allowed marker
and waits for it. Mosquitto handles each client's packets in order, acknowledges a QoS 1 publish
only once it has routed it, queues retained messages when a subscription is made, and feeds a
subscriber first in first out; so once the marker arrives, anything allowed would have come before.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from tests.helpers import REPO, Broker, _spawn, free_port, wait_for_port

ACL_FILE = REPO / "deploy" / "mosquitto.acl"
PASSWORDS = {"host1": "host1-pass", "host2": "host2-pass", "controller": "controller-pass"}
TIMEOUT_S = 5.0
MARKER = b"marker"
OFFLINE = b"offline"

Received = list[tuple[str, bytes]]


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    passwd = tmp_path / "passwd"
    for index, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run(
            ["mosquitto_passwd", "-b", *create, str(passwd), user, password],
            check=True,
            capture_output=True,
        )
    passwd.chmod(0o600)
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        f"acl_file {ACL_FILE}\npersistence false\n"
        # As root, mosquitto would switch to its own user, which cannot read the test's
        # private directory; as any other user this line is ignored.
        "user root\n"
    )
    broker = Broker("127.0.0.1", port, _spawn(config), config)
    try:
        wait_for_port(port)
        yield broker
    finally:
        if broker.process.poll() is None:
            broker.stop()


def client(broker: Broker, user: str, will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=PASSWORDS[user],
        will=will,
        timeout=TIMEOUT_S,
    )


async def receive_until(subscriber: aiomqtt.Client, topic: str, payload: bytes) -> Received:
    """Every message ``subscriber`` gets before (``topic``, ``payload``), which ends the wait."""
    received: Received = []
    async with asyncio.timeout(TIMEOUT_S):
        async for message in subscriber.messages:
            assert isinstance(message.payload, bytes)
            if (message.topic.value, message.payload) == (topic, payload):
                return received
            received.append((message.topic.value, message.payload))
    raise AssertionError("the subscriber's message stream ended")


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


async def connect_and_drop(broker: Broker, user: str, will_topic: str, will: bytes) -> None:
    """Connect with a retained QoS 1 will and drop the connection without DISCONNECT.

    The broker then publishes the will, if the ACL lets ``user`` write ``will_topic``. Returns once
    the connection is accepted and closed.
    """
    # MQTT 3.1.1 CONNECT: user name, password, will retain, will QoS 1, will, clean session.
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + (60).to_bytes(2, "big")
    body += _string("") + _string(will_topic) + _string(will)
    body += _string(user) + _string(PASSWORDS[user])
    assert len(body) < 128  # one-byte remaining length
    reader, writer = await asyncio.open_connection(broker.host, broker.port)
    try:
        writer.write(bytes([0x10, len(body)]) + body)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT_S):
            assert await reader.readexactly(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
    finally:
        writer.close()
        await writer.wait_closed()


def rules(text: str) -> list[list[str]]:
    """The ACL's rule lines, split into words (comments and blank lines left out)."""
    lines = (line.split() for line in text.splitlines())
    return [words for words in lines if words and not words[0].startswith("#")]


def test_readme_shows_the_rules_of_the_shipped_acl() -> None:
    readme = (REPO / "README.md").read_text()
    start = readme.index("```text\n", readme.index("deploy/mosquitto.acl")) + len("```text\n")
    shown = readme[start : readme.index("```", start)]
    assert rules(shown) == rules(ACL_FILE.read_text())


async def test_agent_publishes_its_own_stats_and_the_controller_receives_them(
    acl_broker: Broker,
) -> None:
    own = [
        ("balloon/v1/guest/host1/g1/stats", b"guest"),
        ("balloon/v1/host/host1/stats", b"host"),
        ("balloon/v1/host/host1/batch", b"batch"),
    ]
    async with client(acl_broker, "controller") as controller, client(acl_broker, "host1") as host1:
        await controller.subscribe("balloon/v1/#", qos=1)
        for topic, payload in own:
            await host1.publish(topic, payload, qos=1)
        await host1.publish("balloon/v1/host/host1/stats", MARKER, qos=1)
        assert await receive_until(controller, "balloon/v1/host/host1/stats", MARKER) == own


async def test_agent_cannot_publish_outside_its_own_topics(acl_broker: Broker) -> None:
    forbidden = [
        "balloon/v1/guest/host2/g1/stats",
        "balloon/v1/host/host2/stats",
        "balloon/v1/host/host2/batch",
        "balloon/v1/controller/evil/alive",
        "balloon/v1/guest/host1/g1/target",
        "balloon/v1/guest/host2/g1/target",
    ]
    async with client(acl_broker, "controller") as controller, client(acl_broker, "host1") as host1:
        await controller.subscribe("balloon/v1/#", qos=1)
        for topic in forbidden:
            # Retained, so a dropped publish cannot hide in the retained store either.
            await host1.publish(topic, b"forged", qos=1, retain=True)
        await host1.publish("balloon/v1/host/host1/stats", MARKER, qos=1)
        assert await receive_until(controller, "balloon/v1/host/host1/stats", MARKER) == []

    async with client(acl_broker, "controller") as late:
        await late.subscribe("balloon/v1/#", qos=1)
        # Retained messages are queued when the subscription is made, before this marker.
        await late.publish("balloon/v1/controller/marker/alive", MARKER, qos=1)
        assert await receive_until(late, "balloon/v1/controller/marker/alive", MARKER) == []


async def test_agent_reads_only_its_own_hosts_targets(acl_broker: Broker) -> None:
    async with client(acl_broker, "controller") as controller:
        await controller.publish("balloon/v1/guest/host1/g1/target", b"t1", qos=1, retain=True)
        await controller.publish("balloon/v1/guest/host2/g1/target", b"t2", qos=1, retain=True)
        async with client(acl_broker, "host1") as host1, client(acl_broker, "host2") as host2:
            # Wider than the agent's own filter: the ACL, not the filter, must keep the rest out.
            await host1.subscribe("balloon/v1/#", qos=1)
            await host2.publish("balloon/v1/host/host2/stats", b"host2 stats", qos=1)
            await controller.publish("balloon/v1/guest/host1/marker/target", MARKER, qos=1)
            received = await receive_until(host1, "balloon/v1/guest/host1/marker/target", MARKER)
    assert received == [("balloon/v1/guest/host1/g1/target", b"t1")]


async def test_controller_presence_and_will(acl_broker: Broker) -> None:
    will = aiomqtt.Will("balloon/v1/controller/c1/alive", OFFLINE, qos=1, retain=True)
    async with client(acl_broker, "controller", will) as c1, client(acl_broker, "controller") as c3:
        await c3.subscribe("balloon/v1/controller/#", qos=1)
        await c1.publish("balloon/v1/controller/c1/alive", b"online", qos=1, retain=True)
        # A host agent's will cannot announce a replica either. The broker sees this drop before
        # it answers the next connection's CONNECT, so a will it let through would come first.
        await connect_and_drop(acl_broker, "host1", "balloon/v1/controller/evil/alive", b"online")
        await connect_and_drop(acl_broker, "controller", "balloon/v1/controller/c2/alive", OFFLINE)
        assert await receive_until(c3, "balloon/v1/controller/c2/alive", OFFLINE) == [
            ("balloon/v1/controller/c1/alive", b"online")
        ]

    async with client(acl_broker, "controller") as late:
        await late.subscribe("balloon/v1/controller/+/alive", qos=1)
        await late.publish("balloon/v1/controller/marker/alive", MARKER, qos=1)
        retained = await receive_until(late, "balloon/v1/controller/marker/alive", MARKER)
    # c1 left cleanly (DISCONNECT: no will), c2 dropped (its will fired).
    assert sorted(retained) == [
        ("balloon/v1/controller/c1/alive", b"online"),
        ("balloon/v1/controller/c2/alive", OFFLINE),
    ]
