"""HTTP API: every route, auth, caching, and malformed requests."""

from __future__ import annotations

import gzip
import json
import re
import socket
import time

import pytest
from conftest import Lobbyd, wait_for

SUBJECT = "lobby.discovery"


def raw_http(port: int, data: bytes, timeout: float = 5.0, half_close: bool = False) -> bytes:
    """Send raw bytes, return everything the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except socket.timeout:
            pass
        return out


@pytest.fixture
def pair(lobbyd, nats) -> tuple[Lobbyd, Lobbyd]:
    a = lobbyd("a.example.com", LABELS="service:web,prometheus:node,prometheus:node:location:prg")
    b = lobbyd("b.example.com", LABELS="service:smtp,role:mx,prometheus:node:host:2a03::1")
    wait_for(lambda: a.hostnames() == ["a.example.com", "b.example.com"], what="a sees b")
    return a, b


def test_root_and_discoveries_list_everyone_pretty_printed(pair) -> None:
    a, _b = pair
    status, headers, body = a.request("GET", "/")
    assert status == 200 and headers["content-type"] == "application/json; charset=UTF-8"
    assert body.startswith(b'[\n  {\n    "hostname": "a.example.com",\n    "labels": [\n')
    assert body.endswith(b"\n]\n")
    listed = json.loads(body)
    assert [d["hostname"] for d in listed] == ["a.example.com", "b.example.com"]
    assert listed[1]["labels"] == ["prometheus:node:host:2a03::1", "role:mx", "service:smtp"]
    assert json.loads(a.request("GET", "/v1/discoveries")[2])[0]["hostname"] == "a.example.com"


def test_local_discovery(pair) -> None:
    a, _b = pair
    local = a.get_json("/v1/discovery")
    assert local["hostname"] == "a.example.com"
    assert local["labels"] == ["prometheus:node", "prometheus:node:location:prg", "service:web"]
    assert abs(local["last_check"] - time.time()) < 5


def test_filters_and_resolve(pair) -> None:
    a, _b = pair
    by_label = a.get_json("/v1/discoveries?labels=service:smtp,service:web")
    assert [(d["hostname"], d["labels"]) for d in by_label] == [
        ("a.example.com", ["service:web"]), ("b.example.com", ["service:smtp"])]
    only_mx = a.get_json("/v1/discoveries?labels=role:mx")
    assert [(d["hostname"], d["labels"]) for d in only_mx] == [("b.example.com", ["role:mx"])]
    by_prefix = a.get_json("/v1/discoveries?prefixes=role:,service:w")
    assert [(d["hostname"], d["labels"]) for d in by_prefix] == [
        ("a.example.com", ["service:web"]), ("b.example.com", ["role:mx"])]
    both = a.get_json("/v1/discoveries?labels=role:mx&prefixes=service:")
    assert [(d["hostname"], d["labels"]) for d in both] == [("b.example.com", ["role:mx"])]
    assert a.get_json("/v1/discoveries?labels=nothing") == []
    assert a.request("GET", "/v1/discoveries?labels=nothing")[2] == b"[]\n"
    assert a.get_json("/v1/resolve?label=service:smtp") == ["b.example.com"]
    assert a.get_json("/v1/resolve?label=none") == []
    assert a.request("GET", "/v1/resolve")[0] == 400


def test_prometheus_route(pair) -> None:
    a, _b = pair
    status, headers, body = a.request("GET", "/v1/prometheus/node")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == [
        {"Targets": ["a.example.com:9100"], "Labels": {"location": "prg"}},
        {"Targets": ["[2a03::1]:9100"], "Labels": {}}]
    assert a.get_json("/v1/prometheus/nothing") == []


def test_head_is_answered_for_get_routes(pair) -> None:
    a, _b = pair
    status, headers, body = a.request("HEAD", "/v1/discoveries")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 10


def test_unknown_path_and_wrong_method(pair) -> None:
    a, _b = pair
    assert a.request("GET", "/v2/nothing")[0] == 404
    status, headers, _body = a.request("PUT", "/v1/labels", body="x")
    assert status == 405 and headers["allow"] == "DELETE, GET, POST, HEAD"  # GET: SPEC 9
    assert headers["content-type"] == "text/plain; charset=UTF-8"
    status, headers, _ = a.request("POST", "/v1/discoveries")
    assert status == 405 and "GET" in headers["allow"] and "HEAD" in headers["allow"]


def test_gzip_is_offered_to_clients_that_ask(lobbyd, nats) -> None:
    a = lobbyd("a", LABELS=",".join(f"label:{i}" for i in range(100)))
    status, headers, body = a.request("GET", "/v1/discoveries",
                                      headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(body))[0]["hostname"] == "a"
    _, plain_headers, _ = a.request("GET", "/v1/discoveries")
    assert "content-encoding" not in plain_headers


def test_token_auth(lobbyd) -> None:
    a = lobbyd("a", start=False, TOKEN="s3cret-token")
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/discovery",
                               headers={"Authorization": "Token s3cret-token"})[0] == 200,
             what="API up")
    assert a.request("GET", "/v1/discoveries")[:3:2] == (403, b"access denied\n")
    assert a.request("GET", "/", headers={"Authorization": "Token wrong"})[0] == 403
    assert a.request("GET", "/", headers={"Authorization": "s3cret-token"})[0] == 403
    assert a.request("GET", "/", headers={"Authorization": "Basic s3cret-token"})[0] == 403
    assert a.request("GET", "/", headers={"Authorization": "Token s3cret-token"})[0] == 200
    assert a.request("GET", "/", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
    assert a.request("POST", "/v1/labels", body="x:1")[0] == 403
    assert a.request("POST", "/v1/labels", body="x:1",
                     headers={"Authorization": "Bearer s3cret-token"})[0] == 200
    assert "s3cret-token" not in a.logs()


def test_post_and_delete_runtime_labels(lobbyd) -> None:
    a = lobbyd("a", LABELS="env:label")
    status, _headers, body = a.request("POST", "/v1/labels", body="run:1\nrun:2\n")
    assert (status, body) == (200, b"OK")
    assert a.get_json("/v1/discovery")["labels"] == ["env:label", "run:1", "run:2"]
    assert a.request("DELETE", "/v1/labels", body="run:1\nenv:label")[0] == 200
    assert a.get_json("/v1/discovery")["labels"] == ["env:label", "run:2"]


def test_bad_labels_are_rejected_and_nothing_applied(lobbyd) -> None:
    a = lobbyd("a")
    status, _, body = a.request("POST", "/v1/labels", body="good:1\nbad\x01label\n")
    assert status == 400 and b"control character" in body
    status, _, body = a.request("POST", "/v1/labels", body="ok\n" + "x" * 1025)
    assert status == 400 and b"1025 bytes" in body
    assert a.request("POST", "/v1/labels", body=b"\xff\xfe")[0] == 400
    assert a.request("POST", "/v1/labels", body="\n\n")[:3:2] == (200, b"OK")  # no-op
    assert a.get_json("/v1/discovery")["labels"] == []


def test_malformed_requests_get_their_status_and_others_are_still_served(lobbyd) -> None:
    a = lobbyd("a")
    port = a.port
    assert raw_http(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_http(port, b"GET / HTTP/9.9\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert raw_http(port, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    assert raw_http(port, b"POST /v1/labels HTTP/1.1\r\nContent-Length: abc\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    assert raw_http(port, b"POST /v1/labels HTTP/1.1\r\nContent-Length: -5\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    assert raw_http(port, b"POST /v1/labels HTTP/1.1\r\nContent-Length: 1\r\n"
                          b"Content-Length: 2\r\n\r\nx").startswith(b"HTTP/1.1 400 ")
    big = raw_http(port, b"POST /v1/labels HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 413 ")
    huge_headers = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    assert raw_http(port, huge_headers).startswith(b"HTTP/1.1 431 ")
    assert raw_http(port, b"POST /v1/labels HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"
                    ).startswith(b"HTTP/1.1 501 ")
    assert a.request("GET", "/v1/discovery")[0] == 200
    assert a.proc.poll() is None


def test_chunked_body_and_expect_continue(lobbyd) -> None:
    a = lobbyd("a")
    chunked = (b"POST /v1/labels HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n6\r\nchunk:\r\n1\r\n1\r\n0\r\n\r\n")
    assert raw_http(a.port, chunked).startswith(b"HTTP/1.1 200 ")
    expect = (b"POST /v1/labels HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\n"
              b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        s.sendall(expect)
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"cont:1")
        assert s.recv(1000).startswith(b"HTTP/1.1 200 ")
    assert a.get_json("/v1/discovery")["labels"] == ["chunk:1", "cont:1"]


def test_keep_alive_and_http10(lobbyd) -> None:
    a = lobbyd("a")
    request = b"GET /v1/discovery HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        for _ in range(3):  # three requests on one connection
            s.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            body = b""
            while len(body) < length:
                body += s.recv(length - len(body))
            assert json.loads(body)["hostname"] == "a"
    answer = raw_http(a.port, b"GET /v1/discovery HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in answer


def test_disable_api_means_no_listener(lobbyd, nats) -> None:
    a = lobbyd("quiet", DISABLE_API="true")
    watcher = lobbyd("watcher")
    wait_for(lambda: "quiet" in watcher.hostnames(), what="quiet host still publishes")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", a.port), timeout=1).close()


def test_ipv6_listener(lobbyd) -> None:
    a = lobbyd("a", start=False, HOST="::1")
    a.start(wait=False)

    def answers() -> bool:
        with socket.create_connection(("::1", a.port), timeout=2) as s:
            s.sendall(b"GET /v1/discovery HTTP/1.0\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 200 ")

    wait_for(answers, what="API on [::1]")


def test_non_ascii_token(lobbyd) -> None:
    a = lobbyd("a", start=False, TOKEN="pässwörd")
    a.start(wait=False)
    header = "Token pässwörd".encode().decode("latin-1")  # the UTF-8 bytes on the wire
    wait_for(lambda: a.request("GET", "/", headers={"Authorization": header})[0] == 200,
             what="UTF-8 token accepted")
    assert a.request("GET", "/", headers={"Authorization": "Token passwort"})[0] == 403


# --------------------------------------------------------------------------- repeated heads
# A poller sends the very same request head every time; lobbyd answers a head it has seen
# from what it answered last, while that still is the answer (Answers.repeated). These
# pin that the shortcut changes nothing a client can see.


def exchange(s: socket.socket, request: bytes, head_only: bool = False
             ) -> tuple[int, dict[str, str], bytes]:
    """One request on a kept-alive connection: status, headers (lower-case names), body."""
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = 0 if head_only else int(headers["content-length"])
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    assert len(body) == length, f"{len(body) - length} bytes more than the answer"
    return int(lines[0].split(" ")[1]), headers, body


def test_a_repeated_head_gets_every_change_and_its_new_index(lobbyd) -> None:
    a = lobbyd("a", LABELS="service:web")
    request = b"GET /v1/resolve?label=role:new HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        status, first, body = exchange(s, request)
        assert (status, body) == (200, b"[]\n")
        for _ in range(3):
            assert exchange(s, request) == (200, first, body)
        assert a.request("POST", "/v1/labels", body="role:new")[0] == 200
        wait_for(lambda: exchange(s, request)[2] != b"[]\n", what="the new label resolved")
        status, headers, body = exchange(s, request)
        assert (status, json.loads(body)) == (200, ["a"])
        assert int(headers["x-lobby-index"]) > int(first["x-lobby-index"])
        # the very bytes a head never seen before gets, the whole way through
        other = b"GET /v1/resolve?label=role:new HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        assert exchange(s, other) == (200, headers, body)
        assert exchange(s, request) == (200, headers, body)


def test_a_repeated_head_request_gets_no_body(lobbyd) -> None:
    a = lobbyd("a", LABELS=",".join(f"label:{i}" for i in range(300)))  # a memory-file answer
    head = b"HEAD /v1/discoveries HTTP/1.1\r\nHost: localhost\r\n\r\n"
    get = b"GET /v1/discoveries HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        answers = [exchange(s, head, head_only=True) for _ in range(3)]
        status, headers, body = exchange(s, get)  # misread if a HEAD had sent a body
        assert status == 200 and json.loads(body)[0]["hostname"] == "a"
        for head_status, head_headers, head_body in answers:
            assert (head_status, head_body) == (200, b"")
            assert head_headers["content-length"] == str(len(body)) == headers["content-length"]


def test_a_repeated_head_with_a_wrong_token_stays_denied(lobbyd) -> None:
    a = lobbyd("a", start=False, TOKEN="s3cret-token")
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/discovery",
                               headers={"Authorization": "Token s3cret-token"})[0] == 200,
             what="API up")
    good = b"GET /v1/discoveries HTTP/1.1\r\nAuthorization: Token s3cret-token\r\n\r\n"
    wrong = b"GET /v1/discoveries HTTP/1.1\r\nAuthorization: Token s3cret-tokem\r\n\r\n"
    none = b"GET /v1/discoveries HTTP/1.1\r\nHost: localhost\r\n\r\n"
    kept = socket.create_connection(("127.0.0.1", a.port), timeout=5)
    with kept:
        for request, status in [(wrong, 403), (wrong, 403), (good, 200), (good, 200),
                                (good, 200), (wrong, 403), (none, 403), (none, 403)]:
            if status == 200:  # kept alive: the second and third are repeated heads
                got, _headers, body = exchange(kept, request)
                assert got == status, (request, got, body)
                continue
            with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
                got, _headers, body = exchange(s, request)
                assert got == status, (request, got, body)
                assert body == b"access denied\n"
                assert s.recv(1) == b"", "a refused client's connection stays open"


def test_repeated_heads_are_counted_in_the_metrics(lobbyd) -> None:
    a = lobbyd("a")

    def served() -> int:
        metrics = a.request("GET", "/metrics")[2].decode()
        return int(re.search(r'^lobbyd_http_requests_total\{code="200"\} (\d+)$', metrics,
                             re.M)[1])

    before = served()
    request = b"GET /v1/prometheus/node HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        for _ in range(5):
            assert exchange(s, request)[0] == 200
    assert served() == before + 1 + 5  # the first /metrics, then the five


def read_answers(s: socket.socket, count: int) -> list[bytes]:
    """`count` whole answers (head and body) read off a kept-alive connection, in order."""
    data, answers = b"", []
    while len(answers) < count:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {len(answers)} answers"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
        while len(rest) < length:
            chunk = s.recv(1 << 20)
            assert chunk, "closed mid-body"
            rest += chunk
        answers.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return answers


def test_repeated_heads_pipelined_or_split_are_answered_in_order(lobbyd) -> None:
    """A head the server answers at once (HttpProtocol) only when it arrives alone and
    whole while nothing waits: pipelined with others, or cut in two, it goes the whole
    way, and every answer comes in the order asked."""
    a = lobbyd("a", LABELS="service:web")
    web = b"GET /v1/resolve?label=service:web HTTP/1.1\r\nHost: localhost\r\n\r\n"
    other = b"GET /v1/resolve?label=service:none HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        s.sendall(web)
        first = read_answers(s, 1)[0]
        assert first.endswith(b'[\n  "a"\n]\n')
        s.sendall(web)  # alone and whole: answered at once
        assert read_answers(s, 1) == [first]
        s.sendall(web + other + web + web)
        got = read_answers(s, 4)
        assert [answer.endswith(b"[]\n") for answer in got] == [False, True, False, False]
        assert got[0] == got[2] == got[3] == first
        s.sendall(web[:20])
        time.sleep(0.05)  # the rest in a segment of its own
        s.sendall(web[20:] + web)
        assert read_answers(s, 2) == [first, first]


def test_a_poller_that_does_not_read_holds_one_answer_and_gets_them_all(lobbyd) -> None:
    """A client that sends its head over and over without reading: the answers pile up
    no further than its socket and one answer in lobbyd, others are served meanwhile,
    and once it reads, it gets every answer whole and in order."""
    a = lobbyd("a", LABELS=",".join(f"prometheus:node:k{i:04d}:{'x' * 80}"
                                    for i in range(1000)))
    request = b"GET /v1/prometheus/node HTTP/1.1\r\nHost: localhost\r\n\r\n"  # a kept answer
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as s:
        s.sendall(request)
        first = read_answers(s, 1)[0]
        assert len(first) > 65536  # prepared with its head (Prepared)
        for _ in range(40):
            s.sendall(request)
        assert a.request("GET", "/v1/health")[0] == 200, "others are served meanwhile"
        answers = read_answers(s, 40)
        assert answers == [first] * 40


def test_a_repeated_blocking_query_is_held_every_time(lobbyd) -> None:
    a = lobbyd("a")
    index = a.request("GET", "/v1/discoveries")[1]["x-lobby-index"]
    request = f"GET /v1/discoveries?index={index}&wait=1s HTTP/1.1\r\n" \
        "Host: localhost\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
        for _ in range(3):
            started = time.monotonic()
            status, headers, _body = exchange(s, request)
            assert status == 200 and headers["x-lobby-index"] == index
            assert time.monotonic() - started >= 0.9, "answered without waiting"
