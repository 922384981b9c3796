"""Wire format: the envelope, decoding, and garbage on the subject."""

from __future__ import annotations

import json

import pytest
from conftest import wait_for

from lobbyd import LabelCache, Packet, PacketError, decode_envelope, encode_envelope

SUBJECT = "lobby.discovery"


def test_encode_is_the_go_envelope() -> None:
    data = encode_envelope(Packet("a.example.com", ("service:web",), 7))
    assert json.loads(data) == {"discovery": {"hostname": "a.example.com",
                                              "labels": ["service:web"], "last_check": 7},
                                "message": "hi"}


def test_decode_normalises_labels_and_shares_them() -> None:
    cache = LabelCache()
    msg = {"discovery": {"hostname": "h", "labels": ["b", " a ", "b"], "last_check": 1},
           "message": "hi"}
    first, second, third = (decode_envelope(json.dumps(msg).encode(), cache) for _ in range(3))
    assert first == second == ("hi", "h", ("a", "b"))
    assert second[2] is third[2]  # a list seen twice is stored once


def test_goodbye_may_carry_only_the_hostname() -> None:
    cache = LabelCache()
    for discovery in ({"hostname": "h"}, {"hostname": "h", "labels": None},
                      {"hostname": "h", "labels": []}):
        data = json.dumps({"discovery": discovery, "message": "goodbye"}).encode()
        assert decode_envelope(data, cache) == ("goodbye", "h", ())


GARBAGE = [
    b"", b"not json", b"[]", b"42", b'"hi"', b"{}", b"\x00\x01\x02",
    b'{"message":"hi"}', b'{"discovery":[],"message":"hi"}',
    b'{"discovery":{"hostname":"h","labels":[]},"message":"hello"}',
    b'{"discovery":{"hostname":"h","labels":[]}}',
    b'{"discovery":{"hostname":"","labels":[]},"message":"hi"}',
    b'{"discovery":{"hostname":5,"labels":[]},"message":"hi"}',
    b'{"discovery":{"labels":[]},"message":"hi"}',
    b'{"discovery":{"hostname":"h","labels":"a,b"},"message":"hi"}',
    b'{"discovery":{"hostname":"h","labels":[1,2]},"message":"hi"}',
    b'{"discovery":{"hostname":"h","labels":[["x"]]},"message":"hi"}',
    b'{"discovery":{"hostname":"h","labels":["a\\nb"]},"message":"hi"}',
    b'{"discovery":{"hostname":"h","labels":[""]},"message":"hi"}',
    b'{"discovery":{"hostname":"a b","labels":[]},"message":"hi"}',
    ('{"discovery":{"hostname":"' + "h" * 254 + '","labels":[]},"message":"hi"}').encode(),
    json.dumps({"discovery": {"hostname": "h", "labels": [f"l{i}" for i in range(1001)]},
                "message": "hi"}).encode(),
    json.dumps({"discovery": {"hostname": "h", "labels": ["x" * 1025]},
                "message": "hi"}).encode(),
    b"[" * 100_000 + b"]" * 100_000,
]


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_raises_packet_error(data: bytes) -> None:
    with pytest.raises(PacketError):
        decode_envelope(data, LabelCache())


@pytest.mark.parametrize("hostname", ["a\u202eb.example.com", "a\u200bb", "\ufeffa", "a\x85b",
                                      "a\x9fb", "a\u2028b", "a\u2029b", "a\u00adb",
                                      "a\U000e0061b"])
@pytest.mark.parametrize("form", ["compact", "json"])
def test_hostnames_with_invisible_or_control_characters_are_refused(hostname: str,
                                                                     form: str) -> None:
    """Both decoders (the fast one and the JSON parser, behind a leading space) refuse a
    hostname that could show as another one (bidi overrides, zero-width and C1 controls)."""
    data = encode_envelope(Packet(hostname, ("x",)))
    with pytest.raises(PacketError):
        decode_envelope(data if form == "compact" else b" " + data, LabelCache())
    with pytest.raises(PacketError):  # the same in a label
        decode_envelope(encode_envelope(Packet("h", (hostname,))), LabelCache())


# ----------------------------------------------------------------- with daemons


def test_packets_on_the_wire_have_the_go_shape(lobbyd, nats) -> None:
    sub = nats.client()
    sub.subscribe(SUBJECT)
    lobbyd("a", LABELS="service:web,b:1")
    subject, payload = sub.next_msg(timeout=5)
    assert subject == SUBJECT
    envelope = json.loads(payload)
    assert set(envelope) == {"discovery", "message"} and envelope["message"] == "hi"
    assert set(envelope["discovery"]) == {"hostname", "labels", "last_check"}
    assert envelope["discovery"]["hostname"] == "a"
    assert envelope["discovery"]["labels"] == ["b:1", "service:web"]
    assert isinstance(envelope["discovery"]["last_check"], int)


def test_a_go_daemons_packet_is_listed_and_its_goodbye_removes_it(lobbyd, nats) -> None:
    a = lobbyd("a", TTL=300)  # only the goodbye can take go.example.com away in time
    pub = nats.client()
    # exactly what the Go daemon sends (its field order, its last_check)
    pub.publish(SUBJECT, b'{"discovery":{"hostname":"go.example.com","labels":'
                         b'["service:smtp","public_ip4:1.2.3.4"],"last_check":1630612478},'
                         b'"message":"hi"}')
    pub.flush()
    wait_for(lambda: a.labels_of("go.example.com") == ["public_ip4:1.2.3.4", "service:smtp"],
             what="Go packet listed")
    entry = next(d for d in a.get_json("/v1/discoveries") if d["hostname"] == "go.example.com")
    assert entry["last_check"] > 1630612478  # receiver's clock, not the sender's
    pub.publish(SUBJECT, b'{"discovery":{"hostname":"go.example.com","labels":null,'
                         b'"last_check":0},"message":"goodbye"}')
    pub.flush()
    wait_for(lambda: "go.example.com" not in a.hostnames(), what="goodbye")


def test_garbage_on_the_subject_changes_nothing(lobbyd, nats) -> None:
    a = lobbyd("a", LABELS="x:1")
    lobbyd("b")
    wait_for(lambda: a.hostnames() == ["a", "b"], what="a and b")
    before = a.get_json("/v1/discoveries")
    pub = nats.client()
    for _ in range(20):
        for data in GARBAGE[:-1]:
            pub.publish(SUBJECT, data)
    pub.publish(SUBJECT, json.dumps({"discovery": {"hostname": "h", "labels": [
        f"l{i}" for i in range(10_000)]}, "message": "hi"}))
    pub.flush()
    # a marker packet after the garbage proves the garbage was processed first
    pub.publish_json(SUBJECT, {"discovery": {"hostname": "marker", "labels": []},
                               "message": "hi"})
    pub.flush()
    wait_for(lambda: "marker" in a.hostnames(), what="marker after garbage")
    after = a.get_json("/v1/discoveries")
    assert [d["hostname"] for d in after] == ["a", "b", "marker"]
    assert [d["labels"] for d in after[:2]] == [d["labels"] for d in before]
    assert a.proc.poll() is None
    # the log is rate-limited: ~500 bad packets make a handful of lines
    assert 1 <= a.logs().count("dropped a packet") <= 10


class Recorder:
    """What nats-py's parser hands a client, with lobbyd's direct hook for sid 1."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, ...]] = []
        self.direct = {1: lambda data: self.seen.append(("direct", data))}

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes | None) -> None:
        if sid in self.direct and not reply and not headers:
            self.direct[sid](data)
        else:
            self.seen.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: object) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))


FRAMES = [
    b"MSG lobby.discovery 1 5\r\nhello\r\n", b"MSG lobby.discovery 1 0\r\n\r\n",
    b"MSG lobby.discovery 1 7\r\nwith\r\nx\r\n", b"MSG lobby.discovery 2 3\r\nabc\r\n",
    b"MSG lobby.discovery 1 _INBOX.x 3\r\nabc\r\n", b"MSG _INBOX.a.b 3 2\r\n{}\r\n",
    b"HMSG lobby.discovery 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n", b"PING\r\n", b"PONG\r\n",
    b"+OK\r\n", b'INFO {"server_id":"x","max_payload":1048576}\r\n',
    b"-ERR 'Slow Consumer'\r\n", b"MSG lobby.discovery 1 " + b"9" * 3 + b"\r\n" + b"x" * 999
    + b"\r\n",
]


def test_the_direct_parser_hands_on_what_nats_py_would() -> None:
    """Random mixes of frames, cut at random places: lobbyd's parser and nats-py's own
    deliver the same messages and commands in the same order."""
    import asyncio
    import random

    import nats
    from nats.protocol.parser import Parser

    from lobbyd import direct_parser

    parser = direct_parser(nats)
    assert parser is not None
    rnd = random.Random(5)

    async def feed(p: Parser, chunks: list[bytes]) -> None:
        for chunk in chunks:
            await p.parse(chunk)

    for _ in range(400):
        stream = b"".join(rnd.choices(FRAMES, weights=[20] + [1] * (len(FRAMES) - 1),
                                      k=rnd.randint(1, 60)))
        cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1,
                                                              rnd.randint(0, 8))))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        ours, theirs = Recorder(), Recorder()
        asyncio.run(feed(parser(ours), chunks))
        asyncio.run(feed(Parser(theirs), chunks))
        assert ours.seen == theirs.seen
    for junk in (b"FOO\r\n", b"MSG lobby.discovery 1 x\r\nabc\r\n"):
        for p in (parser(Recorder()), Parser(Recorder())):
            with pytest.raises(nats.errors.ProtocolError):
                asyncio.run(feed(p, [FRAMES[0], junk, FRAMES[0]]))


# --------------------------------------------------------------------------- join sync


def test_join_answer_chunks_round_trip_within_the_budget() -> None:
    from lobbyd import decode_sync_chunk, sync_chunks

    hosts = [(f"host{i}.example.com", (f"role:{i % 3}", "service:web"), i / 7)
             for i in range(200)]
    chunks = sync_chunks(hosts, budget=1024)
    assert len(chunks) > 5 and all(len(chunk) <= 1024 + 100 for chunk in chunks)
    cache, seen = LabelCache(), []
    for n, chunk in enumerate(chunks):
        decoded, done = decode_sync_chunk(chunk, cache)
        assert done is (n == len(chunks) - 1)
        seen += decoded
    assert seen == [(name, labels, round(age, 3)) for name, labels, age in hosts]


def test_join_answer_of_an_empty_registry_and_of_a_huge_host() -> None:
    from lobbyd import decode_sync_chunk, sync_chunks

    assert sync_chunks([], 100) == [b'{"hosts":[],"done":true}']
    big = [("a", tuple(f"label:{i}" for i in range(50)), 1.0), ("b", (), 2.0)]
    chunks = sync_chunks(big, budget=10)  # each host alone in a chunk, never dropped
    assert [decode_sync_chunk(chunk, LabelCache())[0][0][0] for chunk in chunks] == ["a", "b"]


@pytest.mark.parametrize("data", [
    b"not json", b"[]", b"{}", b'{"hosts":1}', b'{"hosts":[["a"]]}',
    b'{"hosts":[["a",[],"old"]]}', b'{"hosts":[["",[],1]]}', b'{"hosts":[["a",[1],1]]}',
    b'{"hosts":[["a",[[]],1]]}', b'{"hosts":[["a",["x\\u0000"],1]]}',
])
def test_a_join_answer_off_the_contract_is_refused_whole(data: bytes) -> None:
    from lobbyd import decode_sync_chunk

    with pytest.raises(PacketError):
        decode_sync_chunk(data, LabelCache())


def test_js_ack_reads_both_forms_of_the_reply_subject() -> None:
    from lobbyd import js_ack

    assert js_ack(b"$JS.ACK.KV_x.c1.1.42.7.1700000000.3") == (42, 7, 3)
    assert js_ack(b"$JS.ACK.dom.hash.KV_x.c1.1.42.7.1700000000.0.token") == (42, 7, 0)
    for other in (b"", b"_INBOX.x", b"$JS.ACK.a.b", b"$JS.ACK.KV.c.1.x.7.1.3",
                  b"$JS.NAK.KV_x.c1.1.42.7.1700000000.3"):
        assert js_ack(other) is None


# --------------------------------------------------------------------------- nats-py


def test_nats_py_tricks_switch_to_plain_nats_py(monkeypatch) -> None:
    """One switch: LOBBYD_PLAIN_NATS, or an untested nats-py, gives plain nats-py."""
    import nats

    import lobbyd

    urls = ["nats://127.0.0.1:4222"]
    tricks = lobbyd.NatsPy({}, urls)
    assert tricks.plain == ""  # the venv's nats-py is one tested
    assert tricks.client(batch_reads=True) is not nats.aio.client.Client
    plain = lobbyd.NatsPy({"LOBBYD_PLAIN_NATS": "1"}, urls)
    assert plain.plain and plain.client(batch_reads=True) is nats.aio.client.Client

    class Sub:
        _id = 1

    class Conn:
        direct: dict = {}

    assert plain.direct(Conn(), Sub(), print) is False and not Conn.direct
    assert plain.direct_stream(Conn(), Sub(), print) is False
    assert tricks.direct(Conn(), Sub(), print) is True and Conn.direct == {1: print}
    monkeypatch.setattr(lobbyd, "NATS_PY_TESTED", ((2, 0), (2, 1)))
    assert "is not one tested (2.0 to 2.1)" in lobbyd.NatsPy({}, urls).plain
    from importlib.metadata import version

    assert lobbyd.nats_py_version(nats) == tuple(map(int, version("nats-py").split(".")[:2]))
