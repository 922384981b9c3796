"""DISCOVERY_MODE=kv on a real 3-node JetStream cluster on loopback: the buckets' leader
killed (kill -9) under a fleet of RESILIENCE_KV_HOSTS hosts (10,000 in CI). No host is lost
from any registry, label changes flow again within seconds, the node's return changes
nothing. Every loop is bounded in count and time."""

from __future__ import annotations

import json
import os
import signal
import time

from conftest import wait_for
from harness import jetstream_ready

import lobbyd as L

from .conftest import Cluster, record

HOSTS = int(os.environ.get("RESILIENCE_KV_HOSTS", "10000"))
BUCKET = "lobby_discovery_hosts"


def stream_info(node, stream: str) -> dict:
    raw = node.client()
    try:
        raw.subscribe("_INBOX.info")
        raw.publish(f"$JS.API.STREAM.INFO.{stream}", b"", reply="_INBOX.info")
        return json.loads(raw.next_msg(timeout=5)[1])
    finally:
        raw.close()


def hosts_of(d) -> int:
    return json.loads(d.request("GET", "/v1/health")[2])["hosts"]


def labels_seen(d, hostname: str) -> list[str] | None:
    return d.labels_of(hostname)


def test_losing_the_buckets_leader_loses_no_host(tmp_path, fleet):
    cluster = Cluster(tmp_path, 3, jetstream=True).start()
    try:
        jetstream_ready(cluster.nodes[0])
        env = {"DISCOVERY_MODE": "kv", "KEEP_ALIVE": "2", "TTL": "300"}  # TTL: the
        # simulated hosts write their liveness key once, and must outlive the test
        daemons = [fleet(f"kvc{i}.test", cluster.urls(i), wait=False, **env) for i in range(3)]
        for d in daemons:
            wait_for(lambda d=d: json.loads(d.request("GET", "/v1/health")[2])["status"] == "ok",
                     timeout=30, what=f"{d.name} set up")
        for bucket in (BUCKET, "lobby_discovery_alive"):
            assert stream_info(cluster.nodes[0], f"KV_{bucket}")["config"]["num_replicas"] == 3

        # the fleet: HOSTS liveness keys, then their packets, in this order as lobbyds
        # write them (they wait for each ack; the two buckets' leaders may differ, so a
        # packet sent right after its key could be stored first, and reaped)
        raw = cluster.nodes[0].client()
        t_write = time.monotonic()
        keys = [L.kv_host_key(f"sim{i:05d}.test") for i in range(HOSTS)]
        for i, key in enumerate(keys):  # bounded: HOSTS rounds
            raw.publish(f"$KV.lobby_discovery_alive.{key}", b"")
            if i % 500 == 499:
                raw.flush()
        raw.flush()
        wait_for(lambda: stream_info(cluster.nodes[0], "KV_lobby_discovery_alive")["state"][
            "messages"] >= HOSTS, timeout=60, interval=0.2, what="the liveness keys stored")
        for i, key in enumerate(keys):  # bounded: HOSTS rounds
            raw.publish(f"$KV.{BUCKET}.{key}",
                        L.encode_envelope(L.Packet(f"sim{i:05d}.test", (f"rack:r{i % 40}",))))
            if i % 500 == 499:
                raw.flush()
        raw.flush()
        raw.close()
        total = HOSTS + len(daemons)
        for d in daemons:
            wait_for(lambda d=d: hosts_of(d) == total, timeout=120, interval=0.2,
                     what=f"{d.name} listing {total} hosts")
        written = time.monotonic() - t_write

        leader = stream_info(cluster.nodes[0], f"KV_{BUCKET}")["cluster"]["leader"]
        node = next(n for n in cluster.nodes if n.name == leader)
        survivors = [n for n in cluster.nodes if n is not node]
        on_node = [d.name for d in daemons if d.nats_port({node.port}) == node.port]
        t_kill = time.monotonic()
        node.stop(signal.SIGKILL)
        # each daemon changes its labels right after the kill; every other daemon must show
        # the three changes; meanwhile no registry may lose a host
        for d in daemons:
            d.request("POST", "/v1/labels", "after:kill")
        fewest, flowing = total, None
        pairs: dict[tuple[str, str], float] = {}
        while time.monotonic() < t_kill + 60:  # bounded
            counts = [hosts_of(d) for d in daemons]
            fewest = min(fewest, *counts)
            for d in daemons:
                for other in daemons:
                    if other is not d and (d.name, other.name) not in pairs and \
                            labels_seen(d, other.name) == ["after:kill"]:
                        pairs[(d.name, other.name)] = round(time.monotonic() - t_kill, 2)
            if all(labels_seen(d, other.name) == ["after:kill"]
                   for d in daemons for other in daemons if other is not d):
                flowing = time.monotonic() - t_kill
                break
            time.sleep(0.2)
        assert flowing is not None, "label changes did not flow within 60 s of the kill"
        new_leader = wait_for(lambda: stream_info(survivors[0], f"KV_{BUCKET}").get(
            "cluster", {}).get("leader"), timeout=30, what="a new leader")
        # a change now goes at once
        t_change = time.monotonic()
        daemons[0].request("POST", "/v1/labels", "after:leader")
        wait_for(lambda: all("after:leader" in (labels_seen(d, daemons[0].name) or [])
                             for d in daemons[1:]), timeout=10, interval=0.02,
                 what="a label change after the new leader")
        change_after = time.monotonic() - t_change

        node.start()  # its return changes nothing
        cluster.wait_meshed()
        t_back = time.monotonic()
        while time.monotonic() < t_back + 10:  # bounded: 10 s under watch
            fewest = min(fewest, *(hosts_of(d) for d in daemons))
            time.sleep(0.2)
        daemons[1].request("POST", "/v1/labels", "after:return")
        wait_for(lambda: all("after:return" in (labels_seen(d, daemons[1].name) or [])
                             for d in daemons if d is not daemons[1]), timeout=10,
                 interval=0.05, what="a label change after the node's return")
        names = {f"sim{i:05d}.test" for i in range(HOSTS)} | {d.name for d in daemons}
        for d in daemons:
            assert set(d.hostnames()) == names
        assert fewest == total, f"a registry lost hosts: fewest {fewest} of {total}"
        record("21 kv cluster leader killed", hosts=HOSTS, nodes=3, replicas=3,
               daemons=len(daemons), killed=leader, daemons_on_killed_node=on_node,
               new_leader=new_leader, hosts_lost=total - fewest,
               written_and_listed_s=round(written, 1),
               label_changes_flowing_again_after_kill_s=round(flowing, 2),
               seen_after_kill_s={f"{a} <- {b}": t for (a, b), t in sorted(pairs.items())},
               label_change_after_new_leader_s=round(change_after, 3))
    finally:
        cluster.stop()
