"""The Redis transport (SPEC 11): real redis-server processes, real lobbyd processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, Lobbyd, RedisServer, lobbyd_command, wait_for

CHANNEL = "lobby:discovery"


def start(lobbyd, name: str, redis: RedisServer, connected: bool = True, **env: str
          ) -> Lobbyd:
    """A lobbyd on Redis (DRIVER=Redis unless `env` says otherwise), once its API answers
    and, with `connected`, once it is connected (so it hears what is published next)."""
    d = lobbyd(name, start=False, **{"DRIVER": "Redis", "REDIS_PORT": str(redis.port),
                                     **redis.client_env, **env})
    d.start(wait=False)
    wait_for(lambda: d.request("GET", "/v1/discovery")[0] == 200, what=f"{name} API")
    if connected:
        wait_for(lambda: health(d)[0] == 200, what=f"{name} connected")
    return d


def health(d: Lobbyd) -> tuple[int, dict]:
    status, _, body = d.request("GET", "/v1/health")
    return status, json.loads(body)


def left(d: Lobbyd) -> dict[str, int]:
    """lobbyd_hosts_left_total by reason."""
    return {sample[len('lobbyd_hosts_left_total{reason="'):-2]: int(value)
            for sample, value in d.metrics().items()
            if sample.startswith('lobbyd_hosts_left_total{reason="')}


def go_envelope(hostname: str, labels: list[str] | None, message: str = "hi") -> str:
    """What a Go lobbyd's Redis driver publishes (encoding/json of its envelope)."""
    return json.dumps({"discovery": {"hostname": hostname, "labels": labels,
                                     "last_check": 1630612478}, "message": message},
                      separators=(",", ":"))


def test_daemons_over_redis_list_each_other_and_share_labels(lobbyd, redis) -> None:
    a = start(lobbyd, "a", redis, LABELS="service:web")
    b = start(lobbyd, "b", redis)
    wait_for(lambda: a.hostnames() == ["a", "b"] == b.hostnames(), what="a and b over Redis")
    assert b.labels_of("a") == ["service:web"]
    assert b.request("POST", "/v1/labels", body="role:x")[0] == 200
    wait_for(lambda: a.labels_of("b") == ["role:x"], what="b's label on a")
    status, body = health(a)
    assert status == 200 and body["drivers"] == [{
        "driver": "Redis", "connected": True, "server": f"redis://127.0.0.1:{redis.port}/0",
        "targets": f"redis://127.0.0.1:{redis.port}/0",
        "since": body["drivers"][0]["since"], "reconnects": 0}]
    b.stop(signal.SIGTERM)
    wait_for(lambda: a.hostnames() == ["a"], what="b's goodbye over Redis")
    assert left(a) == {"goodbye": 1, "expired": 0}  # said goodbye, not gone silent for TTL


def test_a_go_lobbyds_envelopes_come_and_go(lobbyd, redis) -> None:
    a = start(lobbyd, "a", redis)
    redis.cli("PUBLISH", CHANNEL, go_envelope("go.example.com", ["service:smtp"]))
    wait_for(lambda: a.labels_of("go.example.com") == ["service:smtp"],
             what="the Go daemon's hi")
    redis.cli("PUBLISH", CHANNEL, go_envelope("go.example.com", None, "goodbye"))
    wait_for(lambda: a.hostnames() == ["a"], what="the Go daemon's goodbye")
    assert left(a) == {"goodbye": 1, "expired": 0}  # not gone silent for TTL
    # and what we publish is what a Go daemon decodes: the same envelope
    sub = redis.subscriber(CHANNEL)
    assert a.request("POST", "/v1/labels", body="role:y")[0] == 200

    def with_role_y() -> dict | None:  # a keep-alive of a (no labels) may come first
        envelope = json.loads(sub.next_message(timeout=5))
        return envelope if envelope["discovery"]["labels"] == ["role:y"] else None

    envelope = wait_for(with_role_y, what="a's packet with role:y")
    assert envelope["message"] == "hi" and envelope["discovery"]["hostname"] == "a"
    assert set(envelope) == {"discovery", "message"}


def test_garbage_on_the_channel_is_dropped_like_on_nats(lobbyd, redis) -> None:
    a = start(lobbyd, "a", redis)
    for payload in ("not json", "[]", '{"message":"hi"}', go_envelope("", ["x"]),
                    go_envelope("h", ["bad\u0000label"]), '{"discovery":{"hostname":"h"},'
                    '"message":"boom"}', "{}"):
        redis.cli("PUBLISH", CHANNEL, payload)
    redis.cli("PUBLISH", CHANNEL, go_envelope("real", []))
    wait_for(lambda: a.hostnames() == ["a", "real"], what="the real host")
    metrics = a.request("GET", "/metrics")[2].decode()
    assert 'lobbyd_packets_dropped_total{reason="invalid"} 7' in metrics
    assert 'lobbyd_connected{driver="Redis"} 1' in metrics


def test_nats_and_redis_at_once_bridge_two_fleets_for_their_own_view(lobbyd, nats, redis
                                                                     ) -> None:
    on_nats = lobbyd("n")  # the NATS fleet
    on_redis = start(lobbyd, "r", redis)  # the Redis fleet
    both = start(lobbyd, "m", redis, DRIVER="NATS,Redis")
    wait_for(lambda: both.hostnames() == ["m", "n", "r"], what="m lists both fleets")
    wait_for(lambda: on_nats.hostnames() == ["m", "n"], what="n: its own fleet")
    wait_for(lambda: on_redis.hostnames() == ["m", "r"], what="r: its own fleet")
    status, body = health(both)
    assert status == 200 and [d["driver"] for d in body["drivers"]] == ["NATS", "Redis"]
    assert all(d["connected"] for d in body["drivers"])
    redis.stop()
    wait_for(lambda: health(both)[0] == 503, timeout=3, what="503 with Redis down")
    assert [d["connected"] for d in health(both)[1]["drivers"]] == [True, False]
    assert both.hostnames() == ["m", "n", "r"]  # the last known registry is still served


def test_join_sync_over_redis(lobbyd, redis) -> None:
    start(lobbyd, "a", redis, KEEP_ALIVE="60", TTL="180")
    b = start(lobbyd, "b", redis, KEEP_ALIVE="60", TTL="180")
    wait_for(lambda: b.hostnames() == ["a", "b"], what="b learns a")
    c = start(lobbyd, "c", redis, KEEP_ALIVE="60", TTL="180")
    # no keep-alive for a minute: only a join answer can tell c of a this soon (a sends
    # its packet once more only to the first new host within 2 s of connecting: b, or
    # nobody). b may still be in that window (when it learned a from the answer, not
    # from a's packet): then c hears b's packet, maybe before the answer, which then
    # adds only a. CI: the answer added 1, and the test waited for "2 hosts"
    wait_for(lambda: c.hostnames() == ["a", "b", "c"], timeout=15, what="c learns the fleet")
    # said once the answer is complete: c's API may list the hosts a moment before
    line = wait_for(lambda: re.search(r"learned (\d+) hosts? from a peer over Redis",
                                      c.logs()), what="c's line")
    logs = c.logs()
    assert "new host a" not in logs
    assert int(line[1]) == (1 if "new host b" in logs else 2), logs


def test_redis_down_at_start_restarted_and_wrong_password(lobbyd, redis, tmp_path) -> None:
    redis.stop()
    a = start(lobbyd, "a", redis, connected=False, KEEP_ALIVE="1")
    assert health(a)[0] == 503 and a.hostnames() == ["a"]
    redis.start()
    b = start(lobbyd, "b", redis, KEEP_ALIVE="1")
    wait_for(lambda: a.hostnames() == ["a", "b"] == b.hostnames(), timeout=8,
             what="both listed once Redis is up")
    assert a.logs().count("Redis unreachable") == 1
    redis.stop(signal.SIGKILL)
    wait_for(lambda: health(a)[0] == 503, timeout=3, what="503 after Redis died")
    redis.start()
    returned = time.monotonic()
    wait_for(lambda: health(a)[0] == 200 and health(b)[0] == 200, timeout=8,
             what="reconnected")
    # listed again within KEEP_ALIVE + 1 s of Redis's return (KEEP_ALIVE=1 here)
    wait_for(lambda: a.hostnames() == ["a", "b"] == b.hostnames(), timeout=2, what="relisted")
    assert time.monotonic() - returned < 8
    assert health(a)[1]["drivers"][0]["reconnects"] == 1
    assert a.logs().count("disconnected from Redis") == 1


def test_password_is_used_and_never_shown(lobbyd, tmp_path) -> None:
    secret = "r3dis-Pa55-s3cret"
    locked = RedisServer(tmp_path, password=secret).start()
    try:
        ok = start(lobbyd, "ok", locked, REDIS_PASSWORD=secret)
        wait_for(lambda: health(ok)[0] == 200, what="connected with the password")
        wrong = start(lobbyd, "wrong", locked, False, REDIS_PASSWORD="nope-" + secret)
        none = start(lobbyd, "none", locked, False, REDIS_PASSWORD="")
        wait_for(lambda: "Redis unreachable" in wrong.logs() and "Redis unreachable"
                 in none.logs(), what="refusals logged")
        for d in (wrong, none):
            assert health(d)[0] == 503 and d.logs().count("Redis unreachable") == 1
        for d in (ok, wrong, none):
            body = b"".join(d.request("GET", path)[2] for path in ("/v1/health", "/metrics"))
            assert secret.encode() not in body and secret not in d.logs()
    finally:
        locked.stop()


def test_a_nats_only_lobbyd_never_imports_redis(lobbyd, tmp_path) -> None:
    if os.environ.get("LOBBYD_CMD"):
        pytest.skip("imports are a property of the source; the binary bundles redis anyway")
    a = lobbyd("a", start=False)
    env = {**a.env, "PYTHONVERBOSE": "1"}
    log = tmp_path / "verbose.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *lobbyd_command()[1:]], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "connected to NATS" in log.read_text(errors="replace"),
                 what="a connected")
        a.port = int(env["PORT"])
        assert a.request("GET", "/v1/health")[0] == 200
        text = log.read_text(errors="replace")
        assert "import 'nats'" in text  # the verbose log does list imports
        assert "import 'redis'" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_redis_without_the_library_is_a_config_error(tmp_path) -> None:
    if os.environ.get("LOBBYD_CMD"):
        pytest.skip("the binary bundles redis")
    done = subprocess.run([sys.executable, "-S", "-c",
                           "import sys; sys.path.insert(0, sys.argv[1]);"
                           "import lobbyd; sys.exit(lobbyd.main([]))",
                           str(ROOT)],
                          env={"PATH": os.environ["PATH"], "DRIVER": "Redis"},
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 78 and "pip install 'lobbyd[redis]'" in done.stderr, done
