"""Leased labels and health-checked labels (SPEC 9), against real peers and real services."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port, wait_for

import lobbyd as L


def has_label(daemon, host: str, label: str) -> bool:
    return label in (daemon.labels_of(host) or [])


def sources(daemon) -> dict:
    return daemon.get_json("/v1/labels")  # type: ignore[return-value]


@pytest.fixture
def pair(lobbyd, tmp_path):
    checks = tmp_path / "checks"
    checks.mkdir()
    a = lobbyd("a", CHECKS_PATH=str(checks))
    b = lobbyd("b")
    wait_for(lambda: a.hostnames() == ["a", "b"] == b.hostnames(), what="a and b")
    return a, b, checks


# --------------------------------------------------------------------------- leases


def test_a_lease_ends_on_a_peer_within_ttl_and_one_second(pair) -> None:
    a, b, _ = pair
    started = time.monotonic()
    assert a.request("POST", "/v1/labels?ttl=2", body="service:lease")[0] == 200
    wait_for(lambda: has_label(b, "a", "service:lease"), timeout=2, what="lease on b")
    assert 1 <= sources(a)["leases"]["service:lease"] <= 2
    wait_for(lambda: not has_label(b, "a", "service:lease"), timeout=5, what="lease gone")
    gone = time.monotonic() - started
    assert 2.0 <= gone <= 3.0, gone
    assert sources(a)["leases"] == {}


def test_a_refresh_extends_a_lease(pair) -> None:
    a, b, _ = pair
    a.request("POST", "/v1/labels?ttl=2", body="service:lease")
    wait_for(lambda: has_label(b, "a", "service:lease"), timeout=2, what="lease on b")
    time.sleep(1.5)  # the point of the test: time passes before the refresh
    refreshed = time.monotonic()
    a.request("POST", "/v1/labels?ttl=2", body="service:lease")
    time.sleep(max(0.0, refreshed + 1.0 - time.monotonic()))  # past the first lease's end
    assert has_label(b, "a", "service:lease")
    wait_for(lambda: not has_label(b, "a", "service:lease"), timeout=5, what="lease gone")
    assert 2.0 <= time.monotonic() - refreshed <= 3.0


def test_delete_ends_a_lease_and_the_runtime_label_of_the_same_text(pair, tmp_path) -> None:
    a, b, _ = pair
    a.request("POST", "/v1/labels", body="service:both")
    a.request("POST", "/v1/labels?ttl=60", body="service:both\nservice:only-lease")
    wait_for(lambda: has_label(b, "a", "service:only-lease"), timeout=5, what="on b")
    got = sources(a)
    assert got["runtime"] == ["service:both"]
    assert set(got["leases"]) == {"service:both", "service:only-lease"}
    runtime_file = Path(a.env["LABELS_PATH"]) / "_runtime"
    assert "only-lease" not in runtime_file.read_text()  # leases never reach the disk
    assert a.request("DELETE", "/v1/labels", body="service:only-lease")[0] == 200
    wait_for(lambda: not has_label(b, "a", "service:only-lease"), timeout=5, what="gone")
    a.request("DELETE", "/v1/labels", body="service:both")
    wait_for(lambda: not has_label(b, "a", "service:both"), timeout=5, what="both gone")
    got = sources(a)
    assert got["runtime"] == [] and got["leases"] == {}


def test_a_lease_ending_leaves_the_runtime_label_of_the_same_text(pair) -> None:
    a, b, _ = pair
    a.request("POST", "/v1/labels", body="service:kept")
    a.request("POST", "/v1/labels?ttl=1", body="service:kept")
    wait_for(lambda: sources(a)["leases"] == {}, timeout=5, what="the lease ended")
    assert has_label(a, "a", "service:kept") and has_label(b, "a", "service:kept")


def test_a_restart_ends_every_lease(pair) -> None:
    a, _b, _ = pair
    a.request("POST", "/v1/labels?ttl=600", body="service:lease")
    assert "service:lease" in a.get_json("/v1/discovery")["labels"]
    a.restart()
    assert "service:lease" not in a.get_json("/v1/discovery")["labels"]
    assert sources(a)["leases"] == {}


@pytest.mark.parametrize("ttl", ["0", "86401", "abc", "1.5", "-1", "", "1e3", "%C2%B2"])
def test_a_bad_ttl_is_400_and_changes_nothing(lobbyd, ttl) -> None:
    a = lobbyd("a")
    status, _headers, body = a.request("POST", f"/v1/labels?ttl={ttl}", body="service:x")
    assert status == 400 and b"ttl" in body
    assert a.get_json("/v1/discovery")["labels"] == []
    assert sources(a)["leases"] == {} and sources(a)["runtime"] == []


def test_get_labels_lists_every_source(lobbyd, tmp_path) -> None:
    checks = tmp_path / "checks-a"
    checks.mkdir()
    (checks / "up.check").write_text("labels=check:up\nexec=true\ninterval=0.2\nrise=1\n")
    a = lobbyd("a", LABELS="env:1", CHECKS_PATH=str(checks), start=False)
    labels_dir = Path(a.env["LABELS_PATH"])
    labels_dir.mkdir()
    (labels_dir / "web").write_text("file:1\n# comment\nfile:2\n")
    a.start()
    a.request("POST", "/v1/labels", body="runtime:1")
    wait_for(lambda: sources(a)["checks"]["up"]["up"], what="the check up")
    # posted just before the look: 100 s left, or 99 if a second passes in between
    a.request("POST", "/v1/labels?ttl=100", body="lease:1")
    got = sources(a)
    assert got == {"env": ["env:1"], "files": {"web": ["file:1", "file:2"]},
                   "runtime": ["runtime:1"], "leases": {"lease:1": got["leases"]["lease:1"]},
                   "checks": {"up": {"labels": ["check:up"], "up": True}}}
    assert 99 <= got["leases"]["lease:1"] <= 100
    assert a.get_json("/v1/discovery")["labels"] == [
        "check:up", "env:1", "file:1", "file:2", "lease:1", "runtime:1"]


# --------------------------------------------------------------------------- checks


class Service:
    """A real local HTTP server whose /healthz answers `status`, or is down."""

    def __init__(self) -> None:
        self.status = 200
        self.hits: list[str] = []
        self.cut_short = 0  # big answers the client stopped reading
        self.port = free_port()
        self.server: ThreadingHTTPServer | None = None
        self.up()

    def up(self) -> None:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service.hits.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/followed")
                    self.end_headers()
                    return
                body = b"x" * (10 << 20) if self.path == "/big" else b"ok\n"
                self.send_response(service.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the check read what it needed and went
                    service.cut_short += 1

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def service():
    s = Service()
    yield s
    s.down()


def test_http_check_labels_follow_the_service_on_a_peer(pair, service) -> None:
    a, b, checks = pair
    url = f"http://127.0.0.1:{service.port}"
    (checks / "web.check").write_text(
        f"# the web server\nlabels=service:web, public_port:443\nhttp={url}/healthz\n"
        "interval=0.2\ntimeout=1\n")
    (checks / "redirected.check").write_text(
        f"labels=service:redirected\nhttp={url}/redirect\ninterval=0.2\nrise=1\n")
    (checks / "big.check").write_text(f"labels=service:big\nhttp={url}/big\ninterval=0.2\n")
    a.proc.send_signal(signal.SIGHUP)  # re-read now
    # the checks run independently: big's own probe may pass after web's
    wait_for(lambda: has_label(b, "a", "service:web") and has_label(b, "a", "public_port:443"),
             timeout=5, what="web labels on b")
    wait_for(lambda: has_label(b, "a", "service:big"), timeout=5, what="big labels on b")
    # 10 MB answers: the check reads the status line and a few KB, then hangs up
    wait_for(lambda: service.cut_short >= 1, what="a big answer cut short by the check")
    got = sources(a)["checks"]
    assert got["web"] == {"labels": ["public_port:443", "service:web"], "up": True}
    assert got["redirected"]["up"] is False  # a redirect is not followed, and not a pass
    assert "/redirect" in service.hits and "/followed" not in service.hits
    service.status = 500
    wait_for(lambda: not has_label(b, "a", "service:web"), timeout=5, what="web gone on 500")
    assert not has_label(b, "a", "public_port:443")
    service.status = 200
    wait_for(lambda: has_label(b, "a", "service:web"), timeout=5, what="web back on 200")
    service.down()
    wait_for(lambda: not has_label(b, "a", "service:web"), timeout=5, what="web gone when down")
    assert "check web is down" in a.logs()


def test_tcp_check_listening_and_closed_port(pair) -> None:
    a, b, checks = pair
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    (checks / "db.check").write_text(
        f"labels=service:db\ntcp=127.0.0.1:{port}\ninterval=0.2\nrise=1\nfall=1\n")
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: has_label(b, "a", "service:db"), timeout=5, what="db up")
    listener.close()
    wait_for(lambda: not has_label(b, "a", "service:db"), timeout=5, what="db down")


def test_exec_checks_exit_codes_and_a_hanging_one_killed_with_its_group(pair, tmp_path) -> None:
    a, b, checks = pair
    pidfile = tmp_path / "sleeper.pid"
    (checks / "ok.check").write_text("labels=exec:ok\nexec=true\ninterval=0.2\n")
    (checks / "fail.check").write_text('labels=exec:fail\nexec=sh -c "exit 1"\ninterval=0.2\n')
    (checks / "hang.check").write_text(
        f"labels=exec:hang\nexec=sh -c 'sleep 300 & echo $! > {pidfile}; wait'\n"
        "interval=0.2\ntimeout=0.5\nrise=1\n")
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: has_label(b, "a", "exec:ok"), timeout=5, what="ok up")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the sleeper")
    sleeper = int(pidfile.read_text())

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
        except OSError:
            return True

    # killed 0.5 s into its run (timeout=0.5); the slack is for a loaded machine
    wait_for(lambda: gone(sleeper), timeout=10, what="the hanging check's child killed")
    wait_for(lambda: "still running after 0.5s: killed" in a.logs() or
             sources(a)["checks"]["hang"]["up"] is False, what="hang reported")
    got = sources(a)["checks"]
    assert got["fail"]["up"] is False and got["hang"]["up"] is False
    assert not has_label(b, "a", "exec:fail") and not has_label(b, "a", "exec:hang")
    # the state in /v1/health and /metrics
    wait_for(lambda: "killed" in a.get_json("/v1/health")["checks"]["hang"]["output"],
             what="the hang check's output in /v1/health")
    checks = a.get_json("/v1/health")["checks"]
    assert checks["ok"]["up"] is True and checks["ok"]["output"] == "exit 0"
    assert checks["fail"] == {"up": False, "since": checks["fail"]["since"], "output": "exit 1"}
    assert abs(checks["ok"]["since"] - time.time()) < 60
    metrics = a.request("GET", "/metrics")[2].decode()
    assert 'lobbyd_check_up{check="ok"} 1' in metrics
    assert 'lobbyd_check_up{check="fail"} 0' in metrics
    assert 'lobbyd_check_up{check="hang"} 0' in metrics


def test_a_check_never_runs_twice_at_once(pair, tmp_path) -> None:
    a, _b, checks = pair
    trace = tmp_path / "trace"
    (checks / "slow.check").write_text(
        f"labels=slow:1\nexec=sh -c 'echo start >> {trace}; sleep 0.3; echo end >> {trace}'\n"
        "interval=0.1\ntimeout=5\n")
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: trace.exists() and trace.read_text().count("end") >= 4, timeout=10,
             what="four runs")
    lines = trace.read_text().split()
    assert lines[:8] == ["start", "end"] * 4


def test_rise_and_fall_are_honoured(pair, tmp_path) -> None:
    a, _b, checks = pair
    flap, holds = tmp_path / "flap", tmp_path / "holds"
    # passes on odd runs only: with rise=2 it never goes up
    (checks / "flap.check").write_text(
        f"""labels=flap:1\nexec=sh -c 'n=$(( $(cat {flap} 2>/dev/null || echo 0) + 1 )); """
        f"""echo $n > {flap}; [ $(( n % 2 )) = 1 ]'\ninterval=0.1\nrise=2\n""")
    # passes on runs 1 and 2 (up), then on odd runs only: with fall=2 it never goes down
    (checks / "holds.check").write_text(
        f"""labels=holds:1\nexec=sh -c 'n=$(( $(cat {holds} 2>/dev/null || echo 0) + 1 )); """
        f"""echo $n > {holds}; [ $n -le 2 ] || [ $(( n % 2 )) = 1 ]'\n"""
        "interval=0.1\nrise=2\nfall=2\n")
    a.proc.send_signal(signal.SIGHUP)

    def runs(path: Path) -> int:
        return int(path.read_text() or 0) if path.exists() else 0

    wait_for(lambda: runs(flap) >= 12 and runs(holds) >= 12, timeout=15, what="12 runs each")
    logs = a.logs()
    assert "check flap is up" not in logs and sources(a)["checks"]["flap"]["up"] is False
    assert logs.count("check holds is up") == 1 and "check holds is down" not in logs


def test_bad_check_files_are_logged_once_and_skipped(lobbyd, tmp_path) -> None:
    checks = tmp_path / "checks"
    checks.mkdir()
    bad = {"nolabels": "http=http://127.0.0.1:1/\n",
           "unknown": "labels=x\nexec=true\ncolour=blue\n",
           "twokinds": "labels=x\nexec=true\ntcp=127.0.0.1:1\n",
           "interval": "labels=x\nexec=true\ninterval=soon\n",
           "badlabel": "labels=ok,\x01bad\nexec=true\n"}
    for name, text in bad.items():
        (checks / f"{name}.check").write_text(text)
    (checks / "binary.check").write_bytes(b"labels=\xff\n")
    (checks / "notes.txt").write_text("not a check\n")
    (checks / "good.check").write_text("labels=good:1\nexec=true\ninterval=0.2\nrise=1\n")
    a = lobbyd("a", CHECKS_PATH=str(checks))
    wait_for(lambda: "good:1" in a.get_json("/v1/discovery")["labels"], what="good check up")
    first = a.get_json("/v1/discovery")["last_check"]
    wait_for(lambda: a.get_json("/v1/discovery")["last_check"] >= first + 3, timeout=10,
             what="3 keep-alive periods (re-reads)")
    logs = a.logs()
    for name, key in [("nolabels", "key labels"), ("unknown", "key 'colour'"),
                      ("twokinds", "key http/tcp/exec"), ("interval", "key interval"),
                      ("badlabel", "key labels"), ("binary", "not valid UTF-8")]:
        lines = [line for line in logs.splitlines() if f"{name}.check" in line]
        assert len(lines) == 1 and key in lines[0], (name, lines)
    assert "notes.txt" not in logs and set(sources(a)["checks"]) == {"good"}
    # fixed: picked up at the next re-read; removed: its labels go
    (checks / "unknown.check").write_text("labels=fixed:1\nexec=true\ninterval=0.2\nrise=1\n")
    wait_for(lambda: "fixed:1" in a.get_json("/v1/discovery")["labels"], what="fixed check")
    os.unlink(checks / "good.check")
    wait_for(lambda: "good:1" not in a.get_json("/v1/discovery")["labels"], what="good gone")


# --------------------------------------------------------------------------- pure functions


def test_parse_check() -> None:
    spec = L.parse_check("web", "# c\nlabels = service:web, public_port:443\n\n"
                                "http=http://127.0.0.1:8080/healthz\ninterval=5\n")
    assert spec == L.CheckSpec("web", ("public_port:443", "service:web"), "http",
                               "http://127.0.0.1:8080/healthz", (), 5.0, 2.0, 2, 2)
    spec = L.parse_check("s", "labels=a\nexec=/bin/check --flag 'two words'\ntimeout=0.5\n"
                              "rise=1\nfall=3")
    assert spec.argv == ("/bin/check", "--flag", "two words") and spec.timeout == 0.5
    assert spec.rise == 1 and spec.fall == 3
    assert L.parse_check("t", "labels=a\ntcp=[::1]:5432").target == "[::1]:5432"
    for text, key in [("exec=true", "key labels"), ("labels=a", "key http/tcp/exec"),
                      ("labels=a\nexec=true\nexec=false", "key exec: given twice"),
                      ("labels=a\ntcp=nohost", "key tcp"), ("labels=a\ntcp=h:99999", "key tcp"),
                      ("labels=a\nhttp=ftp://x/", "key http"), ("labels=a\nexec='", "key exec"),
                      ("labels=a\nexec=true\nrise=0", "key rise"),
                      ("labels=a\nexec=true\nfall=x", "key fall"),
                      ("labels=a\nexec=true\ntimeout=0", "key timeout"),
                      ("labels=a\nexec=true\nnonsense", "line 3"),
                      ("labels=a\nexec=true\nport=1", "key 'port'")]:
        with pytest.raises(L.CheckError) as caught:
            L.parse_check("x", text)
        assert key in str(caught.value), (text, str(caught.value))


def test_check_state_rise_and_fall() -> None:
    state = L.CheckState(rise=2, fall=3)
    assert [state.record(passed, "", 0) for passed in (True, False, True, True)] == \
        [False, False, False, True]
    assert state.up
    assert [state.record(passed, "", 1) for passed in (False, False, True, False, False)] == \
        [False, False, False, False, False]
    assert state.record(False, "bad", 2) and not state.up and state.output == "bad"
    assert state.since == 2


def test_leases_and_ttl() -> None:
    leases = L.Leases()
    assert leases.add(["a", "b"], 10, 100.0) and not leases.add(["a"], 20, 105.0)
    assert leases.next_end() == 110.0 and leases.seconds_left(104.5) == {"a": 21, "b": 6}
    assert leases.expire(110.0) == ["b"] and leases.labels() == ("a",)
    assert leases.remove(["a", "zz"]) and not leases.remove(["a"])
    assert leases.next_end() is None
    assert L.parse_ttl("1") == 1 and L.parse_ttl("86400") == 86400
    for bad in ("0", "86401", "", "x", "1.0", "-5", "²"):
        with pytest.raises(L.LabelError):
            L.parse_ttl(bad)


def test_checks_path_is_a_documented_variable() -> None:
    assert L.Config.from_env({}).checks_path == "/etc/lobby/checks"
    assert L.Config.from_env({"CHECKS_PATH": "/x"}).checks_path == "/x"
    assert "CHECKS_PATH" in L.help_text()
