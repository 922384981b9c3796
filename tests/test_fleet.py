"""Fleet: what the transports hear, applied to the registry (no sockets)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

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
