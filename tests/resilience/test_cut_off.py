"""Cut off is not everyone dead: real nats-server and redis-server processes killed and
restarted under real lobbyds on loopback. While a daemon has lost every transport it keeps
the last known fleet and says how stale its answers are (X-Lobby-Stale); once a transport
is back every host is heard again or expires TTL later; CUT_OFF_KEEP bounds the keeping;
one transport of two down is no cut. Every loop here is bounded in count and time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from conftest import NatsServer, RedisServer, wait_for
from harness import base_env, lobbyd_command

from .conftest import RouteProxy, record, wait_converged

#: seconds the long outage lasts (RESILIENCE_CUT_OUTAGE; 60 in CI)
OUTAGE = float(os.environ.get("RESILIENCE_CUT_OUTAGE", "60"))


@pytest.fixture
def servers(tmp_path) -> Iterator[Callable[[type], Any]]:
    """Factory: servers(NatsServer) or servers(RedisServer) -> started; stopped at teardown
    (whatever process each runs by then: the tests kill and restart them)."""
    made: list = []

    def make(kind: type) -> Any:
        made.append(kind(tmp_path).start())
        return made[-1]

    yield make
    for server in made:
        server.stop(signal.SIGKILL)


def look(d, path: str = "/v1/discoveries") -> tuple[int, int | None, object]:
    """(status, X-Lobby-Stale or None, JSON) of one GET."""
    status, headers, body = d.request("GET", path)
    stale = headers.get("x-lobby-stale")
    return status, None if stale is None else int(stale), json.loads(body)


def seen(d) -> dict[str, int]:
    """hostname -> last_check in d's registry."""
    return {p["hostname"]: p["last_check"] for p in d.get_json("/v1/discoveries")}


def health(d) -> int:
    return d.request("GET", "/v1/health")[0]


def ctl(d, *words: str) -> subprocess.CompletedProcess:
    env = base_env()
    env.update(PORT=str(d.port))
    return subprocess.run([*lobbyd_command(), "ctl", *words], env=env, capture_output=True,
                          text=True, timeout=20)


def test_a_long_nats_outage_keeps_the_fleet_and_says_how_stale(servers, fleet):
    """NATS killed for OUTAGE seconds (TTL 4): every daemon keeps every host, every answer
    carries a growing X-Lobby-Stale, health stays 503, lobbyctl warns. A daemon killed
    during the cut is kept (nobody can know) and goes TTL after the reconnection; the
    others are heard again and the header is gone within seconds of the restart."""
    keep_alive, ttl = 1, 4
    nats = servers(NatsServer)
    daemons = [fleet(f"cut{i}.test", nats.url, KEEP_ALIVE=keep_alive, TTL=ttl,
                     LABELS=f"prometheus:node,role:r{i}") for i in range(3)]
    names = {d.name for d in daemons}
    victim, live = daemons[2], daemons[:2]
    wait_converged(daemons, lambda d: names, timeout=15, what="initial convergence")
    paths = ["/v1/discoveries", "/v1/prometheus/node", "/v1/resolve?label=role:r2",
             "/v1/discovery", "/v1/discoveries?prefixes=role", "/v1/catalog/nodes"]

    t_cut = time.monotonic()
    nats.stop(signal.SIGKILL)
    missing: list[tuple[float, str, tuple[str, ...]]] = []
    unmarked: list[tuple[float, str, str]] = []  # an answer without the header, after 2.5 s
    backwards: list[tuple[str, str, int, int]] = []  # a header smaller than the one before
    healthy: list[tuple[float, str]] = []
    last: dict[tuple[str, str], int] = {}
    polls = 0
    killed = False
    while time.monotonic() < t_cut + OUTAGE:  # bounded: OUTAGE seconds of polls
        t = time.monotonic() - t_cut
        if not killed and t >= OUTAGE / 2:
            victim.stop(signal.SIGKILL)  # dies during the cut: it can say no goodbye
            killed = True
        for d in daemons if not killed else live:
            for path in paths:
                status, stale, body = look(d, path)
                polls += 1
                assert status == 200, (d.name, path, status)
                if path == "/v1/discoveries":
                    gone = names - {p["hostname"] for p in body}  # type: ignore[union-attr]
                    if gone:
                        missing.append((round(t, 2), d.name, tuple(sorted(gone))))
                if stale is None:
                    if t > 2.5:
                        unmarked.append((round(t, 2), d.name, path))
                    continue
                if stale < last.get((d.name, path), 0):
                    backwards.append((d.name, path, last[(d.name, path)], stale))
                last[(d.name, path)] = stale
            if t > 2.5 and health(d) != 503:
                healthy.append((round(t, 2), d.name))
        time.sleep(0.25)
    warned = ctl(live[0], "discoveries")
    _, consul_head, _ = live[0].request("GET", "/v1/catalog/nodes")  # Consul's own way to say it
    assert int(consul_head["x-consul-lastcontact"]) == 1000 * int(consul_head["x-lobby-stale"])
    assert not missing, f"hosts vanished while cut off: {missing[:10]}"
    assert not unmarked, f"answers without X-Lobby-Stale while cut off: {unmarked[:10]}"
    assert not backwards, f"X-Lobby-Stale went back: {backwards[:10]}"
    assert not healthy, f"/v1/health said 200 while cut off: {healthy[:10]}"
    assert all(last[(d.name, "/v1/discoveries")] >= OUTAGE - 2 for d in live), last
    assert warned.returncode == 0 and all(n in warned.stdout for n in names), warned
    assert "cut off from the fleet for" in warned.stderr, warned.stderr
    assert all(json.loads(d.request("GET", "/v1/health")[2])["cut_off_since"] > 0
               for d in live)

    nats.start()
    t_up, wall_up = time.monotonic(), time.time()
    fresh: dict[str, float] = {}
    gone_at: dict[str, float] = {}
    vanished: list[tuple[float, str, tuple[str, ...]]] = []
    live_names = {d.name for d in live}
    while time.monotonic() < t_up + ttl + 6 and (len(fresh), len(gone_at)) != (2, 2):
        t = time.monotonic() - t_up
        for d in live:
            status, stale, body = look(d)
            hosts = {p["hostname"]: p["last_check"] for p in body}  # type: ignore[union-attr]
            if live_names - set(hosts):
                vanished.append((round(t, 2), d.name, tuple(sorted(live_names - set(hosts)))))
            if d.name not in fresh and stale is None and health(d) == 200 and \
                    all(hosts.get(n, 0) >= int(wall_up) for n in live_names):
                fresh[d.name] = t
            if d.name not in gone_at and victim.name not in hosts:
                gone_at[d.name] = t
        time.sleep(0.05)
    assert not vanished, f"a live host vanished after the reconnection: {vanished[:10]}"
    assert len(fresh) == 2, f"not every live host heard again, header gone: {fresh}"
    assert len(gone_at) == 2, f"the host killed during the cut is still listed: {gone_at}"
    # not heard within TTL of the reconnection (which is after t_up): gone, not before
    assert all(ttl - 0.5 <= t <= ttl + 2 for t in gone_at.values()), gone_at
    assert max(fresh.values()) <= 3, fresh
    assert all(look(d, path)[1] is None for d in live for path in paths)
    record("17 cut off: NATS killed", outage_s=OUTAGE, daemons=3, keep_alive=keep_alive,
           ttl=ttl, polls=polls, hosts_missing_during_cut=len(missing),
           stale_header_last_s=min(last[(d.name, "/v1/discoveries")] for d in live),
           stale_to_fresh_after_restart_s_max=round(max(fresh.values()), 2),
           killed_during_cut_gone_after_restart_s=[round(t, 2) for t in gone_at.values()])


def test_cut_off_keep_bounds_the_keeping(servers, fleet):
    """CUT_OFF_KEEP=6 (TTL 3): the fleet is kept for 6 s of the cut, then hosts expire as
    usual; the answers still say how stale they are; NATS back: all listed, no header."""
    keep = 6
    nats = servers(NatsServer)
    daemons = [fleet(f"keep{i}.test", nats.url, TTL=3, CUT_OFF_KEEP=keep) for i in range(2)]
    names = {d.name for d in daemons}
    wait_converged(daemons, lambda d: names, timeout=15, what="initial convergence")
    t_cut = time.monotonic()
    nats.stop(signal.SIGKILL)
    expired: dict[str, float] = {}
    early: list[tuple[float, str]] = []
    while time.monotonic() < t_cut + keep + 4 and len(expired) < 2:  # bounded
        t = time.monotonic() - t_cut
        for d in daemons:
            hosts = set(seen(d))
            if hosts != names and d.name not in expired:
                expired[d.name] = t
                if t < keep - 0.5:
                    early.append((round(t, 2), d.name))
        time.sleep(0.05)
    assert not early, f"hosts expired before CUT_OFF_KEEP: {early}"
    assert len(expired) == 2 and all(t <= keep + 2 for t in expired.values()), expired
    assert all(set(seen(d)) == {d.name} for d in daemons)
    assert all((look(d)[1] or 0) >= keep for d in daemons)
    nats.start()
    took = wait_converged(daemons, lambda d: names, timeout=10, what="listed again")
    wait_for(lambda: all(look(d)[1] is None for d in daemons), timeout=5,
             what="X-Lobby-Stale gone")
    record("18 cut off keep", cut_off_keep_s=keep, ttl=3,
           expired_after_cut_s=sorted(round(t, 2) for t in expired.values()),
           listed_again_after_restart_s=round(took, 2))


def test_one_transport_of_two_down_is_no_cut(servers, fleet):
    """DRIVER=NATS,Redis: Redis killed for longer than TTL is no cut (the fleet is heard
    over NATS: no header, nothing lost, health 503); NATS killed too is one (header, the
    fleet kept); Redis back alone ends it."""
    nats = servers(NatsServer)
    redis = servers(RedisServer)
    daemons = [fleet(f"two{i}.test", nats.url, DRIVER="NATS,Redis", REDIS_PORT=redis.port,
                     TTL=3) for i in range(2)]
    names = {d.name for d in daemons}
    wait_converged(daemons, lambda d: names, timeout=15, what="initial convergence")
    redis.stop(signal.SIGKILL)
    t_kill = time.monotonic()
    marked, missing, polls = [], [], 0
    while time.monotonic() < t_kill + 6:  # TTL 3, twice over
        for d in daemons:
            status, stale, body = look(d)
            assert status == 200, status
            polls += 1
            if stale is not None:
                marked.append(d.name)
            if {p["hostname"] for p in body} != names:  # type: ignore[union-attr]
                missing.append(d.name)
        time.sleep(0.1)
    assert all(health(d) == 503 for d in daemons)
    assert not marked, f"X-Lobby-Stale with NATS still connected: {marked[:5]}"
    assert not missing, f"hosts lost with NATS still connected: {missing[:5]}"
    nats.stop(signal.SIGKILL)
    wait_for(lambda: all((look(d)[1] or 0) >= 1 for d in daemons), timeout=5,
             what="X-Lobby-Stale once both are down")
    time.sleep(4)  # past TTL
    assert all(set(seen(d)) == names for d in daemons), "the fleet was not kept"
    redis.start()
    wait_for(lambda: all(look(d)[1] is None for d in daemons), timeout=10,
             what="no header with Redis back")
    time.sleep(4)  # past TTL after the reconnection: heard over Redis, nothing expires
    assert all(set(seen(d)) == names for d in daemons)
    nats.start()
    wait_for(lambda: all(health(d) == 200 for d in daemons), timeout=10, what="both back")
    record("19 one transport of two", polls_with_one_down=polls, stale_answers=len(marked),
           hosts_missing=len(missing))


def test_reconnecting_daemons_hear_each_other_at_once(servers, fleet):
    """KEEP_ALIVE 20: a daemon's packet is on the wire within 1 s of its reconnection (a
    raw subscriber sees it), and a daemon that reconnects after a peer (so missed that
    peer's packet) hears it again within 1 s, from its join sync. Each daemon reaches
    NATS through a proxy of its own, so the order of the reconnections is the test's."""
    nats = servers(NatsServer)
    proxies = [RouteProxy(nats.port) for _ in range(2)]
    try:
        a, b = (fleet(f"order{i}.test", f"nats://127.0.0.1:{p.port}", KEEP_ALIVE=20, TTL=60)
                for i, p in enumerate(proxies))
        names = {a.name, b.name}
        wait_converged([a, b], lambda d: names, timeout=15, what="initial convergence")
        raw = nats.client()
        raw.subscribe("lobby.discovery")
        for proxy in proxies:
            proxy.cut()
        wait_for(lambda: all(health(d) == 503 for d in (a, b)), timeout=10,
                 what="both disconnected")
        time.sleep(2)
        raw.messages(0.2)  # nothing of before
        rounds = {}
        for d, proxy in ((a, proxies[0]), (b, proxies[1])):
            wall = time.time()
            proxy.heal()
            wait_for(lambda d=d: health(d) == 200, timeout=10, interval=0.01,
                     what=f"{d.name} reconnected")
            t_back = time.monotonic()
            heard = None
            while time.monotonic() < t_back + 1.0:  # the packet on the wire within 1 s
                try:
                    _subject, payload = raw.next_msg(timeout=0.05)
                except TimeoutError:
                    continue
                if json.loads(payload)["discovery"]["hostname"] == d.name:
                    heard = time.monotonic() - t_back
                    break
            assert heard is not None, f"{d.name}'s packet not on the wire within 1 s"
            rounds[d.name] = (wall, heard)
        # b reconnected after a, so it missed a's packet: its join sync must give it, long
        # before a's next keep-alive (20 s; 2 s: a loaded machine's margin)
        wait_for(lambda: seen(b)[a.name] >= int(rounds[a.name][0]), timeout=2.0,
                 interval=0.02, what="b hearing a again (from its join sync)")
        b_heard = time.monotonic() - t_back
        wait_for(lambda: seen(a)[b.name] >= int(rounds[b.name][0]), timeout=2.0,
                 interval=0.02, what="a hearing b again (its packet at once)")
        raw.close()
        record("20 reconnection order", keep_alive=20,
               packet_on_wire_after_reconnect_s=[round(h, 3) for _, h in rounds.values()],
               later_one_heard_the_first_after_s=round(b_heard, 3))
    finally:
        for proxy in proxies:
            proxy.close()
