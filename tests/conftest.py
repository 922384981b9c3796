"""Fixtures of the core suite: a real nats-server on a free loopback port (`nats`), a
real redis-server (`redis`), and real lobbyd processes (`lobbyd`). The processes
themselves come from tests/harness.py, the one harness every suite and the benchmark
share; its names are re-exported here (`from conftest import Lobbyd, NatsServer, ...`)
for the tests that import them so.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from harness import (
    ROOT,
    Lobbyd,
    NatsServer,
    RedisServer,
    base_env,
    daemon_env,
    free_port,
    lobbyd_command,
    nats_server_binary,
    run_lobbyd,
    skip_unless_required,
    wait_for,
)
from selection import (
    _classified_honestly,
    count_commands,
    deselect_in_process,
    record_durations,
)

# every lobbyd command line is counted (tests/selection.py: what binary_tests runs)
lobbyd_command = count_commands()  # noqa: F811

# The tests interrupt lobbyctl, the demo and daemons with SIGINT, as a terminal's Ctrl-C
# does. A suite started with SIGINT ignored (a script's background job, nohup) would hand
# that on to every process it starts, and Python installs no KeyboardInterrupt for a
# signal ignored at its start: the tests would wait for programs that cannot hear them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

__all__ = ["ROOT", "Lobbyd", "NatsServer", "RedisServer", "base_env", "daemon_env", "free_port",
           "lobbyd_command", "nats_server_binary", "run_lobbyd", "skip_unless_required",
           "wait_for"]


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def lobbyd(tmp_path: Path, nats: NatsServer) -> Iterator[Callable[..., Lobbyd]]:
    """Factory: lobbyd(name, **ENV) starts a daemon against the test's NATS server.

    Defaults: HOSTNAME=name, a private LABELS_PATH, fast KEEP_ALIVE/TTL so the
    suite runs in seconds. Pass start=False to get an unstarted daemon.
    """
    started: list[Lobbyd] = []

    def make(name: str = "a", start: bool = True, wait: bool = True,
             nats: NatsServer = nats, **env: str | int) -> Lobbyd:
        d = Lobbyd(daemon_env(name, nats.url, tmp_path, **env), tmp_path, name, nats)
        started.append(d)
        return d.start(wait=wait) if start else d

    yield make
    for d in started:
        d.stop(signal.SIGKILL, timeout=5)


def pytest_configure(config: pytest.Config) -> None:
    record_durations(config)  # LOBBYD_DURATIONS_OUT=path (`nox -s durations`)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    deselect_in_process(config, items)  # LOBBYD_BINARY_ONLY=1 (binary_tests): the daemon's only


__all__ += ["_classified_honestly"]  # an autouse fixture, active for every test below tests/
