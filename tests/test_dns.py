"""DNS (DNS_PORT) against real lobbyd processes and a real NATS, asked by real clients:
dig, dnspython's stub resolver, and dnsmasq forwarding the zone."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest
from conftest import ROOT, free_port, run_lobbyd, skip_unless_required, wait_for
from harness import stop_process
from watchclient import SUBJECT, envelope

WEB1 = ("service:web,service:web:port:8080,service:web:tag:blue,address:10.0.0.1,"
        "role:front")


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}")
                                  else None)
    if path is None:
        skip_unless_required(f"{tool} is not installed (Debian: bind9-dnsutils, dnsmasq-base)")
    return path  # type: ignore[return-value]


def dig(port: int, *args: str) -> str:
    """dig's whole output (one try, two seconds; it retries over TCP when truncated)."""
    result = subprocess.run([need("dig"), "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1",
                             *args], capture_output=True, text=True, timeout=30)
    return result.stdout


def short(port: int, *args: str) -> list[str]:
    return sorted(line for line in dig(port, "+short", *args).splitlines() if line)


def status(output: str) -> str:
    found = re.search(r"status: ([A-Z]+)", output)
    return found.group(1) if found else ""


def flags(output: str) -> set[str]:
    found = re.search(r";; flags: ([a-z ]*);", output)
    return set(found.group(1).split()) if found else set()


def answer_count(output: str) -> int:
    found = re.search(r"ANSWER: ([0-9]+)", output)
    return int(found.group(1)) if found else -1


def resolver(port: int) -> dns.resolver.Resolver:
    stub = dns.resolver.Resolver(configure=False)
    stub.nameservers = ["127.0.0.1"]
    stub.port = port
    stub.lifetime = 10
    stub.cache = None
    return stub


def web_fleet(lobbyd, nats, **env: str | int):
    """web1 (a lobbyd with DNS), web2 and web3 published on NATS once; returns (daemon,
    port). TTL=3600: the suite's 5 s would forget web2 and web3 while a loaded machine
    still runs the test's queries."""
    port = free_port()
    daemon = lobbyd("web1", DNS_PORT=port, LABELS=WEB1, TTL=3600, **env)
    pub = nats.client()
    pub.publish_json(SUBJECT, envelope("web2", ["service:web", "service:web:port:8081",
                                                "public_ip6:2001:db8::2"]))
    pub.publish_json(SUBJECT, envelope("web3.example.org", [
        "service:web", "service:web:address:10.9.9.9", "service:web:tag:blue",
        "public_ip4:192.0.2.3", "service:db", "service:db:port:5432"]))
    pub.flush()
    pub.close()
    wait_for(lambda: len(daemon.hostnames()) == 3, what="three hosts")
    return daemon, port


def test_dig_every_record_type_and_rcode(lobbyd, nats) -> None:
    daemon, port = web_fleet(lobbyd, nats)
    assert short(port, "web.service.lobby", "A") == ["10.0.0.1", "10.9.9.9"]
    assert short(port, "web.service.lobby", "AAAA") == ["2001:db8::2"]
    assert short(port, "blue.web.service.lobby", "A") == ["10.0.0.1", "10.9.9.9"]
    srv = ["1 1 0 0a090909.addr.lobby.", "1 1 8080 web1.node.lobby.",
           "1 1 8081 web2.node.lobby."]
    assert short(port, "web.service.lobby", "SRV") == srv
    assert short(port, "_web._tcp.service.lobby", "SRV") == srv
    full = dig(port, "_web._tcp.service.lobby", "SRV")
    assert "web1.node.lobby.\t0\tIN\tA\t10.0.0.1" in full
    assert "0a090909.addr.lobby.\t0\tIN\tA\t10.9.9.9" in full
    assert "web2.node.lobby.\t0\tIN\tAAAA\t2001:db8::2" in full
    assert short(port, "db.service.lobby", "SRV") == ["1 1 5432 web3.example.org.node.lobby."]
    assert short(port, "web3.example.org.node.lobby", "A") == ["192.0.2.3"]
    assert short(port, "web1.node.lobby", "TXT") == sorted(
        f'"{label}"' for label in WEB1.split(","))
    # authoritative, never recursive; the rcodes
    found = dig(port, "web.service.lobby", "A")
    assert status(found) == "NOERROR" and "aa" in flags(found) and "ra" not in flags(found)
    missing = dig(port, "nope.service.lobby", "A")
    assert status(missing) == "NXDOMAIN" and "SOA\tns.lobby. hostmaster.lobby." in missing
    nodata = dig(port, "web.service.lobby", "MX")
    assert status(nodata) == "NOERROR" and answer_count(nodata) == 0 and "SOA" in nodata
    assert status(dig(port, "example.com", "A")) == "REFUSED"
    assert status(dig(port, "+opcode=notify", "lobby", "SOA")) == "NOTIMP"
    assert short(port, "+tcp", "web.service.lobby", "A") == ["10.0.0.1", "10.9.9.9"]
    # counted, and shown
    metrics = daemon.request("GET", "/metrics")[2].decode()
    assert re.search(r'lobbyd_dns_queries_total\{type="A",rcode="NOERROR"\} [1-9]', metrics)
    assert 'lobbyd_dns_queries_total{type="A",rcode="NXDOMAIN"} 1' in metrics
    assert 'lobbyd_dns_queries_total{type="A",rcode="REFUSED"} 1' in metrics
    health = daemon.get_json("/v1/health")["dns"]  # type: ignore[index]
    assert health["listening"] is True and health["domain"] == "lobby."
    assert health["address"] == f"127.0.0.1 port {port}"
    ctl = run_lobbyd({}, args=["ctl", "-port", str(daemon.port), "health"])
    assert f"dns:      listening on 127.0.0.1 port {port} for lobby., " in ctl.stdout, ctl


def test_dnspython_stub_resolver(lobbyd, nats) -> None:
    _daemon, port = web_fleet(lobbyd, nats, DNS_DOMAIN="Consul", DNS_TTL=7)
    stub = resolver(port)
    answer = stub.resolve("web.service.consul", "A")
    assert sorted(r.address for r in answer) == ["10.0.0.1", "10.9.9.9"]
    assert answer.rrset.ttl == 7
    assert [r.address for r in stub.resolve("web.service.consul", "AAAA")] == ["2001:db8::2"]
    srv = stub.resolve("_web._tcp.service.consul", "SRV")
    assert sorted((r.port, r.target.to_text()) for r in srv) == [
        (0, "0a090909.addr.consul."), (8080, "web1.node.consul."), (8081, "web2.node.consul.")]
    with pytest.raises(dns.resolver.NXDOMAIN):
        stub.resolve("nope.service.consul", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        stub.resolve("web.service.consul", "MX")
    with pytest.raises(dns.resolver.NoNameservers):  # REFUSED
        stub.resolve("web.service.lobby", "A")


def hundreds(nats, count: int = 200) -> None:
    pub = nats.client()
    for i in range(count):
        pub.publish_json(SUBJECT, envelope(f"host{i:03}.example.org", [
            "service:api", "service:api:port:9000", f"public_ip4:10.1.{i // 250}.{i % 250}"]))
    pub.flush()
    pub.close()


def test_200_hosts_truncated_over_udp_whole_over_tcp(lobbyd, nats) -> None:
    port = free_port()
    daemon = lobbyd("a", DNS_PORT=port, TTL=120)
    hundreds(nats)
    wait_for(lambda: len(daemon.hostnames()) == 201, what="201 hosts")
    # without EDNS0: past 512 bytes, TC and no answers
    cut = dig(port, "+noedns", "+ignore", "api.service.lobby", "SRV")
    assert "tc" in flags(cut) and answer_count(cut) == 0
    cut = dig(port, "+bufsize=1232", "+ignore", "api.service.lobby", "A")  # 200 A: ~3.2 kB
    assert "tc" in flags(cut) and "udp: 4096" in cut  # our EDNS0 record
    roomy = dig(port, "+bufsize=4096", "api.service.lobby", "A")
    assert "tc" not in flags(roomy) and answer_count(roomy) == 200
    # dig retries over TCP by itself and gets everything, the targets' addresses too
    whole = dig(port, "api.service.lobby", "SRV")
    assert "Truncated, retrying in TCP mode" in whole
    assert answer_count(whole) == 200 and "ADDITIONAL: 201" in whole  # and the OPT
    # so does dnspython's resolver
    srv = resolver(port).resolve("_api._tcp.service.lobby", "SRV")
    assert len(srv) == 200 and {r.port for r in srv} == {9000}
    query = dns.message.make_query("api.service.lobby", "SRV")
    udp = dns.query.udp(query, "127.0.0.1", port=port, timeout=5, ignore_trailing=True)
    assert udp.flags & dns.flags.TC
    tcp = dns.query.tcp(query, "127.0.0.1", port=port, timeout=5)
    assert len(tcp.answer[0]) == 200 and not tcp.flags & dns.flags.TC


def test_a_host_saying_goodbye_leaves_dns_at_once(lobbyd, nats) -> None:
    port = free_port()
    lobbyd("a", DNS_PORT=port, TTL=300)  # only its goodbye can take it away in time
    pub = nats.client()
    pub.publish_json(SUBJECT, envelope("leaving", ["service:mail", "address:10.7.7.7"]))
    pub.flush()
    wait_for(lambda: short(port, "mail.service.lobby") == ["10.7.7.7"], what="the host in DNS")
    assert short(port, "leaving.node.lobby") == ["10.7.7.7"]
    pub.publish_json(SUBJECT, envelope("leaving", None, "goodbye"))
    pub.flush()
    pub.close()
    wait_for(lambda: status(dig(port, "mail.service.lobby")) == "NXDOMAIN",
             what="the host gone from DNS")  # within 10 s, TTL 300: its goodbye did it
    assert status(dig(port, "leaving.node.lobby")) == "NXDOMAIN"


def garbage(rng: random.Random, query: bytes) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 600))
    if kind == 1:
        return query[:rng.randrange(len(query))]  # cut short
    if kind == 2:
        return query[:2] + b"\x81\x80" + query[4:]  # a response
    if kind == 3:
        return query[:12] + b"\xc0\x0c\x00\x01\x00\x01"  # a name pointing at itself
    if kind == 4:
        return query[:2] + bytes([rng.randrange(256)]) + query[3:]  # any opcode, flags
    if kind == 5:
        return query[:4] + rng.randbytes(8) + query[12:]  # counts
    if kind == 6:
        flipped = bytearray(query)
        flipped[rng.randrange(len(query))] ^= 1 << rng.randrange(8)
        return bytes(flipped)
    return query[:12] + b"\x3f" * 300  # labels running off the end


def test_a_garbage_flood_costs_only_itself(lobbyd, nats) -> None:
    port = free_port()
    daemon = lobbyd("web1", DNS_PORT=port, LABELS=WEB1)
    query = dns.message.make_query("web.service.lobby", "A", use_edns=0).to_wire()
    rng = random.Random(20261205)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + 10
    while sent < 20000 and time.monotonic() < deadline:
        try:
            sock.sendto(garbage(rng, query), ("127.0.0.1", port))
            sent += 1
        except BlockingIOError:
            time.sleep(0.001)
        with_replies = True
        while with_replies:  # keep our receive buffer from filling: read what came back
            try:
                sock.recv(65536)
            except (BlockingIOError, ConnectionRefusedError):
                with_replies = False
    sock.close()
    assert sent > 1000
    # idle TCP connections past the limit: refused, costing the others nothing
    idle = []
    for _ in range(100):
        idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    try:
        assert daemon.request("GET", "/v1/health")[0] == 200
        # a query that arrives while the socket's buffer is still full of garbage is
        # dropped by the kernel, as UDP does: answered again once lobbyd has read it
        wait_for(lambda: short(port, "web.service.lobby") == ["10.0.0.1"],
                 what="DNS over UDP after the flood")
    finally:
        for conn in idle:
            conn.close()
    wait_for(lambda: short(port, "+tcp", "web.service.lobby") == ["10.0.0.1"],
             what="DNS over TCP once the idle connections are gone")
    metrics = daemon.request("GET", "/metrics")[2].decode()
    dropped = int(re.search(r"lobbyd_dns_dropped_total ([0-9]+)", metrics).group(1))
    formerr = sum(int(n) for n in re.findall(r'rcode="FORMERR"\} ([0-9]+)', metrics))
    handled = sum(int(n) for n in re.findall(r"lobbyd_dns_queries_total\{.*\} ([0-9]+)",
                                               metrics)) + dropped
    # the kernel drops what overflows the socket's buffer; lobbyd read the rest
    assert dropped > 0 and formerr > 0 and handled >= 100, metrics
    print(f"flood: {sent} sent, {handled} read by lobbyd ({dropped} dropped, "
          f"{formerr} FORMERR)")
    assert daemon.proc.poll() is None


def test_dnsmasq_forwards_the_zone(lobbyd, nats, tmp_path: Path) -> None:
    dnsmasq = need("dnsmasq")
    _daemon, port = web_fleet(lobbyd, nats)
    forward = free_port()
    with open(tmp_path / "dnsmasq.log", "wb") as log:
        proc = subprocess.Popen(
            [dnsmasq, "-C", "/dev/null", "--no-daemon", f"--port={forward}", "--no-resolv",
             f"--server=/lobby/127.0.0.1#{port}", "--listen-address=127.0.0.1",
             "--bind-interfaces", "--pid-file", "--no-hosts"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: short(forward, "web.service.lobby") == ["10.0.0.1", "10.9.9.9"],
                 what="web.service.lobby through dnsmasq")
        assert short(forward, "_web._tcp.service.lobby", "SRV") == [
            "1 1 0 0a090909.addr.lobby.", "1 1 8080 web1.node.lobby.",
            "1 1 8081 web2.node.lobby."]
        assert status(dig(forward, "nope.service.lobby")) == "NXDOMAIN"
        assert [r.address for r in resolver(forward).resolve("web2.node.lobby", "AAAA")] == \
            ["2001:db8::2"]
    finally:
        stop_process(proc)


def test_dns_config_errors_exit_78() -> None:
    for env, word in (({"DNS_PORT": "dns"}, "DNS_PORT"), ({"DNS_PORT": "70000"}, "DNS_PORT"),
                      ({"DNS_DOMAIN": "a..b"}, "DNS_DOMAIN"), ({"DNS_TTL": "-1"}, "DNS_TTL")):
        result = run_lobbyd(env)
        assert result.returncode == 78, (env, result.stderr)
        assert result.stderr.startswith(f"lobbyd: configuration error: {word}="), result.stderr


def test_dns_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_lobbyd({"DNS_PORT": str(port), "PORT": str(free_port()),
                             "LABELS_PATH": str(tmp_path), "NATS_URL": "nats://127.0.0.1:1"})
    assert result.returncode == 1, result.stderr
    assert f"cannot start: DNS_PORT={port}: cannot listen on 127.0.0.1" in result.stderr


def test_without_dnslib_dns_port_is_a_config_error(tmp_path: Path) -> None:
    """Python without site-packages (-S): no dnslib there, as without lobbyd[dns]."""
    result = subprocess.run([sys.executable, "-S", str(ROOT / "lobbyd.py")],
                            env={"PATH": os.environ.get("PATH", ""), "DNS_PORT": "8600",
                                 "LABELS_PATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78, result.stderr
    assert "DNS_PORT=8600 needs the Python package dnslib" in result.stderr
    assert "lobbyd[dns]" in result.stderr
    # and a lobbyd without DNS_PORT never imports it
    probe = ("import sys; sys.argv=['lobbyd']; import lobbyd; "
             "lobbyd.Config.from_env({}); print('dnslib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False", out.stderr


def test_health_without_dns_says_nothing_of_it(lobbyd) -> None:
    daemon = lobbyd("a")
    assert "dns" not in daemon.get_json("/v1/health")  # type: ignore[operator]
    assert b"lobbyd_dns" not in daemon.request("GET", "/metrics")[2]
    assert json.loads(daemon.request("GET", "/v1/health")[2])["status"] == "ok"


def test_sigterm_closes_the_dns_listener(lobbyd) -> None:
    port = free_port()
    daemon = lobbyd("a", DNS_PORT=port)
    assert status(dig(port, "a.node.lobby")) == "NOERROR"
    assert daemon.stop(signal.SIGTERM) == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", port))  # free again
