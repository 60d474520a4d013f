"""Broker security against a real mosquitto with TLS client certificates and a password file.

The test setup makes a throwaway CA, a server certificate for 127.0.0.1 and a client certificate
with openssl, and a password file with mosquitto_passwd.
"""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from autoscaler.config import Settings, redacted
from autoscaler.service.controller import Controller
from autoscaler.service.mqtt import make_client
from tests.helpers import (
    Broker,
    _spawn,
    broker_settings,
    free_port,
    poll_until,
    running,
    wait_for_port,
)

PASSWORD = "s3cret-Pa55-never-logged"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=directory,
    )
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=directory,
        )
        ext = directory / f"{name}.ext"
        ext.write_text(extra + "\n" if extra else "basicConstraints=CA:FALSE\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            "-extfile",
            ext.name,
            cwd=directory,
        )


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[Broker]:
    make_certificates(tmp_path)
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "controller", PASSWORD],
        check=True,
        capture_output=True,
    )
    (tmp_path / "passwd").chmod(0o600)
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\n"
        f"keyfile {tmp_path / 'server.key'}\nrequire_certificate true\n"
        f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}\npersistence false\n"
        # Started as root, mosquitto would switch to its own user, which cannot read the
        # test's private directory; as any other user this line is ignored.
        "user root\n"
    )
    broker = Broker("127.0.0.1", port, _spawn(config), config)
    wait_for_port(port)
    yield broker
    broker.stop()


def tls_settings(broker: Broker, directory: Path, password: str, prefix: str) -> Settings:
    return broker_settings(
        broker,
        prefix,
        mqtt={
            "username": "controller",
            "password": password,
            "tls_ca": str(directory / "ca.crt"),
            "tls_cert": str(directory / "client.crt"),
            "tls_key": str(directory / "client.key"),
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 0.5,
        },
        controller={"interval_s": 0.2},
    )


async def test_controller_ingests_over_tls_with_password(
    secure_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    prefix = f"tls-{uuid.uuid4().hex[:8]}"
    settings = tls_settings(secure_broker, tmp_path, PASSWORD, prefix)
    controller = Controller(settings)
    async with running(controller):
        async with make_client(settings.mqtt) as pub:
            payload = {"ts": time.time(), "ram_bytes": 2**32, "stats": {"free-memory": 2**30}}
            await pub.publish(f"{prefix}/guest/h/g/stats", orjson.dumps(payload), qos=1)
        await poll_until(lambda: controller.counters["ingested"] >= 1, 10, what="the sample")
    assert controller.counters["ingested"] == 1
    assert PASSWORD not in caplog.text
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in orjson.dumps(redacted(settings)).decode()


async def test_wrong_password_is_refused_and_retried_not_fatal(
    secure_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tls_settings(secure_broker, tmp_path, "wrong-password", "tls-x")
    controller = Controller(settings)
    async with running(controller, connect=False) as task:
        # Refused, waited, tried again.
        await poll_until(lambda: controller.link.disconnects >= 2, 10, what="two refused attempts")
        assert not controller.link.connected.is_set()
        assert not task.done()
    assert "wrong-password" not in caplog.text
