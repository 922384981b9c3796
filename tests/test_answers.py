"""Answers: reused only within one registry version and second; the bytes they go as."""

from __future__ import annotations

import gzip
import socket
import time
from types import SimpleNamespace

from lobbyd import (
    ALL,
    JSON_TYPE,
    Answers,
    Api,
    Packet,
    Prepared,
    Registry,
    Request,
    Response,
    View,
    Watchers,
    gzip_pieces,
    response_head,
)


def make_api() -> tuple[Api, Registry]:
    registry = Registry(ttl=3600)
    watch = Watchers(registry, lambda: Packet("me", ()), lambda: None, 9100)
    answers = Answers(registry, watch, lambda: None, 9100)
    config = SimpleNamespace(token="", port=1313, host="127.0.0.1", http_allowed_hosts=())
    local = SimpleNamespace(hostname="me")
    return Api(config, answers, watch, local, None), registry  # type: ignore[arg-type]


def get() -> Request:
    return Request("GET", "/v1/discoveries", {}, "HTTP/1.1", {})


def body(response: Response) -> bytes:
    """The body, also of an answer prepared with its head."""
    if response.prepared is None:
        return response.body
    return b"".join(map(bytes, response.prepared.body()))


def test_a_new_registry_version_always_gets_a_new_answer() -> None:
    """Even right after a slow build: a blocking query woken by a change must get a
    body that shows it (SPEC 8), and no answer may lag the registry (SPEC 5)."""
    api, registry = make_api()
    builds = []

    def build() -> bytes:
        time.sleep(0.03)  # a slow build (a big fleet), then asked again at once
        builds.append(registry.version)
        return b"%d\n" % registry.version

    for i in range(5):
        registry.apply_hi("a", (f"seq:{i}",), time.time())
        answer = api.answers.cached(get(), View("test"), build)
        assert body(answer) == b"%d\n" % registry.version
    assert builds == list(range(1, 6))


def test_an_answer_is_reused_within_the_same_version() -> None:
    api, registry = make_api()
    registry.apply_hi("a", ("x",), time.time())
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"[]\n"

    first = api.answers.cached(get(), View("test"), build, timed=False)
    second = api.answers.cached(get(), View("test"), build, timed=False)
    assert builds == [1] and body(first) == body(second)
    index = first.headers["X-Lobby-Index"]
    second.headers["X-Lobby-Index"] = "7"  # each request has headers of its own
    assert api.answers.cached(get(), View("test"), build, timed=False
                              ).headers["X-Lobby-Index"] == index


def test_discoveries_show_a_label_change_at_once() -> None:
    api, registry = make_api()
    now = time.time()
    for i in range(2000):
        registry.apply_hi(f"host{i:05}", ("old",), now)
    assert b'"old"' in body(api.answer(get(), ALL))
    registry.apply_hi("host00000", ("new",), now)
    assert b'"new"' in body(api.answer(get(), ALL))


def test_a_big_answer_carries_its_index_in_its_prepared_head() -> None:
    """The prepared head is what the server would write for the response itself
    (X-Lobby-Index included), so one write sends it: the same bytes as without."""
    api, registry = make_api()
    now = time.time()
    for i in range(2000):
        registry.apply_hi(f"host{i:05}", ("some-label",), now)
    response = api.answer(get(), ALL)
    file = response.prepared
    assert file is not None, "a big answer is prepared with its head"
    index = str(api.watchers.index(ALL))
    assert response.headers == file.headers == {"X-Lobby-Index": index}
    assert file.head == response_head(200, JSON_TYPE, file.length, True, response.headers)
    assert file.data == file.head + body(response)
    gzipped = api.answer(Request("GET", "/v1/discoveries", {}, "HTTP/1.1",
                                 {"accept-encoding": "gzip"}), ALL)
    assert list(gzipped.headers.items()) == [("Content-Encoding", "gzip"),
                                             ("Vary", "Accept-Encoding"), ("X-Lobby-Index", index)]
    registry.apply_hi("host00000", ("other-label",), now)  # a change: a new index and body
    response = api.answer(get(), ALL)
    assert int(response.headers["X-Lobby-Index"]) > int(index)
    assert response.prepared is not None and b"other-label" in body(response)
    assert response.prepared.head == response_head(200, JSON_TYPE, response.prepared.length,
                                                   True, response.headers)


def test_an_answer_is_given_again_only_while_it_is_the_answer() -> None:
    """Answers.repeated: what a repeated request head gets without the handler (the
    HttpServer's shortcut) is the same answer, and nothing once the registry changed."""
    api, registry = make_api()
    registry.apply_hi("a", ("x",), time.time())
    head = b"GET /v1/resolve?label=x HTTP/1.1\r\nHost: localhost\r\n\r\n"
    resolve = Request("GET", "/v1/resolve", {"label": ["x"]}, "HTTP/1.1", {"host": "h"},
                      head=head)
    first = api.answer(resolve, View.resolve("x"))
    again = api.at_once(head, float("inf"))
    assert again is not None and (again.data, again.headers) == (
        first.prepared.data, first.headers)
    registry.apply_hi("b", ("x",), time.time())
    assert api.at_once(head, float("inf")) is None, \
        "a new registry version: the request goes the whole way"
    second = api.answer(resolve, View.resolve("x"))
    assert body(second) == b'[\n  "a",\n  "b"\n]\n'
    assert int(second.headers["X-Lobby-Index"]) > int(first.headers["X-Lobby-Index"])
    assert api.at_once(head, float("inf")) is not None


def test_a_prepared_answer_writes_its_pieces_gathered_then_its_join() -> None:
    """The first write gathers the pieces as rendered (no join: an answer under label
    churn is sent once); later ones, and the head-less form, send the same bytes."""
    pieces = [b"[\n", b"a" * 5000, b"b" * 7000, b"\n]\n"]
    head = response_head(200, JSON_TYPE, sum(map(len, pieces)), True, {})
    file = Prepared(200, JSON_TYPE, pieces, {})
    assert file.length == sum(map(len, pieces)) and file.head == head
    whole = head + b"".join(pieces)
    for offset in (0, 0, len(head)):  # gathered, joined, joined without its head
        left, right = socket.socketpair()
        with left, right:
            sent = file.write_now(left.fileno(), offset)
            assert sent == len(whole) - offset
            got = b""
            while len(got) < sent:
                got += right.recv(1 << 16)
            assert got == whole[offset:]
        if offset == 0 and file.writes == 1:
            assert len(file.parts) == 1 + len(pieces), "joined before it had to be"
    assert file.data == whole and file.parts == (whole,)
    assert b"".join(map(bytes, file.body())) == b"".join(pieces)


def test_gzip_of_pieces_is_the_gzip_of_their_join() -> None:
    pieces = [b"[\n", b'{"hostname": "a"},\n' * 300, memoryview(b"x" * 70000)[5:], b"]\n"]
    packed = gzip_pieces(pieces)
    assert packed[:2] == b"\x1f\x8b" and packed[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    assert gzip.decompress(packed) == b"".join(map(bytes, pieces))
    assert len(packed) < 2000
