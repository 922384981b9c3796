"""Big answers (cached ones: prepared with their head, sent by a gathered write, the
rest in slices) with the watchers' X-Lobby-Index, blocking queries, HEAD, gzip and the
page's negotiation."""

from __future__ import annotations

import gzip
import json
import socket

from conftest import wait_for
from watchclient import SUBJECT, envelope, get, hold, returned

import lobbyd as L

HOSTS = 600


def fill(nats, count: int = HOSTS) -> None:
    client = nats.client()
    for i in range(count):
        labels = [f"service:svc{i % 7}", f"rack:r{i % 13}", f"zone:z{i % 3}",
                  f"public_ip4:192.0.2.{i % 250}", f"some-long-label-{i:04}-padding-padding"]
        client.publish_json(SUBJECT, envelope(f"host{i:04}.example.org", labels))
    client.flush()


def all_listed(port: int) -> bytes:
    """/v1/discoveries once it lists every host: polled with a deadline, not a number of
    tries (a loaded machine applies the packets slower than it answers)."""
    def whole() -> bytes | None:
        body = get(port, "/v1/discoveries")[2]
        return body if len(json.loads(body)) == HOSTS + 1 else None

    body = wait_for(whole, timeout=30, what=f"{HOSTS + 1} hosts listed")
    assert isinstance(body, bytes)
    return body


def read_response(sock: socket.socket, buf: bytes, head_only: bool = False
                  ) -> tuple[int, dict[str, str], bytes, bytes]:
    """One response off a kept-alive connection: status, headers, body, what follows."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = 0 if head_only else int(headers["content-length"])
    while len(buf) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        buf += chunk
    return int(lines[0].split(" ")[1]), headers, buf[:length], buf[length:]


def ask(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


def test_big_answers_keep_alive_head_and_index(lobbyd, nats) -> None:
    # no keep-alive during the test: each would move a's own last_check, and an answer
    # made in the next second would differ from the first by it
    d = lobbyd("a", KEEP_ALIVE=60, TTL=120, LOG_LEVEL="INFO")
    fill(nats)
    body = all_listed(d.port)
    assert len(json.loads(body)) == HOSTS + 1 and len(body) > L.SLICE_MIN
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        # GET, HEAD, GET again on one connection: HEAD sends no body from the file
        sock.sendall(ask("GET", "/v1/discoveries") + ask("HEAD", "/v1/discoveries") +
                     ask("GET", "/v1/discoveries"))
        s1, h1, b1, rest = read_response(sock, b"")
        s2, h2, _, rest = read_response(sock, rest, head_only=True)
        s3, h3, b3, rest = read_response(sock, rest)
        assert (s1, s2, s3) == (200, 200, 200) and rest == b""
        assert len(json.loads(b1)) == HOSTS + 1 and b3 == b1
        for h in (h1, h2, h3):
            assert h["x-lobby-index"].isdigit() and h["content-type"] == L.JSON_TYPE
            assert int(h["content-length"]) == len(b1)
        # gzip: compressed from the file, still indexed
        sock.sendall(ask("GET", "/v1/discoveries", "Accept-Encoding: gzip\r\n"))
        s4, h4, b4, rest = read_response(sock, rest)
        assert s4 == 200 and h4["content-encoding"] == "gzip" and h4["x-lobby-index"].isdigit()
        assert gzip.decompress(b4) == b1
        # the page at / for a browser, also by HEAD; JSON for everyone else
        browser = "Accept: text/html,application/xhtml+xml,*/*;q=0.8\r\n"
        sock.sendall(ask("GET", "/", browser) + ask("HEAD", "/", browser) + ask("GET", "/"))
        s5, h5, b5, rest = read_response(sock, rest)
        s6, h6, _, rest = read_response(sock, rest, head_only=True)
        s7, h7, b7, rest = read_response(sock, rest)
        assert (s5, s6, s7) == (200, 200, 200)
        assert h5["content-type"] == L.HTML_TYPE and b5 == L.PAGE_BYTES and "accept" in \
            h5["vary"].lower()
        assert h6["content-type"] == L.HTML_TYPE and int(h6["content-length"]) == len(b5)
        assert h7["content-type"] == L.JSON_TYPE and b7 == b1 and rest == b""
    # a blocking query woken by a change gets a body that shows it, at once
    index = int(h1["x-lobby-index"])
    held = hold(d.port, "/v1/discoveries", index)
    client = nats.client()
    client.publish_json(SUBJECT, envelope("host0000.example.org", ["brand:new"]))
    client.flush()
    status, headers, body, _ = returned(held)
    assert status == 200 and int(headers["x-lobby-index"]) > index
    hosts = {p["hostname"]: p["labels"] for p in json.loads(body)}
    assert hosts["host0000.example.org"] == ["brand:new"] and len(hosts) == HOSTS + 1


def test_a_big_answer_the_socket_cannot_take_at_once_arrives_whole(lobbyd, nats) -> None:
    """An answer bigger than the socket takes at once: the server's first write sends
    part of it (gathered pieces the first time, the joined answer the next ones), the
    rest goes in slices: whole either way, and the connection is still good for the
    next request."""
    d = lobbyd("a", TTL=120)
    client = nats.client()
    for i in range(HOSTS):  # about 6 MB: more than a loopback socket takes at once
        labels = [f"label-{k:02}-{i:04}-" + "x" * 230 for k in range(40)]
        client.publish_json(SUBJECT, envelope(f"host{i:04}.example.org", labels))
    client.flush()
    all_listed(d.port)
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        answers = []
        for _ in range(3):
            sock.sendall(ask("GET", "/v1/discoveries"))
            first = sock.recv(1)  # the server is writing; what it cannot, it sends later
            status, _headers, answer, rest = read_response(sock, first)
            assert status == 200 and rest == b"" and len(answer) > L.SLICE_MIN
            answers.append({p["hostname"]: p["labels"] for p in json.loads(answer)})
    assert len(answers[0]) == HOSTS + 1 and answers[1] == answers[0] and answers[2] == answers[0]
