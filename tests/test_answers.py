"""Cached answers (Api.cached): reused only within one registry version and second."""

from __future__ import annotations

import gzip
import os
import socket
import time
from types import SimpleNamespace

from lobbyd import (
    JSON_TYPE,
    Api,
    MemoryFile,
    Packet,
    Registry,
    Request,
    Response,
    Watchers,
    gzip_pieces,
    response_head,
)


def make_api() -> tuple[Api, Registry]:
    registry = Registry(ttl=3600)
    watch = Watchers(registry, lambda: Packet("me", ()), lambda: None, 9100)
    daemon = SimpleNamespace(config=SimpleNamespace(token="", node_exporter_port=None),
                             registry=registry, expire=lambda: None, watch=watch)
    return Api(daemon), registry  # type: ignore[arg-type]


def get() -> Request:
    return Request("GET", "/v1/discoveries", {}, "HTTP/1.1", {})


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
        answer = api.cached(get(), ("test",), build)
        assert answer.body == b"%d\n" % registry.version
    assert builds == list(range(1, 6))


def test_an_answer_is_reused_within_the_same_version() -> None:
    api, registry = make_api()
    registry.apply_hi("a", ("x",), time.time())
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"[]\n"

    first = api.cached(get(), ("test",), build, timed=False)
    second = api.cached(get(), ("test",), build, timed=False)
    assert builds == [1] and first.body == second.body
    index = first.headers["X-Lobby-Index"]
    second.headers["X-Lobby-Index"] = "7"  # each request has headers of its own
    assert api.cached(get(), ("test",), build, timed=False).headers["X-Lobby-Index"] == index


def test_discoveries_show_a_label_change_at_once() -> None:
    api, registry = make_api()
    now = time.time()
    for i in range(2000):
        registry.apply_hi(f"host{i:05}", ("old",), now)
    assert b'"old"' in body(api.discoveries(get()))
    registry.apply_hi("host00000", ("new",), now)
    assert b'"new"' in body(api.discoveries(get()))


def body(response: Response) -> bytes:
    """The body, also of a big answer kept in a memory file."""
    file = response.file
    if file is None:
        return response.body
    return os.pread(file.file.fileno(), file.length, len(file.head))


def test_a_big_answer_carries_its_index_in_the_memory_file() -> None:
    """The memory file's head is what the server would write for the response itself
    (X-Lobby-Index included), so one sendfile sends it: the same bytes as without."""
    api, registry = make_api()
    now = time.time()
    for i in range(2000):
        registry.apply_hi(f"host{i:05}", ("some-label",), now)
    response = api.with_index(api.discoveries(get()), ("all",))
    file = response.file
    assert file is not None, "a big answer is kept in a memory file"
    index = str(api.daemon.watch.index(("all",)))
    assert response.headers == file.headers == {"X-Lobby-Index": index}
    assert file.head == response_head(200, JSON_TYPE, file.length, True, response.headers)
    # what a request writes from memory and what sendfile sends from the file agree
    assert os.pread(file.file.fileno(), len(file.data) + 1, 0) == file.data
    assert file.data == file.head + body(response)
    gzipped = api.with_index(api.discoveries(Request(
        "GET", "/v1/discoveries", {}, "HTTP/1.1", {"accept-encoding": "gzip"})), ("all",))
    assert list(gzipped.headers.items()) == [("Content-Encoding", "gzip"),
                                             ("Vary", "Accept-Encoding"), ("X-Lobby-Index", index)]
    registry.apply_hi("host00000", ("other-label",), now)  # a change: a new index and body
    response = api.with_index(api.discoveries(get()), ("all",))
    assert int(response.headers["X-Lobby-Index"]) > int(index)
    assert response.file is not None and b"other-label" in body(response)
    assert response.file.head == response_head(200, JSON_TYPE, response.file.length, True,
                                               response.headers)


def test_an_answer_is_given_again_only_while_it_is_the_answer() -> None:
    """Response.again: what a repeated request head gets without the handler (the
    HttpServer's shortcut) is the same answer, and nothing once the registry changed."""
    api, registry = make_api()
    registry.apply_hi("a", ("x",), time.time())
    resolve = Request("GET", "/v1/resolve", {"label": ["x"]}, "HTTP/1.1", {})
    first = api.with_index(api.resolve(resolve), ("resolve", "x"))
    assert first.again is not None
    again = first.again()
    assert again is not None and (again.body, again.headers) == (first.body, first.headers)
    registry.apply_hi("b", ("x",), time.time())
    assert first.again() is None, "a new registry version: the request goes the whole way"
    second = api.with_index(api.resolve(resolve), ("resolve", "x"))
    assert second.body == b'[\n  "a",\n  "b"\n]\n'
    assert int(second.headers["X-Lobby-Index"]) > int(first.headers["X-Lobby-Index"])
    assert second.again is not None and second.again() is not None


def test_a_memory_file_writes_its_pieces_gathered_then_its_join() -> None:
    """The first write gathers the pieces as rendered (no join: an answer under label
    churn is sent once); later ones, and the head-less form, send the same bytes."""
    pieces = [b"[\n", b"a" * 5000, b"b" * 7000, b"\n]\n"]
    head = response_head(200, JSON_TYPE, sum(map(len, pieces)), True, {})
    file = MemoryFile(head, pieces, {}, sum(map(len, pieces)))
    assert file.length == sum(map(len, pieces))
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
