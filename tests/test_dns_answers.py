"""DNS answers without a socket: DnsAnswers takes a query's bytes and gives the reply's,
read here by dnspython (a real client's parser). The registry is a real Registry."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

import lobbyd as L

HOSTS = {
    "web1": ["service:web", "service:web:port:8080", "service:web:tag:blue",
             "address:10.0.0.1", "role:front"],
    "web2": ["service:web", "service:web:port:8081", "public_ip6:2001:db8::2"],
    "web3.example.org": ["service:web", "service:web:address:10.9.9.9",
                         "service:web:tag:Blue", "public_ip4:192.0.2.3"],
    "db1": ["service:db", "service:db:address:db.example.com", "service:db:port:5432"],
    "plain": ["service:cron"],  # no address label: its address is its hostname
}


def registry(hosts: dict[str, list[str]] = HOSTS) -> L.Registry:
    reg = L.Registry(ttl=1e9)
    for name, labels in hosts.items():
        reg.apply_hi(name, tuple(labels), 1.0)
    return reg


def answers(reg: L.Registry | None = None, domain: str = "lobby.", ttl: int = 0
            ) -> L.DnsAnswers:
    reg = reg if reg is not None else registry()
    return L.DnsAnswers(reg, lambda: None, L.parse_dns_domain("DNS_DOMAIN", domain), ttl)


def ask(server: L.DnsAnswers, name: str, kind: str = "A", tcp: bool = False,
        **make: object) -> dns.message.Message:
    query = dns.message.make_query(name, kind, **make)
    reply = server.respond(query.to_wire(), tcp)
    assert reply is not None
    message = dns.message.from_wire(reply)
    assert message.id == query.id and message.flags & dns.flags.QR
    assert not message.flags & dns.flags.RA  # never recursion
    return message


def records(message: dns.message.Message, section: str = "answer") -> list[str]:
    return sorted(rd.to_text() for rrset in getattr(message, section) for rd in rrset)


def test_service_a_aaaa_ip_literals_only() -> None:
    server = answers()
    a = ask(server, "web.service.lobby", "A")
    assert a.rcode() == dns.rcode.NOERROR and a.flags & dns.flags.AA
    assert records(a) == ["10.0.0.1", "10.9.9.9"]  # web2's address is IPv6
    assert records(ask(server, "web.service.lobby", "AAAA")) == ["2001:db8::2"]
    # a host without an IP (its hostname is its address): no A, but it exists
    cron = ask(server, "cron.service.lobby", "A")
    assert cron.rcode() == dns.rcode.NOERROR and not cron.answer
    assert cron.authority[0].rdtype == dns.rdatatype.SOA


def test_tag_selects_instances_case_blind() -> None:
    server = answers()
    assert records(ask(server, "blue.web.service.lobby")) == ["10.0.0.1", "10.9.9.9"]
    assert records(ask(server, "BLUE.Web.Service.LOBBY")) == ["10.0.0.1", "10.9.9.9"]
    red = ask(server, "red.web.service.lobby")
    assert red.rcode() == dns.rcode.NXDOMAIN and red.authority[0].rdtype == dns.rdatatype.SOA


def test_srv_both_names_targets_and_additional() -> None:
    server = answers()
    for name in ("web.service.lobby", "_web._tcp.service.lobby"):
        srv = ask(server, name, "SRV")
        assert records(srv) == ["1 1 0 0a090909.addr.lobby.",
                                "1 1 8080 web1.node.lobby.",
                                "1 1 8081 web2.node.lobby."], name
        assert records(srv, "additional") == ["10.0.0.1", "10.9.9.9", "2001:db8::2"]
        extra = {rrset.name.to_text(): rrset.rdtype for rrset in srv.additional}
        assert extra == {"web1.node.lobby.": dns.rdatatype.A,
                         "0a090909.addr.lobby.": dns.rdatatype.A,
                         "web2.node.lobby.": dns.rdatatype.AAAA}
    # the targets resolve to the same addresses
    assert records(ask(server, "0a090909.addr.lobby")) == ["10.9.9.9"]
    assert records(ask(server, "web2.node.lobby", "AAAA")) == ["2001:db8::2"]
    # a service address that is a name: the name itself, no additional record
    db = ask(server, "_db._tcp.service.lobby", "SRV")
    assert records(db) == ["1 1 5432 db.example.com."] and not db.additional
    # the RFC 2782 name is for SRV only
    assert not ask(server, "_web._tcp.service.lobby", "A").answer
    assert ask(server, "_nope._tcp.service.lobby", "SRV").rcode() == dns.rcode.NXDOMAIN


def test_node_a_and_txt_one_record_per_label_long_ones_split() -> None:
    long_label = "note:" + "x" * 600
    server = answers(registry({"n1.example.org": ["address:10.1.1.1", long_label, "a"]}))
    assert records(ask(server, "n1.example.org.node.lobby")) == ["10.1.1.1"]
    assert ask(server, "n1.example.org.node.lobby", "TXT").flags & dns.flags.TC  # > 512
    txt = ask(server, "n1.example.org.node.lobby", "TXT", tcp=True)
    strings = sorted(tuple(rd.strings) for rrset in txt.answer for rd in rrset)
    assert strings == [(b"a",), (b"address:10.1.1.1",),
                       (long_label[:255].encode(), long_label[255:510].encode(),
                        long_label[510:].encode())]
    nodata = ask(server, "n1.example.org.node.lobby", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer and nodata.authority
    assert ask(server, "nobody.node.lobby").rcode() == dns.rcode.NXDOMAIN


def test_rcodes_nxdomain_nodata_refused_apex() -> None:
    server = answers()
    for name in ("nope.service.lobby", "a.b.c.d.service.lobby", "x.lobby", "zz.addr.lobby"):
        message = ask(server, name)
        assert message.rcode() == dns.rcode.NXDOMAIN, name
        assert message.authority[0].rdtype == dns.rdatatype.SOA
        assert message.authority[0].name.to_text() == "lobby."
    for name, kind in (("web.service.lobby", "MX"), ("service.lobby", "A"), ("lobby", "A"),
                       ("node.lobby", "TXT")):
        message = ask(server, name, kind)
        assert message.rcode() == dns.rcode.NOERROR and not message.answer, name
        assert message.authority[0].rdtype == dns.rdatatype.SOA
    soa = ask(server, "lobby", "SOA")
    assert records(soa)[0].startswith("ns.lobby. hostmaster.lobby. ")
    for name in ("example.com", "lobby.example.com", "com"):
        refused = ask(server, name)
        assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
        assert not refused.flags & dns.flags.AA


def test_domain_with_or_without_dot_and_ttl() -> None:
    for domain in ("consul", "Consul.", "dc1.example.org"):
        server = answers(domain=domain, ttl=30)
        zone = L.parse_dns_domain("DNS_DOMAIN", domain)
        message = ask(server, f"web.service.{zone}")
        assert records(message) == ["10.0.0.1", "10.9.9.9"]
        assert {rrset.ttl for rrset in message.answer} == {30}
        assert ask(server, "web.service.lobby").rcode() == dns.rcode.REFUSED
    for bad in ("", ".", "a..b", "-x", "x" * 64, "a b"):
        with pytest.raises(L.ConfigError, match="DNS_DOMAIN"):
            L.parse_dns_domain("DNS_DOMAIN", bad)


def big_registry(count: int = 200) -> L.Registry:
    return registry({f"host{i:03}.example.org": ["service:web", "service:web:port:80",
                                                 f"public_ip4:10.0.{i // 250}.{i % 250}"]
                     for i in range(count)})


def test_truncation_over_udp_and_the_whole_answer_over_tcp() -> None:
    server = answers(big_registry())
    plain = ask(server, "web.service.lobby", "A")  # no EDNS0: 512 bytes at most
    assert plain.flags & dns.flags.TC and not plain.answer
    assert len(server.respond(dns.message.make_query("web.service.lobby", "A").to_wire(),
                              False)) <= 512
    edns = ask(server, "web.service.lobby", "A", use_edns=0, payload=4096)
    assert not edns.flags & dns.flags.TC and len(records(edns)) == 200
    assert edns.edns == 0 and edns.payload == L.DNS_EDNS_SIZE  # our OPT in the reply
    srv = ask(server, "web.service.lobby", "SRV", use_edns=0, payload=1232)
    assert srv.flags & dns.flags.TC and not srv.answer and srv.edns == 0
    # the answers fit, not all their targets' addresses: as many as fit, and no TC
    query = dns.message.make_query("web.service.lobby", "SRV", use_edns=0, payload=11000)
    reply = server.respond(query.to_wire(), False)
    srv = dns.message.from_wire(reply)
    assert not srv.flags & dns.flags.TC and len(records(srv)) == 200
    assert 0 < len(records(srv, "additional")) < 200 and 10000 < len(reply) <= 11000
    # the client's size is honoured, however large
    srv = ask(server, "web.service.lobby", "SRV", use_edns=0, payload=65000)
    assert not srv.flags & dns.flags.TC and len(records(srv, "additional")) == 200
    full = ask(server, "web.service.lobby", "SRV", tcp=True)
    assert not full.flags & dns.flags.TC
    assert len(records(full)) == 200 and len(records(full, "additional")) == 200


def test_malformed_opcode_responses() -> None:
    server = answers()
    query = dns.message.make_query("web.service.lobby", "A")
    wire = query.to_wire()
    # a response is never answered
    response = dns.message.make_response(query).to_wire()
    assert server.respond(response, False) is None
    # runts and garbage: dropped, or FORMERR with the query's ID
    assert server.respond(b"", False) is None and server.respond(b"\x01\x02", False) is None
    formerr = server.respond(wire[:12] + b"\x07garbage", False)
    assert formerr is not None and dns.message.from_wire(formerr).rcode() == dns.rcode.FORMERR
    assert formerr[:2] == wire[:2]
    two = bytearray(wire)
    two[5] = 2  # two questions, one there
    assert dns.message.from_wire(server.respond(bytes(two), False)).rcode() == dns.rcode.FORMERR
    # an opcode other than QUERY: NOTIMP
    notify = dns.message.make_query("lobby", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    reply = dns.message.from_wire(server.respond(notify.to_wire(), False))
    assert reply.rcode() == dns.rcode.NOTIMP and reply.opcode() == dns.opcode.NOTIFY
    # an EDNS version past 0: BADVERS
    badvers = ask(server, "web.service.lobby", use_edns=1)
    assert badvers.rcode() == dns.rcode.BADVERS
    assert server.dropped == 3 and server.counts[(0, L.FORMERR)] == 2


def test_answers_kept_per_question_and_registry_version() -> None:
    reg = registry()
    server = answers(reg)
    query = dns.message.make_query("web.service.lobby", "A")
    first = server.respond(query.to_wire(), False)
    query.id ^= 0x5A5A
    again = server.respond(query.to_wire(), False)
    assert again[:2] == query.to_wire()[:2] and again[2:] == first[2:]
    assert len(server.kept) == 1
    # 0x20: the question comes back as asked
    mixed = dns.message.from_wire(server.respond(
        dns.message.make_query("WeB.sErViCe.lobby", "A").to_wire(), False))
    assert mixed.question[0].name.to_text() == "WeB.sErViCe.lobby."
    # a change of the registry: the next answer sees it
    reg.apply_goodbye("web1")
    assert records(dns.message.from_wire(server.respond(query.to_wire(), False))) == \
        ["10.9.9.9"]
    assert server.counts[(1, L.NOERROR)] == 4


def test_dns_key_is_the_query_but_its_id_and_options() -> None:
    base = dns.message.make_query("web.service.lobby", "A", use_edns=0, payload=1232)
    cookie = dns.message.make_query("web.service.lobby", "A", use_edns=0, payload=1232,
                                    options=[dns.edns.GenericOption(10, b"12345678")])
    assert L.dns_key(base.to_wire()) == L.dns_key(cookie.to_wire()) is not None
    other = dns.message.make_query("web.service.lobby", "A", use_edns=0, payload=4096)
    assert L.dns_key(other.to_wire()) != L.dns_key(base.to_wire())
    wire = base.to_wire()
    # cut short, a byte after the end, a response, another opcode: the full parse reads it
    for bad in (wire[:-1], wire + b"\x00", wire[:2] + b"\x80" + wire[3:],
                wire[:2] + b"\x20" + wire[3:]):
        assert L.dns_key(bad) is None, bad
    assert L.dns_key(struct.pack("!6H", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01" * 2) \
        is None  # a pointer in the question: the full parse reads it


def test_any_question_gets_every_type_the_name_has() -> None:
    server = answers()
    message = ask(server, "web1.node.lobby", "ANY")
    kinds = {rrset.rdtype for rrset in message.answer}
    assert kinds == {dns.rdatatype.A, dns.rdatatype.TXT}


def test_metrics_name_a_bounded_set_of_types() -> None:
    server = answers()
    for kind in range(1000, 1300):  # types of a client's choosing
        ask(server, "web.service.lobby", kind)
    ask(server, "web.service.lobby", "A")
    assert server.counts == {(-1, L.NOERROR): 300, (1, L.NOERROR): 1}
    text = L.render_metrics(L.DnsServer(server).families()).decode()
    assert 'lobbyd_dns_queries_total{type="other",rcode="NOERROR"} 300' in text
    assert 'lobbyd_dns_queries_total{type="A",rcode="NOERROR"} 1' in text


def test_the_zone_follows_changes_host_by_host() -> None:
    """After the first look, a change reads again only the hosts it names: the zone
    matches one built afresh after every kind of change."""
    reg = registry()
    server = answers(reg)
    ask(server, "web.service.lobby")
    changes = [lambda: reg.apply_hi("web1", ("service:web", "address:10.0.0.99"), 2.0),
               lambda: reg.apply_goodbye("web2"),
               lambda: reg.apply_hi("new", ("service:web", "service:web:tag:blue",
                                             "address:10.3.3.3"), 2.0),
               lambda: reg.apply_hi("db1", ("role:none",), 2.0),
               lambda: reg.learn("learnt", ("service:db", "address:10.4.4.4"), 2.0),
               lambda: reg.expire(1e12)]
    for change in changes:
        change()
        for name, kind in (("web.service.lobby", "A"), ("blue.web.service.lobby", "A"),
                           ("db.service.lobby", "SRV"), ("web1.node.lobby", "TXT"),
                           ("web2.node.lobby", "AAAA"), ("new.node.lobby", "A")):
            fresh = answers(reg)
            got, want = ask(server, name, kind, tcp=True), ask(fresh, name, kind, tcp=True)
            assert (got.rcode(), records(got), records(got, "additional")) == \
                (want.rcode(), records(want), records(want, "additional")), (name, kind)
    assert not server.names.services and not server.names.nodes  # all expired
