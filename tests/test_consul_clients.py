"""Consul's API (read-only) as real Consul clients use it: a real Traefik (its
consulCatalog provider) routing by labels, and a Consul client library (py-consul)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
from conftest import Lobbyd, wait_for
from harness import Backend, Traefik

TIMEOUT = 30  # Traefik polls every second; its first look may take a few


@pytest.fixture
def backends() -> Iterator[Callable[[str], Backend]]:
    started: list[Backend] = []

    def make(name: str) -> Backend:
        started.append(Backend(name))
        return started[-1]

    yield make
    for backend in started:
        backend.close()


@pytest.fixture
def traefik(tmp_path: Path) -> Iterator[Callable[..., Traefik]]:
    started: list[Traefik] = []

    def make(lobbyd: Lobbyd, **options: object) -> Traefik:
        started.append(Traefik(tmp_path, lobbyd.port, **options).start())
        return started[-1]

    yield make
    for proxy in started:
        proxy.stop()


def web_labels(backend: Backend) -> list[str]:
    return ["service:web", f"service:web:port:{backend.port}", "service:web:address:127.0.0.1",
            "service:web:tag:traefik.enable=true",
            "service:web:tag:traefik.http.routers.web.rule=PathPrefix(`/web`)"]


def routed(proxy: Traefik) -> bytes | None:
    status, body = proxy.get("/web")
    return body if status == 200 else None


def test_traefik_routes_by_labels_and_stops_when_they_go(lobbyd: Callable[..., Lobbyd],
                                        traefik: Callable[..., Traefik],
                                        backends: Callable[[str], Backend]) -> None:
    backend = backends("backend-a")
    a = lobbyd("a")
    proxy = traefik(a)
    assert a.request("POST", "/v1/labels", "\n".join(web_labels(backend)))[0] == 200
    assert wait_for(lambda: routed(proxy), timeout=TIMEOUT, what="Traefik routing /web",
                    retry_on=(OSError,)) == b"backend-a"
    assert a.request("DELETE", "/v1/labels", "\n".join(web_labels(backend)))[0] == 200
    wait_for(lambda: proxy.get("/web")[0] == 404, timeout=TIMEOUT,
             what="Traefik no longer routing /web")


def test_traefik_balances_over_two_hosts(lobbyd: Callable[..., Lobbyd],
                                         traefik: Callable[..., Traefik],
                                         backends: Callable[[str], Backend]) -> None:
    one, two = backends("backend-a"), backends("backend-b")
    a = lobbyd("a", LABELS=",".join(web_labels(one)))
    lobbyd("b", LABELS=",".join(web_labels(two)))
    proxy = traefik(a)  # it asks a alone; a knows b through NATS

    def both() -> bool:
        seen = Counter(routed(proxy) for _ in range(10))
        return seen[b"backend-a"] > 0 and seen[b"backend-b"] > 0

    wait_for(both, timeout=TIMEOUT, what="Traefik balancing over both hosts",
             retry_on=(OSError,))


def test_traefik_with_the_token(lobbyd: Callable[..., Lobbyd], traefik: Callable[..., Traefik],
                                backends: Callable[[str], Backend], tmp_path: Path) -> None:
    backend = backends("backend-a")
    a = lobbyd("a", start=False, LABELS=",".join(web_labels(backend)), TOKEN="s3cret")
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/catalog/services",
                               headers={"X-Consul-Token": "s3cret"})[0] == 200, what="API up")
    proxy = traefik(a, token="s3cret")
    assert wait_for(lambda: routed(proxy), timeout=TIMEOUT, what="Traefik routing /web",
                    retry_on=(OSError,)) == b"backend-a"
    wrong = traefik(a, token="wrong")
    wait_for(lambda: "403" in wrong.log.read_text(), timeout=TIMEOUT,
             what="Traefik with a wrong token refused")
    assert wrong.get("/web")[0] == 404


# -------------------------------------------------------------------- py-consul


def test_py_consul_catalog_and_health(lobbyd: Callable[..., Lobbyd]) -> None:
    consul = pytest.importorskip("consul")
    a = lobbyd("a", LABELS="service:web,service:web:port:8080,service:web:tag:v1,role:db,"
                        "address:10.0.0.1")
    lobbyd("b", LABELS="service:web,service:web:port:8081,service:smtp")
    client = consul.Consul(host="127.0.0.1", port=a.port)
    wait_for(lambda: len(client.catalog.nodes()[1]) == 2, what="both nodes")
    index, services = client.catalog.services()
    assert services == {"smtp": [], "web": ["v1"]} and int(index) >= 1
    _, nodes = client.catalog.service("web")
    assert [(n["Node"], n["Address"], n["ServicePort"]) for n in nodes] == \
        [("a", "10.0.0.1", 8080), ("b", "b", 8081)]
    _, tagged = client.catalog.service("web", tag="v1")
    assert [n["Node"] for n in tagged] == ["a"]
    _, healthy = client.health.service("web", passing=True)
    assert [(e["Node"]["Node"], e["Service"]["Port"], [c["Status"] for c in e["Checks"]])
            for e in healthy] == [("a", 8080, ["passing"] * 2), ("b", 8081, ["passing"] * 2)]
    _, node = client.catalog.node("a")
    assert node["Node"]["Meta"] == {"role": "db"} and list(node["Services"]) == ["web"]
    assert client.catalog.datacenters() == ["lobby"]
    assert client.agent.self()["Config"]["Datacenter"] == "lobby"
    assert client.status.leader()
    _, checks = client.health.state("any")
    assert {c["CheckID"] for c in checks} == {"serfHealth", "service:web", "service:smtp"}
    assert client.kv.get("anything") == (client.kv.get("anything")[0], None)


def test_py_consul_blocking_query_wakes_on_its_change_only(
        lobbyd: Callable[..., Lobbyd]) -> None:
    consul = pytest.importorskip("consul")
    a = lobbyd("a", LABELS="service:web,service:web:port:8080")
    b = lobbyd("b")
    client = consul.Consul(host="127.0.0.1", port=a.port)
    wait_for(lambda: len(client.catalog.nodes()[1]) == 2, what="both nodes")
    index, entries = client.health.service("web")
    assert len(entries) == 1
    result: dict[str, object] = {}

    def held() -> None:
        started = time.monotonic()
        result["answer"] = client.health.service("web", index=index, wait="20s")
        result["after"] = time.monotonic() - started

    thread = threading.Thread(target=held)
    thread.start()
    # an unrelated change (a label of a host that does not offer web): the query holds
    assert b.request("POST", "/v1/labels", "role:cache")[0] == 200
    wait_for(lambda: "role:cache" in (a.labels_of("b") or []), what="a sees b's label")
    assert a.get_json("/v1/discoveries?labels=role:cache")
    thread.join(1.0)
    assert thread.is_alive(), "woken by a change that does not touch its answer"
    # a relevant one: b offers web too
    assert b.request("POST", "/v1/labels", "service:web\nservice:web:port:9090")[0] == 200
    thread.join(15)
    assert not thread.is_alive()
    new_index, entries = result["answer"]  # type: ignore[misc]
    assert int(new_index) > int(index)
    assert [(e["Node"]["Node"], e["Service"]["Port"]) for e in entries] == \
        [("a", 8080), ("b", 9090)]


# ------------------------------------------------------------ the README's example


def test_readme_traefik_example(lobbyd: Callable[..., Lobbyd], backends: Callable[[str], Backend],
                                tmp_path: Path) -> None:
    """The README's label file on two servers and its traefik.yml, as written but for
    the ports (and a shorter refreshInterval): Traefik balances over both, then drops
    the one whose label file goes."""
    from test_readme_watch import example

    one, two = backends("web-1"), backends("web-2")
    daemons = []
    for name, backend in [("web-1", one), ("web-2", two)]:
        daemon = lobbyd(name, start=False, LABELS="address:127.0.0.1")
        labels = Path(daemon.env["LABELS_PATH"])
        labels.mkdir(parents=True, exist_ok=True)
        (labels / "web").write_text(example("labels-web").replace("8080", str(backend.port)))
        daemons.append(daemon.start())
    config = example("traefik.yml")
    assert '":80"' in config and '"127.0.0.1:1313"' in config and "5s" in config
    proxy = Traefik(tmp_path, daemons[0].port)
    proxy.config.write_text(config.replace('":80"', f'"127.0.0.1:{proxy.port}"')
                            .replace("127.0.0.1:1313", f"127.0.0.1:{daemons[0].port}")
                            .replace("5s", "1s"))
    proxy.start()
    try:
        def seen() -> set[bytes]:
            found = set()
            for _ in range(10):
                status, body = proxy.get("/")
                if status == 200:
                    found.add(body)
            return found

        wait_for(lambda: seen() == {b"web-1", b"web-2"}, timeout=TIMEOUT,
                 what="Traefik balancing over both servers", retry_on=(OSError,))
        (Path(daemons[1].env["LABELS_PATH"]) / "web").unlink()  # re-read every KEEP_ALIVE
        wait_for(lambda: seen() == {b"web-1"}, timeout=TIMEOUT,
                 what="Traefik sending to web-1 alone", retry_on=(OSError,))
    finally:
        proxy.stop()
