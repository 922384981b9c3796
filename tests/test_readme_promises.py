"""What the README promises and no other test checked, end to end with real processes:
its first Prometheus example (http_sd_configs, with the token) against a real Prometheus,
NODE_EXPORTER_PORT, `https://` checks verified against a CA, REDIS_HOST / REDIS_DB /
REDIS_CHANNEL, `lobbyctl labels add --ttl`, the 1,000-connection cap, the fsync before
the runtime file's rename, and the KV key format as literal keys on the wire.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import resource
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    Lobbyd,
    NatsServer,
    RedisServer,
    base_env,
    lobbyd_command,
    skip_unless_required,
    wait_for,
)
from harness import RespSubscriber, prometheus_targets, start_prometheus, stop_process

TOKEN = "tok-readme-promise"


def readme_block(after: str, lang: str) -> str:
    """The first ```lang block after the line `after` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {lang} block after {after!r}"
    return match.group(1)


def stop(proc: subprocess.Popen) -> None:
    stop_process(proc)


# --------------------------------------------------------------------------- Prometheus


def test_readme_http_sd_example_with_the_token_in_a_real_prometheus(lobbyd, tmp_path) -> None:
    """The README's first Prometheus example as written, its commented authorization line
    filled in with the token: Prometheus discovers lobbyd's targets with their labels."""
    if not shutil.which("prometheus"):
        skip_unless_required("needs Prometheus: apt-get install prometheus (CI installs it)")
    a = lobbyd("a", wait=False, TOKEN=TOKEN, LABELS="prometheus:node,prometheus:node:location:prg")
    auth = {"Authorization": f"Token {TOKEN}"}
    wait_for(lambda: a.request("GET", "/v1/discovery", headers=auth)[0] == 200, timeout=15,
             what="a's API (with the token)")
    lobbyd("b", LABELS="prometheus:node,prometheus:node:port:9200")
    assert a.request("GET", "/v1/prometheus/node")[0] == 403  # the token is needed
    example = readme_block("## Prometheus", "yaml")
    assert "http_sd_configs" in example and "# authorization: {type: Token" in example
    config = example.replace("http://localhost:1313", f"http://127.0.0.1:{a.port}")
    config = re.sub(r"# (authorization: \{type: Token, credentials: )\.\.\.\}.*",
                    rf"\g<1>{TOKEN}}}", config)
    assert f"credentials: {TOKEN}}}" in config, config
    (tmp_path / "prometheus.yml").write_text("global: {scrape_interval: 1s}\n" + config)
    prom, port = start_prometheus(tmp_path / "prometheus.yml", tmp_path)

    def targets() -> dict[str, dict]:
        return {t["labels"]["instance"]: t["labels"] for t in prometheus_targets(port)}

    try:
        found = wait_for(lambda: targets() if set(targets()) == {"a:9100", "b:9200"} else None,
                         timeout=30, what="Prometheus discovering a and b through lobbyd")
        assert found["a:9100"]["location"] == "prg" and found["a:9100"]["job"] == "node"
    finally:
        stop(prom)


def test_node_exporter_port_is_the_targets_default_port(lobbyd) -> None:
    a = lobbyd("a", NODE_EXPORTER_PORT=9999, LABELS="prometheus:node")
    lobbyd("b", LABELS="prometheus:node")  # b's own default (9100) does not matter to a
    lobbyd("c", LABELS="prometheus:node,prometheus:node:port:7000")

    def targets() -> set[str]:
        return {t for group in a.get_json("/v1/prometheus/node") for t in group["Targets"]}

    wait_for(lambda: targets() == {"a:9999", "b:9999", "c:7000"}, what="a's targets")


# --------------------------------------------------------------------------- https checks


def make_ca(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    directory.mkdir(parents=True)
    ca_key, ca, key = directory / "ca.key", directory / "ca.pem", directory / "server.key"
    csr, cert, ext = directory / "server.csr", directory / "server.pem", directory / "ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
                   "basicConstraints=critical,CA:FALSE\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (
            ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
            ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
             "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext]):
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=30)
    return ca, cert, key


class HealthzOverTls(threading.Thread):
    """An HTTPS server on loopback answering 200 to GET /healthz. Counts connections and
    answered requests (a connection whose handshake fails is never answered)."""

    def __init__(self, cert: Path, key: Path):
        super().__init__(daemon=True)
        owner = self
        self.connections = self.hits = 0
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                self.send_response(200 if self.path == "/healthz" else 404)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def get_request(self):  # the handshake in the handler's thread, counted
                sock, addr = self.socket.accept()
                owner.connections += 1
                return context.wrap_socket(sock, server_side=True,
                                           do_handshake_on_connect=False), addr

            def handle_error(self, request, client_address) -> None:
                pass  # a failed handshake: the client did not trust us

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def check_up(d: Lobbyd, name: str) -> bool:
    return d.get_json("/v1/labels")["checks"][name]["up"]  # type: ignore[index]


def test_https_checks_are_verified_against_the_ca(lobbyd, tmp_path) -> None:
    """An `https://` check passes against a server whose CA lobbyd trusts (SSL_CERT_FILE)
    and fails against the very same server where only the system CAs are trusted."""
    ca, cert, key = make_ca(tmp_path / "pki", "lobbyd check CA")
    servers = [HealthzOverTls(cert, key), HealthzOverTls(cert, key)]
    for server in servers:
        server.start()
    try:
        for name, server in zip(("trusting", "doubting"), servers):
            checks = tmp_path / f"checks-{name}"
            checks.mkdir()
            (checks / "web.check").write_text(
                f"labels=service:tls\nhttp=https://127.0.0.1:{server.port}/healthz\n"
                "interval=0.2\ntimeout=2\nrise=1\nfall=1\n")
        trusting = lobbyd("trusting", CHECKS_PATH=str(tmp_path / "checks-trusting"),
                          SSL_CERT_FILE=str(ca))
        doubting = lobbyd("doubting", CHECKS_PATH=str(tmp_path / "checks-doubting"))
        wait_for(lambda: "service:tls" in trusting.labels_of("trusting"), timeout=15,
                 what="the https check up with the CA trusted")
        assert check_up(trusting, "web") and servers[0].hits >= 1
        wait_for(lambda: servers[1].connections >= 5, timeout=15,
                 what="5 connections of the check without the CA")
        assert servers[1].hits == 0, "a request went through an unverified connection"
        assert not check_up(doubting, "web")
        assert "service:tls" not in doubting.labels_of("doubting")
    finally:
        for server in servers:
            server.close()


# --------------------------------------------------------------------------- Redis


class RedisOn(RedisServer):
    """A redis-server on another loopback address (127.0.0.2): only REDIS_HOST finds it."""

    host = "127.0.0.2"

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--bind") + 1] = self.host
        return cmd

    def _accepting(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.log.read_text()[-2000:]}")
        with socket.create_connection((self.host, self.port), timeout=0.5) as s:
            return self.greets(s)

    def cli(self, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done
        return done.stdout


def test_redis_host_db_and_channel_are_used(lobbyd, tmp_path) -> None:
    server = RedisOn(tmp_path).start()
    try:
        env = {"DRIVER": "Redis", "REDIS_HOST": "127.0.0.2", "REDIS_PORT": str(server.port),
               "REDIS_DB": "3", "REDIS_CHANNEL": "fleet:eu"}
        a = lobbyd("a", wait=False, LABELS="service:web", **env)
        b = lobbyd("b", wait=False, **env)
        wait_for(lambda: sorted(a.hostnames()) == ["a", "b"] == sorted(b.hostnames()),
                 what="a and b over Redis on 127.0.0.2, channel fleet:eu")
        channels = set(server.cli("PUBSUB", "CHANNELS", "*").split())
        assert "fleet:eu" in channels and "lobby:discovery" not in channels, channels
        def on_db_3() -> list[str] | None:
            """Every lobbyd connection on db 3, or None: a connection redis-py's pool has
            just opened says HELLO before it SELECTs, and CLIENT LIST may catch it between."""
            clients = server.cli("CLIENT", "LIST").splitlines()
            lobbyds = [line for line in clients if "cmd=client" not in line]  # not redis-cli
            return lobbyds if lobbyds and all(" db=3 " in f" {line} " for line in lobbyds) \
                else None

        wait_for(on_db_3, what="every lobbyd connection on db 3")
        health = a.get_json("/v1/health")
        assert f"redis://127.0.0.2:{server.port}/3" in json.dumps(health), health
        sub = RespSubscriber.__new__(RespSubscriber)  # on 127.0.0.2: what a Go daemon reads
        sub.sock, sub.buf = socket.create_connection(("127.0.0.2", server.port), timeout=5), b""
        sub.sock.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$8\r\nfleet:eu\r\n")
        try:
            assert sub._value()[0] == b"subscribe"
            a.request("POST", "/v1/labels", "role:x")
            # a keep-alive of a (without role:x) may come first
            packet = json.loads(wait_for(lambda: _packet_of(sub, "a", "role:x"), timeout=10,
                                         what="a's packet with role:x on fleet:eu"))
            assert "role:x" in packet["discovery"]["labels"]
        finally:
            sub.close()
    finally:
        server.stop()


def _packet_of(sub: RespSubscriber, hostname: str, label: str) -> bytes | None:
    payload = sub.next_message(timeout=5)
    discovery = json.loads(payload)["discovery"]
    return payload if discovery["hostname"] == hostname and label in discovery["labels"] \
        else None


# --------------------------------------------------------------------------- lobbyctl


def test_lobbyctl_labels_add_with_ttl_is_a_lease_that_ends(lobbyd, nats) -> None:
    a = lobbyd("a")
    b = lobbyd("b")
    env = {**base_env(), "PORT": str(a.port)}
    sent = time.monotonic()
    # 5 s: the lease outlives lobbyctl's exit (slow on a busy machine) and b's first look
    done = subprocess.run([*lobbyd_command(), "ctl", "labels", "add", "--ttl", "5",
                           "job:batch"], env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done
    answered = time.monotonic()
    leases = a.get_json("/v1/labels")["leases"]  # type: ignore[index]
    assert "job:batch" in json.dumps(leases), leases
    wait_for(lambda: "job:batch" in (b.labels_of("a") or []), timeout=5, what="lease on b")
    wait_for(lambda: "job:batch" not in (b.labels_of("a") or []), timeout=11,
             what="the lease's end published")
    # the lease began between `sent` and `answered`: it cannot end before sent + 5 s
    ended = time.monotonic()
    assert ended - sent >= 5.0, f"the 5 s lease ended {ended - answered:.2f} s after the answer"
    assert "job:batch" not in a.get_json("/v1/discovery")["labels"]  # type: ignore[index]


# --------------------------------------------------------------------------- 1,000 connections


def test_at_most_1000_connections_the_rest_closed_at_once(lobbyd) -> None:
    """README: lobbyd holds at most 1,000 connections; more are closed at once (or, the
    first 16, answered 503 once they send a request for anything but a health check), and
    it serves again as soon as they go. The clients come from 8 loopback addresses: one
    address alone may hold only HTTP_MAX_CONNECTIONS_PER_ADDRESS (250). Each sends a held
    query at once, so that neither the 10 s a new connection has for its head nor the
    closing of idle keep-alive connections decides which ones stay, however slowly the
    machine lets 1,150 clients connect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1150
    if hard != resource.RLIM_INFINITY and hard < want + 200:
        skip_unless_required(f"RLIMIT_NOFILE hard limit {hard}: too low for {want} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want + 200), hard))
    a = lobbyd("a")
    index = a.request("GET", "/v1/discoveries")[1]["x-lobby-index"]
    held = (f"GET /v1/discoveries?index={index}&wait=600s HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\n\r\n").encode()
    clients: list[socket.socket] = []
    gone: dict[socket.socket, bytes] = {}  # closed by lobbyd -> what it answered first
    try:
        for i in range(want):
            client = socket.create_connection(("127.0.0.1", a.port), timeout=5,
                                              source_address=(f"127.0.0.{1 + i % 8}", 0))
            clients.append(client)
            try:
                client.sendall(held)
            except OSError:
                gone[client] = b""  # closed before its request went out

        def closed_by_lobbyd() -> int:
            for client in clients:
                if client in gone:
                    continue
                client.setblocking(False)
                try:
                    answer = client.recv(65536)
                except BlockingIOError:
                    continue  # held: nothing yet
                except OSError:
                    answer = b""
                if answer == b"" or answer.startswith(b"HTTP/1.1 503"):
                    gone[client] = answer
            return len(gone)

        # the excess is closed at once; the 1,000 stay, held (for up to 600 s)
        wait_for(lambda: closed_by_lobbyd() >= want - 1000, timeout=10,
                 what=f"{want - 1000} connections over the limit closed")
        time.sleep(0.5)  # nothing more goes
        assert closed_by_lobbyd() == want - 1000
        # a reserved slot is free again once its 503 is sent, so more than 16 may get one
        refused = [answer for answer in gone.values() if answer]
        assert all(b"/v1/health" in answer for answer in refused), refused[:1]
    finally:
        for client in clients:
            client.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait_for(lambda: a.request("GET", "/v1/discovery")[0] == 200, timeout=10,
             what="serving again once they went")


# --------------------------------------------------------------------------- fsync


def test_runtime_file_is_fsynced_before_its_rename(lobbyd, tmp_path) -> None:
    """The order of system calls as `strace -f -e trace=fsync,rename` shows it: the new
    runtime file is written and fsynced, renamed over the old one, then its directory is
    fsynced, before the POST is answered."""
    if not shutil.which("strace"):
        skip_unless_required("needs strace: apt-get install strace (CI installs it)")
    a = lobbyd("a")
    trace = tmp_path / "strace.log"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=openat,fsync,fdatasync,"
                               "rename,renameat,renameat2,close", "-o", str(trace),
                               "-p", str(_daemon_pid(a))], stderr=subprocess.PIPE)
    try:
        pid = _daemon_pid(a)
        wait_for(lambda: _traced(pid, tracer), timeout=10, what="strace attached")
        # answered once saved (README): the fsyncs are done, strace writes them on exit
        assert a.request("POST", "/v1/labels", "synced:1")[0] == 200
    finally:
        tracer.terminate()
        tracer.wait(timeout=10)
    lines = trace.read_text().splitlines()
    fds: dict[str, str] = {}  # fd -> path, from openat
    events = []
    for line in lines:
        m = re.search(r'openat\([^,]+, "([^"]+)", [^)]*\)\s+= (\d+)', line)
        if m:
            fds[m.group(2)] = m.group(1)
            continue
        m = re.search(r"\b(fsync|fdatasync)\((\d+)\)\s+= 0", line)
        if m:
            events.append(("fsync", fds.get(m.group(2), "?")))
            continue
        m = re.search(r'rename(?:at2?)?\((?:[^,]+, )?"([^"]+)", (?:[^,]+, )?"([^"]+)"', line)
        if m:
            events.append(("rename", m.group(1), m.group(2)))
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and
               e[2].endswith("/_runtime")]
    assert renames, f"no rename onto _runtime: {events}"
    i = renames[-1]
    tmp_name = events[i][1]
    assert ("fsync", tmp_name) in events[:i], \
        f"the new runtime file {tmp_name} is not fsynced before its rename: {events}"
    labels_dir = str(Path(a.env["LABELS_PATH"]))
    assert any(e[0] == "fsync" and e[1].rstrip("/") == labels_dir for e in events[i + 1:]), \
        f"the labels directory is not fsynced after the rename: {events}"


def _daemon_pid(d: Lobbyd) -> int:
    """The process that serves: the leaf of the binary's loader chain, or lobbyd itself."""
    assert d.proc is not None
    pid = d.proc.pid
    for _ in range(5):
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not kids:
            return pid
        pid = int(kids[-1])
    return pid


def _traced(pid: int, tracer: subprocess.Popen) -> bool:
    """Every thread of pid has strace as its tracer (TracerPid in /proc)."""
    assert tracer.poll() is None, tracer.stderr.read() if tracer.stderr else ""
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        if re.search(r"^TracerPid:\s+0$", status, re.M):
            return False
    return True


# --------------------------------------------------------------------------- KV keys


def test_kv_keys_on_the_wire_are_the_documented_literals(tmp_path, lobbyd) -> None:
    """The keys a kv-mode lobbyd writes, as literal subjects (no round trip through the
    code under test): h.NAME where NATS allows it, else x.BASE64URL(NAME) unpadded."""
    js = NatsServer(tmp_path, jetstream=True).start()
    try:
        watcher = js.client()
        watcher.subscribe("$KV.>")
        names = {"web-1.example.com": "h.web-1.example.com", "ünï.example": "x.w7xuw68uZXhhbXBsZQ",
                 "a..b": "x.YS4uYg"}
        assert base64.urlsafe_b64decode("w7xuw68uZXhhbXBsZQ==").decode() == "ünï.example"
        for name in names:
            lobbyd(name, nats=js, DISCOVERY_MODE="kv", KEEP_ALIVE=1, TTL=5)
        want = {f"$KV.lobby_discovery_{bucket}.{key}" for key in names.values()
                for bucket in ("hosts", "alive")}
        seen: set[str] = set()

        def all_seen() -> bool:
            subject, _ = watcher.next_msg(timeout=1)
            seen.add(subject)
            return want <= seen

        try:
            wait_for(all_seen, timeout=15, what="every key on the wire")
        except AssertionError:
            raise AssertionError(f"never seen: {sorted(want - seen)}; seen: {sorted(seen)}"
                                 ) from None
        watcher.close()
    finally:
        js.stop()


@pytest.fixture(autouse=True)
def _no_leftover_rlimit():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, before)
