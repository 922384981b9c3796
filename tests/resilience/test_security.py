"""Bad input 11 of issue 4: the API token, secrets in logs and error bodies, and files or
labels that try to escape LABELS_PATH or smuggle a second label into the runtime file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import (
    ROOT,
    NatsServer,
    base_env,
    free_port,
    lobbyd_command,
    skip_unless_required,
    wait_for,
)
from harness import sigterm_and_wait

from .conftest import (
    SECRET_NATS_PASS,
    SECRET_NATS_TOKEN,
    SECRET_TOKEN,
    SECRETS,
    SUBJECT,
    raw_exchange,
    record,
    statuses,
    tmpfs,
)

SPY = """
import hmac, os, runpy, sys
real, token = hmac.compare_digest, os.environ["TOKEN"].encode("utf-8", "surrogateescape")
out = open(os.environ["SPY_LOG"], "a", buffering=1)
def spy(a, b):
    # lengths only, and whether the configured TOKEN was one side: never the secret itself
    out.write("%d %d %s\\n" % (len(a), len(b), token in (a, b)))
    return real(a, b)
hmac.compare_digest = spy
sys.argv = [os.environ["SPY_TARGET"]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_token_compared_in_constant_time(lobbyd, tmp_path, monkeypatch):
    """Timing over HTTP cannot resolve a memcmp, so the call is checked: lobbyd (from
    source, under a wrapper that counts the calls of hmac.compare_digest) must compare the
    given token with TOKEN through compare_digest exactly once per request, whatever its
    length, and the answers must follow."""
    if os.environ.get("LOBBYD_CMD"):
        skip_unless_required("needs lobbyd.py from source (LOBBYD_CMD is set)")
    spy, spy_log = tmp_path / "spy.py", tmp_path / "compare_digest.calls"
    spy.write_text(SPY)
    monkeypatch.setenv("LOBBYD_CMD", f"{sys.executable} {spy}")
    d = lobbyd("digest.test", TOKEN=SECRET_TOKEN, SPY_LOG=str(spy_log),
               SPY_TARGET=str(ROOT / "lobbyd.py"), wait=False)
    good = {"Authorization": f"Token {SECRET_TOKEN}"}
    wait_for(lambda: d.request("GET", "/v1/discovery", headers=good)[0] == 200, timeout=15,
             what="API up")

    def calls() -> list[str]:
        return spy_log.read_text().splitlines() if spy_log.exists() else []

    cases = [(good, 200), ({"Authorization": "Token " + "x" * len(SECRET_TOKEN)}, 403),
             ({"Authorization": f"Token {SECRET_TOKEN[:-1]}"}, 403),
             ({"Authorization": f"Token {SECRET_TOKEN}{SECRET_TOKEN}"}, 403), ({}, 403)]
    # a cached answer asked again with the very same head is answered from what it got
    # last time (Answers.repeated): the token is compared on those requests too
    cases = [(path, headers, want) for path in ("/v1/discovery", "/v1/discoveries")
             for headers, want in cases for _ in range(2)]
    for path, headers, want in cases:
        before = len(calls())
        status = d.request("GET", path, headers=headers)[0]
        assert status == want, (headers.keys(), status, want)
        new = calls()[before:]
        assert len(new) == 1, f"{headers.keys()}: {len(new)} compare_digest calls: {new}"
        assert new[0].endswith(" True"), f"TOKEN was not one side of compare_digest: {new}"
    record("11 token compare", requests=len(cases), compare_digest_calls=len(calls()))


def test_token_enforced_everywhere(lobbyd):
    d = lobbyd("tok.test", TOKEN=SECRET_TOKEN, LOG_LEVEL="DEBUG", wait=False)
    good = {"Authorization": f"Token {SECRET_TOKEN}"}
    wait_for(lambda: d.request("GET", "/v1/discovery", headers=good)[0] == 200, timeout=15,
             what="API up")
    assert d.request("GET", "/v1/discovery", headers=good)[0] == 200
    assert d.request("GET", "/v1/discovery",
                     headers={"Authorization": f"Bearer {SECRET_TOKEN}"})[0] == 200
    denied = status_500 = 0
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
        status_500 += status == 500
        assert status == 403, (method, path, status, body)
        assert SECRET_TOKEN.encode() not in body
        denied += 1
    # raw bytes no HTTP client would send: non-ASCII, NUL, invalid UTF-8 in the header
    for raw_token in [b"\xe9\xe8", b"\xff\xfe\xfd", SECRET_TOKEN.encode() + b"\xc3",
                      b"T\x00ken", "pässwörd".encode()]:
        reply = raw_exchange(d.port, b"GET /v1/discovery HTTP/1.1\r\nAuthorization: Token " +
                             raw_token + b"\r\nConnection: close\r\n\r\n")
        status_500 += 500 in statuses(reply)
        assert statuses(reply) in ([403], [400]), reply[:200]
        assert SECRET_TOKEN.encode() not in reply
        denied += 1
    assert "Traceback" not in d.logs()
    record("11 token", denied_requests=denied, status_500=status_500)


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


def _run_scenario(env: dict[str, str], cwd: Path, name: str, expect: Scenario,
                  timeout: float = 15) -> str:
    """Run lobbyd until it shows what the scenario is for (a log line it must write, or its
    exit) or exits; SIGTERM it if it runs. Fails when the scenario did not happen."""
    log = cwd / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(lobbyd_command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd)
        try:
            wait_for(lambda: proc.poll() is not None or (expect.running and re.search(
                expect.running, log.read_text(errors="replace"))), timeout=timeout,
                what=f"scenario {name}: {expect}")
        finally:
            running = proc.poll() is None
            code, _hung = sigterm_and_wait(proc)
    text = log.read_text(errors="replace")
    if running or not expect.names:
        assert running and code == 0, f"{name}: should run, exited {code}: {text[-500:]}"
        assert re.search(expect.running, text), f"{name}: no /{expect.running}/ in the log"
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert code == 78 and len(lines) == 1 and expect.names in lines[0], \
            f"{name}: want exit 78 with one line naming {expect.names}: {code} {lines[:3]}"
    return text


class Scenario(NamedTuple):
    """What a leak scenario must be seen to do: keep running and log a line matching
    `running`, or exit 78 with one line naming `names` (where both are given, either)."""

    running: str = ""
    names: str = ""


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
        down1, down2 = free_port(), free_port()
        scenarios = {
            "wrong-password": ({"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}-wrong@127.0.0.1:"
                                            f"{user_srv.port}"},
                               Scenario(running="Authorization Violation")),
            "wrong-token": ({"NATS_URL": f"nats://{SECRET_NATS_TOKEN}-wrong@127.0.0.1:"
                                         f"{token_srv.port}"},
                            Scenario(running="Authorization Violation")),
            "nats-down": ({"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}@127.0.0.1:{down1}"},
                          Scenario(running=rf"(?i)(refused|connect call failed).*{down1}")),
            "cluster-list": ({"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}@127.0.0.1:{down1},"
                                          f"nats://{SECRET_NATS_TOKEN}@127.0.0.1:{down2}"},
                             Scenario(running=rf"(?s)(?=.*:{down1}\b)(?=.*:{down2}\b)")),
            "bad-port-in-url": ({"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}@127.0.0.1:99999"},
                                Scenario(names="NATS_URL")),
            "unparsable-url": ({"NATS_URL": f"nats://lobby:{SECRET_NATS_PASS}@[::1"},
                               Scenario(names="NATS_URL")),
            "bad-scheme": ({"NATS_URL": f"http://lobby:{SECRET_NATS_PASS}@127.0.0.1:1"},
                           Scenario(names="NATS_URL")),
            "other-config-error": ({"PORT": "abc"}, Scenario(names="PORT")),
            # a control character in TOKEN: refused naming TOKEN, or accepted (it then
            # only denies); either way it must not be echoed
            "token-control-char": ({"TOKEN": SECRET_TOKEN + "\x01"},
                                   Scenario(running="(?i)API listening|starting as",
                                            names="TOKEN")),
        }
        for name, (extra, expect) in scenarios.items():
            env = {**base, "PORT": str(free_port()), **extra}
            outputs[name] = _run_scenario(env, tmp_path, f"leak-{name}", expect)
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
    wait_rereads(d)
    assert "hidden:one" in d.get_json("/v1/discovery")["labels"]
    d.restart()
    assert "hidden:one" in d.get_json("/v1/discovery")["labels"]


def wait_rereads(d, packets: int = 2, timeout: float = 10) -> None:
    """Until the label directory has surely been re-read since now: the daemon re-reads it
    before every keep-alive, so the second `hi` it publishes from now on was built from a
    read that began after this call."""
    sub = d.nats.client()
    try:
        sub.subscribe(SUBJECT)
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < packets:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{d.name}: {seen} keep-alives in {timeout}s, want {packets}"
            with contextlib.suppress(TimeoutError):
                envelope = json.loads(sub.next_msg(timeout=remaining)[1])
                seen += envelope["discovery"]["hostname"] == d.name and \
                    envelope["message"] == "hi"
    finally:
        sub.close()


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
        wait_rereads(d)
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


def test_a_label_that_cannot_be_saved_is_never_published(lobbyd, nats, tmp_path):
    """POST on a full disk: 507, and not one packet on the wire ever carried the label
    (it was published before the save, then withdrawn). Watched with a raw subscriber
    over the POSTs and three keep-alives after."""
    mnt = tmp_path / "full-labels"
    with tmpfs(mnt, "64k"):
        d = lobbyd("full.wire", LABELS_PATH=str(mnt), LOG_LEVEL="INFO")
        assert d.request("POST", "/v1/labels", "keep:one")[0] == 200
        filler = mnt / ".filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        with contextlib.suppress(OSError):  # until ENOSPC
            for _ in range(10_000):
                os.write(fd, b"# filler\n" * 512)
        os.close(fd)
        sub = nats.client()
        sub.subscribe(SUBJECT)
        try:
            statuses_seen = [d.request("POST", "/v1/labels", f"fail:full{i}\n" + "x" * 900)[0]
                             for i in range(3)]
            assert statuses_seen == [507] * 3, statuses_seen
            packets, his = [], 0
            while his < 3:  # bounded: KEEP_ALIVE=1, and next_msg times out
                _subject, payload = sub.next_msg(timeout=5)
                envelope = json.loads(payload)
                if envelope["discovery"]["hostname"] == "full.wire":
                    packets.append(envelope["discovery"]["labels"])
                    his += envelope["message"] == "hi"
        finally:
            sub.close()
        assert all("keep:one" in labels for labels in packets), packets
        leaked = [labels for labels in packets if any(x.startswith("fail:") for x in labels)]
        assert not leaked, f"labels never saved went out on the wire: {leaked}"
        filler.unlink()
        d.stop()
    record("11 unsaved labels not published", posts=3, packets_watched=len(packets),
           published_unsaved=len(leaked))
