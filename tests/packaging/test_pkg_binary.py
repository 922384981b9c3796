"""The static binary on its own: TLS CAs, a bare chroot, signals, start-up time."""

from __future__ import annotations

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


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


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


# lobbyd itself ignores a second signal (tests/test_cluster.py checks it from source),
# but the static binary's loaders (staticx, then PyInstaller) stop forwarding while
# they clean up after lobbyd exits, and a second SIGTERM then ends the first loader
# with -15 now and then (1 run in ~6 here). systemd sends SIGTERM once (KillMode=mixed).
LOADER_SECOND_SIGNAL_RACE = pytest.mark.xfail(
    reason="staticx/PyInstaller loaders: a second SIGTERM during their clean-up", strict=False)


@pytest.mark.parametrize("signals", [
    [signal.SIGTERM], [signal.SIGINT],
    pytest.param([signal.SIGTERM, signal.SIGTERM], marks=LOADER_SECOND_SIGNAL_RACE)],
    ids=["TERM", "INT", "TERM-TERM"])
def test_signals_reach_lobbyd_through_the_loader(nats: NatsServer, lobbyd, signals):
    """staticx's loader forwards SIGTERM/SIGINT; a second one must not crash or double-send."""
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
    assert code == 0, d.logs()[-3000:]
    assert took < 2.0, took
    assert goodbyes(sub, "sig", 1.5) == 1
    assert "Traceback" not in d.logs()


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
    results = {}
    for name, cmd in (("binary", [str(pk.BINARY)]),
                      ("python lobbyd.py", [sys.executable, str(pk.ROOT / "lobbyd.py")])):
        times = []
        for i in range(runs):
            port = free_port()
            env = {**base_env(), "PORT": str(port), "NATS_URL": nats.url, "HOSTNAME": f"t{i}",
                   "LABELS_PATH": str(tmp_path / "labels")}
            times.append(time_to_first_200(cmd, env, port))
        results[name] = statistics.median(times)
        print(f"start-to-first-200 {name}: median {results[name] * 1000:.0f} ms "
              f"over {runs} runs (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})")
    assert results["binary"] < 5.0
