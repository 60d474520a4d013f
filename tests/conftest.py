"""Shared fixtures. ``mosquitto`` starts a real broker on a free loopback port for the session."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_TRACE = REPO.parent / "shared" / "traces" / "bitbrains-rnd-2013-08.csv.gz"


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


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A real mosquitto shared by the session; tests isolate themselves by topic prefix."""
    broker = start_broker(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, for tests that stop and restart it."""
    broker = start_broker(tmp_path)
    yield broker
    if broker.process.poll() is None:
        broker.stop()
