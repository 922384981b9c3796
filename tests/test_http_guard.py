"""What a web page may do to the API of a lobbyd on the same machine: nothing but read
what it is allowed to read. A page of another origin cannot add a label (Origin,
Sec-Fetch-Site), and a page whose own name points at 127.0.0.1 (DNS rebinding) cannot
read the fleet (Host). The clients that are no browser (lobbyctl, curl, Prometheus,
HTTP/1.0 without Host) are not concerned. In a real headless Chromium too.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from browser import Chromium, chromium_binary
from conftest import free_port, skip_unless_required, wait_for

import lobbyd as L

# --------------------------------------------------------------------------- pure


def test_host_of_takes_the_name_out_of_a_host_header() -> None:
    assert L.host_of("LocalHost:1313") == "localhost"
    assert L.host_of("example.com.") == "example.com"
    assert L.host_of("[::1]:1313") == "::1"
    assert L.host_of("[::1]") == "::1"
    assert L.host_of("127.0.0.1") == "127.0.0.1"
    for bad in ("[::1", "[::1]x", "a:b:c", "host:port", "host:123456", ":80", ""):
        assert L.host_of(bad) is None, bad


def test_guard_accepts_our_names_and_refuses_others() -> None:
    guard = L.RequestGuard(1313, ("127.0.0.1", "web1.example.com"), ("lobby.example.org",
                                                                      ".corp.example"))
    for host in (None, "", "localhost", "localhost:1313", "LOCALHOST", "a.localhost:9",
                 "127.0.0.1:1313", "127.3.4.5", "[::1]:1313", "10.1.2.3:1313",
                 "web1.example.com:1313", "lobby.example.org", "x.corp.example:80"):
        assert guard.host_ok(host), host
    for host in ("rebind.evil.example", "rebind.evil.example:1313", "localhost.evil.example",
                 "web1.example.com.evil.example", "corp.example.evil", "a b", "x:y:z"):
        assert not guard.host_ok(host), host
    assert L.RequestGuard(1313, (), ("*",)).host_ok("anything.example")


def test_guard_refuses_state_changes_of_other_origins() -> None:
    guard = L.RequestGuard(1313, ("127.0.0.1",), ("lobby.example.org",))
    ok = [{}, {"host": "127.0.0.1:1313"},
          {"host": "127.0.0.1:1313", "origin": "http://127.0.0.1:1313"},
          {"host": "localhost:1313", "origin": "http://localhost:1313",
           "sec-fetch-site": "same-origin"},
          {"host": "127.0.0.1:1313", "origin": "http://localhost:1313"},  # same port, ours
          {"sec-fetch-site": "none"},
          {"host": "127.0.0.1:1313", "origin": "https://lobby.example.org"}]  # a proxy's
    refused = [{"sec-fetch-site": "cross-site"},
               {"host": "127.0.0.1:1313", "origin": "http://127.0.0.1:8000"},
               {"host": "127.0.0.1:1313", "origin": "http://127.0.0.1:8000",
                "sec-fetch-site": "same-site"},
               {"host": "127.0.0.1:1313", "origin": "null"},
               {"host": "127.0.0.1:1313", "origin": "http://attacker.example"},
               {"host": "127.0.0.1:1313", "origin": "http://attacker.example:1313"},
               {"host": "127.0.0.1:1313", "origin": "file://"},
               {"host": "127.0.0.1:1313", "origin": "http://127.0.0.1:1313/x"}]
    for headers in ok:
        assert guard.origin_ok(headers), headers
    for headers in refused:
        assert not guard.origin_ok(headers), headers


# --------------------------------------------------------------------------- raw HTTP


def raw(port: int, data: bytes, source: str = "127.0.0.1") -> tuple[int, bytes, bool]:
    """Status, body, and whether lobbyd closed the connection after the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(source, 0)) as s:
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            assert chunk, f"closed after {out!r}"
            out += chunk
        head, _, body = out.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(body) < length:
            body += s.recv(65536)
        s.settimeout(2)
        try:
            closed = s.recv(1) == b""
        except (socket.timeout, ConnectionError):
            closed = False
        return int(head.split(b" ")[1]), body, closed


def post_label(port: int, label: str, headers: str = "") -> tuple[int, bytes, bool]:
    body = label.encode()
    return raw(port, b"POST /v1/labels HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%sContent-Length: %d"
               b"\r\n\r\n%s" % (port, headers.encode(), len(body), body))


def test_a_rebound_name_reads_nothing(lobbyd) -> None:
    a = lobbyd("guard.test", HTTP_ALLOWED_HOSTS="lobby.example.org")
    for path in ("/v1/discoveries", "/", "/ui", "/v1/health", "/metrics", "/v1/labels"):
        status, body, closed = raw(a.port, b"GET %s HTTP/1.1\r\nHost: rebind.evil.example:%d"
                                   b"\r\n\r\n" % (path.encode(), a.port))
        assert status == 421, (path, status, body)
        assert b"HTTP_ALLOWED_HOSTS" in body and b"guard.test" not in body
        assert closed, "a refused client's connection stays open"
    for host in (b"127.0.0.1:%d" % a.port, b"localhost", b"[::1]:1", b"guard.test",
                 b"lobby.example.org:443"):
        assert raw(a.port, b"GET /v1/discoveries HTTP/1.1\r\nHost: %s\r\n\r\n" % host)[0] \
            == 200, host
    # HTTP/1.0 without Host, as old clients send it
    assert raw(a.port, b"GET /v1/discoveries HTTP/1.0\r\n\r\n")[0] == 200


def test_a_page_of_another_origin_cannot_add_a_label(lobbyd) -> None:
    a = lobbyd("guard.post")
    attacks = [f"Origin: http://127.0.0.1:{a.port + 1}\r\n",
               "Origin: null\r\n",
               "Origin: http://attacker.example\r\n",
               f"Sec-Fetch-Site: cross-site\r\nOrigin: http://127.0.0.1:{a.port}\r\n",
               "Sec-Fetch-Site: cross-site\r\n"]
    for i, headers in enumerate(attacks):
        status, body, closed = post_label(a.port, f"prometheus:node:host:attacker{i}:80",
                                          headers)
        assert status == 403, (headers, status, body)
        assert b"another site" in body and closed
    delete = raw(a.port, b"DELETE /v1/labels HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: "
                 b"http://evil.example\r\nContent-Length: 3\r\n\r\na:b")
    assert delete[0] == 403
    assert "attacker" not in json.dumps(a.get_json("/v1/labels"))
    # the API's own origin, and clients that are no browser, may
    assert post_label(a.port, "role:ours", f"Origin: http://127.0.0.1:{a.port}\r\n"
                      "Sec-Fetch-Site: same-origin\r\n")[0] == 200
    assert post_label(a.port, "role:curl")[0] == 200
    labels = a.get_json("/v1/discovery")["labels"]  # type: ignore[index]
    assert "role:ours" in labels and "role:curl" in labels


# --------------------------------------------------------------------------- Chromium

ATTACK_PAGE = b"""<!doctype html><title>attacker</title><script>
window.attempt = (async () => {
  const out = {};
  try {
    await fetch('http://127.0.0.1:%(port)d/v1/labels', {method: 'POST', mode: 'no-cors',
      body: 'prometheus:node:host:attacker.example:80'});
    out.post = 'sent';
  } catch (e) { out.post = 'error ' + e; }
  try {
    const r = await fetch('http://127.0.0.1:%(port)d/v1/discoveries');
    out.read = await r.text();
  } catch (e) { out.read = 'error ' + e; }
  return out;
})();
</script>"""


class AttackServer:
    """A page of another origin (another loopback port), as any web site could serve."""

    def __init__(self, lobbyd_port: int):
        page = ATTACK_PAGE % {b"port": lobbyd_port}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def chromium(tmp_path: Path, *flags: str) -> Chromium:
    binary = chromium_binary()
    if not binary:
        skip_unless_required("chromium not found: apt-get install chromium (.ci/run does)")
    return Chromium(binary, tmp_path, flags)


@pytest.mark.parametrize("token", ["", "s3cret-guard"])
def test_chromium_page_of_another_origin_adds_nothing_reads_nothing(lobbyd, tmp_path,
                                                                    token: str) -> None:
    a = lobbyd("guard.browser", start=False, TOKEN=token)
    a.start(wait=not token)
    auth = {"Authorization": f"Token {token}"} if token else {}
    wait_for(lambda: a.request("GET", "/v1/discovery", headers=auth)[0] == 200, timeout=15,
             what="API up")
    site = AttackServer(a.port)
    browser = chromium(tmp_path)
    try:
        page = browser.new_page()
        page.navigate(f"http://127.0.0.1:{site.port}/")
        result = page.evaluate("window.attempt", timeout=20)
        assert result["post"] == "sent", result  # the browser sent it; lobbyd refused it
        assert "guard.browser" not in result["read"], result
        labels = json.loads(a.request("GET", "/v1/labels", headers=auth)[2])
        assert "attacker" not in json.dumps(labels), labels
        # the page lobbyd serves itself still works in the same browser
        own = browser.new_page()
        own.navigate(f"http://127.0.0.1:{a.port}/ui")
        if token:
            assert own.evaluate(f"fetch('/v1/labels', {{method: 'POST', body: 'role:page', "
                                f"headers: {{Authorization: 'Token {token}'}}}})"
                                ".then(r => r.status)") == 200
        else:
            own.wait_for("document.querySelectorAll('#list .row').length >= 1",
                         what="the page lists the host")
            assert own.evaluate("fetch('/v1/labels', {method: 'POST', body: 'role:page'})"
                                ".then(r => r.status)") == 200
        assert "role:page" in a.get_json("/v1/discovery", headers=auth)["labels"]  # type: ignore[index]
    finally:
        browser.close()
        site.close()


def test_chromium_dns_rebinding_reads_nothing(lobbyd, tmp_path) -> None:
    """The attacker's name now resolves to 127.0.0.1 (Chromium's resolver told so): its
    page is same-origin with lobbyd's port as far as the browser knows."""
    a = lobbyd("guard.rebind")
    browser = chromium(tmp_path, "--host-resolver-rules=MAP rebind.evil.example 127.0.0.1")
    try:
        page = browser.new_page()
        page.navigate(f"http://rebind.evil.example:{a.port}/ui")
        got = page.evaluate("fetch('/v1/discoveries').then(async r => "
                            "[r.status, await r.text()])")
        assert got[0] == 421 and "guard.rebind" not in got[1], got
        posted = page.evaluate("fetch('/v1/labels', {method: 'POST', body: 'evil:1'})"
                               ".then(r => r.status)")
        assert posted == 421
        assert "evil:1" not in a.get_json("/v1/discovery")["labels"]  # type: ignore[index]
    finally:
        browser.close()


def test_curl_still_reads_and_writes(lobbyd) -> None:
    if not shutil.which("curl"):
        skip_unless_required("curl not found: apt-get install curl")
    a = lobbyd("guard.curl")
    for base in (f"http://127.0.0.1:{a.port}", f"http://localhost:{a.port}"):
        done = subprocess.run(["curl", "-sS", "-f", "--data-binary", "role:curl",
                               f"{base}/v1/labels"], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0 and done.stdout == "OK", done
        done = subprocess.run(["curl", "-sS", "-f", f"{base}/v1/discoveries"],
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0 and "role:curl" in done.stdout, done
