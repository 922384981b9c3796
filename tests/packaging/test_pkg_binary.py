"""The static binary on its own: TLS CAs, a bare chroot, signals, start-up time."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lobbyd_pkgtest as pk
import pytest
from conftest import Lobbyd, NatsServer, base_env, free_port, wait_for

pk.require_packaging_session()


@pytest.fixture(autouse=True)
def the_binary(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every daemon of this module is the static binary, under `env -i` (base_env)."""
    pk.need(pk.BINARY, "binary")
    monkeypatch.setenv("LOBBYD_CMD", str(pk.BINARY))
    return pk.BINARY


def lists_itself(d: Lobbyd) -> bool:
    return d.name in d.hostnames()


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_nats(tmp_path: Path):
    ca, cert, key = pk.make_ca(tmp_path / "pki")
    server = NatsServer(tmp_path, extra=["--tls", "--tlscert", str(cert), "--tlskey", str(key)])
    server.start()
    yield server, ca
    server.stop()


@pytest.fixture
def daemon(tmp_path: Path):
    """Factory of binary daemons not tied to the `nats` fixture (the TLS tests have their own)."""
    started: list[Lobbyd] = []

    def make(name: str, **env: str) -> Lobbyd:
        full = base_env()
        full.update({"HOSTNAME": name, "PORT": str(free_port()), "KEEP_ALIVE": "1", "TTL": "5",
                     "CLEAN_EVERY": "1", "LOG_LEVEL": "DEBUG",
                     "LABELS_PATH": str(tmp_path / f"labels-{name}")})
        full.update(env)
        d = Lobbyd(full, tmp_path, name)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop(signal.SIGKILL, timeout=5)


def test_tls_nats_with_ca_from_ssl_cert_file(tls_nats, daemon):
    server, ca = tls_nats
    d = daemon("tls-a", NATS_URL=f"tls://127.0.0.1:{server.port}", SSL_CERT_FILE=str(ca))
    wait_for(lambda: f"connected to NATS at tls://127.0.0.1:{server.port}" in d.logs(),
             timeout=15, what="lobbyd to connect over tls://")
    assert "certificate verify failed" not in d.logs()


def test_tls_nats_with_ca_from_ssl_cert_dir(tls_nats, daemon, tmp_path: Path):
    server, ca = tls_nats
    certdir = tmp_path / "certs"
    certdir.mkdir()
    (certdir / "test-ca.pem").write_bytes(ca.read_bytes())
    pk.sh(["openssl", "rehash", str(certdir)])
    d = daemon("tls-b", NATS_URL=f"tls://127.0.0.1:{server.port}", SSL_CERT_DIR=str(certdir))
    wait_for(lambda: f"connected to NATS at tls://127.0.0.1:{server.port}" in d.logs(),
             timeout=15, what="lobbyd to connect over tls:// (SSL_CERT_DIR)")


def test_tls_unknown_ca_fails_with_a_clear_line(tls_nats, daemon):
    """Under `env -i` (no SSL_CERT_FILE) the system bundle does not know the test CA."""
    server, _ = tls_nats
    d = daemon("tls-c", NATS_URL=f"tls://127.0.0.1:{server.port}")
    assert "SSL_CERT_FILE" not in d.env
    wait_for(lambda: "certificate verify failed" in d.logs(), timeout=15,
             what="a certificate verification error in the log")
    line = next(ln for ln in d.logs().splitlines() if "certificate verify failed" in ln)
    assert "NATS" in line and f"tls://127.0.0.1:{server.port}" in line, line
    assert d.request("GET", "/v1/discovery")[0] == 200  # the API keeps serving
    assert "connected to NATS" not in d.logs()


# --------------------------------------------------------------------------- chroot


def chroot_env(tmp_path: Path, nats_url: str, port: int) -> dict[str, str]:
    return {"TMPDIR": "/tmp", "HOSTNAME": "chrooted", "PORT": str(port), "NATS_URL": nats_url,
            "LABELS_PATH": "/labels", "KEEP_ALIVE": "1", "LOG_LEVEL": "DEBUG"}


def start_in_chroot(root: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """The binary in a chroot holding only itself, /proc and an exec-capable /tmp."""
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o1777, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    pk.sh(["cp", str(pk.BINARY), str(root / "lobbyd")])
    script = f'mount -t proc proc "{root}/proc" && exec chroot "{root}" /lobbyd'
    with open(log, "ab") as out:
        return subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                 "sh", "-c", script], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


http_get = pk.harness.http_get


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_runs_in_a_bare_chroot(tmp_path: Path, nats: NatsServer):
    root = tmp_path / "root"
    port = free_port()
    log = tmp_path / "chroot.log"
    proc = start_in_chroot(root, chroot_env(tmp_path, nats.url, port), log)
    try:
        def listed() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")
            status, body = http_get(port, "/v1/discoveries")
            return status == 200 and [d["hostname"] for d in json.loads(body)] == ["chrooted"]

        wait_for(listed, timeout=20, what="the chrooted lobbyd to list itself")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/labels", body=b"where:chroot\n")
        assert conn.getresponse().status == 200
        conn.close()
        assert "where:chroot" in (root / "labels" / "_runtime").read_text()
    finally:
        code = stop(proc)
    assert code == 0, log.read_text(errors="replace")
    assert sorted(p.name for p in root.iterdir()) == ["labels", "lobbyd", "proc", "tmp"]
    assert list((root / "tmp").iterdir()) == [], "the binary left its unpacked files in TMPDIR"


def test_chroot_with_a_rhel_ca_layout_finds_its_bundle(tmp_path: Path, tls_nats):
    """A frozen OpenSSL looks only where the build host keeps CAs (/usr/lib/ssl);
    lobbyd must find the bundle at RHEL's path on its own (no SSL_CERT_*)."""
    server, ca = tls_nats
    root = tmp_path / "root"
    bundle = root / "etc/pki/tls/certs/ca-bundle.crt"
    bundle.parent.mkdir(parents=True)
    bundle.write_bytes(ca.read_bytes())
    port = free_port()
    log = tmp_path / "chroot-tls.log"
    proc = start_in_chroot(root, chroot_env(tmp_path, f"tls://127.0.0.1:{server.port}", port),
                           log)
    try:
        def listed() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")
            status, body = http_get(port, "/v1/discoveries")
            return status == 200 and bool(json.loads(body))

        wait_for(lambda: listed() and "connected to NATS at tls://" in log.read_text(),
                 timeout=20, what="the chrooted lobbyd over tls:// with a RHEL bundle")
    finally:
        assert stop(proc) == 0, log.read_text(errors="replace")


# --------------------------------------------------------------------------- signals


def goodbyes(sub, hostname: str, seconds: float) -> int:
    """Count goodbye packets for hostname seen by a raw NATS subscriber."""
    count = 0
    for _, payload in sub.messages(seconds):
        env = json.loads(payload)
        if env.get("message") == "goodbye" and env["discovery"]["hostname"] == hostname:
            count += 1
    return count


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT],
                                     [signal.SIGTERM, signal.SIGTERM]],
                         ids=["TERM", "INT", "TERM-TERM"])
def test_signals_reach_lobbyd_through_the_loader(nats: NatsServer, lobbyd, signals):
    """The loader forwards SIGTERM/SIGINT; a second one must not crash or double-send."""
    sub = nats.client()
    sub.subscribe("lobby.discovery")
    d = lobbyd("sig")
    wait_for(lambda: lists_itself(d), what="daemon up")
    assert d.proc
    started = time.monotonic()
    for sig in signals:
        d.proc.send_signal(sig)
        time.sleep(0.03)
    code = d.proc.wait(timeout=5)
    took = time.monotonic() - started
    logs = d.logs()
    assert code == 0, logs[-3000:]
    assert took < 2.0, took
    assert goodbyes(sub, "sig", 1.5) == 1, logs[-3000:]
    assert "said goodbye as sig" in logs, logs[-3000:]
    assert "Traceback" not in logs


# --------------------------------------------------------------------------- loader chain

# A process supervisor as runit or supervisord is one: it starts the binary,
# adopts orphans (child subreaper) and reaps whatever ends, and exits once it
# has no child left. Orphans are re-parented to it, not to reaper.py (which
# would kill them and hide the very bug these tests are about).
SUPERVISOR = """
import ctypes, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0):  # PR_SET_CHILD_SUBREAPER
    sys.exit("prctl failed")
with open(sys.argv[1], "ab") as log:
    child = subprocess.Popen(sys.argv[2:], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
print(child.pid, flush=True)
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == child.pid:
        print(os.waitstatus_to_exitcode(status), flush=True)
"""


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                out.append(int(name))
    return out


def running(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def port_is_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Supervised:
    """The binary started by SUPERVISOR; `chain` is [staticx, PyInstaller, Python]."""

    def __init__(self, tmp_path: Path, nats: NatsServer, name: str, **env: str):
        self.tmpdir = tmp_path / f"tmp-{name}"
        self.tmpdir.mkdir(exist_ok=True)
        self.name = name
        self.log = tmp_path / f"{name}.log"
        self.port = int(env.pop("PORT", free_port()))
        self.labels = tmp_path / f"labels-{name}"
        self.env = {**base_env(), "TMPDIR": str(self.tmpdir), "HOSTNAME": name,
                    "PORT": str(self.port), "NATS_URL": nats.url, "LOG_LEVEL": "DEBUG",
                    "LABELS_PATH": str(self.labels), "KEEP_ALIVE": "1", "TTL": "5", **env}
        self.sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(self.log),
                                     str(pk.BINARY)], env=self.env, stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)
        assert self.sup.stdout
        self.pid = int(self.sup.stdout.readline())  # the PID the operator knows
        self.chain: list[int] = []

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def up(self) -> Supervised:
        def serving() -> bool:
            assert running(self.pid), self.logs()[-3000:]
            status, body = http_get(self.port, "/v1/discoveries")
            return status == 200 and self.name in [d["hostname"] for d in json.loads(body)]

        pk.wait_for(serving, timeout=20, what=f"{self.name} to list itself")
        loader = children(self.pid)
        assert len(loader) == 1, loader
        python = children(loader[0])
        assert len(python) == 1, python
        self.chain = [self.pid, loader[0], python[0]]
        return self

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.sup.pid, signal.SIGKILL)
        self.sup.wait(timeout=10)


@pytest.fixture
def supervised(tmp_path: Path, nats: NatsServer):
    started: list[Supervised] = []

    def make(name: str, **env: str) -> Supervised:
        s = Supervised(tmp_path, nats, name, **env)
        started.append(s)
        return s.up()

    yield make
    for s in started:
        s.close()


def packet_from(sub, hostname: str) -> bool:
    _, payload = sub.next_msg(timeout=1)
    return json.loads(payload)["discovery"]["hostname"] == hostname


def wait_chain_gone(s: Supervised, limit: float) -> float:
    """Seconds until no process of the chain runs; fails after `limit`."""
    started = time.monotonic()
    while any(running(pid) for pid in s.chain):
        took = time.monotonic() - started
        assert took < limit, (
            f"still running {took:.2f}s later: "
            f"{[pid for pid in s.chain if running(pid)]} of {s.chain}\n{s.logs()[-3000:]}")
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.mark.parametrize("victim", [0, 1], ids=["staticx-loader", "pyinstaller-loader"])
def test_kill_9_leaves_no_orphan(nats: NatsServer, supervised, victim: int):
    """`kill -9 PID` (PID: what the operator started, staticx's loader; or the loader
    after it) leaves no orphan: lobbyd notices its loader is gone and exits within a
    second as `kill -9` ends it from source (no goodbye: peers expire it after TTL),
    the port is free, TMPDIR is clean (lobbyd removes the directories the dead loaders
    cannot), and the binary starts again on the same port."""
    sub = nats.client()
    sub.subscribe("lobby.discovery")
    s = supervised("orphan")
    pk.wait_for(lambda: packet_from(sub, "orphan"), timeout=15,
                what="its first packet (connected: it can say goodbye)")
    os.kill(s.chain[victim], signal.SIGKILL)
    took = wait_chain_gone(s, 1.0)
    print(f"kill -9 {s.chain[victim]} of {s.chain}: all gone after {took * 1000:.0f} ms")
    logs = s.logs()
    assert f"pid {s.pid} (the static binary's loader) ended: exiting at once" in logs, \
        logs[-3000:]
    assert "Traceback" not in logs
    assert goodbyes(sub, "orphan", 1.0) == 0, logs[-3000:]  # a crash, as from source
    assert port_is_free(s.port)
    assert s.sup.wait(timeout=5) == 0  # the supervisor has no child left
    assert list(s.tmpdir.iterdir()) == [], "a loader's temporary directory was left behind"
    again = supervised("orphan", PORT=str(s.port))
    assert again.port == s.port and again.chain != s.chain


def test_sigterms_during_the_loaders_clean_up(nats: NatsServer, supervised):
    """SIGTERM, then more SIGTERMs from the moment lobbyd's own process has ended, while
    its loaders remove their temporary directories (a supervisor insisting): the
    released staticx loader, and PyInstaller's, put the default action back for that
    clean-up and died there with -15, leaving their directories. Ours ignores them:
    exit 0, one goodbye, TMPDIR clean. The clean-up lasts milliseconds: a test kept off
    the CPU through all of it (a loaded machine) has sent nothing, and tries again."""
    sub = nats.client()
    sub.subscribe("lobby.discovery")
    for attempt in range(3):
        sent = sigterms_during_clean_up(supervised, sub, f"twice{attempt}")
        if sent:
            break
    assert sent > 0, "lobbyd ended after its loaders in 3 tries: the clean-up was not hit"


def sigterms_during_clean_up(supervised, sub, name: str) -> int:
    """One round of the test above: the SIGTERMs that reached the loader after lobbyd's
    own process had ended (each round's outcome asserted whatever that count)."""
    s = supervised(name)
    pk.wait_for(lambda: packet_from(sub, name), timeout=15, what="its first packet")
    loader, python = s.chain[0], s.chain[2]
    os.kill(loader, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while running(python):
        assert time.monotonic() < deadline, s.logs()[-3000:]
    sent = 0
    while running(loader):
        with contextlib.suppress(ProcessLookupError):
            os.kill(loader, signal.SIGTERM)
            sent += 1
        time.sleep(0.0005)
        assert time.monotonic() < deadline, "the loader does not exit"
    assert s.sup.stdout
    code = int(s.sup.stdout.readline())  # the loader's exit status, as its supervisor saw it
    logs = s.logs()
    print(f"{sent} SIGTERMs during the loaders' clean-up; exit {code}")
    assert code == 0, logs[-3000:]
    assert f"said goodbye as {name}" in logs and "Traceback" not in logs, logs[-3000:]
    assert goodbyes(sub, name, 1.0) == 1
    assert list(s.tmpdir.iterdir()) == [], "a loader died before removing its directory"
    return sent


@pytest.mark.parametrize("target", [0, 1, 2], ids=["staticx-loader", "pyinstaller-loader",
                                                   "python"])
def test_sighup_rereads_labels_through_the_loaders(supervised, target: int):
    """SIGHUP re-reads the label files at once (KEEP_ALIVE is long here) whichever
    process of the chain gets it, the operator's PID first of all; nothing restarts."""
    s = supervised("hup", KEEP_ALIVE="60", TTL="180")
    chain = list(s.chain)
    s.labels.mkdir(exist_ok=True)
    (s.labels / "file").write_text("hup:yes\n")

    def has_label() -> bool:
        status, body = http_get(s.port, "/v1/discoveries")
        return status == 200 and "hup:yes" in json.loads(body)[0]["labels"]

    assert not has_label()
    os.kill(chain[target], signal.SIGHUP)
    pk.wait_for(has_label, timeout=3, interval=0.02, what="the label after SIGHUP")
    assert all(running(pid) for pid in chain), s.logs()[-3000:]
    assert s.up().chain == chain  # the same three processes
    assert "Traceback" not in s.logs()


# --------------------------------------------------------------------------- start-up time


def time_to_first_200(cmd: list[str], env: dict[str, str], port: int) -> float:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if http_get(port, "/v1/discovery")[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            assert proc.poll() is None, f"{cmd} exited {proc.returncode}"
            assert time.monotonic() - started < 30
            time.sleep(0.005)
    finally:
        stop(proc)


def test_start_to_first_200(nats: NatsServer, tmp_path: Path):
    """Median of several runs, binary next to `python lobbyd.py` (printed for the notes)."""
    runs = int(os.environ.get("LOBBYD_STARTUP_RUNS", "7"))
    results, best = {}, {}
    for name, cmd in (("binary", [str(pk.BINARY)]),
                      ("python lobbyd.py", [sys.executable, str(pk.ROOT / "lobbyd.py")])):
        times = []
        for i in range(runs):
            port = free_port()
            env = {**base_env(), "PORT": str(port), "NATS_URL": nats.url, "HOSTNAME": f"t{i}",
                   "LABELS_PATH": str(tmp_path / "labels")}
            times.append(time_to_first_200(cmd, env, port))
        results[name], best[name] = statistics.median(times), min(times)
        print(f"start-to-first-200 {name}: median {results[name] * 1000:.0f} ms "
              f"over {runs} runs (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})")
    # The target is 300 ms: the bench (alone on the machine, in CI too) fails when the best
    # of its starts misses it. Here, beside other tests in CI, load only adds to a start:
    # the best of 7 within twice the target, the median (which the load moves) within 1 s.
    assert best["binary"] < 0.6, f"best start of the binary {best['binary'] * 1000:.0f} ms"
    assert results["binary"] < 1.0, f"median start {results['binary'] * 1000:.0f} ms"
