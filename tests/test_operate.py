"""Operating lobbyd (SPEC 7): health, metrics, readiness, and the slips of issue 8."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    Lobbyd,
    base_env,
    free_port,
    lobbyd_command,
    run_lobbyd,
    skip_unless_required,
    wait_for,
)

import lobbyd as L

#: plain nats-py (nox -s plain_nats) imports importlib.metadata, and with it lzma and bz2
PLAIN_NATS = bool(os.environ.get("LOBBYD_PLAIN_NATS"))


SUBJECT = "lobby.discovery"


def health(d: Lobbyd, **headers: str) -> tuple[int, dict]:
    status, _, body = d.request("GET", "/v1/health", headers=headers or None)
    return status, json.loads(body) if status in (200, 503) else {}


def prometheus_tool(name: str) -> str:
    """promtool or prometheus (Debian's package `prometheus`; .ci/run installs it)."""
    path = shutil.which(name)
    if not path:
        skip_unless_required(f"{name} not found: apt-get install prometheus")
    return str(path)


# --------------------------------------------------------------------------- health


def test_health_through_never_connected_connected_lost_and_back(lobbyd, nats) -> None:
    nats.stop()
    a = lobbyd("a", start=False)
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/discovery")[0] == 200, what="API up without NATS")
    status, body = health(a)  # from the first answer on: NATS has never answered
    assert status == 503 and body["status"] == "disconnected"
    assert body["drivers"] == [{"driver": "NATS", "connected": False, "server": None,
                                "targets": nats.url,
                                "since": body["drivers"][0]["since"], "reconnects": 0}]
    assert body["hostname"] == "a" and body["version"] == L.__version__
    assert body["hosts"] == 1 and body["checks"] == {} and body["uptime_s"] >= 0

    nats.start()
    wait_for(lambda: health(a)[0] == 200, timeout=6, what="200 once NATS answers")
    status, body = health(a)
    assert body["status"] == "ok"
    assert body["drivers"][0]["server"] == f"nats://127.0.0.1:{nats.port}"
    assert body["drivers"][0]["reconnects"] == 0
    connected_since = body["drivers"][0]["since"]
    assert abs(connected_since - time.time()) < 5

    nats.stop(signal.SIGKILL)
    wait_for(lambda: health(a)[0] == 503, timeout=2, what="503 within 2 s of the kill")
    assert health(a)[1]["drivers"][0]["connected"] is False
    nats.start()
    wait_for(lambda: health(a)[0] == 200, timeout=2, what="200 within 2 s of NATS's return")
    # nats-py says connected a moment before its reconnected callback has run and counted
    wait_for(lambda: health(a)[1]["drivers"][0]["reconnects"] >= 1, timeout=10,
             what="the reconnection counted")
    body = health(a)[1]
    assert body["drivers"][0]["reconnects"] == 1
    assert body["drivers"][0]["since"] >= connected_since


def start_with_token(lobbyd, name: str, token: str, **env: str) -> Lobbyd:
    d = lobbyd(name, start=False, TOKEN=token, **env)
    d.start(wait=False)
    wait_for(lambda: d.request("GET", "/v1/health",
                               headers={"Authorization": f"Token {token}"})[0] == 200,
             what=f"{name} API up and connected")
    return d


def test_health_and_metrics_need_the_token(lobbyd) -> None:
    a = start_with_token(lobbyd, "a", "s3cret")
    for path in ("/v1/health", "/metrics"):
        assert a.request("GET", path)[0] == 403
        assert a.request("GET", path, headers={"Authorization": "Token nope"})[0] == 403
        assert a.request("GET", path, headers={"Authorization": "Token s3cret"})[0] == 200
        assert a.request("HEAD", path, headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_an_unhealthy_answer_keeps_the_connection(lobbyd, nats) -> None:
    nats.stop()
    a = lobbyd("a", start=False)
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/discovery")[0] == 200, what="API up")
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
    try:
        for _ in range(3):  # the same connection serves all three
            conn.request("GET", "/v1/health")
            response = conn.getresponse()
            assert response.status == 503 and response.getheader("Connection") == "keep-alive"
            response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- metrics


def test_metrics_count_what_happens(lobbyd, nats) -> None:
    a = lobbyd("a", TTL="3", CALLBACK="true", CALLBACK_FIRST_RUN_DELAY="0",
               CALLBACK_COOLDOWN="0")
    wait_for(lambda: a.metrics()['lobbyd_callback_runs_total{result="ok"}'] >= 1,
             what="the first callback run")
    before = a.metrics()
    assert before[f'lobbyd_build_info{{version="{L.__version__}"}}'] == 1
    assert before['lobbyd_connected{driver="NATS"}'] == 1
    assert before["lobbyd_hosts"] == 1 and before["lobbyd_local_labels"] == 0

    pub = nats.client()
    for _ in range(3):
        pub.publish_json(SUBJECT, {"discovery": {"hostname": "x", "labels": ["k:v"]},
                                   "message": "hi"})
    pub.publish_json(SUBJECT, {"discovery": {"hostname": "x"}, "message": "goodbye"})
    pub.publish_json(SUBJECT, {"discovery": {"hostname": "y", "labels": []}, "message": "hi"})
    pub.publish(SUBJECT, b"not json")
    pub.publish_json(SUBJECT, {"discovery": {"hostname": ""}, "message": "hi"})
    pub.flush()
    for _ in range(2):
        assert a.request("GET", "/no/such/path")[0] == 404
    # hostnames() is ["a"] before x and y are even heard: wait for what counts them
    expired = 'lobbyd_hosts_left_total{reason="expired"}'
    wait_for(lambda: a.metrics()[expired] > before.get(expired, 0), timeout=15,
             what="y expired")
    assert a.hostnames() == ["a"]
    wait_for(lambda: a.metrics()['lobbyd_callback_runs_total{result="ok"}']
             > before['lobbyd_callback_runs_total{result="ok"}'], what="a callback run")
    after = a.metrics()

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert delta("lobbyd_hosts_joined_total") == 2  # x and y
    assert delta('lobbyd_hosts_left_total{reason="goodbye"}') == 1
    assert delta('lobbyd_hosts_left_total{reason="expired"}') == 1
    assert delta('lobbyd_packets_received_total{message="goodbye"}') == 1
    assert delta('lobbyd_packets_received_total{message="hi"}') >= 4  # and a's own
    assert delta('lobbyd_packets_dropped_total{reason="invalid"}') == 2
    assert delta("lobbyd_packets_published_total") >= 1  # keep-alives every second
    assert delta('lobbyd_http_requests_total{code="404"}') == 2
    assert delta('lobbyd_http_requests_total{code="200"}') >= 1
    assert after['lobbyd_callback_runs_total{result="failed"}'] == 0
    assert after["lobbyd_hosts"] == 1
    assert after["process_resident_memory_bytes"] > 5_000_000
    assert after["process_open_fds"] > 3 and after["process_max_fds"] >= after["process_open_fds"]
    assert 0 < after["process_cpu_seconds_total"] < 600
    assert abs(after["process_start_time_seconds"] - time.time()) < 300


def test_metrics_pass_promtool_and_a_real_prometheus_scrapes_them(lobbyd, tmp_path) -> None:
    open_ = lobbyd("open", LABELS="role:x")
    locked = start_with_token(lobbyd, "locked", "tok-3x")
    body = open_.request("GET", "/metrics")[2]
    check = subprocess.run([prometheus_tool("promtool"), "check", "metrics"], input=body,
                           capture_output=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
        (check.stdout, check.stderr)

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: lobbyd
    static_configs: [{{targets: ["127.0.0.1:{open_.port}"]}}]
  - job_name: lobbyd_token
    authorization: {{type: Token, credentials: tok-3x}}
    static_configs: [{{targets: ["127.0.0.1:{locked.port}"]}}]
""")
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (open while it runs)
    prometheus = subprocess.Popen(
        [prometheus_tool("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        def query(expr: str) -> list:
            url = f"http://127.0.0.1:{port}/api/v1/query?expr=" + urllib.request.quote(expr)
            with urllib.request.urlopen(url.replace("expr=", "query="), timeout=2) as resp:
                return json.loads(resp.read())["data"]["result"]

        def scraped() -> list:
            return [r for r in query("lobbyd_local_labels") if r["value"][1] in ("0", "1")]

        results = wait_for(lambda: len(scraped()) == 2 and scraped(), timeout=30,
                           interval=0.5, what="Prometheus scraped both daemons")
        by_job = {r["metric"]["job"]: r["value"][1] for r in results}
        assert by_job == {"lobbyd": "1", "lobbyd_token": "0"}
        up = {r["metric"]["job"]: r["value"][1] for r in query("up")}
        assert up == {"lobbyd": "1", "lobbyd_token": "1"}
        assert query('lobbyd_hosts{job="lobbyd"}')[0]["value"][1] == "2"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=10)
        log.close()


def test_render_metrics_escapes_and_types() -> None:
    text = L.render_metrics([
        L.Family("x_total", "counter", "Things.", [({"k": 'a"b\\c\nd'}, 3)]),
        L.Family("y", "gauge", "A gauge.", [({}, 0.5), ({}, 2.0)]),
        L.Family("z", "gauge", "Empty.", []),
    ]).decode()
    assert text == ('# HELP x_total Things.\n# TYPE x_total counter\n'
                    'x_total{k="a\\"b\\\\c\\nd"} 3\n'
                    '# HELP y A gauge.\n# TYPE y gauge\ny 0.5\ny 2\n'
                    '# HELP z Empty.\n# TYPE z gauge\n')


# --------------------------------------------------------------------------- readiness


class NotifySocket:
    """The datagram socket systemd gives a Type=notify service, captured by the test."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, timeout: float) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def until(self, word: str, timeout: float) -> tuple[str, float]:
        """The first message containing `word`, and when it came (monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if word in message:
                return message, time.monotonic()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def test_ready_after_the_join_sync_when_nats_is_up(lobbyd, nats, notify) -> None:
    lobbyd("a")
    # a answers joins once its own is over, a moment after its first packet: asked
    # before, b would be first and READY with 1 host (unless a's packet came again)
    wait_for(nats.answers_joins, what="a answers joins")
    b = lobbyd("b", start=False, NOTIFY_SOCKET=str(notify.path))
    started = time.monotonic()
    b.start(wait=False)
    message, when = notify.until("READY=1", timeout=10)
    # connected and synced: a is known from the join sync, not from a keep-alive later
    assert "STATUS=connected to nats://127.0.0.1:" in message and "2 hosts known" in message
    assert when - started < L.READY_TIMEOUT, "READY=1 waited for the fallback"


def test_counts_read_as_sentences(lobbyd, notify) -> None:
    """`1 host`, never `1 hosts`: systemd's STATUS, the join's log line."""
    a = lobbyd("a", start=False, NOTIFY_SOCKET=str(notify.path))
    a.start(wait=False)
    message, _ = notify.until("READY=1", timeout=10)
    assert message.endswith("; 1 host known"), message
    assert [L.plural(n, "host") for n in (0, 1, 2)] == ["0 hosts", "1 host", "2 hosts"]


def test_connected_at_once_while_ready_waits_for_the_join_sync(lobbyd, nats, notify) -> None:
    """A peer that takes the join request and never answers holds the sync for its whole
    window: health says connected as soon as the connection is up, READY=1 waits."""
    peer = nats.client()
    peer.sock.sendall(b"SUB lobby.discovery.sync lobbyd 77\r\n")  # the join queue group
    peer.flush()
    try:
        b = lobbyd("b", start=False, NOTIFY_SOCKET=str(notify.path))
        started = time.monotonic()
        b.start()  # returns once b's first packet is on the subject: it is connected
        up = time.monotonic()
        status, _, body = b.request("GET", "/v1/health")
        assert status == 200 and json.loads(body)["drivers"][0]["connected"] is True, body
        _, ready = notify.until("READY=1", timeout=10)
    finally:
        peer.close()
    assert ready - started >= L.SYNC_WINDOW - 0.2, "READY=1 before the join sync ended"
    assert up - started < ready - started - 1, "the connection waited for the join sync"


def test_ready_after_5_s_when_nats_is_down_and_status_follows_the_connection(
        lobbyd, nats, notify) -> None:
    nats.stop()
    a = lobbyd("a", start=False, NOTIFY_SOCKET=str(notify.path))
    started = time.monotonic()
    a.start(wait=False)
    message, when = notify.until("READY=1", timeout=15)
    assert "STATUS=waiting for NATS at nats://127.0.0.1:" in message, message
    assert when - started >= L.READY_TIMEOUT - 0.5, "READY=1 before the 5 s fallback"
    nats.start()
    message, _ = notify.until("STATUS=", timeout=15)
    assert message.startswith("STATUS=connected to nats://127.0.0.1:"), message
    nats.stop(signal.SIGKILL)
    message, _ = notify.until("STATUS=", timeout=5)
    assert message.startswith("STATUS=NATS connection lost"), message


# --------------------------------------------------------------------------- slips


def test_the_runtime_file_holds_labels_and_nothing_else(lobbyd, tmp_path) -> None:
    a = lobbyd("a")
    assert a.request("POST", "/v1/labels", body="b:2\na:1\n")[0] == 200
    assert (tmp_path / "labels-a" / "_runtime").read_text() == "a:1\nb:2\n"
    assert a.request("DELETE", "/v1/labels", body="a:1\nb:2")[0] == 200
    assert (tmp_path / "labels-a" / "_runtime").read_text() == ""


def test_a_label_file_written_just_before_a_post_is_in_its_packet(lobbyd, nats, tmp_path
                                                                    ) -> None:
    a = lobbyd("a", KEEP_ALIVE="3600", TTL="7200")  # no keep-alive will come to the rescue
    sub = nats.client()
    sub.subscribe(SUBJECT)
    (tmp_path / "labels-a").mkdir(exist_ok=True)
    (tmp_path / "labels-a" / "web").write_text("service:web\n")
    assert a.request("POST", "/v1/labels", body="role:x")[0] == 200
    _subject, payload = sub.next_msg(timeout=5)
    assert json.loads(payload)["discovery"]["labels"] == ["role:x", "service:web"]
    (tmp_path / "labels-a" / "db").write_text("service:db\n")
    assert a.get_json("/v1/discovery")["labels"] == ["role:x", "service:db", "service:web"]
    _subject, payload = sub.next_msg(timeout=5)  # and the change is published at once
    assert json.loads(payload)["discovery"]["labels"] == ["role:x", "service:db", "service:web"]


def test_ttl_below_twice_keep_alive_is_warned_once_and_accepted(lobbyd) -> None:
    a = lobbyd("a", KEEP_ALIVE="60", TTL="30")
    wait_for(lambda: "hosts will flap" in a.logs(), what="the warning")
    assert a.logs().count("hosts will flap") == 1
    b = lobbyd("b", KEEP_ALIVE="1", TTL="5")
    assert a.request("GET", "/v1/health")[0] == 200
    wait_for(lambda: "starting as b" in b.logs(), what="b started")
    assert "hosts will flap" not in b.logs()


def test_help_names_signals_exit_statuses_and_routes() -> None:
    out = run_lobbyd({}, args=["--help"]).stdout
    for word in ("SIGTERM", "SIGHUP", "78", " 2 ", "GET /", "/v1/health", "/metrics",
                 "lobbyctl"):
        assert word in out, word
    bad = run_lobbyd({}, args=["--nope"])
    assert bad.returncode == 2 and "lobbyd --help" in bad.stderr



# --------------------------------------------------------------------------- idle memory


def verbose_daemon(lobbyd, name: str) -> Lobbyd:
    """A connected lobbyd run from source whose log lists every import (PYTHONVERBOSE)."""
    if os.environ.get("LOBBYD_CMD"):
        pytest.skip("how the source runs and what it imports: not the binary's business")
    d = lobbyd(name, PYTHONVERBOSE="1")
    wait_for(lambda: health(d)[0] == 200, what=f"{name} connected")
    return d


def test_a_nats_only_lobbyd_never_imports_importlib_metadata(lobbyd) -> None:
    """nats-py would import it (with zipfile, email, lzma ...) only to read its version."""
    a = verbose_daemon(lobbyd, "a")
    assert "import 'nats'" in a.logs()  # the verbose log does list imports
    assert "import 'importlib.metadata'" not in a.logs()


def test_an_idle_nats_only_lobbyd_loads_no_compression_libraries(lobbyd) -> None:
    """zipfile (and with it shutil, lzma, bz2) stays out: importlib.metadata, which nats-py
    would import, and in the binary PyInstaller's hook for inspect, which reads its zip."""
    a = lobbyd("a")
    wait_for(lambda: health(a)[0] == 200, what="a connected")
    assert a.proc is not None
    maps = ""
    for entry in Path("/proc").iterdir():  # the whole session: the binary is three processes
        with contextlib.suppress(OSError, ValueError):
            if os.getsid(int(entry.name)) == a.proc.pid:
                maps += (entry / "maps").read_text()
    assert "lobbyd" in maps or "python" in maps  # the daemon's own maps were read
    assert ("lzma" in maps) == PLAIN_NATS, "lzma loaded: " + str("lzma" in maps)
    assert PLAIN_NATS or "bz2" not in maps


def test_remove_tree_removes_what_is_inside_and_follows_no_symlink(tmp_path) -> None:
    """What a killed loader leaves (its unpacked files, nested) goes; what a link in it
    points at outside stays."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    tree = tmp_path / "staticx-abc"
    (tree / "lib" / "deep").mkdir(parents=True)
    (tree / "lobbyd").write_bytes(b"\0" * 10)
    (tree / "lib" / "deep" / "libc.so").write_bytes(b"\0")
    (tree / "lib" / "to-outside").symlink_to(outside)
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    L.remove_tree(str(tree))
    assert not tree.exists() and not tree.is_symlink()
    assert (outside / "keep").read_text() == "x"
    L.remove_tree(str(tree))  # gone already: nothing to do, no error


def test_a_cut_off_daemon_keeps_the_fleet_and_every_answer_says_how_stale(lobbyd, nats
                                                                         ) -> None:
    """SPEC 16: NATS gone past TTL: b is still listed; every registry answer, the local
    packet, a blocking query and the event stream's head carry X-Lobby-Stale; health is
    503 with cut_off_since, metrics and lobbyctl say so. NATS back: no header."""
    # TTL 4 s, 4 keep-alives: a keep-alive of b a second late must not expire it before
    # the cut begins (at TTL 2, one late keep-alive would)
    a = lobbyd("a", TTL="4", LABELS="prometheus:node")
    b = lobbyd("b", TTL="4", LABELS="prometheus:node")
    wait_for(lambda: a.hostnames() == b.hostnames() == ["a", "b"], what="a and b listed")
    nats.stop(signal.SIGKILL)
    wait_for(lambda: int(a.request("GET", "/")[1].get("x-lobby-stale", 0)) >= 5, timeout=15,
             what="a cut off for 5 s (past TTL)")
    index = a.request("GET", "/v1/discoveries")[1]["x-lobby-index"]
    paths = ["/", "/v1/discoveries", "/v1/discoveries?labels=prometheus:node",
             "/v1/discovery", "/v1/resolve?label=prometheus:node", "/v1/prometheus/node",
             "/v1/catalog/services", "/v1/catalog/nodes", "/v1/health/service/web",
             "/v1/agent/self", "/v1/status/leader",
             f"/v1/discoveries?index={index}&wait=1s"]
    for path in paths:
        for method in ("GET", "HEAD"):
            status, headers, body = a.request(method, path)
            assert status == 200 and int(headers["x-lobby-stale"]) >= 5, (path, headers)
    assert a.hostnames() == ["a", "b"] and b.hostnames() == ["a", "b"]
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: a\r\n\r\n")
        head = s.recv(4096).split(b"\r\n\r\n")[0]
    assert b"\r\nX-Lobby-Stale: " in head, head
    status, body = health(a)
    assert status == 503 and time.time() - 30 < body["cut_off_since"] <= time.time() - 5
    assert a.metrics()["lobbyd_cut_off_seconds"] >= 5

    def ctl(*words: str) -> subprocess.CompletedProcess:
        return subprocess.run([*lobbyd_command(), "ctl", "-port", str(a.port), *words],
                              env=base_env(), capture_output=True, text=True, timeout=20)

    done = ctl("discoveries")
    assert done.returncode == 0 and "b" in done.stdout, done
    assert "has been cut off from the fleet for" in done.stderr, done.stderr
    assert "cut off:" in ctl("health").stdout
    nats.start()
    wait_for(lambda: health(a)[0] == 200, timeout=5, what="a reconnected")
    # connected a moment before nats-py's reconnected callback ends the cut
    wait_for(lambda: "cut_off_since" not in health(a)[1], timeout=10, what="the cut ended")
    for path in paths[:-1]:
        assert "x-lobby-stale" not in a.request("GET", path)[1], path
    assert "cut_off_since" not in health(a)[1]
    assert ctl("discoveries").stderr == ""
