"""Watching for changes (SPEC 8): X-Lobby-Index, blocking queries, /v1/events.

Real nats-server, real lobbyd processes; simulated hosts speak raw NATS.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shlex
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import base_env, lobbyd_command, wait_for
from watchclient import SUBJECT, EventReader, envelope, get, hold, index_of, returned

import lobbyd as L

# --------------------------------------------------------------------------- helpers


class FakeFleet:
    """Simulated hosts on raw NATS: each one says hi every 0.3 s until it leaves."""

    def __init__(self, nats):
        self.client = nats.client()
        self.hosts: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            with self.lock:
                for name, labels in self.hosts.items():
                    self.client.publish_json(SUBJECT, envelope(name, labels))
                self.client.flush()
            time.sleep(0.3)

    def set(self, name: str, labels: list[str]) -> None:
        with self.lock:
            self.hosts[name] = labels
            self.client.publish_json(SUBJECT, envelope(name, labels))
            self.client.flush()

    def goodbye(self, name: str) -> None:
        with self.lock:
            self.hosts.pop(name, None)
            self.client.publish_json(SUBJECT, envelope(name, None, "goodbye"))
            self.client.flush()

    def silence(self, name: str) -> None:
        """Stop saying hi: the host expires after the daemon's TTL."""
        with self.lock:
            self.hosts.pop(name, None)

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=5)
        self.client.close()


@pytest.fixture
def fleet(nats):
    f = FakeFleet(nats)
    yield f
    f.close()


ROUTES = ["/", "/v1/discoveries", "/v1/discoveries?labels=service:db,service:replica",
          "/v1/discoveries?prefixes=service:", "/v1/resolve?label=service:db",
          "/v1/prometheus/node"]
MATCHING = ["service:db", "service:replica", "prometheus:node"]


def step(port: int, path: str, change) -> tuple[int, int, bytes]:
    """Hold `path` at its current index, make `change`, return (old, new index, body)."""
    before = index_of(port, path)
    held = hold(port, path, before)
    change()
    status, headers, body, _took = returned(held, timeout=15)
    assert status == 200, (status, body)
    after = int(headers["x-lobby-index"])
    assert after != before, (path, before, after)
    return before, after, body


# --------------------------------------------------------------------------- blocking queries


@pytest.mark.parametrize("path", ROUTES)
def test_blocking_query_wakes_on_join_label_change_goodbye_and_expiry(lobbyd, fleet, path):
    a = lobbyd("a", TTL="2", CLEAN_EVERY="1")
    fleet.set("g.test", ["other:1"])
    wait_for(lambda: "g.test" in a.hostnames(), what="g.test listed")

    _, _, body = step(a.port, path, lambda: fleet.set("h.test", MATCHING))
    assert b"h.test" in body or path.startswith("/v1/prometheus")
    _, _, body = step(a.port, path, lambda: fleet.set("g.test", ["other:1", *MATCHING]))
    assert b"g.test" in body or path.startswith("/v1/prometheus")
    _, _, body = step(a.port, path, lambda: fleet.goodbye("h.test"))
    assert b"h.test" not in body
    _, _, body = step(a.port, path, lambda: fleet.silence("g.test"))
    assert b"g.test" not in body


def test_keep_alives_never_wake_a_blocking_query_nor_move_an_index(lobbyd, fleet) -> None:
    a = lobbyd("a", LABELS="prometheus:node,service:db")
    lobbyd("b", LABELS="service:replica")
    fleet.set("g.test", MATCHING)
    wait_for(lambda: a.hostnames() == ["a", "b", "g.test"], what="a sees everyone")
    paths = [*ROUTES, "/v1/discovery"]
    before = {path: index_of(a.port, path) for path in paths}
    held = {path: hold(a.port, path, index) for path, index in before.items()}

    def last_check_of_b() -> int:
        return next(d["last_check"] for d in a.get_json("/v1/discoveries")
                    if d["hostname"] == "b")

    first = last_check_of_b()
    # three keep-alive periods (KEEP_ALIVE=1) of a, b and g.test with nothing new
    wait_for(lambda: last_check_of_b() >= first + 3, timeout=10, what="3 keep-alives of b")
    assert not [path for path, future in held.items() if future.done()]
    assert {path: index_of(a.port, path) for path in paths} == before
    fleet.set("new.test", MATCHING)  # touches every answer of the fleet
    a.request("POST", "/v1/labels", body="service:new")  # and the local one
    for path, future in held.items():
        status, headers, _body, _took = returned(future)
        assert status == 200 and int(headers["x-lobby-index"]) != before[path], path


def test_a_change_wakes_only_the_answers_it_touches(lobbyd, fleet) -> None:
    a = lobbyd("a")
    fleet.set("g.test", ["other:1"])
    wait_for(lambda: "g.test" in a.hostnames(), what="g.test listed")
    paths = {"web": "/v1/discoveries?labels=service:web",
             "db": "/v1/discoveries?labels=service:db",
             "prefix": "/v1/discoveries?prefixes=service:",
             "resolve-db": "/v1/resolve?label=service:db",
             "prom-other": "/v1/prometheus/other",
             "all": "/v1/discoveries"}
    before = {name: index_of(a.port, path) for name, path in paths.items()}
    held = {name: hold(a.port, path, before[name]) for name, path in paths.items()}
    fleet.set("g.test", ["other:1", "service:web"])
    for name in ("web", "prefix", "all"):
        assert returned(held[name])[0] == 200
    for name in ("db", "resolve-db", "prom-other"):
        assert index_of(a.port, paths[name]) == before[name], name
        assert not held[name].done(), name
    fleet.set("g.test", ["other:1", "service:web", "service:db"])
    for name in ("db", "resolve-db"):
        status, headers, body, _ = returned(held[name])
        assert status == 200 and b"g.test" in body
        assert int(headers["x-lobby-index"]) != before[name]
    assert index_of(a.port, paths["prom-other"]) == before["prom-other"]
    assert not held["prom-other"].done()
    fleet.set("g.test", ["prometheus:other:port:9999"])
    status, _headers, body, _ = returned(held["prom-other"])
    assert status == 200 and json.loads(body) == [{"Targets": ["g.test:9999"], "Labels": {}}]


def test_local_discovery_wakes_on_a_label_change(lobbyd) -> None:
    a = lobbyd("a", REGISTER="false")  # no registry change: only the local packet moves
    _, _, body = step(a.port, "/v1/discovery",
                      lambda: a.request("POST", "/v1/labels", body="service:x"))
    assert json.loads(body)["labels"] == ["service:x"]


def test_wait_bounds_and_an_outdated_index(lobbyd) -> None:
    a = lobbyd("a")
    index = index_of(a.port, "/v1/discoveries")
    status, headers, body, took = returned(hold(a.port, "/v1/discoveries", index, "1s"))
    assert status == 200 and int(headers["x-lobby-index"]) == index and took >= 0.95
    assert json.loads(body)[0]["hostname"] == "a"
    status, headers, _body, _took = returned(hold(a.port, "/v1/discoveries", index, "0"))
    assert status == 200 and int(headers["x-lobby-index"]) == index
    # any other index answers at once
    # (held, it would wait the default 5 min: the 10 s of returned() tells them apart)
    status, headers, _body, _took = returned(hold(a.port, "/v1/discoveries", index + 1))
    assert status == 200 and int(headers["x-lobby-index"]) == index
    assert L.parse_wait("20m") == L.MAX_WAIT == 600 and L.parse_wait(None) == 300


@pytest.mark.parametrize("query", ["index=-1", "index=abc", "index=1.5", "index=",
                                   "index=1&wait=5x", "index=1&wait=-1", "index=1&wait=1m30s",
                                   "wait=soon"])
def test_malformed_index_or_wait_is_400(lobbyd, query) -> None:
    a = lobbyd("a")
    for path in ("/v1/discoveries?", "/v1/resolve?label=x&", "/v1/prometheus/node?",
                 "/v1/discovery?"):
        status, _headers, body = get(a.port, path + query)
        assert status == 400, (path, query, body)


def test_held_requests_and_streams_end_at_once_on_sigterm(lobbyd) -> None:
    a = lobbyd("a")
    index = index_of(a.port, "/v1/discoveries")
    held = socket.create_connection(("127.0.0.1", a.port), timeout=5)
    held.sendall(f"GET /v1/discoveries?index={index}&wait=5m HTTP/1.1\r\nHost: localhost\r\n\r\n"
                 .encode())
    events = EventReader(a.port)
    events.wait(1)
    started = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    code = a.proc.wait(timeout=5)
    took = time.monotonic() - started
    assert code == 0 and took < 2.0, (code, took)
    wait_for(lambda: events.closed, what="the event stream closed")  # its process is gone
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := held.recv(65536):  # answered, then closed (or closed at once)
            answer += chunk
    assert answer == b"" or answer.startswith(b"HTTP/1.1 200 ")
    held.close()


# --------------------------------------------------------------------------- events


def test_events_sequence_on_two_peers_with_and_without_a_filter(lobbyd) -> None:
    # a's TTL: b's and c's keep-alives (every 1 s) may come 3 s late on a loaded machine
    # before a spurious "left"/"joined" pair spoils the sequence; c's expiry still shows
    a = lobbyd("a", LABELS="role:watcher", TTL="4")
    everything = EventReader(a.port)
    services = EventReader(a.port, "?prefixes=service:")
    assert everything.wait(1)[0] == ("snapshot", everything.events[0][1], [
        {"hostname": "a", "labels": ["role:watcher"],
         "last_check": everything.events[0][2][0]["last_check"]}])
    assert services.wait(1)[0][0::2] == ("snapshot", [])

    b = lobbyd("b", LABELS="service:web")
    everything.wait(2), services.wait(2)
    c = lobbyd("c", LABELS="role:x", TTL="60")
    everything.wait(3)
    b.request("POST", "/v1/labels", body="service:api")
    everything.wait(4), services.wait(3)
    c.request("POST", "/v1/labels", body="service:db")
    everything.wait(5), services.wait(4)
    c.request("DELETE", "/v1/labels", body="service:db")
    everything.wait(6), services.wait(5)
    b.stop()
    everything.wait(7), services.wait(6)
    c.kill()
    everything.wait(8, timeout=15)

    def shape(events):
        out = []
        for event, _id, data in events[1:]:
            if event == "left":
                out.append((event, data["hostname"], data["reason"]))
            else:
                out.append((event, data["hostname"], data["labels"]))
        return out

    assert shape(everything.events) == [
        ("joined", "b", ["service:web"]),
        ("joined", "c", ["role:x"]),
        ("changed", "b", ["service:api", "service:web"]),
        ("changed", "c", ["role:x", "service:db"]),
        ("changed", "c", ["role:x"]),
        ("left", "b", "goodbye"),
        ("left", "c", "expired"),
    ]
    assert shape(services.events) == [
        ("joined", "b", ["service:web"]),
        ("changed", "b", ["service:api", "service:web"]),
        ("joined", "c", ["service:db"]),
        ("left", "c", "unmatched"),
        ("left", "b", "goodbye"),
    ]
    for reader in (everything, services):
        ids = [event_id for _event, event_id, _data in reader.events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # the last id is the index of the same answer
    assert services.events[-1][1] == index_of(a.port, "/v1/discoveries?prefixes=service:")
    assert b"text/event-stream" in everything.head and b"X-Lobby-Index" in everything.head
    everything.close(), services.close()


def test_a_slow_event_reader_is_cut_off_while_a_fast_one_keeps_up(lobbyd, fleet) -> None:
    a = lobbyd("a")
    fast = EventReader(a.port)
    fast.wait(1)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", a.port))
    slow.sendall(b"GET /v1/events HTTP/1.1\r\nHost: localhost\r\n\r\n")  # and never reads
    big = [f"big:{i:04d}:" + "x" * 900 for i in range(300)]  # ~280 KB a packet
    changes = 40
    for i in range(changes):
        fleet.set("big.test", [*big, f"n:{i}"])
        # pace the changes so each is its own event for the fast reader
        wait_for(lambda i=i: len(fast.events) >= i + 2, timeout=20, what=f"change {i}")
    assert [event for event, _id, _data in fast.events[1:]] == ["joined"] + \
        ["changed"] * (changes - 1)
    wait_for(lambda: "reads too slowly" in a.logs(), timeout=10, what="the slow one dropped")
    slow.settimeout(10)
    received = 0
    with pytest.raises(OSError):  # reset: the server aborted it
        while True:
            chunk = slow.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("closed")
            received += len(chunk)
    assert received < changes * 280_000
    slow.close()
    assert get(a.port, "/v1/discovery")[0] == 200
    fast.close()


def test_events_filters_labels_and_heartbeat_constant(lobbyd, fleet) -> None:
    a = lobbyd("a")
    reader = EventReader(a.port, "?labels=service:db")
    assert reader.wait(1)[0][0::2] == ("snapshot", [])
    fleet.set("x.test", ["service:web"])
    fleet.set("y.test", ["service:db", "service:web"])
    events = reader.wait(2)
    assert events[1][0] == "joined" and events[1][2]["hostname"] == "y.test"
    assert events[1][2]["labels"] == ["service:db"]
    fleet.set("x.test", ["service:web", "other"])  # outside the filter: no event
    fleet.goodbye("y.test")
    events = reader.wait(3)
    assert [e[0::2] for e in events[2:]] == [("left", {"hostname": "y.test",
                                                       "reason": "goodbye"})]
    assert L.STREAM_HEARTBEAT <= 15
    reader.close()


# --------------------------------------------------------------------------- pure functions


def test_parse_index_and_wait() -> None:
    assert L.parse_index(None) is None and L.parse_index("0") == 0
    assert L.parse_index("123") == 123
    for bad in ("-1", "x", "", "1e3", " "):
        with pytest.raises(L.HttpError):
            L.parse_index(bad)
    assert L.parse_wait("30s") == 30 and L.parse_wait("5m") == 300 and L.parse_wait("90") == 90
    assert L.parse_wait("250ms") == 0.25 and L.parse_wait("2h") == 600
    for bad in ("", "5x", "-1", "m", "1m30s", "1 s"):
        with pytest.raises(L.HttpError):
            L.parse_wait(bad)


def test_view_changes_per_view() -> None:
    hosts = {"h": [("prometheus:node", "service:db", "x"), 0.0],
             "k": [("service:web",), 0.0]}
    changes = {"h": (("service:db", "x"), ""), "k": (None, ""), "gone": (("service:db",),
                                                                          "expired")}
    assert L.view_changes(L.ALL, changes, hosts, 9100) == [
        ("changed", "h", ("prometheus:node", "service:db", "x")),
        ("joined", "k", ("service:web",)),
        ("left", "gone", "expired")]
    # only the labels that match count: h's db label is unchanged
    assert L.view_changes(L.View("labels", ("service:db",)), changes, hosts, 9100) == [
        ("left", "gone", "expired")]
    assert L.view_changes(L.View("prefixes", prefixes=("service:",)), changes, hosts, 9100) == [
        ("joined", "k", ("service:web",)), ("left", "gone", "expired")]
    assert L.view_changes(L.View.resolve("service:web"), changes, hosts, 9100) == [
        ("joined", "k", True)]
    assert L.view_changes(L.View.job("node"), changes, hosts, 9100) == [
        ("joined", "h", {"Targets": ["h:9100"], "Labels": {}})]
    unmatched = {"h": (("service:db", "x"), "")}
    hosts2 = {"h": [("x",), 0.0]}
    assert L.view_changes(L.View("labels", ("service:db",)), unmatched, hosts2, 9100) == [
        ("left", "h", "unmatched")]
    assert L.view_changes(L.ALL, changes, hosts, 9100, first_only=True) == [
        ("changed", "h", ("prometheus:node", "service:db", "x"))]


def test_registry_changes_keep_the_first_before_and_the_reason() -> None:
    registry = L.Registry(ttl=10)
    registry.apply_hi("h", ("a",), 100.0)
    registry.apply_hi("h", ("b",), 101.0)
    registry.apply_hi("k", ("a",), 101.0)
    assert registry.take_changes() == {"h": (None, ""), "k": (None, "")}
    registry.apply_hi("h", ("b",), 102.0)  # a keep-alive: nothing
    assert registry.take_changes() == {}
    registry.apply_hi("h", ("c",), 103.0)
    registry.apply_goodbye("h")
    registry.expire(112.0)
    assert registry.take_changes() == {"h": (("b",), "goodbye"), "k": (("a",), "expired")}


def test_sse_framing() -> None:
    assert L.sse_event("joined", '{"a":1}', 7) == b'id: 7\nevent: joined\ndata: {"a":1}\n\n'
    assert L.sse_event("snapshot", "[\n1\n]") == b"event: snapshot\ndata: [\ndata: 1\ndata: ]\n\n"
    hosts = {"h": [("x",), 12.7]}
    text = L.stream_events([("changed", "h", ("x",)), ("left", "k", "goodbye")], hosts, 3)
    assert text == (b'id: 3\nevent: changed\ndata: {"hostname":"h","labels":["x"],'
                    b'"last_check":12}\n\nid: 3\nevent: left\ndata: {"hostname":"k",'
                    b'"reason":"goodbye"}\n\n')


def test_watchers_index_moves_only_with_content() -> None:
    registry = L.Registry(ttl=10)
    local = L.Packet("me", ("a",))
    watch = L.Watchers(registry, lambda: local, lambda: None, 9100)
    first = watch.index(L.ALL)
    db = watch.index(L.View("labels", ("service:db",)))
    registry.apply_hi("h", ("service:web",), 1.0)
    assert watch.index(L.ALL) > first and watch.index(L.View("labels", ("service:db",))) == db
    registry.apply_hi("h", ("service:web",), 2.0)
    assert watch.index(L.ALL) == watch.index(L.ALL)
    unchanged = watch.index(L.ALL)
    registry.apply_hi("h", ("service:web",), 3.0)
    assert watch.index(L.ALL) == unchanged
    mine = watch.index(L.LOCAL)
    local = L.Packet("me", ("a", "b"))
    watch.poke()  # as Daemon.set_labels() does
    assert watch.index(L.LOCAL) > mine and watch.index(L.ALL) == unchanged


def test_streams_and_held_requests_count_against_the_connection_limit(lobbyd, monkeypatch):
    # 260 descriptors: connection_limit() = 260 - backlog 128 - 64 spare = 68
    monkeypatch.setenv("LOBBYD_CMD", "prlimit --nofile=260:260 " +
                       " ".join(shlex.quote(arg) for arg in lobbyd_command()))
    a = lobbyd("a")
    index = index_of(a.port, "/v1/discoveries")
    held = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
        s.sendall(f"GET /v1/discoveries?index={index} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        held.append(s)
    streams = [EventReader(a.port) for _ in range(28)]
    for reader in streams:
        reader.wait(1)
    # 68 connections in use, none idle: the next one gets a slot reserved for health
    # checks, where anything else is answered 503 at once
    with socket.create_connection(("127.0.0.1", a.port), timeout=5) as extra:
        extra.sendall(b"GET /v1/discovery HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert extra.recv(100).startswith(b"HTTP/1.1 503 ")
    streams[0].close()
    wait_for(lambda: get(a.port, "/v1/discovery", timeout=2)[0] == 200, timeout=5,
             what="a slot free again once a stream ends")
    streams[0] = EventReader(a.port)  # full again
    streams[0].wait(1)
    # a client that leaves a held request frees its slot too (the request is let go)
    held.pop().shutdown(socket.SHUT_RDWR)
    wait_for(lambda: get(a.port, "/v1/discovery", timeout=2)[0] == 200, timeout=8,
             what="a slot free again once a held request's client left")
    for s in held:
        s.close()
    for reader in streams:
        reader.close()


def test_touched_views_by_changed_labels() -> None:
    every_host, db, seq, service, node = (
        L.ALL, L.View("labels", ("service:db",)), L.View.resolve("seq:1"),
        L.View("prefixes", prefixes=("service:",)), L.View.job("node"))
    views = [every_host, db, seq, service, node]
    by_label: dict[str, set] = {}
    by_prefix = {}
    everything = set()
    for key in views:
        labels, prefixes, every = key.triggers()
        for label in labels:
            by_label.setdefault(label, set()).add(key)
        if prefixes:
            by_prefix[key] = prefixes
        if every:
            everything.add(key)
    hosts = {"h": [("seq:2", "service:web"), 0.0], "j": [("prometheus:node:port:1",), 0.0],
             "back": [("x",), 0.0]}
    changes = {"h": (("seq:1", "service:web"), ""),  # seq changed: only resolve seq:1
               "j": (None, ""),                      # joined: prometheus node
               "back": (("x",), ""),                 # changed and changed back: nothing
               "gone": (("service:db",), "goodbye")}
    found = L.touched_views(changes, hosts, by_label, by_prefix, everything)
    assert {key: sorted(subset) for key, subset in found.items()} == {
        every_host: ["gone", "h", "j"], seq: ["h"], node: ["j"], db: ["gone"],
        service: ["gone"]}


def test_lobbyctl_watch_prints_each_change(lobbyd) -> None:
    a = lobbyd("a", LABELS="role:watcher")
    env = {**base_env(), "PORT": str(a.port), "NO_COLOR": "1"}
    lines: queue.Queue[str] = queue.Queue()
    procs = []
    for extra in ([], ["-json"]):
        proc = subprocess.Popen([*lobbyd_command(), "ctl", *extra, "watch", "search",
                                 "service:"], env=env, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        threading.Thread(target=lambda p=proc, tag=bool(extra): [
            lines.put(("json" if tag else "plain", line.rstrip("\n"))) for line in p.stdout],
            daemon=True).start()

    seen: list[tuple[str, str]] = []
    used: set[int] = set()

    def expect(kind: str, pattern: str) -> str:
        """The first line of `kind` not matched before that matches; others wait."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for number, (got_kind, line) in enumerate(seen):
                if number not in used and got_kind == kind and re.search(pattern, line):
                    used.add(number)
                    return line
            try:
                seen.append(lines.get(timeout=0.2))
            except queue.Empty:
                continue
        raise AssertionError(f"no {kind} line matching {pattern!r}: {seen}")

    try:
        expect("plain", r"^\(no servers\)$")
        assert json.loads(expect("json", '"snapshot"')) == {"event": "snapshot", "data": []}
        b = lobbyd("b", LABELS="service:web,role:x")
        assert re.fullmatch(r"joined +b +service:web", expect("plain", r"^joined"))
        assert json.loads(expect("json", '"joined"'))["data"]["labels"] == ["service:web"]
        b.stop()
        assert re.fullmatch(r"left +b \(goodbye\)", expect("plain", r"^left"))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)  # the static binary removes its unpacked archive
            except subprocess.TimeoutExpired:  # killed: its status fails the test below,
                proc.kill()  # and the error above (if any) is not hidden by this one
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0]
    bad = subprocess.run([*lobbyd_command(), "ctl", "watch", "nonsense"], env=env,
                         capture_output=True, text=True, timeout=10)
    assert bad.returncode == 2 and "watch [labels" in bad.stderr


def test_token_guards_events_labels_and_blocking_queries(lobbyd) -> None:
    a = lobbyd("a", start=False, TOKEN="s3cret")
    a.start(wait=False)
    auth = {"Authorization": "Token s3cret"}
    wait_for(lambda: a.request("GET", "/v1/discovery", headers=auth)[0] == 200, what="API up")
    for path in ("/v1/events", "/v1/labels", "/v1/discoveries?index=1&wait=1s"):
        assert a.request("GET", path)[0] == 403, path
    assert a.request("GET", "/v1/labels", headers=auth)[0] == 200
    status, headers, _body = a.request("GET", "/v1/discoveries?index=0&wait=0", headers=auth)
    assert status == 200 and int(headers["x-lobby-index"]) > 0
    status, headers, body = a.request("HEAD", "/v1/events", headers=auth)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body == b""


def test_registry_packets_having_some_labels() -> None:
    registry = L.Registry(ttl=10)
    registry.apply_hi("b", ("service:db", "x"), 1.0)
    registry.apply_hi("a", ("service:web",), 2.0)
    registry.apply_hi("c", ("service:db", "service:web"), 3.0)
    assert [p.hostname for p in registry.packets()] == ["a", "b", "c"]
    assert registry.packets(having=["service:db"]) == [
        L.Packet("b", ("service:db", "x"), 1), L.Packet("c", ("service:db", "service:web"), 3)]
    assert [p.hostname for p in registry.packets(having=("nothing", "service:web"))] == ["a", "c"]
