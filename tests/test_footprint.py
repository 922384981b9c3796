"""What an idle lobbyd loads: OpenSSL only for a configuration that uses TLS, JetStream
only for DISCOVERY_MODE=kv.

asyncio and nats-py import ssl at once, and with it libssl and libcrypto (~5 MB of
an idle lobbyd); lobbyd imports them without it and hands asyncio the module when a
tls:// URL or an https:// check needs it (ssl_module()). Checked on the running
daemon's memory maps, from source and (binary_tests) in the static binary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Lobbyd, NatsServer, wait_for
from test_readme_promises import make_ca

OPENSSL = ("libssl.so", "libcrypto.so", "/_ssl.", "/_hashlib.")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the static binary's loaders run lobbyd as a grandchild)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def openssl_mapped(d: Lobbyd) -> list[str]:
    """The OpenSSL files mapped by any process of the daemon's tree."""
    assert d.proc is not None
    found = set()
    for pid in tree(d.proc.pid):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split()[-1]
            if any(name in path for name in OPENSSL):
                found.add(os.path.basename(path))
    return sorted(found)


def test_a_plain_configuration_loads_no_openssl(lobbyd) -> None:
    a = lobbyd("plain-a")
    b = lobbyd("plain-b")
    wait_for(lambda: {"plain-a", "plain-b"} <= set(a.hostnames()), timeout=15,
             what="a to list both daemons over plain NATS")
    assert a.get_json("/v1/health")["status"] == "ok"  # type: ignore[index]
    assert openssl_mapped(a) == [] and openssl_mapped(b) == []


def test_tls_nats_loads_openssl_when_used(lobbyd, tmp_path: Path) -> None:
    """tls:// works although asyncio was imported without ssl: two daemons see each
    other through a TLS-only nats-server, and OpenSSL is then in the process."""
    ca, cert, key = make_ca(tmp_path / "pki", "lobbyd nats CA")
    server = NatsServer(tmp_path, extra=["--tls", "--tlscert", str(cert), "--tlskey", str(key)])
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        # wait=False: the harness's raw NATS watcher speaks no TLS
        a = lobbyd("tls-a", wait=False, nats=server, NATS_URL=url, SSL_CERT_FILE=str(ca))
        b = lobbyd("tls-b", wait=False, nats=server, NATS_URL=url, SSL_CERT_FILE=str(ca))
        wait_for(lambda: {"tls-a", "tls-b"} <= set(a.hostnames()) and
                 {"tls-a", "tls-b"} <= set(b.hostnames()), timeout=20,
                 what="both daemons to list each other over tls://")
        assert f"connected to NATS at {url}" in a.logs()
        assert "libssl.so" in " ".join(openssl_mapped(a))
    finally:
        server.stop()


def test_stand_ins_hand_on_the_real_modules() -> None:
    """In a fresh interpreter: importing lobbyd (and nats-py through it) leaves ssl,
    _hashlib and JetStream out; ssl_module() then gives asyncio and nats-py the real
    module, JetStream comes when imported, and hashlib/hmac work on Python's own code."""
    script = """
import sys
sys.path.insert(0, sys.argv[1])
import lobbyd
nats = lobbyd.import_nats(["nats://127.0.0.1:4222"])
import asyncio.sslproto, asyncio.selector_events, asyncio.base_events, nats.aio.client
assert "ssl" not in sys.modules and "_hashlib" not in sys.modules, "OpenSSL imported"
assert asyncio.sslproto.ssl is None and type(nats.aio.client.ssl).__name__ == "LazyModule"
assert lobbyd.hmac.compare_digest(b"a", b"a") and not lobbyd.hmac.compare_digest(b"a", b"b")
assert lobbyd.PAGE_HEADERS["Content-Security-Policy"].count("sha256-") == 1
assert "nats.js" not in sys.modules and "email" not in sys.modules, "JetStream imported"
assert "datetime" not in sys.modules and type(nats.aio.msg.datetime).__name__ == "LazyModule"
assert "uuid" not in sys.modules and len(str(nats.aio.subscription.uuid4())) == 36
assert "uuid" in sys.modules
lazy = nats.js
assert type(lazy).__name__ == "LazyModule"
status = nats.js.api.Header.STATUS  # what nats-py's client reads in a status header
assert "nats.js.api" not in sys.modules and status == "Status", "the module for one name"
assert nats.js.api.ConsumerConfig  # any other name: nats.js.api alone
assert "nats.js.api" in sys.modules and "nats.js" not in sys.modules, "all of JetStream"
assert "email" not in sys.modules and "datetime" not in sys.modules
real = sys.modules["nats.js.api"].Header
for name, ours in lobbyd.StatusHeader.__members__.items():  # the same keys, either way
    assert real[name] == ours and hash(real[name]) == hash(ours) == hash(ours.value), name
    assert {real[name].value: 1}.get(ours) == 1 == {ours.value: 1}.get(real[name])
assert nats.js.api.ConsumerConfig._to_utc_iso(nats.aio.msg.datetime.datetime(2026, 1, 2)) == \
    "2026-01-02T00:00:00Z"  # datetime, imported when first used, in both modules
from nats.js.api import KeyValueConfig  # as kv mode imports it
context = nats.js.JetStreamContext  # as nc.jetstream() reaches it: the real package
assert nats.js is sys.modules["nats.js"] and nats.js.api is sys.modules["nats.js.api"]
assert nats.js.api.KeyValueConfig is KeyValueConfig and nats.js.api.Header is real
assert lazy.JetStreamContext is context and lazy.api.Header is real
assert "email" in sys.modules
ssl = lobbyd.ssl_module()
for m in (asyncio.sslproto, asyncio.selector_events, asyncio.base_events, nats.aio.client):
    assert m.ssl is ssl, m
assert asyncio.sslproto.SSLAgainErrors == (ssl.SSLWantReadError, ssl.SSLSyscallError)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("why", ["forced", "untested"])
def test_plain_nats_py_reads_the_real_status_header(why: str) -> None:
    """StatusHeader names what the tested nats-py releases read in a status header, no
    more: on plain nats-py (LOBBYD_PLAIN_NATS=1, or a release outside the tested ones)
    the client reads nats.js.api's own Header."""
    script = """
import sys
sys.path.insert(0, sys.argv[1])
import lobbyd
environ = {}
if sys.argv[2] == "forced":
    environ["LOBBYD_PLAIN_NATS"] = "1"
else:
    lobbyd.untested_nats_py = lambda nats: "nats-py 9.9 is not one tested"
natspy = lobbyd.NatsPy(environ, ["nats://127.0.0.1:4222"])
assert natspy.plain, natspy.plain
header = natspy.nats.js.api.Header  # what the client reads
assert header is not lobbyd.StatusHeader and "nats.js.api" in sys.modules, header
assert header is sys.modules["nats.js.api"].Header
assert lobbyd.NatsPy({}, ["nats://127.0.0.1:4222"]).plain == ("" if sys.argv[2] == "forced"
                                                             else "nats-py 9.9 is not one tested")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script, str(ROOT), why], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_machines_fqdn_is_learnt_without_the_idna_codec() -> None:
    """RequestGuard.learn_fqdn() finds what socket.getfqdn() finds, and (for an ASCII
    host name) without importing the idna codec and unicodedata, which stay for good."""
    script = """
import sys, socket
sys.path.insert(0, sys.argv[1])
import lobbyd
guard = lobbyd.RequestGuard.__new__(lobbyd.RequestGuard)
guard.names = frozenset()
guard.learn_fqdn()
assert "encodings.idna" not in sys.modules and "unicodedata" not in sys.modules
assert guard.names == {socket.getfqdn().lower().rstrip(".")}, guard.names
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
