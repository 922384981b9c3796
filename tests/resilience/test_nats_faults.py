"""Faults 1-4: NATS failover, NATS down at start, NATS restarted past TTL (a cut: the
fleet is kept), network partition. Real nats-server clusters on loopback, real lobbyd processes."""

from __future__ import annotations

import json
import os
import signal
import time

from conftest import NatsServer, free_port, wait_for

from .conftest import (
    Cluster,
    Node,
    RegistryWatcher,
    RouteProxy,
    median,
    record,
    tcp_connections,
    wait_converged,
)

KILLS = 10


def _reattached(d, nodes) -> bool:
    """d holds a connection to one of `nodes` that the node lists with the discovery
    subscription (so packets flow again)."""
    ports = {n.port for n in nodes}
    local = {lp for lp, rp in tcp_connections(d.pid) if rp in ports}
    if not local:
        return False
    subscribed = set().union(*(n.subscribed_client_ports() for n in nodes))
    return bool(local & subscribed)


def test_cluster_failover_loses_no_host(cluster3, fleet):
    """Fault 1: kill -9 the node a daemon is attached to, 10 times; it reconnects to another
    node and no peer ever drops a live host (every registry polled every 100 ms)."""
    daemons = [fleet(f"fo{i}.test", cluster3.urls(i)) for i in range(3)]
    names = {d.name for d in daemons}
    wait_converged(daemons, lambda d: names, timeout=15, what="initial convergence")
    attached = {d.name: cluster3.by_port(d.nats_port(cluster3.client_ports)).name
                for d in daemons}

    targeted: list[float] = []
    everyone: list[float] = []
    with RegistryWatcher(daemons, lambda d: names, interval=0.1, max_duration=300) as watch:
        for k in range(KILLS):
            victim = daemons[k % len(daemons)]
            port = wait_for(lambda v=victim: v.nats_port(cluster3.client_ports), timeout=10,
                            what=f"{victim.name} attached to a node")
            node = cluster3.by_port(port)
            survivors = [n for n in cluster3.nodes if n is not node]
            on_node = [d for d in daemons if d.nats_port({node.port}) == node.port]
            t0 = time.monotonic()
            node.stop(signal.SIGKILL)
            pending = {d.name: d for d in on_node}
            deadline = t0 + 15
            while pending and time.monotonic() < deadline:
                for name, d in list(pending.items()):
                    if _reattached(d, survivors):
                        elapsed = time.monotonic() - t0
                        everyone.append(elapsed)
                        if d is victim:
                            targeted.append(elapsed)
                        del pending[name]
                time.sleep(0.01)
            assert not pending, f"kill {k}: {sorted(pending)} never reconnected to a survivor"
            node.start()
            cluster3.wait_meshed()
            wait_for(lambda: all(_reattached(d, [n for n in cluster3.nodes if n.running])
                                 for d in daemons), timeout=10, what="all daemons attached")
        time.sleep(1.0)  # one more keep-alive round under watch after the last restart

    record("1 failover", kills=KILLS, daemons=len(daemons), nodes=3, attached_at_start=attached,
           reconnect_median_s=round(median(targeted), 3),
           reconnect_max_s=round(max(targeted), 3),
           reconnect_all_median_s=round(median(everyone), 3), reconnects=len(everyone),
           polls=watch.samples * len(daemons), hosts_missing=len(watch.misses),
           api_errors=len(watch.errors), stale_answers=len(watch.stale))
    assert not watch.errors, f"API failed during failover: {watch.errors[:5]}"
    assert not watch.misses, f"a live host vanished from a peer: {watch.misses[:10]}"
    # a failover is no cut: never an answer marked stale (SPEC 16)
    assert not watch.stale, f"answers said X-Lobby-Stale during failovers: {watch.stale[:10]}"
    assert all(d.alive() for d in daemons)


def test_nats_down_at_start(tmp_path, fleet):
    """Fault 2: NATS down when the daemons start, up 30 s later: the API answers during the
    outage; every daemon is listed everywhere within 2 s of NATS coming up."""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    daemons = [fleet(f"late{i}.test", url) for i in range(3)]
    names = {d.name for d in daemons}
    outage = float(os.environ.get("RESILIENCE_OUTAGE", "30"))
    log_before = sum(d.log_lines() for d in daemons)
    ok = failed = 0
    slowest = 0.0
    end = time.monotonic() + outage
    while time.monotonic() < end:
        for d in daemons:
            t = time.perf_counter()
            try:
                status = d.request("GET", "/v1/discovery")[0]
            except OSError:
                status = 0
            slowest = max(slowest, time.perf_counter() - t)
            if status == 200:
                ok += 1
            else:
                failed += 1
        time.sleep(0.25)
    log_during = sum(d.log_lines() for d in daemons) - log_before
    assert all(d.alive() for d in daemons)

    server = NatsServer(tmp_path, port=port).start()
    try:
        t_up = time.monotonic()
        wait_for(lambda: all(set(d.hostnames()) == names for d in daemons), timeout=20,
                 interval=0.02, what="convergence after NATS came up")
        took = time.monotonic() - t_up
    finally:
        server.stop()
    assert failed == 0, f"{failed} API requests failed during the NATS outage"
    assert took <= 2.0, f"daemons listed everywhere only {took:.2f}s after NATS came up"
    # an outage is logged once, when it begins (before log_before): nothing while it lasts
    assert log_during == 0, f"{log_during} log lines while NATS stayed down"
    record("2 nats down at start", outage_s=outage, api_requests=ok + failed,
           api_failures=failed, api_slowest_s=round(slowest, 3), daemons=len(daemons),
           log_lines_during_outage=log_during, listed_everywhere_after_s=round(took, 3))


def test_nats_restart_longer_than_ttl(tmp_path, fleet):
    """Fault 3: all NATS nodes down for longer than TTL: every daemon is cut off, so it
    keeps every host and its answers say how stale they are (X-Lobby-Stale); after the
    restart the header is gone and every host is heard again within KEEP_ALIVE + 1 s."""
    keep_alive, ttl, clean = 2, 6, 1
    cluster = Cluster(tmp_path, 2).start()
    try:
        daemons = [fleet(f"rs{i}.test", cluster.urls(i % 2), KEEP_ALIVE=keep_alive, TTL=ttl,
                         CLEAN_EVERY=clean) for i in range(4)]
        names = {d.name for d in daemons}
        wait_converged(daemons, lambda d: names, timeout=15, what="initial convergence")
        rounds = []
        for _round in range(2):
            t_stop = time.monotonic()
            for node in cluster.nodes:
                node.stop()
            lost, stale = [], {}
            while time.monotonic() < t_stop + ttl + clean + 3:  # past TTL, bounded
                for d in daemons:
                    status, headers, body = d.request("GET", "/v1/discoveries")
                    hosts = {p["hostname"] for p in json.loads(body)}
                    if status != 200 or hosts != names:
                        lost.append((round(time.monotonic() - t_stop, 2), d.name))
                    if "x-lobby-stale" in headers:
                        stale[d.name] = int(headers["x-lobby-stale"])
                time.sleep(0.1)
            assert not lost, f"hosts dropped while NATS was down: {lost[:10]}"
            assert len(stale) == len(daemons) and min(stale.values()) >= ttl, stale
            assert all(d.request("GET", "/v1/health")[0] == 503 for d in daemons)
            for node in cluster.nodes:
                node.start()
            t_up, wall_up = time.monotonic(), time.time()
            cluster.wait_meshed()
            meshed = time.monotonic() - t_up

            def fresh(d, wall_up: float = wall_up) -> bool:
                status, headers, body = d.request("GET", "/v1/discoveries")
                return status == 200 and "x-lobby-stale" not in headers and \
                    {p["hostname"] for p in json.loads(body)
                     if p["last_check"] >= int(wall_up)} == names

            wait_for(lambda: all(fresh(d) for d in daemons), timeout=30, interval=0.02,
                     what="every host heard again after the NATS restart")
            back = time.monotonic() - t_up
            rounds.append((min(stale.values()), meshed, back))
            assert back <= keep_alive + 1, \
                f"all hosts heard again only {back:.2f}s after the restart " \
                f"(limit {keep_alive + 1}s)"
        record("3 nats restart > TTL", rounds=len(rounds), daemons=len(daemons), nodes=2,
               keep_alive=keep_alive, ttl=ttl, clean_every=clean, hosts_lost=0,
               stale_header_s_min=min(r[0] for r in rounds),
               back_after_restart_s_max=round(max(r[2] for r in rounds), 3),
               mesh_after_restart_s_max=round(max(r[1] for r in rounds), 3))
    finally:
        cluster.stop()


def test_partition_and_heal(tmp_path, fleet):
    """Fault 4: two NATS nodes whose route runs through a proxy we cut. Each side expires
    the other after TTL and never loses its own side; after the heal everything converges
    within KEEP_ALIVE + 1 s of the route coming back."""
    keep_alive, ttl, clean = 1, 5, 1
    cycles = 3
    pa, ca, ma = free_port(), free_port(), free_port()
    pb, cb, mb = free_port(), free_port(), free_port()
    node_b = Node(tmp_path, "pb", pb, cb, mb, [], ["--no_advertise=true"])
    node_b.start()
    proxy = RouteProxy(cb)
    node_a = Node(tmp_path, "pa", pa, ca, ma, [proxy.port], ["--no_advertise=true"])
    node_a.start()
    try:
        wait_for(lambda: "pb" in node_a.route_peers(), timeout=15, what="route through proxy")
        side_a = [fleet(f"pa{i}.test", node_a.url) for i in range(2)]
        side_b = [fleet(f"pb{i}.test", node_b.url) for i in range(2)]
        everyone = side_a + side_b
        all_names = {d.name for d in everyone}
        names_a, names_b = {d.name for d in side_a}, {d.name for d in side_b}

        def own_side(d):
            return names_a if d.name in names_a else names_b

        wait_converged(everyone, lambda d: all_names, timeout=15, what="initial convergence")
        expiry, heal_from_route, heal_from_cut_end = [], [], []
        with RegistryWatcher(everyone, own_side, interval=0.1, max_duration=200) as watch:
            for _ in range(cycles):
                t_cut = time.monotonic()
                proxy.cut()
                t_split = wait_converged(everyone, own_side, timeout=ttl + clean + 8,
                                         what="each side expiring the other")
                expiry.append(time.monotonic() - t_cut)
                assert "pb" not in node_a.route_peers(), "route still up: partition failed"
                time.sleep(1.0)
                assert all(set(d.hostnames()) == own_side(d) for d in everyone), \
                    "a host of the other side came back during the partition"
                t_heal = time.monotonic()
                proxy.heal()
                wait_for(lambda: "pb" in node_a.route_peers(), timeout=15, interval=0.02,
                         what="route re-established")
                t_route = time.monotonic()
                wait_converged(everyone, lambda d: all_names, timeout=20,
                               what="convergence after the heal")
                heal_from_route.append(time.monotonic() - t_route)
                heal_from_cut_end.append(time.monotonic() - t_heal)
                del t_split
        record("4 partition", cycles=cycles, daemons=len(everyone), keep_alive=keep_alive,
               ttl=ttl, clean_every=clean,
               expiry_after_cut_s=[round(x, 2) for x in expiry],
               converge_after_route_up_s_max=round(max(heal_from_route), 3),
               converge_after_heal_s_max=round(max(heal_from_cut_end), 3),
               own_side_misses=len(watch.misses), polls=watch.samples * len(everyone),
               api_errors=len(watch.errors), stale_answers=len(watch.stale))
        assert not watch.errors, f"API failed during the partition: {watch.errors[:5]}"
        assert not watch.stale, f"connected daemons said X-Lobby-Stale: {watch.stale[:10]}"
        assert not watch.misses, f"a host of a daemon's own side vanished: {watch.misses[:10]}"
        early, late = ttl - keep_alive - 1.5, ttl + clean + 1.5
        assert all(early <= t <= late for t in expiry), f"expiry outside [{early}, {late}]s"
        assert max(heal_from_route) <= keep_alive + 1, \
            f"converged {max(heal_from_route):.2f}s after the route came back"
    finally:
        proxy.close()
        node_a.stop(signal.SIGKILL)
        node_b.stop(signal.SIGKILL)
