"""Bad input 11 of issue 4: the API token, secrets in logs and error bodies, and files or
labels that try to escape LABELS_PATH or smuggle a second label into the runtime file."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, NatsServer, base_env, free_port, lobbyd_command, wait_for

from .conftest import (
    SECRET_NATS_PASS,
    SECRET_NATS_TOKEN,
    SECRET_TOKEN,
    SECRETS,
    raw_exchange,
    record,
    statuses,
)


def test_token_compared_in_constant_time():
    """Timing over HTTP cannot resolve a memcmp; the source must use compare_digest."""
    source = ROOT / "lobbyd.py"
    if not source.exists():
        pytest.skip("no lobbyd.py source to inspect")
    text = source.read_text()
    assert "compare_digest" in text, "TOKEN is not compared with hmac.compare_digest"
    assert "== self.token" not in text and "self.token ==" not in text


def test_token_enforced_everywhere(lobbyd):
    d = lobbyd("tok.test", TOKEN=SECRET_TOKEN, LOG_LEVEL="DEBUG", wait=False)
    good = {"Authorization": f"Token {SECRET_TOKEN}"}
    wait_for(lambda: d.request("GET", "/v1/discovery", headers=good)[0] == 200, timeout=15,
             what="API up")
    assert d.request("GET", "/v1/discovery", headers=good)[0] == 200
    assert d.request("GET", "/v1/discovery",
                     headers={"Authorization": f"Bearer {SECRET_TOKEN}"})[0] == 200
    denied = 0
    for method, path, headers in [
        ("GET", "/", {}), ("GET", "/v1/discoveries", {}), ("HEAD", "/v1/discovery", {}),
        ("POST", "/v1/labels", {}), ("DELETE", "/v1/labels", {}), ("GET", "/nope", {}),
        ("GET", "/v1/prometheus/node", {}), ("GET", "/v1/resolve?label=a", {}),
        ("GET", "/v1/discovery", {"Authorization": f"Token {SECRET_TOKEN[:-1]}"}),
        ("GET", "/v1/discovery", {"Authorization": f"Token {SECRET_TOKEN}x"}),
        ("GET", "/v1/discovery", {"Authorization": SECRET_TOKEN}),
        ("GET", "/v1/discovery", {"Authorization": f"Basic {SECRET_TOKEN}"}),
        ("GET", "/v1/discovery", {"Authorization": "Token "}),
        ("GET", "/v1/discovery", {"Authorization": "Token " + "x" * 60_000}),
    ]:
        status, _headers_out, body = d.request(method, path, body=b"a:b" if method in (
            "POST", "DELETE") else None, headers=headers)
        assert status == 403, (method, path, status, body)
        assert SECRET_TOKEN.encode() not in body
        denied += 1
    # raw bytes no HTTP client would send: non-ASCII, NUL, invalid UTF-8 in the header
    for raw_token in [b"\xe9\xe8", b"\xff\xfe\xfd", SECRET_TOKEN.encode() + b"\xc3",
                      b"T\x00ken", "pässwörd".encode()]:
        reply = raw_exchange(d.port, b"GET /v1/discovery HTTP/1.1\r\nAuthorization: Token " +
                             raw_token + b"\r\nConnection: close\r\n\r\n")
        assert statuses(reply) in ([403], [400]), reply[:200]
        assert SECRET_TOKEN.encode() not in reply
        denied += 1
    assert "Traceback" not in d.logs()
    record("11 token", denied_requests=denied, status_500=0)


def test_non_ascii_token_works(lobbyd):
    """A UTF-8 TOKEN is matched by the same UTF-8 bytes in the header (as curl sends them)."""
    token = "pässwörd-ü-" + SECRET_TOKEN
    d = lobbyd("utf8tok.test", TOKEN=token, wait=False)
    wait_for(lambda: d.request("GET", "/v1/discovery")[0] == 403, timeout=15, what="API up")
    ok = raw_exchange(d.port, b"GET /v1/discovery HTTP/1.1\r\nAuthorization: Token " +
                      token.encode() + b"\r\nConnection: close\r\n\r\n")
    assert statuses(ok) == [200], ok[:200]
    bad = raw_exchange(d.port, b"GET /v1/discovery HTTP/1.1\r\nAuthorization: Token " +
                       token.encode("latin-1", "replace") + b"\r\nConnection: close\r\n\r\n")
    assert statuses(bad) == [403], bad[:200]


def _run_until(env: dict[str, str], cwd: Path, seconds: float, name: str) -> str:
    """Run lobbyd for `seconds` (or until it exits), SIGTERM it; its whole output."""
    log = cwd / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(lobbyd_command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return log.read_text(errors="replace")


def test_no_secret_in_logs_or_errors(tmp_path, lobbyd, nats):
    """TOKEN and the NATS password/token never show in logs (DEBUG level) or error bodies:
    authenticated NATS, a wrong password, NATS down, config errors, denied requests."""
    user_srv = NatsServer(tmp_path, extra=["--user", "lobby", "--pass", SECRET_NATS_PASS]
                          ).start()
    token_srv = NatsServer(tmp_path, extra=["--auth", SECRET_NATS_TOKEN]).start()
    outputs: dict[str, str] = {}
    try:
        ok = lobbyd("creds.test", TOKEN=SECRET_TOKEN, LOG_LEVEL="DEBUG", wait=False,
                    NATS_URL=f"nats://lobby:{SECRET_NATS_PASS}@127.0.0.1:{user_srv.port}")
        auth = {"Authorization": f"Token {SECRET_TOKEN}"}
        wait_for(lambda: ok.request("GET", "/v1/discovery", headers=auth)[0] == 200,
                 timeout=15, what="API up")
        wait_for(lambda: "creds.test" in [h["hostname"] for h in
                                          ok.get_json("/v1/discoveries", headers=auth)],
                 timeout=10, what="daemon connected with user:pass")
        bodies = [ok.request("GET", "/v1/discovery")[2],
                  ok.request("POST", "/v1/labels", "bad\x01label", headers=auth)[2],
                  ok.request("GET", "/nope", headers=auth)[2],
                  raw_exchange(ok.port, b"GET /v1/discovery HTTP/1.1\r\nAuthorization: Token " +
                               SECRET_TOKEN.encode() + b"\r\nContent-Length: x\r\n\r\n")]
        tok = lobbyd("ntok.test", LOG_LEVEL="DEBUG", wait=False,
                     NATS_URL=f"nats://{SECRET_NATS_TOKEN}@127.0.0.1:{token_srv.port}")
        wait_for(lambda: "ntok.test" in tok.hostnames(), timeout=15,
                 what="daemon connected with a NATS token")
        base = base_env()
        base.update({"HOSTNAME": "leak.test", "LABELS_PATH": str(tmp_path / "leak-labels"),
                     "LOG_LEVEL": "DEBUG", "TOKEN": SECRET_TOKEN})
        scenarios = {
            "wrong-password": {"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}-wrong@127.0.0.1:"
                                           f"{user_srv.port}"},
            "wrong-token": {"NATS_URL": f"nats://{SECRET_NATS_TOKEN}-wrong@127.0.0.1:"
                                        f"{token_srv.port}"},
            "nats-down": {"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}@127.0.0.1:"
                                      f"{free_port()}"},
            "cluster-list": {"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}@127.0.0.1:"
                                         f"{free_port()},nats://{SECRET_NATS_TOKEN}@127.0.0.1:"
                                         f"{free_port()}"},
            "bad-port-in-url": {"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}@127.0.0.1:99999"},
            "unparsable-url": {"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}@[::1"},
            "bad-scheme": {"NATS_URL": f"http://lobby:{SECRET_NATS_PASS}@127.0.0.1:1"},
            "other-config-error": {"PORT": "abc"},
            "token-control-char": {"TOKEN": SECRET_TOKEN + "\x01"},
        }
        for name, extra in scenarios.items():
            env = {**base, "PORT": str(free_port()), **extra}
            outputs[name] = _run_until(env, tmp_path, 3.0, f"leak-{name}")
        ok.stop()
        tok.stop()
        outputs["creds.test"] = ok.logs()
        outputs["ntok.test"] = tok.logs()
    finally:
        user_srv.stop()
        token_srv.stop()
    leaks = [(name, s) for name, text in outputs.items() for s in SECRETS if s in text]
    leaks += [("error body", s) for body in bodies for s in SECRETS if s.encode() in body]
    record("11 secrets", scenarios=len(outputs), error_bodies=len(bodies), leaks=len(leaks))
    assert not leaks, f"secrets leaked: {leaks}"
    assert "wrong" not in outputs["wrong-password"] or SECRET_NATS_PASS not in \
        outputs["wrong-password"]


@pytest.mark.parametrize("filename", ["../escape", "/tmp/lobbyd-abs-escape", "a/b", "..",
                                      ".", "x/../../y", "./_runtime", "\\..\\x"])
def test_runtime_filename_cannot_escape(tmp_path, filename):
    sandbox = tmp_path / "sandbox"
    labels = sandbox / "labels"
    labels.mkdir(parents=True)
    env = base_env()
    port = free_port()
    env.update({"HOSTNAME": "esc.test", "PORT": str(port), "LABELS_PATH": str(labels),
                "NATS_URL": f"nats://127.0.0.1:{free_port()}", "RUNTIME_LABELS_FILENAME": filename})
    proc = subprocess.Popen(lobbyd_command(), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        code = None
    if code is None:  # it started: a POST must write inside LABELS_PATH only
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/labels", body=b"esc:1")
        conn.getresponse().read()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
    out, err = proc.communicate()
    (tmp_path / "out.log").write_bytes(out + err)
    outside = [str(p.relative_to(sandbox)) for p in sandbox.rglob("*")
               if labels not in p.parents and p != labels]
    assert not outside, f"files written outside LABELS_PATH: {outside}"
    assert not Path("/tmp/lobbyd-abs-escape").exists()
    if "/" in filename or filename in (".", ".."):
        assert code == 78, f"RUNTIME_LABELS_FILENAME={filename!r} accepted (exit {code})"
        lines = [ln for ln in err.decode().splitlines() if ln.strip()]
        assert len(lines) == 1 and "RUNTIME_LABELS_FILENAME" in lines[0], lines


def test_hidden_runtime_filename_still_published(lobbyd, tmp_path):
    """RUNTIME_LABELS_FILENAME=.runtime: label files starting with '.' are skipped, so either
    it is refused (78, one line naming it) or the runtime file still counts, also after a
    restart."""
    env = base_env()
    env.update({"HOSTNAME": "hidden.test", "PORT": str(free_port()),
                "LABELS_PATH": str(tmp_path / "hl"), "RUNTIME_LABELS_FILENAME": ".runtime",
                "NATS_URL": f"nats://127.0.0.1:{free_port()}"})
    try:
        res = subprocess.run(lobbyd_command(), env=env, capture_output=True, text=True,
                             timeout=3, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        res = None
    if res is not None:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 78 and len(lines) == 1, (res.returncode, lines)
        assert "RUNTIME_LABELS_FILENAME" in lines[0]
        return
    d = lobbyd("hidden.test", RUNTIME_LABELS_FILENAME=".runtime", LOG_LEVEL="INFO")
    assert d.request("POST", "/v1/labels", "hidden:one")[0] == 200
    time.sleep(1.5)  # a keep-alive re-read of the label directory
    assert "hidden:one" in d.get_json("/v1/discovery")["labels"]
    d.restart()
    assert "hidden:one" in d.get_json("/v1/discovery")["labels"]


SEPARATORS = {"LINE SEPARATOR": "\u2028", "PARAGRAPH SEPARATOR": "\u2029", "NEL": "\x85",
              "VT": "\x0b", "FF": "\x0c", "FS": "\x1c", "GS": "\x1d", "RS": "\x1e", "CR": "\r"}


@pytest.mark.parametrize("sep_name", sorted(SEPARATORS))
def test_label_cannot_inject_a_second_label(lobbyd, sep_name):
    """A label carrying a character that some line splitter treats as a line break must be
    refused (400) or stay one label through the runtime file, a re-read and a restart."""
    sep = SEPARATORS[sep_name]
    label = f"inj:a{sep}inj:b"
    d = lobbyd("inj.test", LOG_LEVEL="INFO")
    status, _, body = d.request("POST", "/v1/labels", label.encode())
    if sep in "\x85\x0b\x0c\x1c\x1d\x1e\r":  # control characters: the contract says refuse
        assert status == 400, f"{sep_name}: control character accepted ({status} {body!r})"
    for _ in range(2):
        time.sleep(1.5)  # the label directory is re-read every KEEP_ALIVE
        published = d.get_json("/v1/discovery")["labels"]
        assert "inj:b" not in published, f"{sep_name}: injected a second label: {published}"
        if status == 200:
            assert label in published, f"{sep_name}: label mangled: {published}"
        else:
            assert not [lb for lb in published if lb.startswith("inj:")], published
        d.restart()


def test_label_content_cannot_escape(lobbyd, tmp_path):
    d = lobbyd("content.test", LOG_LEVEL="INFO")
    before = {p for p in tmp_path.rglob("*")}
    for label in ["../../escape:x", "/etc/passwd", "..", "path:../../../../tmp/x",
                  "nul\\x00:1", "$(touch /tmp/lobbyd-pwned)", "`touch /tmp/lobbyd-pwned`"]:
        status = d.request("POST", "/v1/labels", label)[0]
        assert status in (200, 400)
    labels_dir = Path(d.env["LABELS_PATH"])
    new = [p for p in tmp_path.rglob("*") if p not in before and labels_dir not in p.parents
           and p != labels_dir and p.suffix != ".log"]
    assert not new, f"files created outside LABELS_PATH: {new}"
    assert not Path("/tmp/lobbyd-pwned").exists()
