"""The service model: what a host offers, read off its labels (pure functions)."""

from __future__ import annotations

from lobbyd import Service, host_address, host_services, node_meta


def test_a_host_offers_a_service_only_with_its_bare_label() -> None:
    assert host_services(("service:web:port:80",)) == ()
    assert host_services(("service:web",)) == (Service("web", 0, "", (), ()),)
    assert host_services(("role:db", "other")) == ()


def test_port_address_tags_and_meta() -> None:
    labels = ("service:web", "service:web:port:8080", "service:web:address:10.0.0.7",
              "service:web:tag:traefik.enable=true",
              "service:web:tag:traefik.http.routers.web.rule=Host(`a:b`)",
              "service:web:meta:version:1.2:3", "service:web:meta:version:9",
              "service:smtp", "service:smtp:port:25")
    smtp, web = host_services(labels)
    assert smtp == Service("smtp", 25, "", (), ())
    assert web.port == 8080 and web.address == "10.0.0.7"
    assert web.tags == ("traefik.enable=true", "traefik.http.routers.web.rule=Host(`a:b`)")
    assert web.meta == (("version", "1.2:3"),)  # K ends at the first colon; first wins


def test_bad_ports_are_no_port_and_the_first_valid_one_wins() -> None:
    for bad in ("0", "65536", "-1", "http", "", "08x"):
        (web,) = host_services(("service:web", f"service:web:port:{bad}"))
        assert web.port == 0, bad
    (web,) = host_services(("service:web", "service:web:port:x", "service:web:port:9000",
                            "service:web:port:443"))
    assert web.port == 443  # sorted order: "443" before "9000"


def test_tags_keep_label_order_once_each() -> None:
    (web,) = host_services(("service:web:tag:b", "service:web", "service:web:tag:a",
                            "service:web:tag:b", "service:web:tag:"))
    assert web.tags == ("b", "a", "")


def test_host_address_order() -> None:
    assert host_address("h1", ()) == "h1"
    assert host_address("h1", ("public_ip6:fd00::1",)) == "fd00::1"
    assert host_address("h1", ("public_ip6:fd00::1", "public_ip4:192.0.2.1")) == "192.0.2.1"
    assert host_address("h1", ("public_ip4:192.0.2.1", "address:10.1.1.1")) == "10.1.1.1"
    assert host_address("h1", ("address:10.1.1.2", "address:10.1.1.1")) == "10.1.1.1"
    assert host_address("h1", ("address:",)) == "h1"


def test_node_meta() -> None:
    labels = ("role:db", "role:api", "service:web", "prometheus:node", "address:10.0.0.1",
              "dc-zone:eu:1", "bare", "bad key:x", "a.b:c")
    assert node_meta(labels) == {"role": "api", "dc-zone": "eu:1"}
