"""Consul's API, read-only (the consul views): the pure parts, the index moving exactly
with each answer, and the request sequences of Consul's clients that cannot be
installed here (Prometheus consul_sd, consul-template, Fabio), replayed as raw HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable

import pytest
from conftest import Lobbyd, wait_for

from lobbyd import (
    MAX_WAIT,
    Answers,
    Api,
    ConsulNode,
    ConsulRenderer,
    HttpError,
    Packet,
    Registry,
    Request,
    Response,
    Service,
    Watchers,
    consul_filters,
    consul_node_id,
    consul_request_view,
    consul_shows,
    consul_view,
    parse_consul_wait,
)

WEB = ("service:web", "service:web:port:8080", "service:web:tag:v1", "service:web:tag:eu",
       "role:db", "address:10.0.0.1")


# ----------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("given", "seconds"), [
    ("120000ms", 120.0), ("5m", 300.0), ("30s", 30.0), ("1m30s", 90.0), ("90", 90.0),
    ("1.5s", 1.5), ("250ms", 0.25), ("1h", MAX_WAIT), ("2h30m", MAX_WAIT)])
def test_wait_takes_go_durations(given: str, seconds: float) -> None:
    assert parse_consul_wait(given) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5x", "m", "-1s", "1s m", "ms5"])
def test_a_bad_wait_is_a_400(bad: str) -> None:
    with pytest.raises(HttpError) as caught:
        parse_consul_wait(bad)
    assert caught.value.status == 400 and "wait=" in caught.value.message


def test_the_view_of_a_request() -> None:
    def request(query: dict[str, list[str]]) -> Request:
        return Request("GET", "/v1/health/service/web", query, "HTTP/1.1", {})

    view = consul_request_view(request({"tag": ["b", "a", "b"], "node-meta": ["role:db"],
                                        "stale": [""], "filter": ["x == y"], "near": ["_agent"]}),
                               "health", "web", "lobby")
    assert view == consul_view("health", "web", ("a", "b"), ("role:db",))
    assert consul_filters(view) == (("a", "b"), (("role", "db"),))
    # another datacenter: Consul's empty shapes, whatever else is asked
    assert consul_request_view(request({"dc": ["elsewhere"]}), "health", "web", "lobby") == \
        consul_view("nothing", "[]")
    assert consul_request_view(request({"dc": ["elsewhere"]}), "services", "", "lobby") == \
        consul_view("nothing", "{}")
    assert consul_request_view(request({"dc": ["lobby"]}), "services", "", "lobby") == \
        consul_view("services")
    # tags filter service routes only
    assert consul_request_view(request({"tag": ["a"]}), "nodes", "", "lobby") == \
        consul_view("nodes")


def test_what_a_view_shows_of_a_host() -> None:
    node = ConsulNode("10.0.0.1", (("role", "db"),),
                      (Service("web", 8080, "", ("v1", "eu"), ()),))
    assert consul_shows(consul_view("health", "web"), "h", WEB) == (node, node.services[0])
    assert consul_shows(consul_view("health", "smtp"), "h", WEB) is None
    assert consul_shows(consul_view("health", "web", ("v1", "eu")), "h", WEB) is not None
    assert consul_shows(consul_view("health", "web", ("v1", "us")), "h", WEB) is None
    assert consul_shows(consul_view("health", "web", (), ("role:db",)), "h", WEB) is not None
    assert consul_shows(consul_view("health", "web", (), ("role:api",)), "h", WEB) is None
    assert consul_shows(consul_view("service-checks", "web"), "h", WEB) == ("web", ("v1", "eu"))
    assert consul_shows(consul_view("services"), "h", WEB) == (("web", ("v1", "eu")),)
    assert consul_shows(consul_view("services"), "h", ("role:db",)) is None
    assert consul_shows(consul_view("nodes"), "h", WEB) == ("10.0.0.1", (("role", "db"),))
    assert consul_shows(consul_view("nodes"), "h", ()) == ("", ())  # "": the hostname
    assert consul_shows(consul_view("checks"), "h", ()) == ()  # its node check alone
    assert consul_shows(consul_view("node", "h"), "h", WEB) == node
    assert consul_shows(consul_view("node", "other"), "h", WEB) is None
    assert consul_shows(consul_view("nothing", "[]"), "h", WEB) is None


def render(registry: Registry, view_args: tuple[Any, ...], datacenter: str = "lobby") -> Any:
    renderer = ConsulRenderer(datacenter)
    api = make_api(registry)[0]
    view = consul_view(*view_args)
    return json.loads(renderer.render(view, registry, api.answers.renderer(view)))


def test_consul_shapes() -> None:
    registry = Registry(ttl=3600)
    now = time.time()
    registry.apply_hi("a", WEB, now)
    registry.apply_hi("b", ("service:web", "service:web:address:192.0.2.9", "service:smtp",
                            "service:smtp:meta:version:2"), now)
    registry.apply_hi("c", ("role:cache",), now)
    assert render(registry, ("services",)) == {"smtp": [], "web": ["eu", "v1"]}
    a, b = render(registry, ("service", "web"))
    assert a["ID"] == consul_node_id("a") and a["Node"] == "a" and a["Address"] == "10.0.0.1"
    assert (a["Datacenter"], a["NodeMeta"], a["ServiceID"], a["ServiceName"]) == \
        ("lobby", {"role": "db"}, "web", "web")
    assert (a["ServiceAddress"], a["ServicePort"], a["ServiceTags"]) == ("", 8080, ["v1", "eu"])
    assert (b["Address"], b["ServiceAddress"], b["ServicePort"]) == ("b", "192.0.2.9", 0)
    (entry,) = render(registry, ("health", "web", ("v1",)))
    assert entry["Node"]["Node"] == "a" and entry["Node"]["ID"] == consul_node_id("a")
    assert entry["Service"] == {"ID": "web", "Service": "web", "Tags": ["v1", "eu"],
                                "Address": "", "Meta": {}, "Port": 8080,
                                "Weights": {"Passing": 1, "Warning": 1},
                                "EnableTagOverride": False}
    assert [(c["CheckID"], c["Status"], c["ServiceID"]) for c in entry["Checks"]] == \
        [("serfHealth", "passing", ""), ("service:web", "passing", "web")]
    checks = render(registry, ("checks",))
    assert [(c["Node"], c["CheckID"]) for c in checks] == [
        ("a", "serfHealth"), ("a", "service:web"), ("b", "serfHealth"), ("b", "service:smtp"),
        ("b", "service:web"), ("c", "serfHealth")]
    assert [c["Node"] for c in render(registry, ("service-checks", "web"))] == ["a", "b"]
    assert [c["CheckID"] for c in render(registry, ("node-checks", "c"))] == ["serfHealth"]
    assert [n["Node"] for n in render(registry, ("nodes",))] == ["a", "b", "c"]
    assert [n["Node"] for n in render(registry, ("nodes", "", (), ("role:cache",)))] == ["c"]
    node = render(registry, ("node", "b"))
    assert node["Node"]["Address"] == "b" and node["Services"]["smtp"]["Meta"] == \
        {"version": "2"}
    assert render(registry, ("node", "nobody")) is None
    assert render(registry, ("datacenters",), "eu-1") == ["eu-1"]
    assert render(registry, ("nothing", "{}")) == {}
    assert render(Registry(ttl=1), ("service", "web")) == []


# ------------------------------------------------------- the answer path, in-process


def make_api(registry: Registry | None = None) -> tuple[Api, Registry]:
    registry = registry or Registry(ttl=3600)
    watch = Watchers(registry, lambda: Packet("me", ()), lambda: None, 9100)
    answers = Answers(registry, watch, lambda: None, 9100)
    config = SimpleNamespace(token="", port=1313, host="127.0.0.1", http_allowed_hosts=())
    local = SimpleNamespace(hostname="me")
    return Api(config, answers, watch, local, None), registry  # type: ignore[arg-type]


def ask(api: Api, target: str) -> Response:
    path, _, query = target.partition("?")
    params: dict[str, list[str]] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        params.setdefault(key, []).append(value)
    return asyncio.run(api.handle(Request("GET", path, params, "HTTP/1.1", {})))


def index_of(api: Api, target: str) -> int:
    response = ask(api, target)
    assert response.status == 200
    return int(response.headers["X-Consul-Index"])


def test_each_answer_index_moves_exactly_when_its_body_does() -> None:
    api, registry = make_api()
    registry.apply_hi("a", WEB, time.time())
    registry.apply_hi("b", ("role:cache",), time.time())
    targets = ["/v1/health/service/web", "/v1/catalog/service/web?tag=v1",
               "/v1/catalog/services", "/v1/catalog/nodes", "/v1/health/state/any",
               "/v1/catalog/node/a", "/v1/health/checks/web", "/v1/catalog/datacenters"]

    def bodies() -> dict[str, tuple[int, bytes]]:
        found = {}
        for target in targets:
            response = ask(api, target)
            body = b"".join(map(bytes, response.prepared.body()))  # type: ignore[union-attr]
            found[target] = (int(response.headers["X-Consul-Index"]), body)
        return found

    before = bodies()
    assert all(index >= 1 for index, _ in before.values())
    for labels in [("role:cache", "zone:x"),  # b's metadata: catalog/nodes alone
                   (*WEB, "zone:x"),  # a's metadata: everything showing a's node
                   (*WEB, "zone:x", "service:web:tag:new"),  # a tag: services too
                   (*WEB, "zone:x", "service:web:tag:new", "other"),  # nothing
                   # b offers web with a tag a has: the union of services stays
                   ("role:cache", "zone:x", "service:web", "service:web:tag:v1")]:
        host = "b" if labels[0] == "role:cache" else "a"
        registry.apply_hi(host, labels, time.time())
        after = bodies()
        for target in targets:
            moved = after[target][0] != before[target][0]
            changed = after[target][1] != before[target][1]
            assert moved == changed, (labels, target, moved, changed)
        before = after
    assert before["/v1/catalog/datacenters"][0] == bodies()["/v1/catalog/datacenters"][0]


def test_lobby_answers_keep_their_own_headers() -> None:
    api, registry = make_api()
    registry.apply_hi("a", WEB, time.time())
    response = ask(api, "/v1/discoveries")
    assert "X-Lobby-Index" in response.headers and "X-Consul-Index" not in response.headers
    response = ask(api, "/v1/health/service/web")
    assert "X-Lobby-Index" not in response.headers
    assert (response.headers["X-Consul-KnownLeader"], response.headers["X-Consul-LastContact"]
            ) == ("true", "0")


def test_writes_are_refused_and_say_where_labels_go() -> None:
    api, _registry = make_api()
    for method, path in [("PUT", "/v1/agent/service/register"), ("PUT", "/v1/catalog/register"),
                         ("PUT", "/v1/kv/fabio/config"), ("DELETE", "/v1/kv/x"),
                         ("POST", "/v1/catalog/services"), ("PUT", "/v1/agent/self")]:
        response = asyncio.run(api.handle(Request(method, path, {}, "HTTP/1.1", {})))
        assert response.status == 405, (method, path)
        assert b"read-only" in response.body and b"/v1/labels" in response.body
    assert ask(api, "/v1/agent/services").status == 404
    assert ask(api, "/v1/health/state/bogus").status == 400
    assert ask(api, "/v1/health/service/web?wait=soon&index=1").status == 400


# ------------------------------------------- the clients' request sequences, raw HTTP


def get(daemon: Lobbyd, target: str, timeout: float = 5,
        **headers: str) -> tuple[int, dict[str, str], Any]:
    status, found, body = daemon.request("GET", target, headers=headers, timeout=timeout)
    return status, found, json.loads(body) if "json" in found.get("content-type", "") else body


def held(daemon: Lobbyd, target: str) -> Callable[[], tuple[int, dict[str, str], Any]]:
    """Start a blocking request in a thread; the returned callable joins it (10 s).
    Its client waits up to 60 s, not Lobbyd.request's 5 s: it is held across the test's
    own steps (POSTs, a second of still_held), which a loaded machine may make longer."""
    result: list[Any] = []
    started = time.monotonic()

    def run() -> None:
        result.append(get(daemon, target, timeout=60))
        join.seconds = time.monotonic() - started  # type: ignore[attr-defined]

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> tuple[int, dict[str, str], Any]:
        thread.join(10)
        assert not thread.is_alive(), f"{target} still held"
        return result[0]
    join.thread = thread  # type: ignore[attr-defined]
    return join


def still_held(join: Callable[[], Any], seconds: float = 1.0) -> bool:
    join.thread.join(seconds)  # type: ignore[attr-defined]
    return join.thread.is_alive()  # type: ignore[attr-defined]


def test_prometheus_consul_sd_sequence(lobbyd: Callable[..., Lobbyd]) -> None:
    """What prometheus/discovery/consul asks: the agent's datacenter, the services
    (stale, blocking), then each service's healthy instances (with its tags)."""
    a = lobbyd("a", LABELS=",".join(WEB))
    b = lobbyd("b", LABELS="service:web,service:web:port:9090,role:cache")
    wait_for(lambda: len(a.hostnames()) == 2)
    _, _, agent = get(a, "/v1/agent/self")
    assert agent["Config"]["Datacenter"] == "lobby"
    status, headers, services = get(a, "/v1/catalog/services?stale=&wait=120000ms")
    index = int(headers["x-consul-index"])
    assert status == 200 and index > 0 and services == {"web": ["eu", "v1"]}
    status, headers, entries = get(a, "/v1/health/service/web?stale=&tag=v1&wait=120000ms")
    assert [(e["Node"]["Address"], e["Node"]["Node"], e["Node"]["Meta"],
             e["Node"]["TaggedAddresses"]["lan"], e["Service"]["ID"], e["Service"]["Address"],
             e["Service"]["Port"], e["Service"]["Tags"], e["Service"]["Meta"],
             [c["Status"] for c in e["Checks"]]) for e in entries] == [
        ("10.0.0.1", "a", {"role": "db"}, "10.0.0.1", "web", "", 8080, ["eu", "v1"], {},
         ["passing", "passing"])]
    service_index = int(headers["x-consul-index"])
    wait = held(a, f"/v1/health/service/web?stale=&tag=v1&index={service_index}&wait=120000ms")
    services_wait = held(a, f"/v1/catalog/services?stale=&index={index}&wait=120000ms")
    assert b.request("POST", "/v1/labels", "service:web:tag:v1")[0] == 200
    _, headers, entries = wait()
    assert int(headers["x-consul-index"]) > service_index
    assert [e["Node"]["Node"] for e in entries] == ["a", "b"]
    assert still_held(services_wait), "web's tags did not change: v1 was there"
    assert b.request("POST", "/v1/labels", "service:db")[0] == 200
    _, headers, services = services_wait()
    assert services == {"db": [], "web": ["eu", "v1"]} and int(headers["x-consul-index"]) > index


def test_consul_template_sequence(lobbyd: Callable[..., Lobbyd]) -> None:
    """consul-template's dependencies, each a blocking query; an index lower than the
    current one (a restarted server) answers at once, and the client starts over."""
    a = lobbyd("a", LABELS=",".join(WEB))
    lobbyd("b", LABELS="service:web,role:cache")
    wait_for(lambda: len(a.hostnames()) == 2)
    joins = []
    for target, check in [
            ("/v1/catalog/services", lambda v: v == {"web": ["eu", "v1"]}),
            ("/v1/health/service/web?passing=1", lambda v: len(v) == 2),
            ("/v1/catalog/service/web", lambda v: [e["Node"] for e in v] == ["a", "b"]),
            ("/v1/catalog/nodes", lambda v: [e["Node"] for e in v] == ["a", "b"]),
            ("/v1/catalog/node/b", lambda v: v["Node"]["Meta"] == {"role": "cache"}),
            ("/v1/catalog/datacenters", lambda v: v == ["lobby"])]:
        status, headers, value = get(a, target)
        assert status == 200 and check(value), (target, value)
        index = int(headers["x-consul-index"])
        sep = "&" if "?" in target else "?"
        joins.append((target, index, value, held(a, f"{target}{sep}index={index}&wait=3s")))
        started = time.monotonic()
        status, headers, again = get(a, f"{target}{sep}index={index - 1}&wait=60000ms")
        # at once, not held for its 60 s (no 2.5 s bound: a loaded machine can be slower)
        assert time.monotonic() - started < 30 and again == value
        assert int(headers["x-consul-index"]) == index
    for target, index, value, join in joins:  # nothing changed: each held for its wait
        _, headers, again = join()
        assert join.seconds >= 2.9 and again == value, target  # type: ignore[attr-defined]
        assert int(headers["x-consul-index"]) == index


def test_fabio_sequence(lobbyd: Callable[..., Lobbyd]) -> None:
    """Fabio: every check (routes only instances with a passing check), each service's
    instances, and a long poll of its KV config, which must block for its wait."""
    a = lobbyd("a", LABELS="service:web,service:web:port:8080,service:web:tag:urlprefix-/web")
    wait_for(lambda: a.hostnames() == ["a"])
    status, headers, checks = get(a, "/v1/health/state/any?consistent=")
    index = int(headers["x-consul-index"])
    passing = {(c["Node"], c["ServiceID"]) for c in checks
               if c["Status"] == "passing" and c["ServiceID"] and c["CheckID"] != "serfHealth"}
    assert passing == {("a", "web")}
    assert any(c["CheckID"] == "serfHealth" and c["Status"] == "passing" for c in checks)
    _, _, instances = get(a, "/v1/catalog/service/web?consistent=")
    assert [(i["ServiceID"], i["ServicePort"], i["ServiceTags"]) for i in instances] == \
        [("web", 8080, ["urlprefix-/web"])]
    status, headers, _ = get(a, "/v1/kv/fabio/config?consistent=")
    kv_index = int(headers["x-consul-index"])
    assert status == 404 and kv_index >= 1
    started = time.monotonic()
    status, headers, _ = get(a, f"/v1/kv/fabio/config?consistent=&index={kv_index}&wait=1s")
    assert status == 404 and time.monotonic() - started >= 0.9  # held, not spinning
    wake = held(a, f"/v1/health/state/any?consistent=&index={index}")
    assert a.request("POST", "/v1/labels", "service:api")[0] == 200
    _, headers, checks = wake()
    assert int(headers["x-consul-index"]) > index
    assert {c["ServiceID"] for c in checks} == {"", "web", "api"}


def test_token_as_consul_clients_send_it(lobbyd: Callable[..., Lobbyd]) -> None:
    a = lobbyd("a", start=False, LABELS="service:web", TOKEN="s3cret")
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/catalog/services",
                               headers={"X-Consul-Token": "s3cret"})[0] == 200, what="API up")
    assert get(a, "/v1/catalog/services")[0] == 403
    assert get(a, "/v1/catalog/services", **{"X-Consul-Token": "wrong"})[0] == 403
    assert get(a, "/v1/catalog/services?token=wrong")[0] == 403
    assert get(a, "/v1/catalog/services?token=s3cret")[2] == {"web": []}
    assert get(a, "/v1/catalog/services", Authorization="Bearer s3cret")[2] == {"web": []}
    assert get(a, "/v1/discoveries", **{"X-Consul-Token": "s3cret"})[0] == 200
    assert "s3cret" not in a.logs()
