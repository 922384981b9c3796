"""The Redis transport under faults (issue 11): Redis down at start, Redis killed and
restarted, and a flood of hostile packets on the channel. Real redis-server and lobbyd
processes on loopback; every loop bounded in count and time."""

from __future__ import annotations

import json
import random
import signal
import socket
import time

from conftest import RedisServer, wait_for
from harness import resp_command

from .conftest import RegistryWatcher, record, wait_converged
from .test_nats_flood import hostile_packets

CHANNEL = "lobby:discovery"
FLOOD = 20_000


def redis_fleet(fleet, redis: RedisServer, names: list[str], **env: str) -> list:
    return [fleet(name, "nats://127.0.0.1:1", DRIVER="Redis", REDIS_PORT=str(redis.port),
                  **env) for name in names]


def heard_since(d, since: float) -> bool:
    """`d` has a packet from every host received after `since` (unix seconds)."""
    return all(p["last_check"] >= int(since) for p in d.get_json("/v1/discoveries"))


def health(d) -> int:
    return d.request("GET", "/v1/health")[0]


def test_redis_down_at_start(tmp_path, fleet):
    """R1: three daemons start with Redis absent; Redis comes up 10 s later."""
    redis = RedisServer(tmp_path)
    daemons = redis_fleet(fleet, redis, ["rd0", "rd1", "rd2"])
    names = {d.name for d in daemons}
    requests = failures = 0
    outage_end = time.monotonic() + 10
    while time.monotonic() < outage_end:  # bounded: 10 s of polls
        for d in daemons:
            requests += 1
            try:
                failures += d.request("GET", "/v1/discoveries")[0] != 200
            except OSError:
                failures += 1
        time.sleep(0.05)
    assert failures == 0 and all(health(d) == 503 for d in daemons)
    lines = [d.logs().count("Redis unreachable") for d in daemons]
    assert lines == [1, 1, 1], lines
    redis.start()
    try:
        took = wait_converged(daemons, lambda d: names, timeout=2, what="listed after Redis")
        assert all(health(d) == 200 for d in daemons)
    finally:
        redis.stop()
    record("redis_down_at_start", api_requests=requests, api_failures=failures,
           outage_log_lines=sum(lines), converged_after_s=round(took, 3))


def test_redis_killed_and_restarted(tmp_path, fleet):
    """R2: kill -9 of redis-server (3 s down) three times; nobody expires (TTL 10 s: the
    outage, from the last packet to the reconnect, stays well under it), and everyone is
    connected again within KEEP_ALIVE + 1 s of Redis's return."""
    redis = RedisServer(tmp_path).start()
    try:
        daemons = redis_fleet(fleet, redis, ["rr0", "rr1", "rr2"], TTL="10")
        names = {d.name for d in daemons}
        wait_converged(daemons, lambda d: names, timeout=5, what="initial convergence")
        back: list[float] = []
        with RegistryWatcher(daemons, lambda d: names, interval=0.1, max_duration=120) as watch:
            for _ in range(3):
                redis.stop(signal.SIGKILL)
                wait_for(lambda: all(health(d) == 503 for d in daemons), timeout=3,
                         what="503 everywhere")
                time.sleep(3)  # the outage itself (shorter than TTL)
                port = redis.port
                redis = RedisServer(tmp_path, port=port).start()
                returned = time.monotonic()
                wait_for(lambda: all(health(d) == 200 for d in daemons), timeout=2,
                         what="reconnected")
                back.append(time.monotonic() - returned)
                # up long enough for everyone to hear everyone again (pub/sub keeps nothing
                # for a subscriber that is not back yet: the next keep-alive tells it)
                since = time.time() - 0.5
                wait_for(lambda s=since: all(heard_since(d, s) for d in daemons), timeout=3,
                         what="a fresh packet from everyone")
        assert watch.misses == [] and watch.errors == [], (watch.misses, watch.errors)
        assert watch.samples > 50
        reconnects = [json.loads(d.request("GET", "/v1/health")[2])["drivers"][0]["reconnects"]
                      for d in daemons]
        assert reconnects == [3, 3, 3], reconnects
        assert all(d.logs().count("disconnected from Redis") == 3 for d in daemons)
    finally:
        redis.stop()
    record("redis_restart", restarts=3, hosts_missing=len(watch.misses),
           back_after_s_max=round(max(back), 3), polls=watch.samples)


def test_flood_of_hostile_packets_on_the_channel(tmp_path, fleet):
    """R3: 20,000 hostile packets pipelined onto the channel; registries stay exact."""
    redis = RedisServer(tmp_path).start()
    try:
        daemons = redis_fleet(fleet, redis, ["rf0", "rf1"])
        names = {d.name for d in daemons}
        wait_converged(daemons, lambda d: names, timeout=5, what="initial convergence")
        packets, _kinds = hostile_packets(random.Random(7))
        sample = random.Random(7).sample(packets, FLOOD)
        rss_before = [d.rss_kb() for d in daemons]
        lines_before = [d.logs().count("\n") for d in daemons]
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", redis.port), timeout=30) as s:
            for i in range(0, FLOOD, 500):
                s.sendall(b"".join(resp_command("PUBLISH", CHANNEL, p)
                                   for p in sample[i:i + 500]))
            s.settimeout(30)
            drained = b""
            while drained.count(b"\r\n") < FLOOD:  # one :N reply per PUBLISH
                chunk = s.recv(1 << 16)
                assert chunk, "redis closed the connection"
                drained += chunk
        # A subscriber that falls 32 MB behind is dropped by Redis itself (its pub/sub
        # output buffer limit; pub/sub keeps nothing for it): lobbyd then reconnects.
        # So the sentinel is published until each daemon has it, every 0.5 s (bounded).
        sentinel = json.dumps({"discovery": {"hostname": "sentinel.flood", "labels": []},
                               "message": "hi"})
        for d in daemons:
            wait_for(lambda d=d: redis.cli("PUBLISH", CHANNEL, sentinel) and
                     "sentinel.flood" in d.hostnames(), timeout=60, interval=0.5,
                     what=f"{d.name} drained the flood")
        took = time.monotonic() - started
        dropped_by_redis = [json.loads(d.request("GET", "/v1/health")[2])["drivers"][0]
                            ["reconnects"] for d in daemons]
        assert all(d.alive() for d in daemons)
        for d in daemons:
            assert set(d.hostnames()) == names | {"sentinel.flood"}
            assert health(d) == 200
        grown = [d.logs().count("\n") - before for d, before in zip(daemons, lines_before)]
        assert max(grown) < 100, grown
        rss_after = [d.rss_kb() for d in daemons]
    finally:
        redis.stop()
    record("redis_flood", packets=FLOOD, crashes=sum(not d.alive() for d in daemons),
           registry_exact=True,
           drained_s=round(took, 2), log_lines_max=max(grown),
           subscribers_dropped_by_redis=sum(dropped_by_redis),
           rss_mb_before=round(max(rss_before) / 1024, 1),
           rss_mb_after=round(max(rss_after) / 1024, 1))

