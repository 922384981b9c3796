"""Processes the benchmark runs and watches: nats-server, daemons under test, load meters.

Everything here talks to the daemon only through its environment (SPEC section 2),
its HTTP API and NATS, so any implementation given as LOBBYD_CMD can be measured.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness  # the one harness of the test suites and the bench
from harness import base_env, free_port, spawn

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- /proc readings


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of a live process plus its reaped children (cutime+cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime is field 14 -> index 11
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def proc_own_cpu_seconds(pid: int) -> float:
    """utime+stime of one process (threads included), without its children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0])
    return out


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree_pids(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    total = 0.0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, ValueError, IndexError):  # exited meanwhile
            total += proc_cpu_seconds(pid)
    return total


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


#: machine_pace() on the machine the timed targets were set on (2 cores, idle, a fresh VM):
#: 13.3 ms; 10 calls, each in a new process, gave 13.2-13.5 (2026-12-06)
PACE_REFERENCE_MS = 13.3


def pace_work() -> None:
    """A fixed piece of Python, CPU and memory bound, like a start-up or a request."""
    doc = {"hosts": [{"hostname": f"host-{i}.example", "labels": [f"service:web{i % 7}",
                                                                   f"seq:{i}"]}
                     for i in range(400)]}
    for _ in range(12):
        json.loads(json.dumps(doc))
        sorted((str(i * 7919 % 4001) for i in range(4000)), reverse=True)


def machine_pace(trials: int = 5) -> float:
    """Milliseconds of pace_work(), the median of `trials`: how fast this machine runs Python
    at this moment. A VM whose host is busy runs everything slower, in stalls that nothing
    inside the VM shows as another process's load; the median, not the best, because a
    stall-free moment says nothing of the stalls the figure met."""
    pace_work()  # the first call in a process is up to 60 % slower (allocator, caches)
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        pace_work()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


class LoadMeter:
    """Background load during a measurement: what OTHER processes did to the machine.

    `other_cpu_pct` is the CPU the rest of the machine used (percent of one core,
    at most 100 x cores), i.e. machine busy time minus this harness's own process
    tree (daemons, nats-server, load generators, wrk). With `pace`, also how much
    slower than the reference machine_pace() ran, at the start and at the end (the
    slower of the two): `pace` is that ratio, at least 1.
    """

    def __init__(self, pace: bool = False) -> None:
        self.me = os.getpid()
        self.pace = pace

    def __enter__(self) -> LoadMeter:
        self.pace_ms = machine_pace() if self.pace else 0.0
        self.t0 = time.monotonic()
        self.busy0, _ = machine_busy_seconds()
        self.own0 = tree_cpu_seconds(self.me)
        self.load0 = loadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> dict[str, object]:
        if hasattr(self, "result"):
            return self.result
        dt = max(1e-6, time.monotonic() - self.t0)
        busy1, _ = machine_busy_seconds()
        own1 = tree_cpu_seconds(self.me)
        machine = 100.0 * (busy1 - self.busy0) / dt
        own = 100.0 * (own1 - self.own0) / dt
        self.result = {
            "seconds": round(dt, 2),
            "loadavg_start": self.load0,
            "loadavg_end": loadavg(),
            "machine_cpu_pct": round(machine, 1),
            "bench_cpu_pct": round(own, 1),
            "other_cpu_pct": round(max(0.0, machine - own), 1),
            "cores": os.cpu_count(),
        }
        if self.pace:
            pace_ms = max(self.pace_ms, machine_pace())
            self.result.update(pace_ms=round(pace_ms, 2),
                               pace=round(max(1.0, pace_ms / PACE_REFERENCE_MS), 2))
        return self.result


# --------------------------------------------------------------------------- nats-server


class NatsServer(harness.NatsServer):
    """The harness's nats-server with a monitoring port and a large per-client pending
    buffer: the burst probes must measure how fast the daemon drains, not how soon
    nats-server disconnects a slow consumer."""

    def __init__(self, workdir: Path):
        self.mport = free_port()
        conf = workdir / "nats.conf"
        conf.write_text("max_pending: 268435456\nmax_payload: 1048576\n")
        super().__init__(workdir, extra=["-c", str(conf), "-m", str(self.mport)])

    def varz(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.mport, timeout=5)
        try:
            conn.request("GET", "/varz")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()


# --------------------------------------------------------------------------- daemon under test


def lobbyd_command(explicit: str | None = None) -> list[str]:
    """The daemon under test: `explicit` (--lobbyd-cmd), else the harness's (LOBBYD_CMD or
    lobbyd.py from source)."""
    return shlex.split(explicit) if explicit else harness.lobbyd_command()


class HttpClient:
    """One keep-alive HTTP/1.1 connection, reopened on error."""

    def __init__(self, port: int, timeout: float = 60.0):
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, data
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Daemon:
    """One daemon process under test, configured only by SPEC environment variables."""

    def __init__(self, cmd: list[str], nats_url: str, workdir: Path, hostname: str,
                 subject: str, **env: str | int):
        self.cmd = cmd
        self.hostname = hostname
        self.port = free_port()
        self.labels_path = Path(tempfile.mkdtemp(prefix=f"labels-{hostname}-", dir=workdir))
        self.env = base_env()
        self.env.update({"HOSTNAME": hostname, "HOST": "127.0.0.1", "PORT": str(self.port),
                    "NATS_URL": nats_url, "NATS_DISCOVERY_CHANNEL": subject,
                         "LABELS_PATH": str(self.labels_path)})
        self.env.update({k: str(v) for k, v in env.items()})
        self.log_path = workdir / f"daemon-{hostname}.log"
        self.proc: subprocess.Popen | None = None
        self.http = HttpClient(self.port)
        self.t_exec = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 30) -> Daemon:
        self.t_exec = time.monotonic()
        self.proc = spawn(self.cmd, self.env, self.log_path)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30) -> float:
        """Seconds from exec to the first 200 of GET /v1/discovery (polled every ~1 ms)."""
        deadline = time.monotonic() + timeout
        req = b"GET /v1/discovery HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"{self.hostname} exited {self.proc.returncode}: "
                                   f"{self.logs()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(req)
                    head = s.recv(16)
                if head.startswith(b"HTTP/1.") and head[9:12] == b"200":
                    return time.monotonic() - self.t_exec
            except OSError:
                pass
            time.sleep(0.001)
        raise TimeoutError(f"{self.hostname} not ready after {timeout}s: {self.logs()[-2000:]}")

    def get_json(self, path: str) -> object:
        status, body = self.http.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body[:200]!r}")
        return json.loads(body)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        self.http.close()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cpu_seconds(self) -> float:
        """CPU of the daemon's whole process tree (a launcher script may sit on top)."""
        return tree_cpu_seconds(self.pid)

    def mem_kib(self) -> dict[str, int]:
        """RSS of the biggest process in the daemon's tree (the daemon, not a wrapper)."""
        best: dict[str, int] = {"VmRSS": 0, "VmHWM": 0}
        for pid in tree_pids(self.pid):
            try:
                m = proc_mem_kib(pid)
            except OSError:
                continue
            if m.get("VmRSS", 0) > best["VmRSS"]:
                best = m
        return best

    def tree_rss_kib(self) -> int:
        """RSS of every process in the daemon's tree, wrappers included."""
        total = 0
        for pid in tree_pids(self.pid):
            with contextlib.suppress(OSError):
                total += proc_mem_kib(pid).get("VmRSS", 0)
        return total
