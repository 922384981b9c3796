"""A host shutting down signals lobbyd and the server beside it (nats-server, Redis) at
the same time: a reboot, Ctrl-C on the demo's process group. lobbyd must still exit 0,
with no traceback, every time, whichever signal and whichever comes first. Every stop
path runs: a CALLBACK still running, an exec check mid-probe, the transport's close.
From source; the packaging suite runs it on the binary (LOBBYD_CMD)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from conftest import NatsServer, RedisServer, wait_for

#: rounds per transport: the broadcast is what most hosts run
ROUNDS = {"nats": 20, "kv": 6, "redis": 6}


def _server(kind: str, workdir: Path):
    if kind == "redis":
        return RedisServer(workdir).start()
    return NatsServer(workdir, jetstream=kind == "kv").start()


def _env(kind: str, server, workdir: Path) -> dict[str, str]:
    checks = workdir / "checks"
    checks.mkdir(exist_ok=True)
    (checks / "busy.check").write_text("labels=busy\nexec=sleep 5\ninterval=0.1\ntimeout=10\n")
    env = {"CALLBACK": "sleep 5", "CALLBACK_FIRST_RUN_DELAY": "0", "CHECKS_PATH": str(checks)}
    if kind == "redis":
        env.update(DRIVER="Redis", REDIS_PORT=str(server.port), **server.client_env)
    elif kind == "kv":
        env["DISCOVERY_MODE"] = "kv"
    return env


def _connected(d) -> bool:
    status, _, _ = d.request("GET", "/v1/health")
    return status == 200


@pytest.mark.parametrize("kind", sorted(ROUNDS))
def test_lobbyd_and_its_server_signalled_together_exit_cleanly(tmp_path, fleet, kind):
    failures = []
    for k in range(ROUNDS[kind]):
        sig = (signal.SIGTERM, signal.SIGINT)[k % 2]
        server = _server(kind, tmp_path)
        d = fleet(f"sd{k}.test", getattr(server, "url", "nats://127.0.0.1:1"),
                  **_env(kind, server, tmp_path))
        wait_for(lambda d=d: _connected(d), timeout=15, what=f"{d.name} connected")
        lobbyd_first = k % 4 < 2  # the two orders the signals of a shutdown come in
        first, second = (d.proc, server.proc) if lobbyd_first else (server.proc, d.proc)
        assert first is not None and second is not None
        first.send_signal(sig)
        second.send_signal(sig)
        try:
            code = d.proc.wait(timeout=10)  # well past SHUTDOWN_DEADLINE: a hang fails
        except subprocess.TimeoutExpired:
            code = None
        server.stop()
        logs = d.logs()
        if code != 0 or "Traceback" in logs or "shutdown took over" in logs:
            failures.append((k, sig.name, code, logs[-2500:]))
        d.stop(signal.SIGKILL, timeout=2)
    assert not failures, "\n\n".join(f"round {k} ({name}): exit {code}\n{tail}"
                                     for k, name, code, tail in failures)
