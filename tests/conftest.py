"""Fixtures shared by the tests; the helpers they use live in :mod:`tests.helpers`.

``mosquitto`` starts a real broker on a free loopback port for the session, ``private_mosquitto``
one for a test of its own. ``bitbrains_trace`` is the Bitbrains month in the directory that
``$BALLOON_TRACES_DIR`` names; the tests that need it are skipped when the variable is unset (the
default) or the file is not there. ``.ci/run`` sets it to ``../shared/traces`` beside the
repository.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from autoscaler.recordings.traces import BITBRAINS_MONTH, TRACES_DIR_ENV, find_trace
from tests.helpers import Broker, start_broker


@pytest.fixture(scope="session")
def bitbrains_trace() -> Path:
    """The Bitbrains month in ``$BALLOON_TRACES_DIR``; skips the test when it is not there."""
    path = find_trace()
    if path is None:
        pytest.skip(f"no {BITBRAINS_MONTH} in ${TRACES_DIR_ENV} (set it to the traces directory)")
    return path


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
