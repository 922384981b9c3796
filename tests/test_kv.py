"""DISCOVERY_MODE=kv: JetStream key-value buckets instead of the broadcast.

Real nats-server with JetStream (memory storage, a store dir under tmp_path), real
lobbyd processes. KEEP_ALIVE=1 and TTL=3 keep every wait short.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest
from conftest import NatsServer, run_lobbyd, wait_for
from harness import jetstream_ready, nats_cluster
from watchclient import EventReader, hold, index_of, returned

import lobbyd as L

KV = {"DISCOVERY_MODE": "kv", "KEEP_ALIVE": "1", "TTL": "3"}


@pytest.fixture
def js(tmp_path: Path):
    server = NatsServer(tmp_path, jetstream=True).start()
    yield server
    server.stop()


@pytest.fixture
def kv(lobbyd, js):
    """Factory: a lobbyd in kv mode on the JetStream server."""
    def make(name: str, **env: str | int):
        return lobbyd(name, nats=js, **{**KV, **env})
    return make


def health(d) -> dict:
    return json.loads(d.request("GET", "/v1/health")[2])


def is_reaper(d) -> bool:
    return health(d)["drivers"][0].get("reaper") is True


def sees(d, names: list[str]) -> bool:
    return d.hostnames() == names


def write_hosts(js, packets: dict[str, bytes]) -> None:
    """Write hosts into the buckets as their lobbyds would: liveness key, then packet."""
    raw = js.client()
    for key, packet in packets.items():
        raw.publish(f"$KV.lobby_discovery_alive.{key}", b"")
        raw.publish(f"$KV.lobby_discovery_hosts.{key}", packet)
    raw.flush()
    raw.close()


def stored(js, key: str) -> bytes | None:
    """The value of a key of the hosts bucket, as the server holds it."""
    raw = js.client()
    raw.subscribe("_INBOX.stored")
    raw.publish("$JS.API.STREAM.MSG.GET.KV_lobby_discovery_hosts",
                json.dumps({"last_by_subj": f"$KV.lobby_discovery_hosts.{key}"}),
                reply="_INBOX.stored")
    message = json.loads(raw.next_msg()[1]).get("message")
    raw.close()
    return base64.b64decode(message["data"]) if message else None


def packet(name: str, *labels: str) -> bytes:
    return L.encode_envelope(L.Packet(name, labels))


@pytest.mark.parametrize("name", ["web-1.example.com", "a_b", "ünï.example", "a..b", "x.",
                                  "reaper.0", "h.x", "-", "a*b>c"])
def test_every_hostname_has_a_key_nats_accepts_and_back(name: str) -> None:
    key = L.kv_host_key(name)
    assert re.fullmatch(r"[-_a-zA-Z0-9]+(\.[-_a-zA-Z0-9]+)*", key), key
    assert key.startswith(("h.", "x.")) and L.kv_key_host(key) == name
    assert L.kv_key_host("reaper.1") is None


def test_bucket_names_come_from_the_subject() -> None:
    assert L.kv_bucket_base("lobby.discovery") == "lobby_discovery"
    assert L.kv_bucket_base("prod.eu-1.lobby") == "prod_eu-1_lobby"


def test_bad_mode_and_a_driver_other_than_nats_are_config_errors() -> None:
    result = run_lobbyd({"DISCOVERY_MODE": "gossip"})
    assert result.returncode == 78 and "DISCOVERY_MODE" in result.stderr
    result = run_lobbyd({"DISCOVERY_MODE": "kv", "DRIVER": "Redis"})
    assert result.returncode == 78 and "DRIVER=NATS only" in result.stderr


def test_join_labels_and_goodbye(kv) -> None:
    # TTL=10: a reaper would take b no sooner than ~8 s after its stop, so a goodbye heard
    # within 5 s is b's own, however slowly a loaded machine runs the rest
    a = kv("a", LABELS="service:web", TTL="10")
    b = kv("b", LABELS="service:smtp", TTL="10")
    wait_for(lambda: sees(a, ["a", "b"]) and sees(b, ["a", "b"]), what="a and b")
    c = kv("c", TTL="10")  # learns the fleet from the bucket's contents, nobody's keep-alive
    wait_for(lambda: sees(c, ["a", "b", "c"]), what="c lists the fleet")
    assert c.labels_of("a") == ["service:web"] and c.labels_of("b") == ["service:smtp"]
    assert health(c)["drivers"][0]["driver"] == "NATS-KV"

    a.request("POST", "/v1/labels", body="role:x")
    wait_for(lambda: b.labels_of("a") == ["role:x", "service:web"], what="label added")
    a.request("DELETE", "/v1/labels", body="role:x")
    wait_for(lambda: c.labels_of("a") == ["service:web"], what="label removed")

    assert b.stop() == 0
    wait_for(lambda: sees(a, ["a", "c"]) and sees(c, ["a", "c"]), timeout=5,
             what="b's goodbye heard")
    d = kv("d", TTL="10")  # both of b's keys are gone: a newcomer does not list it either
    wait_for(lambda: sees(d, ["a", "c", "d"]), what="d lists the fleet")
    time.sleep(1.5)  # past d's first watch values: b must not come back
    assert sees(d, ["a", "c", "d"])


def test_keep_alives_are_not_delivered_to_peers(kv) -> None:
    a = kv("a")
    b = kv("b")
    wait_for(lambda: sees(a, ["a", "b"]), what="a sees b")
    wait_for(lambda: b.metric("lobbyd_packets_published_total") >= 3, what="b's keep-alives")
    heard = a.metric('lobbyd_packets_received_total{message="hi"}')
    published = b.metric("lobbyd_packets_published_total")
    wait_for(lambda: b.metric("lobbyd_packets_published_total") >= published + 4,
             timeout=10, what="four more keep-alives of b")
    assert a.metric('lobbyd_packets_received_total{message="hi"}') == heard
    assert sees(a, ["a", "b"])  # and b has not expired from a's registry either


def test_a_killed_host_is_reaped_by_an_elected_reaper(kv) -> None:
    a, b, c = kv("a"), kv("b"), kv("c")
    for d in (a, b, c):
        wait_for(lambda d=d: sees(d, ["a", "b", "c"]), what=f"{d.name} sees all")
    wait_for(lambda: sum(map(is_reaper, (a, b, c))) == 3, timeout=10,
             what="three reaper slots held")
    c.kill()  # gone within TTL + a scan (1 s) + slack for a busy machine
    wait_for(lambda: sees(a, ["a", "b"]) and sees(b, ["a", "b"]), timeout=3 + 1 + 4,
             what="c reaped")
    # said once the reaper's delete is answered: a and b may drop c a moment before
    wait_for(lambda: "reaped 1 host silent for over 3s: c" in a.logs() + b.logs(),
             what="the reaper's line")
    assert 'lobbyd_hosts_left_total{reason="goodbye"} 1' in a.request("GET", "/metrics")[2].decode()


def test_a_killed_reaper_is_replaced_within_ttl(kv) -> None:
    daemons = [kv(name) for name in ("a", "b", "c", "d")]
    names = ["a", "b", "c", "d"]
    for d in daemons:
        wait_for(lambda d=d: sees(d, names), what=f"{d.name} sees all")
    wait_for(lambda: sum(map(is_reaper, daemons)) == 3, timeout=10, what="three reapers")
    spare = next(d for d in daemons if not is_reaper(d))
    victim = next(d for d in daemons if is_reaper(d))
    victim.kill()  # its slot key expires within TTL; the jitter (<= 1 s) and a tick
    wait_for(lambda: is_reaper(spare), timeout=3 + 2 + 4, what=f"{spare.name} takes the slot")
    rest = [d for d in daemons if d is not victim]
    left = [n for n in names if n != victim.name]
    for d in rest:
        wait_for(lambda d=d: sees(d, left), timeout=5, what=f"{victim.name} gone from {d.name}")
    assert sum(map(is_reaper, rest)) == 3


def test_nats_server_restarted_with_its_memory_lost(kv, js) -> None:
    a, b, c = kv("a", LABELS="x:1"), kv("b"), kv("c")
    for d in (a, b, c):
        wait_for(lambda d=d: sees(d, ["a", "b", "c"]), what=f"{d.name} sees all")
    js.stop()
    c.kill()  # dies while the server is away: nobody will hear of it from the bucket
    js.start()  # same port, JetStream's memory storage empty
    wait_for(lambda: health(a)["status"] == "ok" and health(b)["status"] == "ok",
             what="reconnected")
    newcomer = kv("n")  # it sees only what was written again into the new bucket
    # a and b wrote their packets again at once on reconnecting (the bench times it)
    # (a bound for a loaded machine: n starts, binds and reads the buckets in that time)
    wait_for(lambda: sees(newcomer, ["a", "b", "n"]), timeout=15, what="bucket refilled")
    assert newcomer.labels_of("a") == ["x:1"]
    for d in (a, b):  # c never wrote again: forgotten KEEP_ALIVE + 1 s after the watch
        wait_for(lambda d=d: sees(d, ["a", "b", "n"]), timeout=5, what=f"{d.name} whole")


def test_a_newcomer_reads_a_big_fleet_at_once_without_a_line_per_host(kv, js) -> None:
    a = kv("a", TTL="60")  # the liveness bucket's MaxAge: the written hosts stay alive
    wait_for(lambda: health(a)["status"] == "ok", what="buckets")
    names = [f"f{i:04d}" for i in range(3000)]
    fleet = {L.kv_host_key(name): packet(name, "service:web", f"n:{i}")
             for i, name in enumerate(names)}
    fleet[L.kv_host_key("bad")] = b"not JSON"  # dropped, counted, the rest goes on
    fleet[L.kv_host_key("ünï")] = packet("ünï", "x:1")  # an x. key
    write_hosts(js, fleet)
    everyone = sorted(["a", "ünï", *names])
    wait_for(lambda: sees(a, everyone), what="a lists the written fleet")
    n = kv("n", TTL="60")
    wait_for(lambda: sees(n, sorted([*everyone, "n"])), what="n lists the fleet")
    assert n.labels_of("f0042") == ["n:42", "service:web"] and n.labels_of("ünï") == ["x:1"]
    # said once the watch's initial values are in: its API may list them a moment before
    wait_for(lambda: re.search(r"learned \d+ hosts from the bucket lobby_discovery_hosts",
                               n.logs()), what="n's join line")
    logs = n.logs()
    assert "new host f" not in logs  # no line per host of the join
    assert n.metric('lobbyd_packets_dropped_total{reason="invalid"}') == 1
    write_hosts(js, {L.kv_host_key("f0001"): packet("f0001", "service:db")})
    wait_for(lambda: n.labels_of("f0001") == ["service:db"], what="a change after the join")
    write_hosts(js, {L.kv_host_key("late"): packet("late")})
    wait_for(lambda: "late" in n.hostnames(), what="a host after the join")
    assert "new host late" in n.logs()


def test_after_a_restart_a_packet_written_again_as_it_was_changes_nothing(kv, js) -> None:
    a = kv("a", TTL="60", LABELS="x:1")
    # b forgets what the new watch lacks KEEP_ALIVE + 1 s after it: long enough for the
    # steps below to write "same" again first (at KEEP_ALIVE=1, a slow machine's
    # reconnections took longer: "same" was forgotten and came back as new, decoded)
    b = kv("b", TTL="60", KEEP_ALIVE="5")
    wait_for(lambda: sees(b, ["a", "b"]), what="b sees a")
    write_hosts(js, {"h.same": packet("same", "k:1"), "h.changed": packet("changed", "k:1"),
                     "h.gone": packet("gone", "k:1")})
    wait_for(lambda: sees(b, ["a", "b", "changed", "gone", "same"]), what="b sees all")
    before = stored(js, "h.a")
    heard = b.metric('lobbyd_packets_received_total{message="hi"}')
    js.stop()
    js.start()  # its memory lost
    wait_for(lambda: health(a)["status"] == "ok" and health(b)["status"] == "ok",
             what="reconnected")
    wait_for(lambda: stored(js, "h.a") is not None, what="a wrote its packet again")
    assert stored(js, "h.a") == before  # byte for byte: its labels did not change
    write_hosts(js, {"h.same": packet("same", "k:1"), "h.changed": packet("changed", "k:2")})
    wait_for(lambda: b.labels_of("changed") == ["k:2"], what="the changed packet")
    # "gone" was not written again: forgotten KEEP_ALIVE + 1 s after the new watch
    wait_for(lambda: sees(b, ["a", "b", "changed", "same"]), timeout=10, what="gone forgotten")
    assert "goodbye from same" not in b.logs()
    assert b.labels_of("same") == ["k:1"] and b.labels_of("a") == ["x:1"]
    # only the changed packet was decoded again (a's, b's and same's were as they were)
    assert b.metric('lobbyd_packets_received_total{message="hi"}') == heard + 1


def test_jetstream_unavailable_is_one_clear_error_and_no_crash(lobbyd, nats) -> None:
    a = lobbyd("a", wait=False, **KV)  # `nats` runs without -js
    wait_for(lambda: a.request("GET", "/v1/discovery")[0] == 200, what="API up")
    wait_for(lambda: "JetStream unavailable" in a.logs(), what="the error")
    time.sleep(4.5)  # two more retries of the bucket set-up, silently
    assert a.proc.poll() is None
    lines = [line for line in a.logs().splitlines() if "JetStream unavailable" in line]
    assert len(lines) == 1 and "ERROR" in lines[0] and "-js" in lines[0], lines
    status, _, body = a.request("GET", "/v1/health")
    driver = json.loads(body)["drivers"][0]
    assert status == 503 and driver["connected"] is False and "JetStream" in driver["error"]
    assert a.hostnames() == ["a"]  # the API keeps serving
    assert "Traceback" not in a.logs()


def test_the_api_is_unchanged_in_kv_mode(kv) -> None:
    a = kv("a", LABELS="service:web,role:lb")
    b = kv("b", LABELS="service:db,prometheus:node")
    wait_for(lambda: sees(a, ["a", "b"]), what="a sees b")
    status, _, body = a.request("GET", "/")
    assert status == 200 and [p["hostname"] for p in json.loads(body)] == ["a", "b"]
    assert a.get_json("/v1/discovery")["labels"] == ["role:lb", "service:web"]
    assert a.get_json("/v1/resolve?label=service:db") == ["b"]
    assert [(p["hostname"], p["labels"]) for p in a.get_json("/v1/discoveries?prefixes=service:")
            ] == [("a", ["service:web"]), ("b", ["service:db"])]
    assert a.get_json("/v1/prometheus/node") == [{"Targets": ["b:9100"], "Labels": {}}]

    index = index_of(a.port, "/v1/discoveries")
    held = hold(a.port, "/v1/discoveries", index)
    events = EventReader(a.port)
    events.wait(1)
    time.sleep(2.5)  # keep-alives of both go on: they must wake nothing
    assert not held.done() and len(events.events) == 1
    b.request("POST", "/v1/labels", body="role:new")
    status, headers, body, _seconds = returned(held)
    assert status == 200 and int(headers["x-lobby-index"]) > index
    assert next(p["labels"] for p in json.loads(body) if p["hostname"] == "b") == [
        "prometheus:node", "role:new", "service:db"]
    events.wait(2)
    assert events.events[1][0] == "changed" and events.events[1][2]["hostname"] == "b"
    b.request("DELETE", "/v1/labels", body="role:new")
    wait_for(lambda: a.labels_of("b") == ["prometheus:node", "service:db"], what="removed")


def test_plain_nats_py_joins_labels_and_goodbye(kv) -> None:
    """The kv mode on public nats-py only (LOBBYD_PLAIN_NATS=1), beside the fast path."""
    a = kv("a", LABELS="service:web", LOBBYD_PLAIN_NATS="1", TTL="10")  # TTL: see above
    b = kv("b", LABELS="service:smtp", TTL="10")
    wait_for(lambda: sees(a, ["a", "b"]) and sees(b, ["a", "b"]), what="a and b")
    c = kv("c", LOBBYD_PLAIN_NATS="1", TTL="10")  # the bucket's contents, nats-py's callbacks
    wait_for(lambda: sees(c, ["a", "b", "c"]), what="c lists the fleet")
    assert c.labels_of("b") == ["service:smtp"]
    # said once the watch's initial values are in: its API may list them a moment before
    wait_for(lambda: "learned 2 hosts from the bucket" in c.logs(), what="c's join line")
    b.request("POST", "/v1/labels", body="role:x")
    wait_for(lambda: a.labels_of("b") == ["role:x", "service:smtp"], what="label added")
    assert b.stop() == 0
    wait_for(lambda: sees(a, ["a", "c"]) and sees(c, ["a", "c"]), timeout=5,
             what="b's goodbye heard")
    assert "using plain nats-py" in c.logs() and "Traceback" not in a.logs() + c.logs()


# ----------------------------------------------------------------- what the bucket may not do

def js_api(js, subject: str, request: dict) -> dict:
    raw = js.client()
    raw.subscribe("_INBOX.api")
    raw.publish(subject, json.dumps(request), reply="_INBOX.api")
    answer = json.loads(raw.next_msg()[1])
    raw.close()
    return answer


def test_a_value_speaks_only_for_the_host_its_key_names(kv, js) -> None:
    a = kv("a", TTL="60")
    write_hosts(js, {L.kv_host_key("victim"): packet("victim", "role:real")})
    wait_for(lambda: a.labels_of("victim") == ["role:real"], what="a lists victim")
    write_hosts(js, {L.kv_host_key("victim"): packet("other", "role:evil"),  # under victim's key
                     L.kv_host_key("attacker2"): L.encode_envelope(L.Packet("victim"),
                                                                   "goodbye"),
                     L.kv_host_key("marker"): packet("marker")})  # written last
    wait_for(lambda: "marker" in a.hostnames(), what="the writes applied")
    assert a.hostnames() == ["a", "marker", "victim"] and a.labels_of("victim") == ["role:real"]
    assert a.metric('lobbyd_packets_dropped_total{reason="subject"}') == 2


def test_our_key_written_by_another_is_written_again(kv, js) -> None:
    a = kv("a", LABELS="role:real")
    wait_for(lambda: stored(js, "h.a") is not None, what="a's packet stored")
    write_hosts(js, {"h.a": packet("a", "role:fake")})
    wait_for(lambda: json.loads(stored(js, "h.a"))["discovery"]["labels"] == ["role:real"],
             timeout=5, what="a writes its own packet again")
    assert a.labels_of("a") == ["role:real"]
    assert "another's value in our key h.a: ignored; publishing ours again" in a.logs()


def test_bucket_settings_that_break_the_fleet_are_said(kv, js) -> None:
    common = {"max_msgs_per_subject": 1, "discard": "new", "storage": "memory",
              "num_replicas": 1, "allow_rollup_hdrs": True, "deny_delete": True,
              "allow_direct": True, "max_age": 0}
    for bucket, extra in (("lobby_discovery_hosts", {"max_bytes": 64}),
                          ("lobby_discovery_alive", {})):  # no TTL
        answer = js_api(js, f"$JS.API.STREAM.CREATE.KV_{bucket}",
                        {"name": f"KV_{bucket}", "subjects": [f"$KV.{bucket}.>"],
                         **common, **extra})
        assert "error" not in answer, answer
    a = kv("a", start=False)
    a.start(wait=False)
    wait_for(lambda: "write_error" in health(a)["drivers"][0], what="a failed write said")
    driver = health(a)["drivers"][0]
    assert [w.split(" ", 2)[1] for w in driver["warnings"]] == ["lobby_discovery_hosts",
                                                                  "lobby_discovery_alive"]
    assert "maximum bytes" in driver["write_error"], driver
    logs = a.logs()
    assert "is limited to 64 bytes" in logs and "has no TTL" in logs
    assert "writing to the buckets lobby_discovery_hosts, lobby_discovery_alive failed" in logs


def stream_info(server: NatsServer, stream: str) -> dict:
    raw = server.client()
    try:
        raw.subscribe("_INBOX.info")
        raw.publish(f"$JS.API.STREAM.INFO.{stream}", b"", reply="_INBOX.info")
        return json.loads(raw.next_msg()[1])
    finally:
        raw.close()


def replicas(server: NatsServer, bucket: str) -> int:
    return stream_info(server, f"KV_{bucket}")["config"]["num_replicas"]


def test_buckets_get_one_replica_on_one_server(kv, js) -> None:
    a = kv("a")
    wait_for(lambda: health(a)["status"] == "ok", what="a set up")
    assert replicas(js, "lobby_discovery_hosts") == replicas(js, "lobby_discovery_alive") == 1


def test_auto_takes_one_replica_when_jetstream_cannot_place_three(lobbyd, js) -> None:
    """Three URLs in NATS_URL, but one server without a cluster: JetStream refuses three
    replicas, so KV_REPLICAS=auto creates the buckets with one, and says so once each."""
    url = f"{js.url},nats://127.0.0.1:1,nats://127.0.0.1:2"
    a = lobbyd("a", nats=js, NATS_URL=url, **KV)
    wait_for(lambda: health(a)["status"] == "ok", what="a set up")
    assert replicas(js, "lobby_discovery_hosts") == replicas(js, "lobby_discovery_alive") == 1
    lines = [line for line in a.logs().splitlines() if "cannot place 3 replicas" in line]
    assert len(lines) == 2 and "WARNING" in lines[0] and "KV_REPLICAS=3 insists" in lines[0]


def test_buckets_get_three_replicas_on_a_jetstream_cluster(lobbyd, tmp_path) -> None:
    """KV_REPLICAS=auto on a 3-node JetStream cluster: NATS_URL names one node, the
    server announces the others, and the buckets get 3 replicas; KV_REPLICAS=2 gets 2.
    On one server KV_REPLICAS=3 is refused by JetStream: a clear error, retried."""
    nodes = nats_cluster(tmp_path, 3, jetstream=True)
    try:
        for node in nodes:
            node.start()
        jetstream_ready(nodes[0])
        a = lobbyd("a", nats=nodes[0], **KV)
        b = lobbyd("b", nats=nodes[1], **KV)
        wait_for(lambda: sees(a, ["a", "b"]) and sees(b, ["a", "b"]), what="a and b")
        for bucket in ("lobby_discovery_hosts", "lobby_discovery_alive"):
            info = stream_info(nodes[2], f"KV_{bucket}")
            assert info["config"]["num_replicas"] == 3, info
            assert len(info["cluster"]["replicas"]) == 2  # besides the leader
        c = lobbyd("c", nats=nodes[2], NATS_DISCOVERY_CHANNEL="two", KV_REPLICAS="2", **KV)
        wait_for(lambda: health(c)["status"] == "ok", what="c set up")
        assert replicas(nodes[0], "two_hosts") == replicas(nodes[0], "two_alive") == 2
    finally:
        for node in nodes:
            node.stop()


def test_three_replicas_asked_of_one_server_is_a_clear_error(lobbyd, js) -> None:
    a = lobbyd("a", nats=js, KV_REPLICAS="3", **KV, wait=False)
    wait_for(lambda: "JetStream unavailable" in a.logs(), what="the error")
    assert "replicas > 1 not supported in non-clustered mode" in a.logs()
    assert health(a)["status"] == "disconnected" and a.hostnames() == ["a"]
