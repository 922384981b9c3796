"""Cached answers (Api.cached): reused only within one registry version and second."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from lobbyd import Api, Registry, Request, Response


def make_api() -> tuple[Api, Registry]:
    registry = Registry(ttl=3600)
    daemon = SimpleNamespace(config=SimpleNamespace(token="", node_exporter_port=None),
                             registry=registry, expire=lambda: None)
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
    second.headers["X-Lobby-Index"] = "7"  # each request has headers of its own
    assert "X-Lobby-Index" not in api.cached(get(), ("test",), build, timed=False).headers


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
