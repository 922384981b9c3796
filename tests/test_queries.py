"""Queries: filters, resolve, Prometheus target groups, rendering."""

from __future__ import annotations

import json
import random

import pytest

from lobbyd import (
    MAX_NOTED,
    RENDER_CHUNK,
    BlockRenderer,
    BoundedCache,
    Packet,
    Registry,
    RegistryRenderer,
    View,
    group_block,
    packet_block,
    prometheus_group,
    render_json,
    select_packets,
    with_port,
)

PACKETS = [
    Packet("a", ("role:db", "service:smtp", "service:web"), 1),
    Packet("b", ("service:web",), 2),
    Packet("c", ("other",), 3),
]


def resolve_label(packets: list[Packet], label: str) -> list[str]:
    """The hostnames /v1/resolve?label= lists (what Registry.carrying() keeps)."""
    return [packet.hostname for packet in select_packets(View.resolve(label), packets)]


def prometheus_groups(name: str, packets: list[Packet], default_port: int) -> list[dict]:
    """Prometheus HTTP SD target groups for job NAME, one per host that has any."""
    groups = (prometheus_group(name, packet, default_port) for packet in packets)
    return [group for group in groups if group is not None]


def test_filter_by_labels_is_an_or_and_reduces_labels() -> None:
    assert select_packets(View("labels", ("service:smtp", "other")), PACKETS) == [
        Packet("a", ("service:smtp",), 1), Packet("c", ("other",), 3)]
    assert select_packets(View("labels", ("nothing",)), PACKETS) == []


def test_filter_by_prefixes() -> None:
    assert select_packets(View("prefixes", prefixes=("service:", "ro")), PACKETS) == [
        Packet("a", ("role:db", "service:smtp", "service:web"), 1),
        Packet("b", ("service:web",), 2)]


def test_resolve() -> None:
    assert resolve_label(PACKETS, "service:web") == ["a", "b"]
    assert resolve_label(PACKETS, "nope") == []


@pytest.mark.parametrize("host,port,expected", [
    ("10.0.0.1", "9100", "10.0.0.1:9100"),
    ("10.0.0.1:8080", "9100", "10.0.0.1:8080"),
    ("10.0.0.1", None, "10.0.0.1"),
    ("2a03::1", "9100", "[2a03::1]:9100"),
    ("2a03::1", None, "[2a03::1]"),
    ("[2a03::1]:443", "9100", "[2a03::1]:443"),
    ("[2a03::1]", "9100", "[2a03::1]:9100"),
    ("web.example.com", "9100", "web.example.com:9100"),
])
def test_with_port(host: str, port: str | None, expected: str) -> None:
    assert with_port(host, port) == expected


def groups(*labels: str, hostname: str = "h1", port: int = 9100) -> list[dict]:
    return prometheus_groups("node", [Packet(hostname, tuple(sorted(labels)), 0)], port)


def test_prometheus_host_labels_are_targets_with_the_default_port() -> None:
    assert groups("prometheus:node:host:192.168.1.1", "prometheus:node:host:192.168.1.2",
                  "prometheus:node:location:prague") == [
        {"Targets": ["192.168.1.1:9100", "192.168.1.2:9100"], "Labels": {"location": "prague"}}]


def test_prometheus_port_label_applies_to_all_targets() -> None:
    assert groups("prometheus:node:host:10.0.0.1", "prometheus:node:port:9200") == [
        {"Targets": ["10.0.0.1:9200"], "Labels": {}}]


def test_prometheus_dash_port_means_no_port() -> None:
    assert groups("prometheus:node:host:10.0.0.1", "prometheus:node:port:-") == [
        {"Targets": ["10.0.0.1"], "Labels": {}}]


def test_prometheus_embedded_port_is_kept() -> None:
    assert groups("prometheus:node:host:10.0.0.1:1234", "prometheus:node:port:9200") == [
        {"Targets": ["10.0.0.1:1234"], "Labels": {}}]


def test_prometheus_ipv6_gets_brackets() -> None:
    assert groups("prometheus:node:host:2a03::1") == [
        {"Targets": ["[2a03::1]:9100"], "Labels": {}}]


def test_prometheus_without_host_uses_the_hostname() -> None:
    assert groups("prometheus:node", hostname="web1.example.com", port=9999) == [
        {"Targets": ["web1.example.com:9999"], "Labels": {}}]


def test_prometheus_invalid_label_names_are_left_out() -> None:
    assert groups("prometheus:node", "prometheus:node:ok_name:1", "prometheus:node:bad-name:2",
                  "prometheus:node:9lives:3") == [
        {"Targets": ["h1:9100"], "Labels": {"ok_name": "1"}}]


def test_prometheus_reserved_labels_and_job_are_left_out() -> None:
    """Prometheus takes a target group's __scheme__, __metrics_path__, __address__, job ...
    over the scrape config's: no host may redirect its own scrape or pose as another job."""
    assert groups("prometheus:node:__scheme__:https", "prometheus:node:__metrics_path__:/x",
                  "prometheus:node:__address__:evil:80", "prometheus:node:__param_a:1",
                  "prometheus:node:job:other", "prometheus:node:_ok:1",
                  "prometheus:node:jobs:2") == [
        {"Targets": ["h1:9100"], "Labels": {"_ok": "1", "jobs": "2"}}]


def test_prometheus_other_jobs_and_no_match() -> None:
    assert groups("prometheus:other", "prometheus:nodes") == []
    assert prometheus_groups("node", [], 9100) == []
    assert render_json(prometheus_groups("node", [], 9100)) == b"[]\n"


def test_prometheus_one_group_per_host() -> None:
    packets = [Packet("a", ("prometheus:node",), 0), Packet("b", ("x",), 0),
               Packet("c", ("prometheus:node:host:c.lan",), 0)]
    assert prometheus_groups("node", packets, 9100) == [
        {"Targets": ["a:9100"], "Labels": {}}, {"Targets": ["c.lan:9100"], "Labels": {}}]


def test_renderer_equals_json_pretty_print_also_from_its_memo() -> None:
    packets = [*PACKETS, Packet("ünï\"code", ('quo"te', "\\back"), 9), Packet("e", (), 0)]
    renderer = BlockRenderer(lambda packet: packet_block(packet, BoundedCache(100)))
    expected = render_json([p.to_json() for p in packets])
    assert renderer.render(packets) == expected
    assert renderer.render(packets) == expected  # from the memo
    changed = [packets[0]._replace(last_check=99), *packets[1:]]
    assert renderer.render(changed) == render_json([p.to_json() for p in changed])
    assert renderer.render([]) == b"[]\n"
    assert json.loads(expected)[0]["labels"] == ["role:db", "service:smtp", "service:web"]


def test_registry_renderer_equals_json_pretty_print_through_changes() -> None:
    """Chunks are kept while their hosts stay: after joins, leaves (a chunk fewer or
    more), label changes and new last_checks the answer is still the whole one."""
    registry = Registry(ttl=3600)
    renderer = RegistryRenderer()
    rng = random.Random(12)
    assert renderer.render(registry) == b"[]\n"
    now = 1_700_000_000.0
    for step in range(300):
        now += rng.random() / 3
        for _ in range(rng.choice((1, 1, 5, 3 * RENDER_CHUNK))):
            name = f"h{rng.randrange(4 * RENDER_CHUNK):04}"
            if rng.random() < 0.2:
                registry.apply_goodbye(name)
            else:
                registry.apply_hi(name, (f"seq:{rng.randrange(3)}", 'q"uote'), now)
        expected = render_json([p.to_json() for p in registry.packets()])
        assert renderer.render(registry) == expected, f"step {step}"
        assert b"".join(renderer.render_parts(registry)) == expected


def test_registry_renderer_within_a_second_shows_every_label_change() -> None:
    """Between two full looks (one a second) only the chunks of hosts whose labels
    changed are rendered again: hostnames and labels are exact at every render, and
    each last_check is the current one or the one of the second's first render."""
    registry = Registry(ttl=3600)
    renderer = RegistryRenderer()
    rng = random.Random(13)
    now = 1_700_000_000.0
    for i in range(10 * RENDER_CHUNK):
        registry.apply_hi(f"h{i:04}", ("seq:0",), now)
    at_look: dict[str, int] = {}
    second = -1
    for step in range(400):
        now += rng.random() / 20
        for _ in range(rng.choice((0, 1, 1, 2, 7))):
            name = f"h{rng.randrange(10 * RENDER_CHUNK):04}"
            kept = registry.hosts.get(name, ((),))[0]
            labels = (f"seq:{rng.randrange(4)}",) if rng.random() < 0.5 else \
                kept  # half of them keep-alives: last_check alone
            registry.apply_hi(name, labels, now)
        if rng.random() < 0.02:  # now and then a host goes: a full look, in any second
            registry.apply_goodbye(f"h{rng.randrange(10 * RENDER_CHUNK):04}")
        exact = [p.to_json() for p in registry.packets()]
        got = json.loads(renderer.render(registry, int(now)))
        assert [(h["hostname"], h["labels"]) for h in got] == \
            [(h["hostname"], h["labels"]) for h in exact], f"step {step}"
        if int(now) != second:  # the second's first render: a full look
            assert got == exact, f"step {step}"
            second, at_look = int(now), {h["hostname"]: h["last_check"] for h in exact}
        for shown, current in zip(got, exact):
            assert shown["last_check"] in (current["last_check"],
                                           at_look.get(shown["hostname"])), f"step {step}"
    assert b"".join(renderer.render_parts(registry)) == render_json(exact)  # -1: full look


def test_the_registry_cuts_its_notes_and_the_renderer_then_looks_in_full() -> None:
    registry = Registry(ttl=3600)
    renderer = RegistryRenderer()
    registry.apply_hi("a", ("x:0",), 1000.0)
    renderer.render(registry, 1000)
    for i in range(1, MAX_NOTED + 2):
        registry.apply_hi("a", (f"x:{i}",), 1000.0)
    assert len(registry.noted.names) < MAX_NOTED and registry.noted.cut > 0
    assert json.loads(renderer.render(registry, 1000))[0]["labels"] == [f"x:{MAX_NOTED + 1}"]


def test_prometheus_blocks_equal_json_pretty_print() -> None:
    packets = [Packet("a", ("prometheus:node", "prometheus:node:dc:prg",
                            'prometheus:node:q:"x"'), 0),
               Packet("b", ("other",), 0),
               Packet("c", ("prometheus:node:host:2a03::1", "prometheus:node:host:c.lan"), 0)]
    renderer = BlockRenderer(lambda p: group_block(prometheus_group("node", p, 9100)),
                             key=lambda p: p.labels)
    expected = render_json(prometheus_groups("node", packets, 9100))
    assert renderer.render(packets) == expected
    assert renderer.render(packets[1:2]) == b"[]\n"
