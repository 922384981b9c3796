"""One client cannot lock everyone out of the API: a client address holds at most
HTTP_MAX_CONNECTIONS_PER_ADDRESS connections, idle keep-alive connections are closed
first when a new one needs room, and past every limit 16 reserved slots still answer
/v1/health and /metrics. The clients are real sockets from several loopback addresses."""

from __future__ import annotations

import contextlib
import http.client
import resource
import socket
from collections.abc import Iterator

import pytest
from conftest import skip_unless_required, wait_for

TOKEN = "lock-out-token"
AUTH = f"Authorization: Token {TOKEN}\r\n"


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1400
    if hard != resource.RLIM_INFINITY and hard < want:
        skip_unless_required(f"RLIMIT_NOFILE hard limit {hard}: too low for {want} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def get(port: int, path: str, source: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """One GET with the token from `source`: status and body (OSError if refused)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": f"Token {TOKEN}"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def start(lobbyd, name: str, nofile: int | None = None, **env: str):
    d = lobbyd(name, start=False, TOKEN=TOKEN, **env)
    d.nofile = nofile
    d.start(wait=False)
    wait_for(lambda: get(d.port, "/v1/health", "127.0.0.1")[0] == 200, timeout=15,
             what=f"{name} healthy")
    return d


def answered_or_closed(sock: socket.socket) -> bool:
    """Whether lobbyd answered (the head is there) or closed the connection."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b"" or b"\r\n\r\n" in data


def test_a_thousand_page_loads_from_one_address_lock_no_one_out(lobbyd, many_fds) -> None:
    """1,000 connections from 127.0.0.1 each ask for the page, then hold the connection
    open (idle keep-alive, 60 s); a health check (right token) from 127.0.0.2 and one
    from 127.0.0.1 itself are answered at once."""
    d = start(lobbyd, "lockout.idle")
    clients: list[socket.socket] = []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=5)
            s.sendall(b"GET /ui HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            clients.append(s)
        wait_for(lambda: all(answered_or_closed(s) for s in clients), timeout=30,
                 what="every page request answered (or its connection closed)")
        for source in ("127.0.0.2", "127.0.0.1"):
            status, body = wait_for(lambda source=source: get(d.port, "/v1/health", source),
                                    timeout=5, what=f"health from {source}")  # type: ignore[misc]
            assert status == 200, body
        status, body = get(d.port, "/v1/discoveries", "127.0.0.3")
        assert status == 200 and b"lockout.idle" in body
    finally:
        for s in clients:
            s.close()


def open_streams(port: int, count: int, source: str) -> tuple[list[socket.socket], list[int]]:
    """`count` event streams from `source`: the sockets and the status each got."""
    socks, statuses = [], []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n" + AUTH.encode() + b"\r\n")
        socks.append(s)
    for s in socks:
        s.settimeout(5)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
        statuses.append(int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0)
    return socks, statuses


def test_one_address_holds_at_most_its_share(lobbyd) -> None:
    d = start(lobbyd, "lockout.share", HTTP_MAX_CONNECTIONS_PER_ADDRESS="20")
    socks, statuses = open_streams(d.port, 30, "127.0.0.1")
    try:
        assert statuses[:20] == [200] * 20, statuses
        # the other 10: a reserved slot's 503 (only health and metrics), or closed at once
        assert set(statuses[20:]) <= {503, 0} and 503 in statuses[20:], statuses
        assert get(d.port, "/v1/health", "127.0.0.1")[0] == 200  # a reserved slot
        status, body = get(d.port, "/v1/discoveries", "127.0.0.1")
        assert status == 503 and b"too many connections" in body
        assert get(d.port, "/v1/discoveries", "127.0.0.2")[0] == 200  # the others: served
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: get(d.port, "/v1/discoveries", "127.0.0.1")[0] == 200, timeout=10,
             what="served again once the streams went")


def test_busy_connections_everywhere_leave_health_and_metrics(lobbyd) -> None:
    """Under RLIMIT_NOFILE=256 lobbyd holds 64 connections; 64 event streams from four
    addresses take them all (none idle: none can be closed for room). Health and metrics
    still answer from a fifth address, the rest gets a 503 that says why."""
    d = start(lobbyd, "lockout.busy", nofile=256)
    socks: list[socket.socket] = []
    try:
        for i in range(4):
            more, statuses = open_streams(d.port, 16, f"127.0.0.{10 + i}")
            socks += more
            assert statuses == [200] * 16, statuses
        assert get(d.port, "/v1/health", "127.0.0.2")[0] == 200
        status, body = get(d.port, "/metrics", "127.0.0.2")
        assert status == 200 and b"lobbyd_http_requests_total" in body
        status, body = get(d.port, "/v1/discoveries", "127.0.0.2")
        assert status == 503 and b"/v1/health" in body
    finally:
        for s in socks:
            s.close()
