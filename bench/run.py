"""lobbyd benchmark harness: one table of fleet-scale figures.

    python bench/run.py            # full run (people): 3 runs of each figure, ~25 min
    python bench/run.py --smoke    # CI smoke: 1 short run of each figure, ~3.5 min
    LOBBYD_CMD="/usr/local/bin/lobby" python bench/run.py --label go   # any implementation

The daemon under test is configured only through SPEC environment variables and
observed only through NATS and its HTTP API. Simulated hosts come from
bench/loadgen.py on a real nats-server on loopback. Every load is bounded in count
and in time. Next to every figure the table records the machine's background
load (load average and the CPU used by processes outside this harness), because
the machines are shared. Results go to bench/results/<label>-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # harness.py

import dnsbench
import httpload
import kvbench
from harness import ROOT, RedisServer, nats_server_binary, stop_process
from loadgen import hostname as fake_hostname
from loadgen import labels as fake_labels
from nginx_ceiling import NginxCeiling
from procs import Daemon, LoadMeter, NatsServer, lobbyd_command, proc_mem_kib, tree_pids

BENCH = Path(__file__).resolve().parent
SUBJECT = "lobby.discovery"
SENTINEL = "zz-sentinel.bench.invalid"
REDIS_CHANNEL = "lobby:discovery"  # DRIVER=Redis's default


# --------------------------------------------------------------------------- profiles


@dataclass
class Profile:
    runs: int
    ingest_hosts: list[int]
    ingest_confirm_s: float
    redis_hosts: list[int]  # ingest over Redis (DRIVER=Redis) at these sizes
    steady_window_s: float
    steady_big: bool
    http_hosts: list[int]
    http_seconds: float
    http_extra: bool
    http_rounds: int  # turns of lobbyd and of the ceiling server per case
    prop_changes: int
    goodbye_trials: int
    join_trials: int
    join_peers: int
    join_fakes: int
    dead_variants: list[tuple[int, int, int, int]]  # (TTL, CLEAN_EVERY, victims' KEEP_ALIVE, n)
    startup_trials: int
    fanout_msgs: int
    dns_seconds: float = 5  # one dnsperf turn (lobbyd's or dnsmasq's)
    dns_rounds: int = 2  # turns of each per question type


FULL = Profile(runs=3, ingest_hosts=[1000, 10000, 100000], ingest_confirm_s=5,
               redis_hosts=[1000, 10000],  # 100k: a burst overflows Redis's pub/sub buffer
               steady_window_s=30, steady_big=True, http_hosts=[1000, 10000],
               http_seconds=10, http_extra=True, http_rounds=2, prop_changes=200, goodbye_trials=30,
               join_trials=10, join_peers=5, join_fakes=1000,
               dead_variants=[(30, 15, 5, 3), (5, 60, 1, 3)], startup_trials=20,
               fanout_msgs=300000)
# the smoke: every figure once, its answers checked; HTTP in one turn of each side (2 s of
# load each, without the second round's gaps: no guard reads its req/s)
SMOKE = Profile(runs=1, ingest_hosts=[1000, 10000], ingest_confirm_s=2, redis_hosts=[10000],
                steady_window_s=8, steady_big=False, http_hosts=[10000], http_seconds=2,
                http_extra=False, http_rounds=1, prop_changes=40, goodbye_trials=20, join_trials=3,
                join_peers=2, join_fakes=200, dead_variants=[(3, 15, 1, 1)],
                startup_trials=5, fanout_msgs=100000, dns_seconds=2, dns_rounds=1)

# What the issue gives for the Go daemon, and the targets it sets.
REFERENCE = {
    "ingest": {1000: "38k/s", 10000: "8k/s", 20000: "2.6k/s", 100000: "-"},
    "steady_cpu": "36-41% of a core", "steady_rss": "18 MB (peak 31 MB)", "idle_rss": "9.3 MB",
    "http_10k_c8": "83 req/s, p99 237 ms", "propagation": "2-4 ms", "goodbye": "1-3 ms",
    "dead": "40-41 s", "join": "0-5 s", "startup": "6-8 ms",
}


# --------------------------------------------------------------------------- helpers


def pctl(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(len(v) - 1, int(k) + 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Env:
    """One nats-server plus the daemons of one measurement; torn down by close()."""

    def __init__(self, cmd: list[str], workroot: Path, redis: bool = False):
        self.cmd = cmd
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=workroot))
        self.nats = NatsServer(self.dir).start()
        #: with `redis`, daemons use DRIVER=Redis and load generators publish there
        self.redis = RedisServer(self.dir).start() if redis else None
        self.daemons: list[Daemon] = []
        self.gens: list[subprocess.Popen] = []

    def daemon(self, name: str, start: bool = True, cmd: list[str] | None = None,
               **env: str | int) -> Daemon:
        if self.redis:
            env = {"DRIVER": "Redis", "REDIS_PORT": self.redis.port, **env}
        d = Daemon(cmd or self.cmd, self.nats.url, self.dir, name, SUBJECT, **env)
        self.daemons.append(d)
        return d.start() if start else d

    def loadgen(self, hosts: int, *, mode: str = "paced", rate: float = 0, count: int = 0,
                seq0: int = 0, duration: float = 10, sentinel: str = "",
                max_seconds: float = 300, relabel_every: int = 0) -> subprocess.Popen:
        where = ["--port", str(self.redis.port), "--subject", REDIS_CHANNEL, "--redis"] \
            if self.redis else ["--port", str(self.nats.port), "--subject", SUBJECT]
        cmd = [sys.executable, str(BENCH / "loadgen.py"), *where, "--hosts", str(hosts),
               "--mode", mode, "--rate", str(rate), "--count", str(count), "--seq0", str(seq0),
               "--duration", str(duration), "--max-seconds", str(max_seconds), "--wait-go",
               "--relabel-every", str(relabel_every)]
        if sentinel:
            cmd += ["--sentinel", sentinel]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = p.stdout.readline()  # type: ignore[union-attr]
        if not ready:
            raise RuntimeError("loadgen failed to start")
        self.gens.append(p)
        return p

    @staticmethod
    def go(p: subprocess.Popen) -> None:
        p.stdin.write("go\n")  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]

    @staticmethod
    def result(p: subprocess.Popen, timeout: float = 400) -> dict:
        line = p.stdout.readline()  # type: ignore[union-attr]
        p.wait(timeout)
        if not line:
            raise RuntimeError("loadgen ended without a result")
        return json.loads(line)

    last: Env | None = None

    def close(self) -> None:
        Env.last = self
        self.log_tails = {d.hostname: d.logs()[-1200:] for d in self.daemons}
        for p in self.gens:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        for d in self.daemons:
            d.stop(signal.SIGKILL)
        self.nats.stop()
        if self.redis:
            self.redis.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_sentinel(d: Daemon, token: str, timeout: float, interval: float) -> float:
    """Monotonic time of the first poll that saw the sentinel (an upper bound of the moment
    the daemon applied it: never corrected towards an earlier moment)."""
    path = f"/v1/resolve?label=sentinel:{token}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            hit = SENTINEL in d.get_json(path)  # type: ignore[operator]
        except (OSError, RuntimeError, ValueError):
            hit = False
        if hit:
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"sentinel {token} not visible within {timeout}s")


def wait_idle(d: Daemon, timeout: float, window: float = 0.1, busy: float = 0.3) -> float:
    """Wait until the daemon's CPU share over `window` drops below `busy` (it has drained
    its backlog), reading /proc only (free for the daemon); returns the end of the first
    quiet window. Used to let a burst drain before its sentinel is polled for."""
    deadline = time.monotonic() + timeout
    prev_t, prev_c = time.monotonic(), d.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(window)
        t, c = time.monotonic(), d.cpu_seconds()
        if (c - prev_c) / (t - prev_t) < busy:
            return t
        prev_t, prev_c = t, c
    return time.monotonic()


def check_registry(d: Daemon, n: int, expected: list[int] | None) -> dict[str, object]:
    """The registry must list exactly the fake hosts (with their latest seq label),
    the daemon itself and the sentinel - nothing more, nothing less, sorted."""
    data = d.get_json("/v1/discoveries")
    assert isinstance(data, list)
    names = [p["hostname"] for p in data]
    by = {p["hostname"]: p for p in data}
    wrong: list[str] = []
    for i in range(n):
        h = fake_hostname(i)
        p = by.get(h)
        if p is None:
            wrong.append(f"{h} missing")
        elif expected is not None and sorted(p["labels"]) != fake_labels(i, expected[i]):
            wrong.append(f"{h} labels {p['labels']}")
        if len(wrong) > 5:
            break
    extra = set(by) - {fake_hostname(i) for i in range(n)} - {d.hostname, SENTINEL}
    return {"exact": not wrong and not extra and names == sorted(names) and d.hostname in by,
            "hosts": len(data), "wrong": wrong[:5], "extra": sorted(extra)[:5],
            "sorted": names == sorted(names)}


def prefill(env: Env, d: Daemon, n: int, token: str = "fill") -> float:
    """One round of `hi` for every host; returns seconds until the daemon had all of them."""
    g = env.loadgen(n, count=n, seq0=0, sentinel=token)
    env.go(g)
    r = env.result(g)
    t = wait_sentinel(d, token, timeout=120, interval=0.05)
    return t - r["t_first"]


# --------------------------------------------------------------------------- figures


def fig_idle_rss(cmd: list[str], work: Path, prof: Profile) -> dict:
    env = Env(cmd, work)
    try:
        d = env.daemon("bench-idle")
        with LoadMeter() as m:
            time.sleep(3)
            mem = d.mem_kib()
            tree = d.tree_rss_kib()
            members = []
            for pid in tree_pids(d.pid):
                with contextlib.suppress(OSError):
                    members.append(proc_mem_kib(pid))
        # value: the daemon itself; tree_mb adds its wrappers (the binary's staticx
        # and PyInstaller loaders), what the server pays in all; peak_tree_mb: the sum
        # of every process's high-water mark, the most the tree can have held at once
        # while it started (the loaders peak while they unpack, lobbyd after)
        return {"value": mem["VmRSS"] / 1024, "unit": "MB", "peak_mb": mem["VmHWM"] / 1024,
                "tree_mb": tree / 1024, "processes": len(members),
                "peak_tree_mb": sum(x.get("VmHWM", 0) for x in members) / 1024,
                "load": m.stop()}
    finally:
        env.close()


def deb_install(deb: Path, root: Path) -> Path:
    """The .deb's files unpacked under `root` (dpkg-deb -x, no root needed): its
    usr/bin/lobbyd, as the package installs it (a symlink into usr/lib/lobbyd)."""
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=120)
    return root / "usr" / "bin" / "lobbyd"


def fig_startup(cmd: list[str], work: Path, prof: Profile, trials: int) -> dict:
    env = Env(cmd, work)
    try:
        times = []
        with LoadMeter(pace=True) as m:
            for k in range(trials):
                d = env.daemon(f"bench-start-{k}", start=False)
                d.start(wait=False)
                times.append(d.wait_ready(60) * 1000)
                d.stop()
        return {"value": statistics.median(times), "unit": "ms", "samples": times,
                "load": m.stop()}
    finally:
        env.close()


#: a paced run holds when the daemon has applied its last packet this soon after the
#: sender stopped: the idle lag (a sentinel alone: the sender's flush, the packet's way,
#: the API's poll: 9-11 ms on an idle 2-core VM, more on a slower or busier one) plus 2 %
#: of the run (at least 50 ms, the API polls' own resolution)
INGEST_LAG_FRACTION = 0.02
INGEST_LAG_FLOOR_S = 0.05
#: the idle lag is the best of this many sentinels sent alone
INGEST_IDLE_SENTINELS = 3
#: ... and the daemon was not pegged meanwhile (a full core = a backlog was building)
INGEST_CPU_SATURATED = 0.95
#: ... in this many runs in a row at the same target rate
INGEST_RUNS_IN_A_ROW = 2


def fig_ingest(cmd: list[str], work: Path, prof: Profile, n: int,
               on_daemon: Callable[[Daemon, str], None] | None = None,
               redis: bool = False) -> dict:
    """Sustained `hi` capacity at N hosts, measured on the daemon's side.

    1. prefill one round; 2. a burst (as fast as the generator goes) estimates the drain
    rate, only to place the ladder; 3. paced runs of `ingest_confirm_s` at a target rate,
    each followed by a sentinel on the same connection. A run HOLDS when the sentinel
    shows in the daemon's API at most the lag allowed (below) after the sender's last
    packet (first poll that sees it; no correction), the daemon's CPU over the run stayed
    under 95 % of a core, and the registry then lists every host with exactly its last
    seq. Its rate is the DAEMON's: packets / (sentinel visible - first packet sent). The
    lag allowed is the idle lag (the best of INGEST_IDLE_SENTINELS sentinels sent alone,
    measured after the burst) plus that margin: what the daemon may still have queued. A
    target rate is sustained when INGEST_RUNS_IN_A_ROW runs in a row hold; the figure is
    the lowest daemon-side rate of those runs at the highest sustained target. The ladder
    walks down from 95 % of the burst estimate, then up by x1.15 while it keeps holding.
    With `redis` the same over redis-server (DRIVER=Redis, PUBLISH pipelined).
    """
    env = Env(cmd, work, redis=redis)
    poll = 0.01 if n <= 10000 else 0.05
    margin = max(INGEST_LAG_FRACTION * prof.ingest_confirm_s, INGEST_LAG_FLOOR_S)
    try:
        d = env.daemon("bench-ingest", TTL=86400)
        expected = [0] * n
        fill_s = prefill(env, d, n)
        seq = 1
        count = max(100_000, min(2 * n, 250_000))
        count = -(-count // n) * n  # whole rounds
        if on_daemon:
            on_daemon(d, "ingest-burst")
        with LoadMeter() as m:
            cpu0 = d.cpu_seconds()
            g = env.loadgen(n, count=count, seq0=seq, sentinel="burst")
            env.go(g)
            r = env.result(g)
            wait_idle(d, timeout=max(60, count / 2000))
            t_done = wait_sentinel(d, "burst", timeout=max(60, count / 2000), interval=poll)
            cpu = d.cpu_seconds() - cpu0
        for i in range(n):
            expected[i] = seq + (count - 1 - i) // n
        seq += count // n
        burst_s = t_done - r["t_first"]
        check = check_registry(d, n, expected)
        burst = {"packets": count, "seconds": round(burst_s, 3),
                 "drain_rate_estimate": round(count / burst_s),
                 "daemon_cpu_pct": round(100 * cpu / burst_s, 1), "exact": check["exact"],
                 "check": check, "load": m.stop()}
        if not check["exact"]:
            raise AssertionError(f"ingest n={n}: registry not exact after the burst: {check}")
        idle_lags = []
        for k in range(INGEST_IDLE_SENTINELS):
            g = env.loadgen(n, count=0, sentinel=f"idle{k}")
            env.go(g)
            r = env.result(g)
            idle_lags.append(wait_sentinel(d, f"idle{k}", timeout=30, interval=poll) - r["t_last"])
        bound = min(idle_lags) + margin
        log(f"ingest n={n}: idle lag {1000 * min(idle_lags):.1f} ms (of "
            f"{', '.join(f'{1000 * x:.1f}' for x in idle_lags)}): a run holds with a lag up to "
            f"{1000 * bound:.0f} ms")
        runs: list[dict] = []

        def paced(rate: float) -> dict:
            nonlocal seq
            cnt = -(-max(n, int(rate * prof.ingest_confirm_s)) // n) * n  # whole rounds
            with LoadMeter() as m:
                cpu0 = d.cpu_seconds()
                g = env.loadgen(n, rate=rate, count=cnt, seq0=seq, sentinel=f"c{seq}",
                                max_seconds=prof.ingest_confirm_s * 4 + 30)
                env.go(g)
                r = env.result(g)
                cpu_send = d.cpu_seconds() - cpu0  # the daemon's CPU while packets came
                t_vis = wait_sentinel(d, f"c{seq}", timeout=120, interval=poll)
            for i in range(n):
                expected[i] = seq + (cnt - 1 - i) // n
            seq += cnt // n
            check = check_registry(d, n, expected)
            if not check["exact"]:
                raise AssertionError(f"ingest n={n}: registry not exact: {check}")
            lag = t_vis - r["t_last"]
            cpu_share = cpu_send / max(1e-6, r["t_last"] - r["t_first"])
            holds = lag <= bound and cpu_share < INGEST_CPU_SATURATED and r["sent"] == cnt
            run = {"target_rate": round(rate), "sender_rate": round(r["rate"]),
                   "daemon_rate": round(cnt / (t_vis - r["t_first"])), "packets": cnt,
                   "lag_s": round(lag, 3), "lag_bound_s": round(bound, 4),
                   "daemon_cpu_pct": round(100 * cpu_share, 1), "exact": True,
                   "holds": holds, "load": m.stop()}
            runs.append(run)
            log(f"ingest n={n}: target {run['target_rate']}/s daemon {run['daemon_rate']}/s "
                f"lag {run['lag_s']} s cpu {run['daemon_cpu_pct']}% -> "
                f"{'holds' if holds else 'no'}")
            return run

        def sustained_at(rate: float) -> list[dict] | None:
            """INGEST_RUNS_IN_A_ROW runs at `rate`; all of them must hold."""
            out = []
            for _ in range(INGEST_RUNS_IN_A_ROW):
                run = paced(rate)
                if not run["holds"]:
                    return None
                out.append(run)
            return out

        drain = burst["drain_rate_estimate"]
        best: tuple[float, list[dict]] | None = None
        for f in (0.95, 0.8, 0.65, 0.5, 0.35, 0.2, 0.1):
            held = sustained_at(drain * f)
            if held:
                best = (drain * f, held)
                break
        if best:
            for _ in range(3):  # the burst estimate may be low on a noisy machine
                rate = best[0] * 1.15
                held = sustained_at(rate)
                if not held:
                    break
                best = (rate, held)
        value = min(r["daemon_rate"] for r in best[1]) if best else 0
        return {"value": value, "unit": "pkt/s", "fill_s": round(fill_s, 3), "burst": burst,
                "idle_lags_s": [round(x, 4) for x in idle_lags], "lag_bound_s": round(bound, 4),
                "sustained_target": round(best[0]) if best else 0, "ladder": runs,
                "exact": True, "load": (best[1][-1] if best else runs[-1])["load"]}
    finally:
        env.close()


#: a stable fleet: one host in 1,000 changes its labels per minute
STABLE_RELABELS_PER_HOST_MIN = 1 / 1000


def fig_steady(cmd: list[str], work: Path, prof: Profile, n: int, window: float,
               keep_alive: int = 5, churn: bool = False) -> dict:
    """N hosts at KEEP_ALIVE (N/KEEP_ALIVE packets/s): the daemon's CPU share and RSS after
    a warm-up. Stable: labels change rarely (one host in 1,000 per minute), as in a real
    fleet; churn: every packet carries a new seq:K label (a worst case)."""
    env = Env(cmd, work)
    try:
        d = env.daemon("bench-steady", TTL=86400)
        prefill(env, d, n)
        rate = n / keep_alive
        warm = 5.0
        seconds = warm + window + 5
        if churn:
            g = env.loadgen(n, rate=rate, count=int(rate * seconds), seq0=1,
                            max_seconds=seconds + 30)
        else:
            per_packet = n * STABLE_RELABELS_PER_HOST_MIN / 60 / rate  # label changes
            g = env.loadgen(n, mode="keepalive", rate=rate, duration=seconds,
                            max_seconds=seconds + 30, relabel_every=round(1 / per_packet))
        env.go(g)
        time.sleep(warm)
        with LoadMeter() as m:
            t0, cpu0 = time.monotonic(), d.cpu_seconds()
            time.sleep(window)
            cpu = d.cpu_seconds() - cpu0
            dt = time.monotonic() - t0
            mem = d.mem_kib()
        load = m.stop()
        g.terminate()
        g.wait(10)
        names = d.get_json("/v1/discoveries")
        # unrounded: bench/report.py compares these with the targets
        return {"value": 100 * cpu / dt, "unit": "% of a core", "rate": rate,
                "labels": "churn" if churn else "stable",
                "rss_mb": mem["VmRSS"] / 1024, "peak_mb": mem["VmHWM"] / 1024,
                "hosts_listed": len(names), "load": load}  # type: ignore[arg-type]
    finally:
        env.close()


class Ceiling:
    """bench/ceiling.py for one case: the same answer bytes, served by a minimal server."""

    def __init__(self, d: Daemon, path: str, headers: dict[str, str] | None):
        cmd = [sys.executable, str(BENCH / "ceiling.py"), "--from-port", str(d.port),
               "--path", path, "--max-seconds", "900"]
        for k, v in (headers or {}).items():
            cmd += ["--header", f"{k}: {v}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("ceiling server failed to start")
        info = json.loads(line)
        self.port, self.bytes = info["port"], info["bytes"]

    def cpu_seconds(self) -> float:
        return _cpu(self.proc.pid)

    def close(self) -> None:
        stop_process(self.proc)


def log_load(what: str, res: dict) -> None:
    """One line for one HTTP load: lobbyd's figures, both ceilings', errors, wrong answers."""
    log(f"{what}: {res['rps']:.0f} req/s p99 {res.get('p99_ms')} ms "
        f"= {res['pct_of_ceiling']:.1f}% of the Python server's "
        f"{res['ceiling']['rps']:.0f} req/s, {res.get('pct_of_nginx', 0):.1f}% of "
        f"nginx's {res.get('nginx', {}).get('rps', 0):.0f}; errors {res['errors']}, "
        f"wrong answers {res['answers_checked']['wrong']}")


def ab_load(d: Daemon, path: str, conns: int, headers: dict[str, str] | None,
            seconds: float, rounds: int, work: Path,
            sample: Callable[[], str] | None = None) -> dict:
    """lobbyd, the same-bytes Python server (bench/ceiling.py) and nginx serving the same
    bytes as a static file (bench/nginx_ceiling.py) in turns (lobbyd, python, nginx, lobbyd
    ...), the same load flowing meanwhile; each side's figures summed over its turns.

    After each of lobbyd's turns its answers are checked: wrk's bytes per response against
    the answer's size (a cut or empty body shows), and one answer fetched at once must pass
    `sample` (returns "" when right, else what is wrong)."""
    ceiling = Ceiling(d, path, headers)
    nginx = None
    try:
        nginx = NginxCeiling(work, ceiling_answer(d, path, headers))
    except (RuntimeError, AssertionError, OSError) as exc:  # the figure says so
        log(f"nginx ceiling unavailable: {exc!r}")
    sides: dict[str, list[dict]] = {"lobbyd": [], "ceiling": [], "nginx": []}
    checks: list[str] = []
    turns = [("lobbyd", d.port, d.cpu_seconds), ("ceiling", ceiling.port, ceiling.cpu_seconds)]
    if nginx:
        turns.append(("nginx", nginx.port, nginx.cpu_seconds))
    try:
        for _ in range(rounds):
            for side, port, cpu in turns:
                with LoadMeter() as m:
                    cpu0, t0 = cpu(), time.monotonic()
                    res = httpload.http_load(port, path, conns, seconds, headers)
                    res["cpu_s"] = cpu() - cpu0
                    res["seconds"] = time.monotonic() - t0
                res.pop("raw", None)
                res["load"] = m.stop()
                sides[side].append(res)
                if side == "lobbyd":
                    checks += whole_answers(res, ceiling.bytes, sample)
    finally:
        ceiling.close()
        if nginx:
            nginx.close()
    out: dict = {}
    for side, runs in sides.items():
        if not runs:
            continue
        reqs = sum(int(r["requests"]) for r in runs)
        out[side] = {"rps": round(sum(float(r["rps"]) for r in runs) / len(runs), 1),
                     "requests": reqs, "errors": sum(int(r["errors"]) for r in runs),
                     "p50_ms": max(r.get("p50_ms", 0) for r in runs),
                     "p99_ms": max(r.get("p99_ms", 0) for r in runs),
                     "p99_ms_runs": [r.get("p99_ms") for r in runs],
                     "rps_runs": [round(float(r["rps"])) for r in runs],
                     "cpu_pct": round(100 * sum(r["cpu_s"] for r in runs) /
                                      sum(r["seconds"] for r in runs), 1),
                     "bytes_per_req": runs[0].get("bytes_per_req"), "tool": runs[0]["tool"]}
    res = dict(out["lobbyd"])
    res["ceiling"] = out["ceiling"]  # bench/ceiling.py: a minimal Python server, same bytes
    # unrounded: a target (>= 80 %) is compared with this, and 79.98 is not 80
    res["pct_of_ceiling"] = 100 * out["lobbyd"]["rps"] / max(1e-9, out["ceiling"]["rps"])
    if "nginx" in out:  # the machine's real ceiling: nginx, sendfile, the same bytes
        res["nginx"] = out["nginx"]
        res["pct_of_nginx"] = 100 * out["lobbyd"]["rps"] / max(1e-9, out["nginx"]["rps"])
    res["answers_checked"] = {"turns": len(sides["lobbyd"]), "wrong": checks}
    res["req_per_daemon_cpu_s"] = round(res["requests"] / max(1e-6, sum(
        r["cpu_s"] for r in sides["lobbyd"])))
    res["daemon_cpu_pct"] = res.pop("cpu_pct")
    res["answer_bytes"] = ceiling.bytes
    res["load"] = sides["lobbyd"][0]["load"]
    res["loads"] = [r["load"] for side in sides.values() for r in side]
    return res


def ceiling_answer(d: Daemon, path: str, headers: dict[str, str] | None) -> bytes:
    """One whole answer of lobbyd (head and body), as bench/ceiling.py serves it."""
    import ceiling as ceiling_module
    return ceiling_module.fetch(d.port, path, [f"{k}: {v}" for k, v in (headers or {}).items()])


#: wrk's "MB read" has 3 significant digits; answers under churn differ by a few digits
ANSWER_SIZE_TOLERANCE = 0.02


def whole_answers(res: dict, answer_bytes: int, sample: Callable[[], str] | None) -> list[str]:
    """What was wrong with lobbyd's answers in one turn: their mean size (wrk counts head
    and body) off the answer's, or the answer fetched right after the turn."""
    wrong = []
    got = res.get("bytes_per_req")
    if res.get("tool") == "wrk" and res.get("requests") and (
            not got or abs(got - answer_bytes) > ANSWER_SIZE_TOLERANCE * answer_bytes):
        wrong.append(f"{got} bytes per response, the answer has {answer_bytes}")
    if sample is not None:
        why = sample()
        if why:
            wrong.append(f"answer after the turn: {why}")
    return wrong


def answer_check(d: Daemon, path: str, headers: dict[str, str] | None, n: int,
                 labels_known: bool) -> Callable[[], str]:
    """What to check of one answer fetched right after a turn of load: "" when right."""
    def check() -> str:
        if path == "/v1/discoveries" and not headers:
            reg = check_registry(d, n, [0] * n if labels_known else None)
            return "" if reg["exact"] else f"registry answer not exact: {reg}"
        hosts = d.get_json("/v1/discoveries")
        assert isinstance(hosts, list)
        if headers:  # gzip: the same answer, decoded
            import gzip
            answer = ceiling_answer(d, path, headers)
            _head, _, body = answer.partition(b"\r\n\r\n")
            got = json.loads(gzip.decompress(body))
            same = [(h["hostname"], h["labels"]) for h in got] == \
                [(h["hostname"], h["labels"]) for h in hosts]
            return "" if same else "gzip answer decodes to other hosts than the plain one"
        got = d.get_json(path)
        if path.startswith("/v1/prometheus/"):
            want = sum(any(x == "prometheus:node" or x.startswith("prometheus:node:")
                           for x in h["labels"]) for h in hosts)
            return "" if isinstance(got, list) and len(got) == want else \
                f"{len(got) if isinstance(got, list) else got!r} target groups, want {want}"
        if path.startswith("/v1/resolve?label="):
            label = path.split("=", 1)[1]
            want = sorted(h["hostname"] for h in hosts if label in h["labels"])
            return "" if got == want else f"{len(got)} hostnames, want {len(want)}"
        return ""
    return check


def fig_http(cmd: list[str], work: Path, prof: Profile, n: int) -> dict:
    """wrk against the API while N hosts keep-alive (N/5 msg/s), in turns with two servers
    sending the same bytes: a minimal Python one (bench/ceiling.py) and nginx with sendfile
    (the machine's real ceiling); lobbyd as % of each. Stable labels first, then label
    churn. Every turn of lobbyd's is checked for whole, exact answers."""
    env = Env(cmd, work)
    cases = [("/v1/discoveries", 8, None), ("/v1/discoveries", 1, None)]
    if prof.http_extra and n >= 10000:
        cases += [("/v1/discoveries", 8, {"Accept-Encoding": "gzip"}),
                  ("/v1/prometheus/node", 8, None), ("/v1/resolve?label=service:web", 8, None)]
    rounds, turn = prof.http_rounds, prof.http_seconds / prof.http_rounds
    per_case = rounds * 3 * (turn + 1.5) + 5  # lobbyd, Python server, nginx
    try:
        d = env.daemon("bench-http", TTL=86400)
        prefill(env, d, n)
        check = check_registry(d, n, [0] * n)
        total = len(cases) * per_case + 10
        g = env.loadgen(n, mode="keepalive", rate=n / 5, duration=total, max_seconds=total + 30)
        env.go(g)
        out = {}
        for path, conns, headers in cases:
            res = ab_load(d, path, conns, headers, turn, rounds, work,
                          answer_check(d, path, headers, n, labels_known=True))
            key = f"{path}{' gzip' if headers else ''} c{conns}"
            out[key] = res
            log_load(f"http n={n} {key}", res)
        g.terminate()
        g.wait(10)
        # Label churn: the same N/5 packets/s, but every packet changes its host's labels
        # (a new seq:K each round), so the registry changes between almost any two
        # requests and the per-second answer cache cannot serve them.
        churn_s = per_case + 5
        g = env.loadgen(n, rate=n / 5, count=int(n / 5 * churn_s), seq0=1,
                        max_seconds=churn_s + 30)
        env.go(g)
        res = ab_load(d, "/v1/discoveries", 8, None, turn, rounds, work,
                      answer_check(d, "/v1/discoveries", None, n, labels_known=False))
        res["label_changes_per_s"] = n / 5
        sent = env.result(g)
        out["/v1/discoveries c8 label-churn"] = res
        log(f"http n={n} label churn: {res['rps']:.0f} req/s p99 {res.get('p99_ms')} ms "
            f"= {res['pct_of_ceiling']:.1f}% of the Python server, "
            f"{res.get('pct_of_nginx', 0):.1f}% of nginx; errors {res['errors']}, wrong "
            f"answers {res['answers_checked']['wrong']} ({sent['sent']} label changes sent)")
        main = out["/v1/discoveries c8"]
        return {"value": main["rps"], "unit": "req/s", "cases": out, "registry": check,
                "churn_rps": res["rps"], "pct_of_ceiling": main["pct_of_ceiling"],
                "churn_pct_of_ceiling": res["pct_of_ceiling"], "load": main["load"]}
    finally:
        env.close()


#: hosts offering the service of the Consul figure, besides the N of the load generator
CONSUL_OFFERING = 100


def consul_check(d: Daemon, path: str, n: int) -> Callable[[], str]:
    """What to check of a Consul answer fetched right after a turn: "" when right."""
    def check() -> str:
        got = d.get_json(path)
        if path.startswith("/v1/health/service/"):
            names = [entry["Node"]["Node"] for entry in got]  # type: ignore[union-attr]
            want = [f"api{i:03d}.bench.invalid" for i in range(CONSUL_OFFERING)]
            return "" if names == want else f"{len(names)} instances, want {len(want)}"
        want_services = {"api": ["v1"], "cache": [], "db": [], "smtp": [], "web": []}
        return "" if got == want_services else f"services {got!r}, want {want_services}"
    return check


def fig_consul(cmd: list[str], work: Path, prof: Profile, n: int = 10000) -> dict:
    """Consul's API at fleet scale, as fig_http: wrk in turns with the same-bytes servers
    while N hosts keep-alive. GET /v1/health/service/api (CONSUL_OFFERING more hosts
    offer api, with port and tag) and GET /v1/catalog/services (every host offers one
    of the load generator's four services)."""
    env = Env(cmd, work)
    cases = ["/v1/health/service/api", "/v1/catalog/services"]
    rounds, turn = prof.http_rounds, prof.http_seconds / prof.http_rounds
    per_case = rounds * 3 * (turn + 1.5) + 5
    try:
        d = env.daemon("bench-consul", TTL=86400)
        prefill(env, d, n)
        registry = check_registry(d, n, [0] * n)  # before the hosts offering api join
        nats = env.nats.client()
        for i in range(CONSUL_OFFERING):  # TTL=86400: one hi each holds them
            nats.publish_json(SUBJECT, {"discovery": {
                "hostname": f"api{i:03d}.bench.invalid", "last_check": 0,
                "labels": ["service:api", "service:api:port:8080", "service:api:tag:v1",
                           f"address:10.1.{i // 256}.{i % 256}", f"location:dc{i % 4}"]},
                "message": "hi"})
        nats.flush()
        wait_until(lambda: len(d.get_json(cases[0])) == CONSUL_OFFERING, timeout=30)
        total = len(cases) * per_case + 10
        g = env.loadgen(n, mode="keepalive", rate=n / 5, duration=total, max_seconds=total + 30)
        env.go(g)
        out = {}
        for path in cases:
            res = ab_load(d, path, 8, None, turn, rounds, work, consul_check(d, path, n))
            out[f"{path} c8"] = res
            log_load(f"consul n={n} {path} c8", res)
        g.terminate()
        g.wait(10)
        main = out[f"{cases[0]} c8"]
        return {"value": main["rps"], "unit": "req/s", "cases": out, "registry": registry,
                "pct_of_ceiling": main["pct_of_ceiling"],
                "services_pct_of_ceiling": out[f"{cases[1]} c8"]["pct_of_ceiling"],
                "load": main["load"]}
    finally:
        env.close()


#: held blocking queries of the consul_watch figure: the same number on each kind of route
#: the watchers of the watch figures all come from 127.0.0.1: one client address, which
#: may hold 250 connections by default (HTTP_MAX_CONNECTIONS_PER_ADDRESS); these hold ~1,000
ONE_ADDRESS_WATCHERS = {"HTTP_MAX_CONNECTIONS_PER_ADDRESS": "1000"}
CONSUL_HELD = 500


def fig_consul_watch(cmd: list[str], work: Path, prof: Profile, n: int = 10000) -> dict:
    """CONSUL_HELD blocking queries held on a Lobby route, then as many on a Consul route
    (both show the hosts offering service `watched`), N hosts: lobbyd's RSS with them,
    and the time from a label change on a peer until every one has its answer."""
    env = Env(cmd, work)
    clients: list[subprocess.Popen] = []
    try:
        d = env.daemon("bench-cwatch", TTL=86400, **ONE_ADDRESS_WATCHERS)
        b = env.daemon("bench-cwatch-peer", TTL=86400)
        prefill(env, d, n)
        time.sleep(2)
        out: dict = {}
        with LoadMeter() as m:
            for kind, path in [("lobby", "/v1/discoveries?labels=service:watched"),
                               ("consul", "/v1/health/service/watched")]:
                rss_before = d.mem_kib()["VmRSS"] / 1024
                client = subprocess.Popen(
                    [sys.executable, str(BENCH / "watchload.py"), "--port", str(d.port),
                     "--plan", json.dumps([["held", path, CONSUL_HELD, True]]),
                     "--max-seconds", "600"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                clients.append(client)

                def ask(command: str | None, client: subprocess.Popen = client) -> dict:
                    if command:
                        client.stdin.write(command + "\n")  # type: ignore[union-attr]
                        client.stdin.flush()  # type: ignore[union-attr]
                    line = client.stdout.readline()  # type: ignore[union-attr]
                    if not line:
                        raise RuntimeError("watchload ended early")
                    return json.loads(line)

                ready = ask(None)
                time.sleep(2)
                rss_with = d.mem_kib()["VmRSS"] / 1024
                latencies: list[float] = []
                missing = 0
                for k in range(10 if prof is FULL else 4):
                    ask("arm")
                    time.sleep(1)  # the re-armed requests reach the daemon and are held
                    t0 = time.monotonic()
                    status, _ = b.http.request("POST" if k % 2 == 0 else "DELETE",
                                               "/v1/labels", b"service:watched")
                    assert status == 200, status
                    got = ask("collect")
                    latencies += [(t - t0) * 1000 for t in got["times"]]
                    missing += got["missing"]
                client.stdin.write("quit\n")  # type: ignore[union-attr]
                client.stdin.flush()  # type: ignore[union-attr]
                client.wait(10)
                out[kind] = {"path": path, "held": ready["held"], "missing": missing,
                             "p50_ms": round(pctl(latencies, 50), 1),
                             "p99_ms": round(pctl(latencies, 99), 1),
                             "rss_mb_without": round(rss_before, 1),
                             "rss_mb_with": round(rss_with, 1),
                             "rss_kib_per_held": round(
                                 (rss_with - rss_before) * 1024 / max(1, ready["held"]), 1)}
                log(f"consul_watch n={n} {kind} {path}: {ready['held']} held, wake p50 "
                    f"{out[kind]['p50_ms']} ms p99 {out[kind]['p99_ms']} ms, RSS "
                    f"{rss_before:.1f} -> {rss_with:.1f} MB, missing {missing}")
        return {"value": out["consul"]["p99_ms"], "unit": "ms", **out, "load": m.stop()}
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait(5)
        env.close()


def fig_propagation(cmd: list[str], work: Path, prof: Profile) -> dict:
    """POST/DELETE /v1/labels on A -> visible on B (B polled over one keep-alive conn)."""
    env = Env(cmd, work)
    try:
        a = env.daemon("bench-prop-a")
        b = env.daemon("bench-prop-b")
        wait_until(lambda: a.hostname in [p["hostname"] for p in b.get_json("/v1/discoveries")],
                   10)
        lat, post = [], []
        with LoadMeter(pace=True) as m:
            for k in range(prof.prop_changes):
                label = f"bench-prop:{k // 2}"
                add = k % 2 == 0
                # send the request, watch B at once, read A's answer afterwards: the
                # figure is "request sent -> visible on B", whatever A does before it
                # answers (an fsync of the runtime labels file, say)
                conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
                conn.connect()
                t0 = time.perf_counter()
                conn.request("POST" if add else "DELETE", "/v1/labels", body=label.encode())
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    hosts = b.get_json(f"/v1/resolve?label={label}")
                    if (a.hostname in hosts) == add:  # type: ignore[operator]
                        break
                else:
                    raise TimeoutError(f"change {k} not visible on B within 5 s")
                seen = time.perf_counter()
                resp = conn.getresponse()
                resp.read()
                post.append((time.perf_counter() - t0) * 1000)
                conn.close()
                if resp.status != 200:
                    raise RuntimeError(f"labels request answered {resp.status}")
                lat.append((seen - t0) * 1000)
        return {"value": round(pctl(lat, 50), 3), "unit": "ms", "p50_ms": round(pctl(lat, 50), 3),
                "p99_ms": round(pctl(lat, 99), 3), "max_ms": round(max(lat), 3),
                "post_p50_ms": round(pctl(post, 50), 3), "post_p99_ms": round(pctl(post, 99), 3),
                "changes": len(lat), "samples_ms": [round(x, 3) for x in lat],
                "load": m.stop()}
    finally:
        env.close()


def wait_until(pred: Callable[[], object], timeout: float, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except (OSError, RuntimeError, ValueError):
            pass
        time.sleep(interval)
    raise TimeoutError("condition not met")


def fig_goodbye(cmd: list[str], work: Path, prof: Profile) -> dict:
    """SIGTERM on A -> A gone on B."""
    env = Env(cmd, work)
    try:
        b = env.daemon("bench-gb-b")
        lat, exits = [], []
        with LoadMeter(pace=True) as m:
            for k in range(prof.goodbye_trials):
                label = f"bench-gb:{k}"
                a = env.daemon(f"bench-gb-a{k}", LABELS=label)
                wait_until(lambda label=label, a=a: a.hostname in b.get_json(
                    f"/v1/resolve?label={label}"), 10, 0.005)
                time.sleep(0.05)
                t0 = time.perf_counter()
                assert a.proc is not None
                a.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if a.hostname not in b.get_json(f"/v1/resolve?label={label}"):  # type: ignore[operator]
                        break
                else:
                    raise TimeoutError(f"goodbye {k} not seen on B")
                lat.append((time.perf_counter() - t0) * 1000)
                a.proc.wait(10)
                exits.append((time.perf_counter() - t0) * 1000)
                a.stop()
        return {"value": round(pctl(lat, 50), 3), "unit": "ms", "p50_ms": round(pctl(lat, 50), 3),
                "p99_ms": round(pctl(lat, 99), 3), "max_ms": round(max(lat), 3),
                "exit_p50_ms": round(pctl(exits, 50), 1), "exit_max_ms": round(max(exits), 1),
                "trials": len(lat), "samples_ms": [round(x, 3) for x in lat],
                "load": m.stop()}
    finally:
        env.close()


def fig_join(cmd: list[str], work: Path, prof: Profile) -> dict:
    """A new daemon starts while K real daemons and F simulated hosts run:
    exec -> it lists every live lobbyd (and every simulated host)."""
    env = Env(cmd, work)
    try:
        peers = [env.daemon(f"bench-join-peer{k}", LABELS="bench-peer:yes")
                 for k in range(prof.join_peers)]
        want = {p.hostname for p in peers}
        f = prof.join_fakes
        total = prof.join_trials * 8 + 20
        g = env.loadgen(f, mode="keepalive", rate=f / 5, duration=total, max_seconds=total + 30)
        env.go(g)
        time.sleep(5.5)  # every fake host has been heard once
        joins, after_ready, fleet, ready = [], [], [], []
        with LoadMeter() as m:
            for k in range(prof.join_trials):
                c = env.daemon(f"bench-join-new{k}", start=False)
                c.start(wait=False)
                t_ready = c.wait_ready(60)
                t_peers = None
                t_fleet = None
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline and (t_peers is None or t_fleet is None):
                    if t_peers is None:
                        got = set(c.get_json("/v1/resolve?label=bench-peer:yes"))  # type: ignore[arg-type]
                        if want <= got:
                            t_peers = time.monotonic() - c.t_exec
                    if t_fleet is None:
                        got = c.get_json("/v1/resolve?label=prometheus:node")
                        if len(got) >= f:  # type: ignore[arg-type]
                            t_fleet = time.monotonic() - c.t_exec
                    time.sleep(0.005)
                ready.append(t_ready * 1000)
                joins.append((t_peers if t_peers is not None else float("inf")) * 1000)
                after_ready.append(((t_peers or float("inf")) - t_ready) * 1000)
                fleet.append((t_fleet if t_fleet is not None else float("inf")) * 1000)
                c.stop()
                time.sleep(0.2)
        g.terminate()
        return {"value": round(statistics.median(joins), 1), "unit": "ms",
                "exec_to_all_lobbyd_ms": [round(x, 1) for x in joins],
                "ready_to_all_lobbyd_ms": [round(x, 1) for x in after_ready],
                "exec_to_all_simulated_ms": [round(x, 1) for x in fleet],
                "exec_to_ready_ms": [round(x, 1) for x in ready],
                "peers": prof.join_peers, "simulated_hosts": f, "load": m.stop()}
    finally:
        env.close()


class LastSeen(threading.Thread):
    """Raw NATS subscriber noting when each hostname's last packet passed."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b'CONNECT {"verbose":false}\r\nSUB ' + SUBJECT.encode() + b" 1\r\n")
        self.seen: dict[str, float] = {}
        self.stopped = False

    def run(self) -> None:
        buf = b""
        while not self.stopped:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while True:
                if buf.startswith(b"MSG "):
                    nl = buf.find(b"\r\n")
                    if nl < 0:
                        break
                    size = int(buf[:nl].split()[-1])
                    if len(buf) < nl + 2 + size + 2:
                        break
                    payload = buf[nl + 2:nl + 2 + size]
                    buf = buf[nl + 4 + size:]
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        self.seen[json.loads(payload)["discovery"]["hostname"]] = time.monotonic()
                else:
                    nl = buf.find(b"\r\n")
                    if nl < 0:
                        break
                    if buf.startswith(b"PING"):
                        self.sock.sendall(b"PONG\r\n")
                    buf = buf[nl + 2:]

    def close(self) -> None:
        self.stopped = True
        self.sock.close()


def fig_dead(cmd: list[str], work: Path, prof: Profile, ttl: int, clean: int, ka: int,
             victims: int) -> dict:
    """kill -9 on A -> A gone on B (B with TTL/CLEAN_EVERY as given)."""
    env = Env(cmd, work)
    watcher = LastSeen(env.nats.port)
    watcher.start()
    try:
        b = env.daemon("bench-dead-b", TTL=ttl, CLEAN_EVERY=clean)
        vs = [env.daemon(f"bench-dead-v{k}", KEEP_ALIVE=ka, LABELS="bench-victim:yes")
              for k in range(victims)]
        wait_until(lambda: len(b.get_json("/v1/resolve?label=bench-victim:yes")) == victims,  # type: ignore[arg-type]
                   15)
        time.sleep(min(ka, 2) + 0.3)
        with LoadMeter() as m:
            t_kill = time.monotonic()
            for v in vs:
                assert v.proc is not None
                v.proc.kill()
            gone: dict[str, float] = {}
            deadline = t_kill + ttl + clean + 20
            while time.monotonic() < deadline and len(gone) < victims:
                listed = set(b.get_json("/v1/resolve?label=bench-victim:yes"))  # type: ignore[arg-type]
                now = time.monotonic()
                for v in vs:
                    if v.hostname not in listed and v.hostname not in gone:
                        gone[v.hostname] = now
                time.sleep(0.05)
        from_kill = [gone.get(v.hostname, float("inf")) - t_kill for v in vs]
        from_last = [gone.get(v.hostname, float("inf")) - watcher.seen.get(v.hostname, t_kill)
                     for v in vs]
        return {"value": round(statistics.median(from_kill), 2), "unit": "s",
                "from_kill_s": [round(x, 2) for x in from_kill],
                "from_last_packet_s": [round(x, 2) for x in from_last],
                "ttl": ttl, "clean_every": clean, "victim_keep_alive": ka,
                "target_max_from_last_packet_s": ttl + 1, "load": m.stop()}
    finally:
        watcher.close()
        env.close()


# The watchers of the watch figure: 890 blocking queries and 100 event streams, which
# with the harness's own connections is SPEC 5's connection limit of 1,000 (the issue
# asks for 1,000 + 100: over that limit, the extra ones would be refused).
WATCH_PLAN = [
    ["held", "/v1/discoveries?labels=service:watched", 400, True],
    ["held", "/v1/resolve?label=service:watched", 200, True],
    ["held", "/v1/prometheus/watched", 100, True],
    ["held", "/v1/discoveries?prefixes=service:wat", 100, True],
    ["held", "/v1/discoveries?labels=service:untouched", 90, False],
    ["stream", "?labels=service:watched", 90, True],
    ["stream", "?prefixes=service:wat", 10, True],
]


def drain_rate(env: Env, d: Daemon, n: int, count: int, seq0: int, token: str) -> float:
    """Packets/s the daemon ingests in a burst of `count` label changes (N hosts, whole
    rounds), from the first packet until a sentinel sent after them is visible."""
    g = env.loadgen(n, count=count, seq0=seq0, sentinel=token)
    env.go(g)
    r = env.result(g)
    t_done = wait_sentinel(d, token, timeout=max(60, count / 2000), interval=0.05)
    return count / (t_done - r["t_first"])


def fig_watch(cmd: list[str], work: Path, prof: Profile, n: int = 10000) -> dict:
    """SPEC 8 at fleet scale: N hosts, 890 blocking queries + 100 event streams.

    A label change on a peer (POST to B) -> the time until every watcher of a
    touched answer has it (p50/p99 over all watchers and changes); lobbyd's RSS
    without and with the watchers; the drain rate of a burst of label changes
    without and with them connected (the watchers of untouched answers must not wake).
    """
    env = Env(cmd, work)
    watchers: list[subprocess.Popen] = []
    try:
        d = env.daemon("bench-watch", TTL=86400, **ONE_ADDRESS_WATCHERS)
        b = env.daemon("bench-watch-peer", TTL=86400)
        prefill(env, d, n)
        burst = 5 * n if n <= 10000 else n
        with LoadMeter() as m:
            without = drain_rate(env, d, n, burst, 1, "w0")
            time.sleep(2)
            rss_before = d.mem_kib()["VmRSS"] / 1024
            # two client processes: one would queue the answers it reads, and its
            # queueing would count as the daemon's latency
            clients = [subprocess.Popen(
                [sys.executable, str(BENCH / "watchload.py"), "--port", str(d.port),
                 "--plan", json.dumps(half), "--max-seconds", "600"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for half in split_plan(WATCH_PLAN, 2)]
            watchers.extend(clients)

            def ask(command: str | None) -> list[dict]:
                for client in clients:
                    if command:
                        client.stdin.write(command + "\n")  # type: ignore[union-attr]
                        client.stdin.flush()  # type: ignore[union-attr]
                answers = []
                for client in clients:
                    line = client.stdout.readline()  # type: ignore[union-attr]
                    if not line:
                        raise RuntimeError("watchload ended early")
                    answers.append(json.loads(line))
                return answers

            ready = ask(None)
            time.sleep(2)  # connected; let the snapshots drain before reading RSS
            rss_with = d.mem_kib()["VmRSS"] / 1024
            latencies: list[float] = []
            per_change: list[list[float]] = []  # [p50, p99] ms of each change
            missing = 0
            changes = 10 if prof is FULL else 4
            for k in range(changes):
                ask("arm")
                time.sleep(1)  # the re-armed requests reach the daemon and are held
                t0 = time.monotonic()
                status, _ = b.http.request("POST" if k % 2 == 0 else "DELETE", "/v1/labels",
                                           b"service:watched\nprometheus:watched")
                assert status == 200, status
                this = []
                for got in ask("collect"):
                    this += [(t - t0) * 1000 for t in got["times"]]
                    missing += got["missing"]
                latencies += this
                per_change.append([round(pctl(this, 50), 1), round(pctl(this, 99), 1)])
            with_them = drain_rate(env, d, n, burst, 1 + burst // n, "w1")
            ask("arm")
            after = ask("collect")
            rss_after = d.mem_kib()["VmRSS"] / 1024
            for client in clients:
                client.stdin.write("quit\n")  # type: ignore[union-attr]
                client.stdin.flush()  # type: ignore[union-attr]
                client.wait(10)
            # streams of the whole registry get an event for every change of a burst:
            # their cost, measured on its own
            everything = subprocess.Popen(
                [sys.executable, str(BENCH / "watchload.py"), "--port", str(d.port),
                 "--plan", json.dumps([["stream", "", 10, True]]), "--max-seconds", "600"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            watchers.append(everything)
            everything.stdout.readline()  # type: ignore[union-attr]
            with_all = drain_rate(env, d, n, burst, 1 + 2 * burst // n, "w2")
            everything.kill()
            everything.wait(5)
            # the machine is shared: the burst without watchers again, to show the noise
            without_again = drain_rate(env, d, n, burst, 1 + 3 * burst // n, "w3")
        log(f"watch n={n}: p99 {pctl(latencies, 99):.1f} ms, RSS +{rss_with - rss_before:.1f}"
            f" MB, drain {without:.0f}/s without, {with_them:.0f}/s with watchers, "
            f"{without_again:.0f}/s without again")
        return {"value": round(pctl(latencies, 99), 1), "unit": "ms",
                "p50_ms": round(pctl(latencies, 50), 1), "max_ms": round(max(latencies), 1),
                "answers": len(latencies), "missing": missing, "changes": changes,
                "per_change_p50_p99_ms": per_change,
                "watchers": ready,
                "untouched_woken": sum(a["untouched_woken"] for a in after),
                "streams_open_after_burst": sum(a["streams_open"] for a in after),
                "rss_mb_without": round(rss_before, 1), "rss_mb_with": round(rss_with, 1),
                "rss_mb_after_burst": round(rss_after, 1),
                "drain_without": round(without), "drain_with": round(with_them),
                "drain_without_again": round(without_again),
                "drain_ratio": round(2 * with_them / (without + without_again), 3),
                "drain_with_10_unfiltered_streams": round(with_all), "load": m.stop()}
    finally:
        for client in watchers:
            if client.poll() is None:
                client.kill()
                client.wait(5)
        env.close()


def split_plan(plan: list[list], parts: int) -> list[list[list]]:
    """The watchers of `plan` dealt out to `parts` client processes."""
    out: list[list[list]] = [[] for _ in range(parts)]
    for kind, target, count, touched in plan:
        for k in range(parts):
            share = count // parts + (1 if k < count % parts else 0)
            if share:
                out[k].append([kind, target, share, touched])
    return out


def fig_fanout(work: Path, prof: Profile, subs: int = 8) -> dict:
    """What one nats-server here delivers: M packets to S raw subscribers."""
    env = Env([], work)
    socks = []
    try:
        for _ in range(subs):
            s = socket.create_connection(("127.0.0.1", env.nats.port))
            s.sendall(b'CONNECT {"verbose":false}\r\nSUB ' + SUBJECT.encode() + b" 1\r\nPING\r\n")
            buf = b""
            while b"PONG" not in buf:
                buf += s.recv(4096)
            s.setblocking(False)
            socks.append(s)
        m_count = prof.fanout_msgs
        g = env.loadgen(1000, count=m_count, seq0=1, sentinel="fanout-end")
        # every subscriber reads until the sentinel, published after the bulk, arrives
        import selectors
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        tails = dict.fromkeys(range(len(socks)), b"")
        done: set[int] = set()
        with LoadMeter() as m:
            cpu0 = _cpu(env.nats.proc.pid) if env.nats.proc else 0.0
            env.go(g)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(done) < len(socks):
                for key, _ in sel.select(0.5):
                    s = key.fileobj
                    idx = socks.index(s)  # type: ignore[arg-type]
                    try:
                        data = s.recv(1 << 20)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    if b"sentinel:fanout-end" in tails[idx] + data:
                        done.add(idx)
                        sel.unregister(s)
                    tails[idx] = data[-64:]
            t_end = time.monotonic()
            cpu = _cpu(env.nats.proc.pid) - cpu0 if env.nats.proc else 0.0
            r = env.result(g)
        secs = t_end - r["t_first"]
        delivered = len(done) * m_count
        return {"value": round(delivered / secs), "unit": "deliveries/s", "subscribers": subs,
                "published": m_count, "publish_rate": round(r["rate"]),
                "nats_cpu_pct": round(100 * cpu / secs, 1), "complete": len(done) == subs,
                "load": m.stop()}
    finally:
        for s in socks:
            s.close()
        env.close()


def _cpu(pid: int) -> float:
    from procs import proc_cpu_seconds
    return proc_cpu_seconds(pid)


# --------------------------------------------------------------------------- the page


#: JavaScript put into the page before the updates: the longest gap between two
#: animation frames (a frozen tab shows up here) and the long tasks Chromium saw
FRAME_WATCH = """(() => {
  window.benchFrames = {max: 0, last: performance.now(), long: []};
  const tick = (t) => {
    benchFrames.max = Math.max(benchFrames.max, t - benchFrames.last);
    benchFrames.last = t; requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  new PerformanceObserver((l) => benchFrames.long.push(...l.getEntries().map((e) => e.duration)))
    .observe({type: "longtask"});
  return true;
})()"""


def fig_page(cmd: list[str], work: Path, prof: Profile, n: int, rate: int = 1000,
             seconds: float = 5) -> dict:
    """The page (SPEC 12) in a real headless Chromium with N simulated hosts.

    Time to first paint: from navigation start to the second animation frame after
    the snapshot's rows are drawn (they are on screen then). Per-update cost: while
    `rate` hosts a second change labels for `seconds`, the JavaScript time of each
    batch the page applies (parse to draw), and the longest gap between frames.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    from browser import Chromium, chromium_binary

    binary = chromium_binary()
    if not binary:
        raise RuntimeError("chromium not found: apt-get install chromium")
    env = Env(cmd, work)
    chromium = None
    try:
        d = env.daemon("bench-page", TTL=86400)
        prefill(env, d, n)
        chromium = Chromium(binary, env.dir)
        page = chromium.new_page()
        with LoadMeter(pace=True) as m:
            page.navigate(f"http://127.0.0.1:{d.port}/", timeout=60)
            page.wait_for("lobbyStats.firstRows !== null", timeout=60, what="rows on screen")
            first = page.evaluate("({rows: lobbyStats.firstRows, snapshot: lobbyStats.snapshotMs,"
                                  " fcp: performance.getEntriesByName("
                                  "'first-contentful-paint')[0]?.startTime ?? null,"
                                  " dom: document.querySelectorAll('.row').length,"
                                  " count: document.getElementById('count').textContent})")
            page.evaluate(FRAME_WATCH)
            count = int(rate * seconds)
            g = env.loadgen(n, rate=rate, count=count, seq0=1,
                            max_seconds=seconds * 4 + 30)
            env.go(g)
            r = env.result(g)
            page.wait_for(f"lobbyStats.events >= {count}", timeout=60, what="every change")
            seen = page.wait_for("lobbyStats.seenPolls.length > 0 && lobbyStats.seenPolls",
                                 timeout=30, what="a refresh of the ages")
            after = page.evaluate("({flushes: lobbyStats.flushes, events: lobbyStats.events,"
                                  " frames: benchFrames})")
        flushes = after["flushes"]
        costs = [ms for _, ms in flushes]
        per_event = sum(costs) / max(1, sum(k for k, _ in flushes)) * 1000
        log(f"page n={n}: rows on screen {first['rows']:.0f} ms, update p99 "
            f"{pctl(costs, 99):.2f} ms, longest frame gap {after['frames']['max']:.0f} ms")
        return {"value": round(first["rows"], 1), "unit": "ms",
                "fcp_ms": round(first["fcp"], 1) if first["fcp"] else None,
                "snapshot_js_ms": round(first["snapshot"], 1), "dom_rows": first["dom"],
                "count_text": first["count"], "changes": count,
                "change_rate": round(r["rate"]), "batches": len(flushes),
                "events_per_batch": round(after["events"] / max(1, len(flushes)), 1),
                "batch_p50_ms": round(pctl(costs, 50), 2),
                "batch_p99_ms": round(pctl(costs, 99), 2),
                "batch_max_ms": round(max(costs), 2), "us_per_event": round(per_event, 1),
                "longest_frame_gap_ms": round(after["frames"]["max"], 1),
                "long_tasks": len(after["frames"]["long"]),
                "age_refresh_ms": round(max(seen), 1), "load": m.stop()}
    finally:
        if chromium:
            chromium.close()
        env.close()


# --------------------------------------------------------------------------- driver


def aggregate(samples: list[dict]) -> dict:
    vals = [s["value"] for s in samples]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "unit": samples[0]["unit"], "runs": samples}


def fmt(v: float, unit: str) -> str:
    if unit in ("pkt/s", "req/s", "deliveries/s"):
        return f"{v/1000:.1f}k" if v >= 10000 else f"{v:.0f}"
    if unit == "ms":
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return f"{v:.1f}"


def other(run: dict, moment: str) -> str:
    """" (other procs N% cpu)" for a kv moment measured with a load meter of its own."""
    load = run.get(f"{moment}_load")
    return f" (other procs {load['other_cpu_pct']:.0f}% cpu)" if load else ""


def load_str(load: dict) -> str:
    pace = f", pace {load['pace']:.2f}" if "pace" in load else ""
    return (f"load {load['loadavg_start'][0]:.2f}, other procs "
            f"{load['other_cpu_pct']:.0f}% cpu{pace}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="short CI run: 1 run, small sizes")
    ap.add_argument("--runs", type=int, help="runs per figure (default 3, smoke 1)")
    ap.add_argument("--only", default="", help="comma list: idle,startup,ingest,ingest_redis,"
                    "steady,http,consul,propagation,goodbye,join,dead,fanout,watch,page,dns; kv "
                    "(DISCOVERY_MODE=kv) runs only when named, at --hosts "
                    "(default 10000,100000)")
    ap.add_argument("--label", default="lobbyd", help="name of the implementation measured")
    ap.add_argument("--lobbyd-cmd", default=None, help="default: $LOBBYD_CMD or lobbyd.py")
    ap.add_argument("--binary", default=str(ROOT / "dist" / "lobbyd_linux_x86_64"),
                    help="static binary for the startup and idle figures ('' skips)")
    debs = sorted((ROOT / "dist").glob("lobbyd_*.deb"))
    ap.add_argument("--deb", default=str(debs[-1]) if debs else "",
                    help="the .deb whose install (dpkg-deb -x) the startup and idle figures "
                    "also measure (default: dist/'s; '' skips)")
    ap.add_argument("--go", default=os.environ.get("LOBBY_GO", "/usr/local/bin/lobby"),
                    help="the Go daemon, measured in the same run for the startup and idle "
                    "figures when it exists (default: $LOBBY_GO or /usr/local/bin/lobby)")
    ap.add_argument("--hosts", default="", help="override ingest host counts, e.g. 1000,100000")
    ap.add_argument("--out", default="", help="JSON path (default bench/results/...)")
    a = ap.parse_args()

    prof = SMOKE if a.smoke else FULL
    if a.runs:
        prof.runs = a.runs
    if a.hosts:
        prof.ingest_hosts = [int(x) for x in a.hosts.split(",")]
    only = set(filter(None, a.only.split(",")))
    cmd = lobbyd_command(a.lobbyd_cmd)
    nats_server_binary()  # fail early
    work = Path(tempfile.mkdtemp(prefix="lobbyd-bench-"))
    results: dict[str, dict] = {}
    t_start = time.time()

    def want(name: str) -> bool:
        return not only or name in only

    def measure(key: str, fn: Callable[[], dict], runs: int | None = None) -> None:
        samples = []
        for k in range(runs or prof.runs):
            log(f"{key}: run {k + 1}")
            try:
                samples.append(fn())
            except Exception as exc:  # a failing figure must not hide the others
                log(f"{key}: run {k + 1} FAILED: {exc!r}")
                tails = getattr(Env.last, "log_tails", {})
                samples.append({"value": float("nan"), "unit": "", "error": repr(exc),
                                "daemon_logs": tails})
        ok = [s for s in samples if s.get("unit")]
        results[key] = aggregate(ok) if ok else {"error": samples[-1]["error"], "runs": samples}
        if ok and len(ok) < len(samples):
            results[key]["errors"] = [s["error"] for s in samples if "error" in s]

    # the other builds of the start-up and idle figures: the static binary, the .deb's
    # install, the Go daemon (each when it exists)
    builds = []
    if a.binary and Path(a.binary).exists():
        builds.append(("binary", [a.binary]))
    if a.deb and Path(a.deb).exists() and (want("idle") or want("startup")):
        builds.append(("deb", [str(deb_install(Path(a.deb), work / "deb-root"))]))
    if a.go and Path(a.go).exists():
        builds.append(("go", [a.go]))
    try:
        if want("idle"):
            measure("idle_rss", lambda: fig_idle_rss(cmd, work, prof))
            for name, build in builds:
                measure(f"idle_rss_{name}", lambda build=build: fig_idle_rss(build, work, prof))
        if want("startup"):
            measure("startup_source", lambda: fig_startup(cmd, work, prof, prof.startup_trials))
            for name, build in builds:
                measure(f"startup_{name}",
                        lambda build=build: fig_startup(build, work, prof, prof.startup_trials))
        if want("ingest"):
            for n in prof.ingest_hosts:
                measure(f"ingest@{n}", lambda n=n: fig_ingest(cmd, work, prof, n))
        if want("ingest_redis"):
            for n in prof.redis_hosts:
                measure(f"ingest_redis@{n}",
                        lambda n=n: fig_ingest(cmd, work, prof, n, redis=True))
        if want("steady"):
            measure("steady@10000", lambda: fig_steady(cmd, work, prof, 10000,
                                                       prof.steady_window_s))
            measure("churn@10000", lambda: fig_steady(cmd, work, prof, 10000,
                                                      prof.steady_window_s, churn=True))
            if prof.steady_big:
                measure("steady@1000", lambda: fig_steady(cmd, work, prof, 1000, 15), runs=1)
                measure("steady@100000", lambda: fig_steady(cmd, work, prof, 100000, 15),
                        runs=1)
        if want("http"):
            for n in prof.http_hosts:
                measure(f"http@{n}", lambda n=n: fig_http(cmd, work, prof, n))
        if want("consul"):
            measure("consul@10000", lambda: fig_consul(cmd, work, prof))
            measure("consul_watch@10000", lambda: fig_consul_watch(cmd, work, prof))
        if want("propagation"):
            measure("propagation", lambda: fig_propagation(cmd, work, prof))
        if want("goodbye"):
            measure("goodbye", lambda: fig_goodbye(cmd, work, prof))
        if want("join"):
            measure("join", lambda: fig_join(cmd, work, prof))
        if want("dead"):
            for ttl, clean, ka, nv in prof.dead_variants:
                measure(f"dead@ttl{ttl}_clean{clean}",
                        lambda t=ttl, c=clean, k=ka, v=nv: fig_dead(cmd, work, prof, t, c, k, v),
                        runs=1)
        if want("watch"):
            measure("watch@10000", lambda: fig_watch(cmd, work, prof))
        if want("page"):
            measure("page@10000", lambda: fig_page(cmd, work, prof, 10000))
        if want("dns"):
            measure("dns@10000", lambda: dnsbench.fig_dns(
                lambda: Env(cmd, work), prefill, SUBJECT, 10000, prof.dns_seconds,
                prof.dns_rounds))
        if want("fanout"):
            measure("nats_fanout", lambda: fig_fanout(work, prof), runs=1)
        if "kv" in only:
            for n in ([int(x) for x in a.hosts.split(",")] if a.hosts else [10000, 100000]):
                measure(f"kv@{n}", lambda n=n: kvbench.fig_kv(cmd, work / f"kv{n}", n), runs=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = {"label": a.label, "cmd": cmd, "smoke": a.smoke, "runs": prof.runs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
            "seconds": round(time.time() - t_start), "python": platform.python_version(),
            "machine": platform.machine(), "cores": os.cpu_count(),
            "http_tool": "wrk" if shutil.which("wrk") else "python-fallback",
            "code": code_identity(cmd)}
    doc = {"meta": meta, "figures": results}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t_start))
    out = Path(a.out) if a.out else \
        BENCH / "results" / f"{a.label}-{'smoke-' if a.smoke else ''}{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(doc), indent=2, default=str) + "\n")
    print(table(doc))
    print(f"\nwritten: {out}")
    try:  # pictures of the newest run of every label in the same directory
        import plots
        for path in plots.draw(plots.newest_per_label(out.parent), out.parent / "plots"):
            print(f"plot: {path}")
    except Exception as exc:  # a picture must never fail the figures
        print(f"plots failed: {exc!r}", file=sys.stderr)
    failed = failed_figures(results)
    wrong = wrong_results(results)
    for line in wrong:
        print(f"WRONG RESULT: {line}", file=sys.stderr)
    slow = regressions(results)
    for line in slow:
        print(f"REGRESSION: {line}", file=sys.stderr)
    if failed:
        print(f"FAILED figures: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or wrong or slow else 0


#: the full bench the guards below compare with (the README's figures come from it)
BASELINE = BENCH / "results" / "lobbyd-20261126T191722Z.json"
#: idle RSS varies by 0.1 MB from run to run: 10 % over the baseline is a regression
RSS_GUARD = 1.10
STARTUP_TARGET_MS = 300


def busy(run: dict) -> float:
    """How much slower a time may be in this run: the larger of 1 + the share of a core the
    machine's other processes took meanwhile (its LoadMeter; 1.0 on a quiet machine, 2.5 when
    others took 150 % of the 2 cores' 200 %) and the run's pace (how much slower than on the
    reference machine a fixed piece of Python ran at its start and end: a VM whose host is
    busy slows every process, and nothing inside the VM shows it as load: one CI machine's
    HTTP, DNS and start-up figures were 1.8-3 times those of an idle one). Timer-bound
    figures (dead host, kv's reaping) and sizes (RSS) are judged as they are."""
    load = run_load(run)
    others = 1 + max(0.0, float(load.get("other_cpu_pct", 0))) / 100
    return max(others, float(load.get("pace", 1.0)))


def run_load(run: dict) -> dict:
    """A run's LoadMeter result ({} where it has none)."""
    return run["load"] if isinstance(run.get("load"), dict) else {}


def allowance_note(run: dict) -> str:
    """What busy() allowed, in words, for a REGRESSION line ('' at 1)."""
    f = busy(run)
    if f <= 1:
        return ""
    load = run_load(run)
    return (f" (x {f:.2f}: others took {float(load.get('other_cpu_pct', 0)):.0f} % of a "
            f"core, the machine's pace {float(load.get('pace', 1.0)):.2f})")


def regressions(results: dict[str, dict]) -> list[str]:
    """Figures past their target or guard. Load only adds time, so a time is judged on its
    best sample (start-up, goodbye) or its median (propagation), not on its tail, against
    its limit times busy() (others' load and the machine's pace in that very figure)."""
    out: list[str] = []
    try:
        base = json.loads(BASELINE.read_text())["figures"]
    except (OSError, ValueError, KeyError):
        base = {}
    for key, r in results.items():
        for k, s in enumerate(r.get("runs", [])):
            if "error" in s:
                continue
            where = f"{key} run {k + 1}"
            f = busy(s)
            scaled = allowance_note(s)
            if key.startswith("startup"):
                best = min(s["samples"])
                if best >= STARTUP_TARGET_MS * f:
                    out.append(f"{where}: best start {best:.0f} ms, target < "
                               f"{STARTUP_TARGET_MS * f:.0f}{scaled}")
            elif key.startswith("idle_rss") and key in base:
                limit = base[key]["median"] * RSS_GUARD
                if s["value"] > limit:
                    out.append(f"{where}: {s['value']:.2f} MB idle, over {limit:.2f} MB "
                               f"({BASELINE.name} + 10 %)")
            elif key == "propagation":
                if s["p50_ms"] >= 5 * f:  # target p99 < 5 ms; p99 is reported, load moves it
                    out.append(f"{where}: p50 {s['p50_ms']} ms (p99 {s['p99_ms']}), want < "
                               f"{5 * f:.1f}{scaled}")
            elif key == "goodbye":
                # three idle processes wake in turn (lobbyd at the signal, nats-server, the
                # peer), and a VM's idle vCPUs wake slower at some times than others: the
                # median of one commit's smoke runs moved from 3.0 to 5.5 ms. The best of the
                # trials still fails a goodbye that waits for anything (a timer, a batch).
                best = min(s["samples_ms"])
                if best >= 5 * f:
                    out.append(f"{where}: best {best} ms of {s['trials']} (p50 {s['p50_ms']}, "
                               f"p99 {s['p99_ms']}), want < {5 * f:.1f}{scaled}")
            elif key.startswith("dead@"):
                late = [x for x in s["from_last_packet_s"]
                        if not x <= s["target_max_from_last_packet_s"]]
                if late:
                    out.append(f"{where}: gone {late} s after the last packet, target "
                               f"<= TTL + 1 = {s['target_max_from_last_packet_s']} s")
            elif key.startswith("page@"):
                if s["batch_p99_ms"] >= 16 * f:
                    out.append(f"{where}: update batches p99 {s['batch_p99_ms']} ms, "
                               f"want under a 16 ms frame{scaled}")
            elif key.startswith("dns@"):
                for qtype, c in s["cases"].items():  # a same-run ceiling: no scaling
                    if c["pct_of_dnsmasq"] < 50 or c["p99_ms"] >= 5 * f:
                        out.append(f"{where}: {qtype} {c['qps']:.0f}/s = "
                                   f"{c['pct_of_dnsmasq']}% of dnsmasq, p99 {c['p99_ms']} ms "
                                   f"at {c['rate']}/s; "
                                   f"want >= 50 % and < {5 * f:.1f} ms{scaled}")
            elif key.startswith("kv@"):
                gone_by = s["ttl"] + 2 + 1  # README: about TTL + 2 s after the last keep-alive
                if not s["killed_gone_s"] <= gone_by:
                    out.append(f"{where}: a killed host went after {s['killed_gone_s']} s, "
                               f"want <= TTL + 3 = {gone_by}")
                for name, moment in (("join_s", "join"), ("restart_whole_s", "restart")):
                    g = busy({"load": s.get(f"{moment}_load")})
                    if not s[name] <= 2.0 * g:
                        out.append(f"{where}: {name} {s[name]} s, want <= {2.0 * g:.1f} s")
    return out


def failed_figures(results: dict[str, dict]) -> list[str]:
    """Every figure with a failed run: all of them failed (`error`) or some (`errors`, the
    figure then a median of the runs that worked). Any failed run fails the bench."""
    out = []
    for key, r in results.items():
        if "error" in r:
            out.append(f"{key} (every run)")
        elif r.get("errors"):
            out.append(f"{key} ({len(r['errors'])} of {len(r['errors']) + len(r['runs'])} runs: "
                       f"{'; '.join(r['errors'])[:300]})")
    return out


def _ok_number(v: object) -> bool:
    return isinstance(v, (int, float)) and v == v and v not in (float("inf"), float("-inf"))


def wrong_results(results: dict[str, dict]) -> list[str]:
    """Results that cannot be right, however slow or loaded the machine: a zero or missing
    ingest rate, a registry that is not exact, an HTTP error, a join or dead-host time
    that never happened. A slow result is not wrong: no thresholds on speed here."""
    out: list[str] = []
    for key, r in results.items():
        for k, s in enumerate(r.get("runs", [])):
            if "error" in s:
                continue  # reported as FAILED already
            where = f"{key} run {k + 1}"
            if not (_ok_number(s.get("value")) and s["value"] > 0):
                why = "; ".join(f"{r['target_rate']}/s lag {r['lag_s']} s of "
                                f"{r['lag_bound_s']} cpu {r['daemon_cpu_pct']}%"
                                for r in s.get("ladder", []))
                out.append(f"{where}: value {s.get('value')!r}"
                           + (f" (no target rate held: {why})" if why else ""))
            if key.startswith(("ingest@", "ingest_redis@")):
                if not (s.get("exact") and s["burst"].get("exact")):
                    out.append(f"{where}: registry not exact")
            elif key.startswith(("http@", "consul@")):
                if not s["registry"]["exact"]:
                    out.append(f"{where}: registry not exact: {s['registry']}")
                for case, c in s["cases"].items():
                    if c.get("errors") or not c.get("requests"):
                        out.append(f"{where} {case}: {c.get('requests')} requests, "
                                   f"{c.get('errors')} errors")
                    checked = c.get("answers_checked")
                    if checked is None or checked["wrong"] or not checked["turns"]:
                        out.append(f"{where} {case}: answers not whole and exact: {checked}")
                    if "nginx" not in c:
                        out.append(f"{where} {case}: no nginx ceiling (apt-get install nginx)")
            elif key.startswith(("steady@", "churn@")):
                n = int(key.split("@")[1])
                if s.get("hosts_listed", 0) < n:
                    out.append(f"{where}: {s.get('hosts_listed')} hosts listed, want {n}+")
            elif key == "join":
                for name in ("exec_to_all_lobbyd_ms", "exec_to_all_simulated_ms"):
                    if not all(_ok_number(x) for x in s[name]):
                        out.append(f"{where}: {name} never reached: {s[name]}")
            elif key.startswith("dead"):
                if not all(_ok_number(x) for x in s["from_kill_s"] + s["from_last_packet_s"]):
                    out.append(f"{where}: a dead host never went: {s['from_kill_s']}")
            elif key.startswith("consul_watch@"):
                for kind in ("lobby", "consul"):
                    if s[kind]["missing"] or s[kind]["held"] != CONSUL_HELD:
                        out.append(f"{where} {kind}: {s[kind]['held']} held, "
                                   f"{s[kind]['missing']} never got their answer")
            elif key.startswith("watch@"):
                streams = sum(count for kind, _t, count, _x in WATCH_PLAN if kind == "stream")
                if s.get("missing"):
                    out.append(f"{where}: {s['missing']} watchers never got their answer")
                if s.get("untouched_woken"):
                    out.append(f"{where}: {s['untouched_woken']} untouched watchers woken")
                if s.get("streams_open_after_burst") != streams:
                    out.append(f"{where}: {s.get('streams_open_after_burst')} of {streams} "
                               "streams left after the burst")
            elif key == "nats_fanout" and not s.get("complete"):
                out.append(f"{where}: not every subscriber got every packet")
    return out


def code_identity(cmd: list[str]) -> dict[str, str]:
    """What was measured: the repo's commit and a hash of every file on the command line."""
    import hashlib
    out: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["git_head"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
    for arg in cmd[1:] if len(cmd) > 1 else cmd:
        if Path(arg).is_file():
            digest = hashlib.sha256(Path(arg).read_bytes()).hexdigest()
            out[f"sha256:{Path(arg).name}"] = digest[:16]
    return out


def finite(obj: object) -> object:
    """JSON has no Infinity/NaN: a figure that never happened is written as null."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def go_figure(doc: dict, key: str) -> str:
    """The Go daemon's figure measured in this very run ('' if it was not)."""
    r = doc["figures"].get(key)
    if not r or "median" not in r:
        return ""
    tree = f", tree {r['runs'][0]['tree_mb']:.1f}" if "tree_mb" in r["runs"][0] else ""
    return f"{fmt(r['median'], r['unit'])} {r['unit']}{tree} (this run)"


def table(doc: dict) -> str:
    rows = [("figure", "median", "min-max", "detail", "Go reference", "background load")]
    for key, r in doc["figures"].items():
        if "error" in r:
            rows.append((key, "FAILED", "", r["error"][:60], "", ""))
            continue
        unit = r["unit"]
        first = r["runs"][0]
        detail = ""
        ref = ""
        if key.startswith(("ingest@", "ingest_redis@")):
            n = int(key.split("@")[1])
            ref = REFERENCE["ingest"].get(n, "") if key.startswith("ingest@") else ""
            detail = (f"sustained (daemon-side, 2 in a row), target "
                      f"{first['sustained_target']}/s, burst estimate "
                      f"{first['burst']['drain_rate_estimate']}/s, lag allowed "
                      f"{1000 * first.get('lag_bound_s', 0):.0f} ms, "
                      f"exact={all(s.get('exact') for s in r['runs'])}")
        elif key.startswith("idle_rss"):
            ref = go_figure(doc, "idle_rss_go") or REFERENCE["idle_rss"]
            detail = (f"whole process tree {first.get('tree_mb', 0):.1f} MB in "
                      f"{first.get('processes', '?')} processes, start-up peak (their "
                      f"high-water marks) {first.get('peak_tree_mb', 0):.1f} MB")
        elif key.startswith("startup"):
            ref = go_figure(doc, "startup_go") or REFERENCE["startup"]
        elif key.startswith(("steady", "churn")):
            ref = f"{REFERENCE['steady_cpu']}, {REFERENCE['steady_rss']}" \
                if key.endswith("@10000") else ""
            detail = (f"RSS {statistics.median([s['rss_mb'] for s in r['runs']]):.1f} MB, "
                      f"peak {max(s['peak_mb'] for s in r['runs']):.1f} MB")
        elif key.startswith("http@"):
            ref = REFERENCE["http_10k_c8"] if key == "http@10000" else ""
            parts = []
            for case, c in first["cases"].items():
                ceil = (f" = {c['pct_of_ceiling']:.0f}% of ceiling {c['ceiling']['rps']:.0f}/s"
                        if "ceiling" in c else "")
                parts.append(f"{case}: {c['rps']:.0f}/s p99 {c.get('p99_ms')}ms{ceil}")
            detail = "; ".join(parts)
        elif key == "propagation":
            ref = REFERENCE["propagation"]
            detail = f"p99 {max(s['p99_ms'] for s in r['runs'])} ms (worst run)"
        elif key == "goodbye":
            ref = REFERENCE["goodbye"]
            detail = f"p99 {max(s['p99_ms'] for s in r['runs'])} ms (worst run)"
        elif key == "join":
            ref = REFERENCE["join"]
            detail = (f"ready->all lobbyd p50 "
                      f"{statistics.median(first['ready_to_all_lobbyd_ms']):.0f} ms")
        elif key.startswith("dead"):
            ref = REFERENCE["dead"] if "ttl30_clean15" in key else ""
            detail = f"from last packet {first['from_last_packet_s']} s"
        elif key.startswith("watch@"):
            ref = "target p99 <= 50 ms, RSS <= +20 MB, drain within 10 %"
            detail = (f"p50 {first['p50_ms']} ms, {first['answers']} answers, RSS "
                      f"{first['rss_mb_without']}->{first['rss_mb_with']} MB, drain "
                      f"{first['drain_without']}->{first['drain_with']}->"
                      f"{first['drain_without_again']}/s "
                      f"({first['drain_with_10_unfiltered_streams']}/s with 10 unfiltered "
                      f"streams), untouched woken {first['untouched_woken']}")
        elif key.startswith("page@"):
            ref = "no freeze: batches well under a 16 ms frame"
            detail = (f"first paint {first['fcp_ms']} ms, update batch p50 "
                      f"{first['batch_p50_ms']} / p99 {first['batch_p99_ms']} ms "
                      f"({first['events_per_batch']} changes each, {first['us_per_event']} "
                      f"us/change), longest frame gap {first['longest_frame_gap_ms']} ms, "
                      f"age refresh {first['age_refresh_ms']} ms")
        elif key.startswith("kv@"):
            detail = (f"broadcast {first['broadcast_packets_per_s']}/s; lobbyd cpu "
                      f"{first['lobbyd_cpu_pct']}% (reaper {first['reapers']}); nats "
                      f"{first['nats_in_msgs_per_s']} in/s {first['nats_out_msgs_per_s']} "
                      f"out/s (broadcast {first['broadcast_deliveries_per_s']}), cpu "
                      f"{first['nats_cpu_pct']}%; join {first['join_s']} s{other(first, 'join')}; "
                      f"killed gone {first['killed_gone_s']} s; restart whole "
                      f"{first['restart_whole_s']} s{other(first, 'restart')}")
        elif key.startswith("dns@"):
            ref = "target >= 50% of dnsmasq's queries/s, p99 < 5 ms at that rate"
            detail = "; ".join(
                f"{q}: {c['qps']:.0f}/s = {c['pct_of_dnsmasq']:.0f}% of dnsmasq "
                f"{c['dnsmasq_qps']:.0f}/s; at {c['rate']}/s p99 {c['p99_ms']} ms (dnsmasq "
                f"{c['dnsmasq_p99_ms']} ms), flat out {c['p99_flat_out_ms']} ms"
                for q, c in first["cases"].items())
        elif key == "nats_fanout":
            detail = f"{first['subscribers']} subscribers, nats cpu {first['nats_cpu_pct']}%"
        rows.append((key, f"{fmt(r['median'], unit)} {unit}",
                     f"{fmt(r['min'], unit)}-{fmt(r['max'], unit)}", detail, ref,
                     load_str(first["load"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
