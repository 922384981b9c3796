"""Fixtures of the resilience suite: NATS clusters, a cuttable route proxy, daemon fleets,
registry watchers, process probes, and the figures the README's Reliability table reports.

Everything talks to loopback only. Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from harness import (
    Lobbyd,
    NatsServer,
    daemon_env,
    free_port,
    skip_unless_required,
    wait_for,
)

HERE = Path(__file__).resolve().parent

# Secrets used throughout the suite; test_zz_secrets.py greps every log for them.
SECRET_TOKEN = "tok-Zq8rW2xV9sLk3-s3cr3t"
SECRET_NATS_PASS = "pw-Hh7Jd0Ke4Qm1-s3cr3t"
SECRET_NATS_TOKEN = "nt-Ux5Tb8Pn2Wc6-s3cr3t"
SECRETS = (SECRET_TOKEN, SECRET_NATS_PASS, SECRET_NATS_TOKEN)

SUBJECT = "lobby.discovery"


# --------------------------------------------------------------------------- collection

def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Collected only when asked for by path (`pytest tests/resilience[/...]`): the
    ordinary `pytest tests` run stays fast."""
    if os.environ.get("LOBBYD_RESILIENCE") == "1":
        return None
    for arg in config.args:
        target = Path(arg.split("::")[0]).resolve()
        if target == HERE or HERE in target.parents:
            return None
    return True


# --------------------------------------------------------------------------- figures

FIGURES: dict[str, dict[str, object]] = {}


def record(section: str, **values: object) -> None:
    """Store figures for the README's Reliability table (printed at the end of the run)."""
    FIGURES.setdefault(section, {}).update(values)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not FIGURES:
        return
    terminalreporter.section("resilience figures")
    for section in sorted(FIGURES):
        terminalreporter.write_line(f"{section}: {json.dumps(FIGURES[section], sort_keys=True)}")
    out = os.environ.get("RESILIENCE_FIGURES")
    if out:
        # which run these are: a file of figures says whether every test passed
        counts = {kind: len(terminalreporter.stats.get(kind, ()))
                  for kind in ("passed", "failed", "error", "skipped")}
        head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        run = {"commit": head, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "exit_status": int(exitstatus), "tests": counts,
               "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count()}
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:  # parts may end at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc: dict = {"runs": [], "figures": {}}
            with contextlib.suppress(OSError, ValueError):  # a run in parts adds to the file
                doc = json.loads(path.read_text())
            run["sections"] = sorted(FIGURES)
            doc["runs"].append(run)
            doc["figures"].update(FIGURES)
            path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        terminalreporter.write_line(f"figures written to {out}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return percentile(values, 50)


# --------------------------------------------------------------------------- processes

def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """Direct children of pid (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def tcp_connections(pid: int) -> list[tuple[int, int]]:
    """(local port, remote port) of every ESTABLISHED IPv4/IPv6 TCP socket pid holds."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "01" or f[9] not in inodes:
                continue
            out.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)))
    return out


class ResLobbyd(Lobbyd):
    """A Lobbyd with process probes (`nofile`, the RLIMIT_NOFILE, is Lobbyd's)."""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def nats_port(self, candidates: set[int]) -> int | None:
        """The NATS client port (of `candidates`) this daemon is attached to."""
        for _local, remote in tcp_connections(self.pid):
            if remote in candidates:
                return remote
        return None

    def local_ports_to(self, remote_port: int) -> list[int]:
        return [lp for lp, rp in tcp_connections(self.pid) if rp == remote_port]

    def discovery(self) -> dict:
        return self.get_json("/v1/discovery")  # type: ignore[return-value]

    def log_lines(self) -> int:
        return self.logs().count("\n")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[..., ResLobbyd]]:
    """Factory: fleet(name, nats_url, **ENV) -> a started daemon; all killed at teardown."""
    started: list[ResLobbyd] = []

    def make(name: str, nats_url: str, start: bool = True, wait: bool = True,
             nofile: int | None = None, **env: str | int) -> ResLobbyd:
        full = daemon_env(name, nats_url, tmp_path, log_level="INFO", **env)
        d = ResLobbyd(full, tmp_path, name)
        d.nofile = nofile
        started.append(d)
        return d.start(wait=wait) if start else d

    yield make
    for d in started:
        d.stop(signal.SIGKILL, timeout=5)


# --------------------------------------------------------------------------- NATS

def http_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class Node(NatsServer):
    """A cluster member with a monitoring port."""

    def __init__(self, workdir: Path, name: str, port: int, cluster_port: int,
                 monitor_port: int, routes: list[int], extra: list[str] | None = None):
        self.name = name
        self.cluster_port = cluster_port
        self.routes = routes
        args = ["--server_name", name, "-m", str(monitor_port),
                "--cluster_name", "lobby", "--cluster", f"nats://127.0.0.1:{cluster_port}"]
        if routes:
            args += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in routes)]
        super().__init__(workdir, port=port, extra=args + (extra or []))
        self.monitor_port = monitor_port  # after the base, which sets its own (None)

    def monitor(self, endpoint: str) -> dict:
        return http_json(f"http://127.0.0.1:{self.monitor_port}/{endpoint}")

    def route_peers(self) -> set[str]:
        try:
            routes = self.monitor("routez").get("routes") or []
        except OSError:
            return set()
        return {r.get("remote_name") or r.get("remote_id") for r in routes}

    def subscribed_client_ports(self, subject: str = SUBJECT) -> set[int]:
        """Client ports of connections that hold a subscription on subject."""
        try:
            conns = self.monitor("connz?subs=1&limit=1000").get("connections") or []
        except OSError:
            return set()
        return {c["port"] for c in conns if subject in (c.get("subscriptions_list") or [])}

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """n NATS nodes on loopback, full mesh of routes."""

    def __init__(self, workdir: Path, n: int, extra: list[str] | None = None,
                 jetstream: bool = False):
        ports = [(free_port(), free_port(), free_port()) for _ in range(n)]
        cluster_ports = [c for _, c, _ in ports]
        self.nodes = [
            Node(workdir, f"n{i}", p, c, m, [q for q in cluster_ports if q != c],
                 (extra or []) + (["-js", "-sd", str(workdir / f"js-n{i}")] if jetstream
                                  else []))
            for i, (p, c, m) in enumerate(ports)
        ]

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        self.wait_meshed()
        return self

    def wait_meshed(self, timeout: float = 15) -> None:
        names = {n.name for n in self.nodes}
        wait_for(lambda: all(n.route_peers() >= names - {n.name} for n in self.nodes),
                 timeout=timeout, interval=0.05, what="NATS cluster full mesh")

    def urls(self, first: int = 0) -> str:
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(n.url for n in order)

    @property
    def client_ports(self) -> set[int]:
        return {n.port for n in self.nodes}

    def by_port(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL)


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, 3).start()
    yield c
    c.stop()


# --------------------------------------------------------------------------- route proxy

class RouteProxy:
    """A TCP proxy in front of a NATS cluster port; cut() severs it, heal() restores it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.closed = False
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        self.refused = 0
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            if not self.open:
                self.refused += 1
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                conn.close()
                continue
            self.accepted += 1
            with self.lock:
                self.pairs.append((conn, upstream))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def heal(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.closed = True
        self.listener.close()
        self.thread.join(timeout=2)


# --------------------------------------------------------------------------- watchers

class RegistryWatcher:
    """Polls every daemon's GET /v1/discoveries every `interval` seconds (in a thread) and
    records every sample in which an expected host is missing, and every answer that said
    it was stale (X-Lobby-Stale: the daemon was cut off from the fleet)."""

    def __init__(self, daemons: list[Lobbyd], expected: Callable[[Lobbyd], set[str]],
                 interval: float = 0.1, max_duration: float = 300):
        self.daemons = daemons
        self.expected = expected
        self.interval = interval
        self.max_duration = max_duration
        self.samples = 0
        self.misses: list[tuple[float, str, tuple[str, ...]]] = []
        self.errors: list[tuple[float, str, str]] = []
        self.stale: list[tuple[float, str, str]] = []  #: (when, daemon, X-Lobby-Stale)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_duration
        while not self._stop.is_set() and time.monotonic() < deadline:
            t = time.monotonic()
            for d in self.daemons:
                try:
                    status, headers, body = d.request("GET", "/v1/discoveries")
                    assert status == 200, (status, body[:200])
                    seen = {packet["hostname"] for packet in json.loads(body)}
                except (OSError, http.client.HTTPException, ValueError, AssertionError) as exc:
                    self.errors.append((t - self.started, d.name, repr(exc)))
                    continue
                if "x-lobby-stale" in headers:
                    self.stale.append((round(t - self.started, 2), d.name,
                                       headers["x-lobby-stale"]))
                missing = self.expected(d) - seen
                if missing:
                    self.misses.append((round(t - self.started, 2), d.name,
                                        tuple(sorted(missing))))
            self.samples += 1
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def __enter__(self) -> RegistryWatcher:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def views(daemons: list[Lobbyd]) -> dict[str, set[str]]:
    return {d.name: set(d.hostnames()) for d in daemons}


def converged(daemons: list[Lobbyd], expected: Callable[[Lobbyd], set[str]]) -> bool:
    return all(set(d.hostnames()) == expected(d) for d in daemons)


def wait_converged(daemons: list[Lobbyd], expected: Callable[[Lobbyd], set[str]],
                   timeout: float, what: str = "convergence") -> float:
    """Seconds until every daemon lists exactly its expected hosts (polling every 20 ms)."""
    t0 = time.monotonic()
    wait_for(lambda: converged(daemons, expected), timeout=timeout, interval=0.02, what=what)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- raw HTTP

def raw_exchange(port: int, data: bytes, timeout: float = 5.0, shut_write: bool = False
                 ) -> bytes:
    """Send raw bytes, read until the server closes or `timeout` passes."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):
            s.sendall(data)
            if shut_write:
                s.shutdown(socket.SHUT_WR)
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if len(out) > 4 << 20:
                break
    return out


def statuses(raw: bytes) -> list[int]:
    """Status codes of the successive HTTP responses in raw bytes (Content-Length framed;
    1xx responses included)."""
    out: list[int] = []
    rest = raw
    while rest.startswith(b"HTTP/1."):
        head, sep, body = rest.partition(b"\r\n\r\n")
        m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        if not m:
            break
        code = int(m.group(1))
        out.append(code)
        if not sep:
            break
        length = 0
        if code >= 200:
            cl = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            length = int(cl.group(1)) if cl else len(body)
        rest = body[length:]
    return out


def timed_get(d: Lobbyd, path: str = "/v1/discoveries") -> float:
    t = time.perf_counter()
    status, _, _ = d.request("GET", path)
    elapsed = time.perf_counter() - t
    assert status == 200, status
    return elapsed


# --------------------------------------------------------------------------- filesystems

@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tiny tmpfs at path (root and CAP_SYS_ADMIN needed; skips otherwise, fails under
    LOBBYD_REQUIRE_ALL=1)."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                          str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        skip_unless_required(f"cannot mount a tmpfs here ({res.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


# --------------------------------------------------------------------------- labels

def file_labels(path: Path) -> list[str]:
    """Labels of a label file as the contract reads them (blank lines and # comments skipped)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [ln.strip() for ln in text.split("\n") if ln.strip() and not ln.strip().startswith("#")]
