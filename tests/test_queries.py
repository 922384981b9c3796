"""Queries: filters, resolve, Prometheus target groups, rendering."""

from __future__ import annotations

import json
import random

import pytest

from lobbyd import (
    RENDER_CHUNK,
    BlockRenderer,
    Packet,
    Registry,
    RegistryRenderer,
    filter_by_labels,
    filter_by_prefixes,
    group_block,
    packet_block,
    prometheus_group,
    prometheus_groups,
    render_json,
    resolve_label,
    with_port,
)

PACKETS = [
    Packet("a", ("role:db", "service:smtp", "service:web"), 1),
    Packet("b", ("service:web",), 2),
    Packet("c", ("other",), 3),
]


def test_filter_by_labels_is_an_or_and_reduces_labels() -> None:
    assert filter_by_labels(PACKETS, ["service:smtp", "other"]) == [
        Packet("a", ("service:smtp",), 1), Packet("c", ("other",), 3)]
    assert filter_by_labels(PACKETS, ["nothing"]) == []


def test_filter_by_prefixes() -> None:
    assert filter_by_prefixes(PACKETS, ["service:", "ro"]) == [
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
    renderer = BlockRenderer(lambda packet: packet_block(packet, {}))
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
    renderer = RegistryRenderer({})
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
