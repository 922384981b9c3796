"""Bad input 8 of issue 4: 100,000 garbage or hostile packets on the discovery subject, as
fast as the publisher can. The daemons stay up, their registries stay exactly the real hosts,
RSS stays bounded and the log grows by at most a few hundred lines."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import threading
import time

from conftest import wait_for

from .conftest import SUBJECT, RegistryWatcher, record

TOTAL = int(os.environ.get("RESILIENCE_FLOOD", "100000"))
MB = 1_000_000  # under nats-server's default max_payload (1 MiB)


def env(hostname: object = "x.flood", labels: object = (), message: object = "hi",
        **extra: object) -> bytes:
    disc = {"hostname": hostname, "labels": list(labels) if isinstance(labels, tuple)
            else labels, "last_check": 0}
    doc = {"discovery": disc, "message": message, **extra}
    if next(COMPACT) % 2:  # half in the daemons' compact form: the fast decoder's input
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass")
    return json.dumps(doc).encode()


COMPACT = itertools.count()


def hostile_packets(rng: random.Random) -> tuple[list[bytes], dict[str, int]]:
    """TOTAL packets none of which is a valid 'hi' (goodbyes for unknown names are allowed)."""
    big_host = env("h" * MB)
    big_label = env("big.flood", ["x:" + "y" * (MB - 100)])
    many_labels = env("many.flood", [f"l:{i}" for i in range(10_000)])
    deep_list = b"[" * 200_000
    deep_obj = b'{"a":' * 100_000
    deep_in_env = b'{"discovery":{"hostname":"deep.flood","labels":' + b"[" * 100_000 + \
        b'"x"' + b"]" * 100_000 + b'},"message":"hi"}'
    fixed = [
        # (name, count, generator)
        ("1MB hostname", 50, lambda i: big_host),
        ("1MB label", 50, lambda i: big_label),
        ("10,000 labels", 200, lambda i: many_labels),
        ("deep nesting", 300, lambda i: (deep_list, deep_obj, deep_in_env)[i % 3]),
        ("NUL bytes", 5_000, lambda i: (env(f"nul{i}\x00.flood"), env("n.flood", [f"a\x00{i}"]),
                                        b"\x00" * (i % 64 + 1),
                                        env(f"nul{i}.flood").replace(b"hi", b"h\x00i"))[i % 4]),
        ("invalid UTF-8", 5_000, lambda i: env(f"u{i}.flood").replace(b".flood",
                                                                     b"\xff\xfe\xc3(")),
        ("wrong types", 20_000, lambda i: WRONG_TYPES[i % len(WRONG_TYPES)](i)),
        ("unknown message", 5_000, lambda i: env(f"um{i}.flood", ["a:b"],
                                                 message=("bye", "HI", "", "hello", 1)[i % 5])),
        ("bad label/hostname", 4_000, lambda i: (
            env("h" * 254 + f"{i}"), env(f"lb{i}.flood", ["x" * 1025]),
            env(f"cc{i}.flood", ["a\nb"]), env(f"cr{i}.flood", ["a:\rb:c"]),
            env(f"sp{i}.flood", ["a:b", "del:\x7f"]), env(f"e{i}.flood", [""]),
            env(f"ml{i}.flood", [f"m:{k}" for k in range(1001)]),
            env(f"lbl{i}.flood", ["ok:1", "a\rb"]))[i % 8]),
        ("huge numbers", 1_000, lambda i: (b'{"discovery":{"hostname":"n.flood","labels":[],'
                                           b'"last_check":' + b"9" * 5000 + b'},"message":1}',
                                           b"1e999999", b"-" + b"9" * 10000)[i % 3]),
        ("goodbye for unknown names", 10_000, lambda i: env(f"ghost{i}.flood", None,
                                                             message="goodbye")),
        ("empty payload", 1_000, lambda i: b""),
    ]
    packets: list[bytes] = []
    counts: dict[str, int] = {}
    for name, count, gen in fixed:
        counts[name] = count
        packets += [gen(i) for i in range(count)]
    rest = TOTAL - len(packets)
    if rest > 0:
        counts["random bytes / not JSON"] = rest
        packets += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
                    for _ in range(rest)]
    packets = packets[:TOTAL]
    rng.shuffle(packets)
    return packets, counts


WRONG_TYPES = [
    lambda i: json.dumps([1, 2, i]).encode(),
    lambda i: json.dumps("hi").encode(),
    lambda i: json.dumps(i).encode(),
    lambda i: b"null",
    lambda i: b"{}",
    lambda i: json.dumps({"discovery": None, "message": "hi"}).encode(),
    lambda i: json.dumps({"discovery": [f"w{i}.flood"], "message": "hi"}).encode(),
    lambda i: json.dumps({"discovery": f"w{i}.flood", "message": "hi"}).encode(),
    lambda i: json.dumps({"message": "hi"}).encode(),
    lambda i: env(i),
    lambda i: env(None),
    lambda i: env(""),
    lambda i: env([f"w{i}.flood"]),
    lambda i: env({"h": i}),
    lambda i: env(True),
    lambda i: env(f"w{i}.flood", f"notalist{i}"),
    lambda i: env(f"w{i}.flood", {"a": "b"}),
    lambda i: env(f"w{i}.flood", 5),
    lambda i: env(f"w{i}.flood", [1, 2, 3]),
    lambda i: env(f"w{i}.flood", ["ok:1", None]),
    lambda i: env(f"w{i}.flood", [["nested:1"]]),
    lambda i: env(f"w{i}.flood", message=None),
    lambda i: json.dumps({"discovery": {"labels": ["a:b"]}, "message": "hi"}).encode(),
]


class RssSampler(threading.Thread):
    def __init__(self, pids: list[int], max_time: float = 300):
        super().__init__(daemon=True)
        self.pids, self.max_time = pids, max_time
        self.peak = dict.fromkeys(pids, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        from .conftest import rss_kb
        end = time.monotonic() + self.max_time
        while not self.stop.is_set() and time.monotonic() < end:
            for pid in self.pids:
                with contextlib.suppress(OSError, AssertionError):
                    self.peak[pid] = max(self.peak[pid], rss_kb(pid))
            self.stop.wait(0.05)


def test_subject_flood(nats, fleet):
    rng = random.Random(int(os.environ.get("RESILIENCE_SEED", "4")))
    packets, counts = hostile_packets(rng)
    total_bytes = sum(len(p) for p in packets)
    ttl = 10
    real = [fleet(f"real{i}.flood", nats.url, TTL=ttl) for i in range(2)]
    names = {d.name for d in real}
    wait_for(lambda: all(set(d.hostnames()) == names for d in real), timeout=10,
             what="real hosts listed")
    labels_before = {d.name: d.labels_of(d.name) for d in real}
    time.sleep(1.0)
    rss_before = {d.name: d.rss_kb() for d in real}
    lines_before = {d.name: d.log_lines() for d in real}
    sampler = RssSampler([d.pid for d in real])
    sampler.start()
    pub = nats.client()
    t0 = time.monotonic()
    with RegistryWatcher(real, lambda d: names, interval=0.1, max_duration=300) as watch:
        batch: list[bytes] = []
        size = 0
        for p in packets:
            batch.append(b"PUB %s %d\r\n%s\r\n" % (SUBJECT.encode(), len(p), p))
            size += len(p)
            if size > 4 * MB or len(batch) >= 2000:
                pub.sock.sendall(b"".join(batch))
                batch, size = [], 0
            if time.monotonic() - t0 > 240:
                raise AssertionError("publishing the flood took over 240 s")
        pub.sock.sendall(b"".join(batch))
        pub.flush()
        published_s = time.monotonic() - t0
        # a sentinel after the flood: once listed, everything before it was dealt with
        # (re-sent every second: a daemon cut off as a slow consumer may miss one)
        deadline = time.monotonic() + 120
        while not all("sentinel.flood" in d.hostnames() for d in real):
            assert time.monotonic() < deadline, "daemons never drained the flood (120 s)"
            pub.publish(SUBJECT, env("sentinel.flood", ["s:1"]))
            pub.flush()
            time.sleep(1.0)
        drained_s = time.monotonic() - t0
        pub.publish(SUBJECT, env("sentinel.flood", None, message="goodbye"))
        pub.flush()
        wait_for(lambda: all(set(d.hostnames()) == names for d in real), timeout=10,
                 what="registries exactly the real hosts")
    pub.close()
    time.sleep(2.0)
    sampler.stop.set()
    sampler.join(timeout=5)
    rss_after = {d.name: d.rss_kb() for d in real}
    peak = {d.name: sampler.peak[d.pid] for d in real}
    log_growth = {d.name: d.log_lines() - lines_before[d.name] for d in real}
    assert all(d.alive() for d in real), "a daemon died in the flood"
    assert not watch.errors, f"API failed during the flood: {watch.errors[:5]}"
    assert not watch.misses, f"a real host vanished during the flood: {watch.misses[:10]}"
    for d in real:
        assert d.labels_of(d.name) == labels_before[d.name]
        assert rss_after[d.name] <= rss_before[d.name] + 64 * 1024, \
            f"{d.name}: RSS {rss_before[d.name]} -> {rss_after[d.name]} kB after the flood"
        assert peak[d.name] <= 512 * 1024, f"{d.name}: RSS peaked at {peak[d.name]} kB"
        assert log_growth[d.name] <= 300, f"{d.name}: log grew by {log_growth[d.name]} lines"
    record("8 NATS flood", packets=len(packets), bytes=total_bytes, categories=counts,
           publish_s=round(published_s, 1), drained_s=round(drained_s, 1),
           rss_before_mb={k: round(v / 1024, 1) for k, v in rss_before.items()},
           rss_peak_mb={k: round(v / 1024, 1) for k, v in peak.items()},
           rss_after_mb={k: round(v / 1024, 1) for k, v in rss_after.items()},
           log_lines_added=log_growth, real_hosts_missing=len(watch.misses),
           polls=watch.samples * len(real), api_errors=len(watch.errors),
           crashes=sum(not d.alive() for d in real))  # recorded once asserted
