"""The DISCOVERY_MODE=kv figure (issue 13): `nox -s bench -- --only kv`.

A real nats-server with JetStream (memory storage) and a monitoring port, four real
lobbyd in kv mode (three hold the reaper slots, one does not) and bench/kvload.py
standing in for the other N - 4 hosts. Measured: packets into each lobbyd and its
CPU at steady state, NATS deliveries a second (/varz), nats-server's CPU, how long
a new lobbyd takes to list the fleet, how long a killed lobbyd stays listed, and
how long after a restart of nats-server (memory lost) the bucket is whole again.
The broadcast mode's figures for the same N are computed (N/KEEP_ALIVE packets into
each lobbyd, N²/KEEP_ALIVE deliveries). Bounded in time: every wait has a deadline.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from harness import NatsServer
from procs import Daemon, LoadMeter, tree_cpu_seconds

BENCH = Path(__file__).resolve().parent
SUBJECT = "lobby.discovery"
BASE = "lobby_discovery"


def monitor(server: NatsServer, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", server.monitor_port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def bucket_keys(server: NatsServer, bucket: str) -> int:
    doc = monitor(server, "/jsz?accounts=true&streams=true")
    for account in doc.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            if stream["name"] == f"KV_{bucket}":
                return int(stream["state"].get("num_subjects", 0))
    return 0


def hosts_of(d: Daemon) -> int:
    return int(d.get_json("/v1/health")["hosts"])  # type: ignore[index]


def received(d: Daemon) -> float:
    _status, body = d.http.request("GET", "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("lobbyd_packets_received_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05
          ) -> float:
    """Seconds until `pred` holds; TimeoutError after `timeout`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except (OSError, RuntimeError, ValueError, http.client.HTTPException):
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout}s")


def fig_kv(cmd: list[str], work: Path, n: int, keep_alive: int = 5, ttl: int = 15,
           window: float = 20.0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    server = NatsServer(work, jetstream=True, monitor=True).start()
    env = {"DISCOVERY_MODE": "kv", "KEEP_ALIVE": keep_alive, "TTL": ttl, "LOG_LEVEL": "INFO"}
    daemons: list[Daemon] = []
    load: subprocess.Popen | None = None
    fakes = n - 4
    try:
        first = Daemon(cmd, server.url, work, "kv-a", SUBJECT, **env).start()
        daemons.append(first)
        until(lambda: first.get_json("/v1/health")["status"] == "ok", 30, "buckets")
        load = subprocess.Popen(
            [sys.executable, str(BENCH / "kvload.py"), "--port", str(server.port),
             "--hosts", str(fakes), "--keep-alive", str(keep_alive), "--changes", "2",
             "--base", BASE, "--duration", str(window + ttl + 120)],
            stdout=subprocess.PIPE, text=True)
        assert load.stdout is not None
        ready = json.loads(load.stdout.readline())
        assert ready.get("ready") == fakes, ready
        for name in ("kv-b", "kv-c"):
            daemons.append(Daemon(cmd, server.url, work, name, SUBJECT, **env).start())
        for d in daemons:
            until(lambda d=d: hosts_of(d) == n - 1, 60, f"{d.hostname} lists the fleet")
        newcomer = Daemon(cmd, server.url, work, "kv-d", SUBJECT, **env)
        with LoadMeter(pace=True) as join_load:  # the machine's load during the join itself
            newcomer.start(wait=False)
            t_exec = time.monotonic()
            until(lambda: hosts_of(newcomer) == n, 60, "the newcomer lists the fleet", 0.01)
            join_s = time.monotonic() - t_exec
        join_cpu_s = newcomer.cpu_seconds()  # from exec: what the join costs, whatever the load
        daemons.append(newcomer)
        until(lambda: all(hosts_of(d) == n for d in daemons), 30, "everyone sees the newcomer")
        time.sleep(2 * keep_alive)  # the newcomer's start and the first reaper scans are over

        # steady state
        reapers = [d.get_json("/v1/health")["drivers"][0]["reaper"] for d in daemons]
        nats_pid = server.proc.pid  # type: ignore[union-attr]
        before = ([received(d) for d in daemons], [d.cpu_seconds() for d in daemons],
                  tree_cpu_seconds(nats_pid), monitor(server, "/varz"))
        with LoadMeter() as meter:
            t0 = time.monotonic()
            time.sleep(window)
            dt = time.monotonic() - t0
        after = ([received(d) for d in daemons], [d.cpu_seconds() for d in daemons],
                 tree_cpu_seconds(nats_pid), monitor(server, "/varz"))
        packets = [round((b - a) / dt, 2) for a, b in zip(before[0], after[0])]
        cpu = [round(100 * (b - a) / dt, 2) for a, b in zip(before[1], after[1])]
        nats_cpu = round(100 * (after[2] - before[2]) / dt, 1)
        out_msgs = round((after[3]["out_msgs"] - before[3]["out_msgs"]) / dt)
        in_msgs = round((after[3]["in_msgs"] - before[3]["in_msgs"]) / dt)
        rss = [round(d.mem_kib()["VmRSS"] / 1024, 1) for d in daemons]

        # a killed lobbyd (not the observer, kv-a)
        victim = daemons[1]
        victim.stop(signal.SIGKILL)
        killed = time.monotonic()
        until(lambda: hosts_of(first) == n - 1, ttl + 30, "the killed lobbyd gone")
        killed_gone_s = time.monotonic() - killed
        live = [d for d in daemons if d is not victim]

        # nats-server restarted, its memory storage lost
        server.stop()
        with LoadMeter(pace=True) as restart_load:
            server.start()
            restarted = time.monotonic()
            until(lambda: bucket_keys(server, f"{BASE}_hosts") >= n - 1, keep_alive + 60,
                  "the bucket whole again", 0.1)
            restart_s = time.monotonic() - restarted
        until(lambda: all(hosts_of(d) == n - 1 for d in live), 30, "registries whole")
        return {
            "value": round(max(packets), 2), "unit": "pkt/s", "hosts": n,
            "keep_alive": keep_alive, "ttl": ttl, "window_s": round(dt, 1),
            "packets_per_s": packets, "lobbyd_cpu_pct": cpu, "reapers": reapers,
            "lobbyd_rss_mb": rss, "nats_cpu_pct": nats_cpu,
            "nats_in_msgs_per_s": in_msgs, "nats_out_msgs_per_s": out_msgs,
            "join_s": round(join_s, 2), "join_cpu_s": round(join_cpu_s, 2),
            "killed_gone_s": round(killed_gone_s, 2),
            "restart_whole_s": round(restart_s, 2),
            "broadcast_packets_per_s": round(n / keep_alive),
            "broadcast_deliveries_per_s": round(n * n / keep_alive),
            "load": meter.stop(), "join_load": join_load.stop(),
            "restart_load": restart_load.stop(),
        }
    finally:
        if load is not None:
            load.kill()
            load.wait()
        for d in daemons:
            d.stop()
        server.stop()
