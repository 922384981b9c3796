"""Registry: hi, goodbye, expiry on the receiver's clock, second-hand learning."""

from __future__ import annotations

import math
import random

from lobbyd import (
    HEARD_LATER,
    INDEXED_LABEL_IDLE_S,
    NEW_HOST,
    NEW_LABELS,
    Packet,
    Registry,
    View,
)


def resolve_label(packets: list[Packet], label: str) -> list[str]:
    """A scan of every host: what Registry.carrying() must always equal."""
    return [packet.hostname for packet in packets if label in packet.labels]


def test_hi_adds_and_only_label_changes_bump_the_version() -> None:
    r = Registry(ttl=30)
    assert r.apply_hi("a", ("x",), 100.0) == NEW_HOST
    v = r.version
    assert not r.apply_hi("a", ("x",), 101.0) and r.version == v
    assert r.apply_hi("a", ("y",), 102.0) == NEW_LABELS and r.version == v + 1
    assert r.packets() == [Packet("a", ("y",), 102)]


def test_goodbye_removes_at_once() -> None:
    r = Registry(ttl=30)
    r.apply_hi("a", (), 100.0)
    assert r.apply_goodbye("a") is True
    assert r.apply_goodbye("a") is False
    assert r.packets() == []


def test_expire_drops_exactly_the_silent_hosts() -> None:
    r = Registry(ttl=10)
    r.apply_hi("old", (), 100.0)
    r.apply_hi("new", (), 105.0)
    assert r.expire(110.0) == []  # exactly TTL old is still alive
    assert r.expire(110.5) == ["old"]
    assert [p.hostname for p in r.packets()] == ["new"]
    assert r.next_expiry() == 115.0
    assert r.expire(115.01) == ["new"]
    assert len(r) == 0


class WalkCountingDict(dict):  # type: ignore[type-arg]
    """A real dict that counts the walks over it (iteration, keys, values, items)."""

    walks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super().__iter__()

    def keys(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super().keys()

    def values(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super().values()

    def items(self):  # type: ignore[no-untyped-def]
        self.walks += 1
        return super().items()


def test_expire_is_cheap_when_nothing_can_have_expired() -> None:
    """Cheap, checked by structure, not by time: with no host older than TTL, expire()
    neither walks the hosts nor changes anything; once one can have expired, it does."""
    r = Registry(ttl=10)
    for i in range(1000):
        r.apply_hi(f"h{i}", (), 100.0 + i / 1000)
    before = r.packets()
    r.hosts = hosts = WalkCountingDict(r.hosts)
    v = r.version
    for now in (100.5, 105.0, 109.0, 110.0):  # exactly TTL old is still alive
        assert r.expire(now) == []
    assert hosts.walks == 0, f"expire() walked the registry {hosts.walks} times for nothing"
    assert r.version == v and r.packets() == before
    # the control: the first moment one host is over TTL, expire() must look, and drop it
    assert r.expire(110.0005) == ["h0"]
    assert hosts.walks >= 1 and r.version == v + 1 and len(r) == 999


def test_learn_adds_unknown_hosts_and_takes_only_later_hearings() -> None:
    r = Registry(ttl=30)
    r.apply_hi("a", ("fresh",), 100.0)
    assert r.learn("a", ("stale",), 90.0) == 0  # we heard it later: nothing changes
    assert r.learn("b", ("x",), 95.0) == NEW_HOST
    assert r.packets() == [Packet("a", ("fresh",), 100), Packet("b", ("x",), 95)]
    v = r.version
    r.take_changes()
    # the peer heard b later than we did: b is heard again, no change to show
    assert r.learn("b", ("x",), 97.0) == HEARD_LATER
    assert r.version == v and r.take_changes() == {} and r.hosts["b"] == (("x",), 97.0)
    # ... and with other labels: a change like a keep-alive's
    assert r.learn("a", ("newer",), 101.0) == NEW_LABELS
    assert r.version == v + 1 and r.take_changes() == {"a": (("fresh",), "")}
    assert r.expire(127.5) == ["b"]


def test_spared_hosts_do_not_expire_until_then() -> None:
    """A cut-off lobbyd spares every host (SPEC 16): none expires before `spared_until`,
    then each expires as usual; next_expiry() says so, for the clean-up and the cache."""
    r = Registry(ttl=10)
    r.apply_hi("a", (), 100.0)
    r.apply_hi("b", (), 105.0)
    r.spare(math.inf)
    assert r.expire(10_000.0) == [] and len(r) == 2 and r.next_expiry() == math.inf
    r.spare(200.0)  # the cut ended at 190: every host has until 200 to be heard
    assert r.next_expiry() == 200.0
    assert r.expire(199.9) == []
    r.apply_hi("b", (), 195.0)  # heard again
    assert r.expire(200.0) == ["a"] and r.packets() == [Packet("b", (), 195)]
    assert r.next_expiry() == 205.0 and r.expire(205.5) == ["b"]


def test_packets_are_sorted_by_hostname() -> None:
    r = Registry(ttl=30)
    for name in ("c", "a", "b"):
        r.apply_hi(name, (), 1.0)
    assert [p.hostname for p in r.packets()] == ["a", "b", "c"]


def test_entries_stay_tuples_and_every_change_is_noted() -> None:
    """Entries are tuples (untracked by the GC); the watchers' change record still
    sees new hosts, label changes, second-hand hosts and leavers (SPEC 8)."""
    r = Registry(ttl=30)
    r.apply_hi("a", ("x",), 100.0)
    r.take_changes()
    assert not r.apply_hi("a", ("x",), 101.0) and r.take_changes() == {}
    r.apply_hi("a", ("y",), 102.0)
    r.apply_hi("a", ("z",), 103.0)  # only the state before the first change counts
    r.learn("b", ("w",), 103.0)
    assert r.take_changes() == {"a": (("x",), ""), "b": (None, "")}
    assert all(type(entry) is tuple for entry in r.hosts.values())
    assert r.hosts["a"] == (("z",), 103.0)
    r.apply_goodbye("b")
    assert r.take_changes() == {"b": (("w",), "goodbye")}


def test_carrying_stays_equal_to_a_scan_through_every_kind_of_change() -> None:
    """/v1/resolve's kept carriers of a label follow new hosts, label changes, goodbyes,
    expiry and second-hand hosts exactly as a scan of the registry would see them."""
    rnd = random.Random(7)
    r = Registry(ttl=30)
    asked = ("x", "y", "z")
    now = 1000.0
    for step in range(3000):
        now += 0.01
        name = f"h{rnd.randrange(60)}"
        labels = tuple(sorted(rnd.sample(("w", "x", "y", "z"), rnd.randint(0, 3))))
        kind = rnd.random()
        if kind < 0.7:
            r.apply_hi(name, labels, now - rnd.choice((0, 0, 25)))
        elif kind < 0.8:
            r.learn(name, labels, now - 5)
        elif kind < 0.9:
            r.apply_goodbye(name)
        else:
            r.expire(now)
        if step % 7 == 0:
            r.expire(now)
            label = rnd.choice(asked)
            assert r.carrying(View.resolve(label), now) == resolve_label(r.packets(), label)


def test_carrying_forgets_labels_nobody_asks_about() -> None:
    r = Registry(ttl=30)
    r.apply_hi("a", ("x",), 100.0)
    assert r.carrying(View.resolve("x"), 100.0) == ["a"]
    r.expire(100.0 + INDEXED_LABEL_IDLE_S)
    assert r._carriers  # asked lately: kept
    r.expire(101.0 + INDEXED_LABEL_IDLE_S)
    assert not r._carriers  # changes of labels no longer pay for it
    r.apply_hi("b", ("x",), 111.0)
    assert r.carrying(View.resolve("x"), 111.0) == ["a", "b"]
