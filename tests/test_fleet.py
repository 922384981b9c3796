"""Fleet: what the transports hear, applied to the registry (no sockets)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import lobbyd
from lobbyd import Counters, Fleet, LabelCache, Packet, Registry, encode_envelope


def make_fleet(ttl: float = 30) -> tuple[Fleet, list[str]]:
    calls: list[str] = []

    async def say_hi() -> None:
        calls.append("hi")

    fleet = Fleet(Registry(ttl), Counters(), LabelCache(), ttl,
                  changed=lambda: calls.append("changed"), expire=lambda: calls.append("expire"),
                  say_hi=say_hi, state_changed=lambda: calls.append("state"),
                  joined=lambda: calls.append("joined"), schedule=asyncio.ensure_future)
    return fleet, calls


def test_one_handler_counts_applies_and_logs(caplog) -> None:
    fleet, calls = make_fleet()
    caplog.set_level(logging.INFO, logger="lobbyd")
    fleet.packet(encode_envelope(Packet("a", ("x",))))
    fleet.packet(encode_envelope(Packet("a", ("x",))))  # a keep-alive: no change
    fleet.packet(encode_envelope(Packet("a", ("y",))))
    fleet.packet(b"garbage")
    fleet.packet(encode_envelope(Packet("a"), "goodbye"))
    fleet.packet(encode_envelope(Packet("a"), "goodbye"))  # counted, not applied
    c = fleet.counters
    assert (c.his, c.goodbyes, c.dropped, c.joined, c.left_goodbye) == (3, 2, 1, 1, 1)
    assert calls == ["changed"] * 3 and len(fleet.registry) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "new host a", "new labels of a", "dropped a packet: not JSON: Expecting value: "
        "line 1 column 1 (char 0)", "goodbye from a"]


def test_a_quiet_bulk_read_logs_no_line_per_host(caplog) -> None:
    fleet, _ = make_fleet()
    caplog.set_level(logging.INFO, logger="lobbyd")
    for name in ("a", "b"):
        fleet.packet(encode_envelope(Packet(name, ("x",))), quiet=True)
    fleet.packet(encode_envelope(Packet("a", ("y",))), quiet=True)
    fleet.goodbye("b")  # a value, as the kv mode hands a deleted key: never quiet
    assert fleet.counters.joined == 2 and fleet.counters.left_goodbye == 1
    assert [r.getMessage() for r in caplog.records] == ["goodbye from b"]
    assert fleet.registry.packets()[0][:2] == ("a", ("y",))


def test_join_sync_answers_and_learns_in_chunks() -> None:
    peer, _ = make_fleet()
    now = time.time()
    for i in range(300):
        peer.registry.apply_hi(f"host{i:03d}", (f"role:{i % 5}",), now - i / 10)
    chunks = peer.answer(2048)
    assert len(chunks) > 3 and json.loads(chunks[-1])["done"] is True
    joiner, _ = make_fleet(ttl=20)  # hosts silent for 20 s or more are not learned
    learned = [joiner.learn_chunk(chunk, time.time()) for chunk in chunks]
    assert sum(count for count, _ in learned) == 200
    assert [done for _, done in learned] == [False] * (len(chunks) - 1) + [True]
    assert joiner.learn_chunk(b'{"hosts":[["a",[1],0]],"done":true}', now) == (0, False)


def test_connecting_says_hi_syncs_and_joins_once_every_transport_did() -> None:
    class Quiet:  # a transport that cannot sync: it learns from keep-alives
        kind = "test"

        async def ask_fleet(self, reply, window):
            return False

        async def serve_fleet(self, answer):
            self.served = answer

    async def main() -> list[str]:
        fleet, calls = make_fleet()
        first, second = Quiet(), Quiet()
        fleet.attach(first)  # type: ignore[arg-type]
        fleet.attach(second)  # type: ignore[arg-type]
        await fleet.connected(first)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert "joined" not in calls and first.served == fleet.answer
        await fleet.connected(second)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        return calls

    assert asyncio.run(main()) == ["hi", "hi", "joined"]


def test_a_packet_claiming_our_hostname_is_refused_and_ours_published_again(caplog) -> None:
    async def main() -> tuple[Fleet, list[str]]:
        fleet, calls = make_fleet()
        fleet.own_hostname = "me"
        fleet.own_labels = lambda: ("role:real",)
        fleet.sent_own(("role:real",))
        fleet.registry.apply_hi("me", ("role:real",), time.time(), own=True)
        fleet.packet(encode_envelope(Packet("me", ("role:real",))))  # our echo: fine
        for _ in range(20):  # an impostor, over and over
            fleet.packet(encode_envelope(Packet("me", ("role:fake",))))
        fleet.packet(encode_envelope(Packet("me"), "goodbye"))
        await asyncio.sleep(0.01)
        return fleet, calls

    caplog.set_level(logging.INFO, logger="lobbyd")
    fleet, calls = asyncio.run(main())
    assert fleet.registry.packets()[0][:2] == ("me", ("role:real",))  # still ours
    assert calls.count("hi") == 1  # published again at once, not once per impostor
    assert "changed" not in calls and fleet.counters.impostors == 21
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 5 and "claiming to be this host ('me')" in warnings[0]


def test_a_late_echo_of_our_own_labels_is_no_impostor(caplog) -> None:
    fleet, _calls = make_fleet()
    fleet.own_hostname, fleet.own_labels = "me", lambda: ("v:2",)
    fleet.sent_own(("v:1",))
    fleet.sent_own(("v:2",))
    fleet.registry.apply_hi("me", ("v:2",), time.time(), own=True)
    fleet.packet(encode_envelope(Packet("me", ("v:1",))))  # published before v:2, late
    assert fleet.registry.packets()[0].labels == ("v:2",) and fleet.counters.impostors == 0


def test_without_register_a_packet_of_our_name_is_listed() -> None:
    fleet, _ = make_fleet()  # own_hostname None: REGISTER=false, someone else may be "me"
    fleet.packet(encode_envelope(Packet("me", ("x",))))
    assert fleet.registry.packets()[0][:2] == ("me", ("x",))


def test_a_full_registry_keeps_who_it_has_and_counts_the_new() -> None:
    fleet, _ = make_fleet()
    fleet.registry.max_hosts = 3
    for i in range(100):
        fleet.packet(encode_envelope(Packet(f"h{i}", ("x",))))
    fleet.packet(encode_envelope(Packet("h1", ("y",))))  # a known host still changes
    assert [p.hostname for p in fleet.registry.packets()] == ["h0", "h1", "h2"]
    assert fleet.registry.packets()[1].labels == ("y",)
    assert fleet.counters.dropped_full == 97 and fleet.counters.joined == 3
    assert fleet.registry.apply_hi("me", (), time.time(), own=True)  # never ourselves
    assert not fleet.registry.learn("late", (), time.time())  # nor second-hand


def test_join_answers_are_rationed() -> None:
    fleet, _ = make_fleet()
    for i in range(50):
        fleet.registry.apply_hi(f"h{i}", ("x",), time.time())
    answers = [fleet.answer(4096) for _ in range(50)]
    assert sum(1 for chunks in answers if chunks) <= lobbyd.SYNC_ANSWER_BURST + 1
    assert fleet.counters.sync_refused >= 50 - lobbyd.SYNC_ANSWER_BURST - 1


def test_per_host_packets_speak_only_for_their_sender() -> None:
    fleet, _ = make_fleet()
    fleet.packet(encode_envelope(Packet("b", ("x",))), sender="b")
    fleet.packet(encode_envelope(Packet("a", ("evil",))), sender="b")
    fleet.packet(encode_envelope(Packet("b"), "goodbye"), sender="a")
    assert [p.hostname for p in fleet.registry.packets()] == ["b"]
    assert fleet.counters.dropped_subject == 2 and fleet.counters.dropped == 0


def test_per_host_join_requests_get_one_packet_of_ours_each_second() -> None:
    async def main() -> tuple[Fleet, list[str]]:
        fleet, calls = make_fleet()
        fleet.own_hostname = "me"
        request = encode_envelope(Packet("b"), "sync")
        for _ in range(50):  # a flood of requests: coalesced
            fleet.packet(request, sender="b")
        fleet.packet(encode_envelope(Packet("a"), "sync"), sender="b")  # for another: dropped
        fleet.packet(encode_envelope(Packet("me"), "sync"), sender="me")  # ours: no answer
        await asyncio.sleep(lobbyd.SYNC_SPREAD + 0.1)
        return fleet, calls

    fleet, calls = asyncio.run(main())
    assert calls.count("hi") == 1
    assert fleet.counters.dropped_subject == 1 and len(fleet.registry) == 0
