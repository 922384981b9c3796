"""Several real daemons on one real NATS server: what they see of each other."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import wait_for

SUBJECT = "lobby.discovery"


def test_two_and_three_daemons_list_each_other(lobbyd) -> None:
    a = lobbyd("a", LABELS="service:web")
    b = lobbyd("b", LABELS="service:smtp")
    wait_for(lambda: a.hostnames() == ["a", "b"] == b.hostnames(), what="a and b")
    c = lobbyd("c")
    for d in (a, b, c):
        wait_for(lambda d=d: d.hostnames() == ["a", "b", "c"], what=f"{d.name} sees all")
    assert c.labels_of("a") == ["service:web"] and a.labels_of("b") == ["service:smtp"]


def test_sigterm_says_goodbye_and_exits_quickly(lobbyd, nats) -> None:
    a = lobbyd("a", TTL="60")
    b = lobbyd("b", TTL="60")
    wait_for(lambda: a.hostnames() == ["a", "b"], what="a sees b")
    sub = nats.client()
    sub.subscribe(SUBJECT)
    started = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    b.proc.send_signal(signal.SIGTERM)  # a second signal during shutdown is harmless
    code = b.proc.wait(timeout=5)
    took = time.monotonic() - started
    assert code == 0 and took < 2.0, (code, took)
    # b's goodbye, not its expiry (TTL=60), however slowly a loaded machine routes it
    wait_for(lambda: a.hostnames() == ["a"], timeout=10, what="b gone from a by its goodbye")
    def next_goodbye() -> dict:
        while True:
            envelope = json.loads(sub.next_msg(timeout=5)[1])
            if envelope["message"] == "goodbye":
                return envelope

    assert next_goodbye()["discovery"] == {"hostname": "b", "labels": [], "last_check": 0}
    assert "Traceback" not in b.logs()


def test_a_stopping_daemon_takes_no_new_connection_or_request(lobbyd, nats) -> None:
    """From SIGTERM on, a client that comes back (the page reconnecting, a blocking query
    asked again) finds the port closed, and its kept-alive connection closed, rather
    than an answer from a daemon that its own goodbye may have dropped from its registry.
    NATS paused holds the shutdown for its 0.8 s close, so the daemon is seen stopping."""
    a = lobbyd("a", TTL="60")
    kept = socket.create_connection(("127.0.0.1", a.port), timeout=5)
    kept.sendall(b"GET /v1/discovery HTTP/1.1\r\nHost: a\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 200 ")  # and kept alive
    nats.proc.send_signal(signal.SIGSTOP)
    try:
        a.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "said goodbye as a" in a.logs(), what="the goodbye")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", a.port), timeout=5)
        answer = b""
        with contextlib.suppress(OSError):  # closed: the request may not even go out
            kept.sendall(b"GET /v1/discovery HTTP/1.1\r\nHost: a\r\n\r\n")
            while chunk := kept.recv(65536):
                answer += chunk
        assert answer == b"" or answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    finally:
        nats.proc.send_signal(signal.SIGCONT)
        kept.close()
    assert a.proc.wait(timeout=5) == 0 and "Traceback" not in a.logs()


@pytest.mark.parametrize("second", ["at once", "after the goodbye"])
def test_a_second_sigterm_sends_no_second_goodbye(lobbyd, nats, second: str) -> None:
    """Two SIGTERMs: back to back, or the second once the first goodbye is on the wire
    (the daemon is then closing its NATS connection). Exactly one goodbye either way,
    exit status 0. Should a daemon be gone before the second signal could land, the try
    does not count and another daemon is tried (3 at most; one must count)."""
    for attempt in range(3):
        name = f"b{attempt}"
        b = lobbyd(name, TTL="60")
        sub = nats.client()
        sub.subscribe(SUBJECT)
        sub.flush()
        goodbyes: list[dict] = []

        def collect(timeout: float, sub=sub, name=name, goodbyes=goodbyes) -> None:
            with contextlib.suppress(TimeoutError):
                envelope = json.loads(sub.next_msg(timeout=timeout)[1])
                if envelope["message"] == "goodbye" and \
                        envelope["discovery"]["hostname"] == name:
                    goodbyes.append(envelope)

        b.proc.send_signal(signal.SIGTERM)
        landed = True
        if second == "at once":
            b.proc.send_signal(signal.SIGTERM)
        else:
            wait_for(lambda collect=collect, goodbyes=goodbyes: collect(0.05) or goodbyes,
                     timeout=5, what="the first goodbye")
            landed = b.proc.poll() is None
            b.proc.send_signal(signal.SIGTERM)  # a no-op if it has exited meanwhile
        code = b.proc.wait(timeout=5)
        # b is gone: whatever it published is at the server; a round trip on our
        # connection then puts every packet the server routed to us ahead of the PONG
        sub.flush()
        drain_until = time.monotonic() + 0.5
        while time.monotonic() < drain_until:
            collect(drain_until - time.monotonic())
        sub.close()
        assert code == 0, (code, b.logs()[-2000:])
        assert len(goodbyes) == 1, goodbyes
        assert goodbyes[0]["discovery"] == {"hostname": name, "labels": [], "last_check": 0}
        assert "Traceback" not in b.logs()
        if landed:
            return
    raise AssertionError("3 daemons in a row exited before a second signal could land")


def test_kill_9_expires_after_ttl(lobbyd) -> None:
    a = lobbyd("a", TTL="4", CLEAN_EVERY="15")
    b = lobbyd("b", TTL="4")
    wait_for(lambda: a.hostnames() == ["a", "b"], what="a sees b")
    killed = time.monotonic()
    b.kill()
    wait_for(lambda: a.hostnames() == ["a"], timeout=8, what="b expired")
    gone_after = time.monotonic() - killed
    # not before TTL minus the last keep-alive interval (1 s) and a second more for a
    # keep-alive late on a loaded machine, and not long after TTL
    assert 2.0 < gone_after < 6.0, gone_after


def test_runtime_labels_propagate_persist_and_delete(lobbyd) -> None:
    # keep-alives a minute apart: a change on b within 10 s was published at once
    a = lobbyd("a", start=False, LABELS="env:1", KEEP_ALIVE="60", TTL="180")
    labels_dir = Path(a.env["LABELS_PATH"])
    labels_dir.mkdir(exist_ok=True)
    (labels_dir / "static").write_text("file:1\n")
    a.start()
    b = lobbyd("b", KEEP_ALIVE="60", TTL="180")
    wait_for(lambda: b.labels_of("a") == ["env:1", "file:1"], what="b sees a's file label")
    posted = time.monotonic()
    assert a.request("POST", "/v1/labels", body="run:1\nrun:2")[0] == 200
    wait_for(lambda: b.labels_of("a") == ["env:1", "file:1", "run:1", "run:2"], timeout=10,
             what="POST visible on b before a keep-alive")
    assert time.monotonic() - posted < 10
    a.restart()
    assert a.get_json("/v1/discovery")["labels"] == ["env:1", "file:1", "run:1", "run:2"]
    assert a.request("DELETE", "/v1/labels", body="run:1\nenv:1\nfile:1")[0] == 200
    wait_for(lambda: b.labels_of("a") == ["env:1", "file:1", "run:2"], timeout=10,
             what="DELETE visible on b before a keep-alive; env and file labels stay")
    assert (labels_dir / "_runtime").read_text().splitlines()[-1] == "run:2"


def test_client_only_daemon_listens_but_never_publishes(lobbyd) -> None:
    a = lobbyd("a")
    client = lobbyd("client", REGISTER="false")
    wait_for(lambda: client.hostnames() == ["a"], what="client sees a")
    time.sleep(1.5)  # over a keep-alive period: the client must still be absent ...
    lobbyd("b")  # ... from an `a` shown to hear the subject: it lists b, who came later
    wait_for(lambda: a.hostnames() == ["a", "b"], what="a lists b, never client")


def test_a_joining_daemon_learns_the_fleet_without_waiting_a_keep_alive(lobbyd) -> None:
    a = lobbyd("a", KEEP_ALIVE="60", TTL="120")
    b = lobbyd("b", KEEP_ALIVE="60", TTL="120")
    wait_for(lambda: a.hostnames() == ["a", "b"] == b.hostnames(), what="a and b")
    go = lobbyd("go")  # stands for a Go daemon: no sync, learned from its keep-alives
    wait_for(lambda: "go" in a.hostnames(), what="a hears go")
    go.kill()
    # c learns from ONE peer's answer: the next keep-alive is a minute away
    started = time.monotonic()
    c = lobbyd("c", KEEP_ALIVE="60", TTL="120")
    wait_for(lambda: c.hostnames() == ["a", "b", "c", "go"], timeout=15, what="c learns all")
    assert time.monotonic() - started < 30  # long before a keep-alive (60 s) could tell it
    # logged once the sync's last chunk is in, a moment after the registry has the hosts
    wait_for(lambda: "learned 3 hosts from a peer" in c.logs(), what="the sync logged")


def test_a_late_join_answer_never_undoes_a_packet_heard_since(lobbyd, nats) -> None:
    """A peer's join answer can reach us after a packet its host sent later (the answer
    was made first, or waited in a queue): the later packet's labels stay."""
    peer = nats.client()  # the fleet's only answerer of join requests
    peer.subscribe(SUBJECT + ".sync", queue="lobbyd")
    b = lobbyd("b", wait=False, KEEP_ALIVE="60", TTL="180")
    peer.next_msg(timeout=30)  # b's join request
    # x's new labels first-hand, then an answer made before them, which says v:1
    peer.publish_json(SUBJECT, {"message": "hi", "discovery": {
        "hostname": "x", "labels": ["v:2"], "last_check": int(time.time())}})
    peer.publish(peer.reply, b'{"hosts":[["x",["v:1"],0],["y",["w:1"],0]],"done":true}')
    peer.flush()
    wait_for(lambda: b.labels_of("y") == ["w:1"], what="b took the answer")
    assert b.labels_of("x") == ["v:2"]


def test_a_new_host_just_after_connecting_gets_our_packet_once_more(lobbyd, nats) -> None:
    """Two daemons that connect at once can each miss the other's first packet, and
    neither answers the other's join while asking its own (the demo waited a keep-alive
    for that). The first new host heard soon after connecting gets our packet again."""
    watcher = nats.client()
    watcher.subscribe(SUBJECT)
    a = lobbyd("a", KEEP_ALIVE="60", TTL="120")

    def from_a(messages: list[tuple[str, bytes]]) -> list[dict]:
        packets = [json.loads(payload) for _, payload in messages]
        return [p for p in packets if p.get("discovery", {}).get("hostname") == "a"]

    first = wait_for(lambda: from_a(watcher.messages(0.1)), what="a's first packet")
    assert len(first) == 1
    peer = nats.client()
    peer.publish_json(SUBJECT, {"message": "hi", "discovery": {
        "hostname": "b", "labels": [], "last_check": int(time.time())}})
    peer.flush()
    again = wait_for(lambda: from_a(watcher.messages(0.1)), timeout=10,
                     what="a's packet again (a keep-alive is a minute away)")
    assert len(again) == 1 and "b" in a.hostnames()
    peer.publish_json(SUBJECT, {"message": "hi", "discovery": {
        "hostname": "c", "labels": [], "last_check": int(time.time())}})
    peer.flush()
    wait_for(lambda: "c" in a.hostnames(), what="a hears c")
    assert from_a(watcher.messages(1.0)) == []  # once per connection, not once per host
    watcher.close()
    peer.close()


def test_nats_restart_the_daemon_keeps_serving_and_comes_back(lobbyd, nats) -> None:
    a = lobbyd("a", TTL="30")
    b = lobbyd("b", TTL="30")
    wait_for(lambda: a.hostnames() == ["a", "b"], what="a sees b")
    nats.stop()
    for _ in range(5):
        assert a.hostnames() == ["a", "b"]  # the last known registry is still served
        time.sleep(0.1)
    assert a.request("POST", "/v1/labels", body="during:outage")[0] == 200
    nats.start()
    wait_for(lambda: b.labels_of("a") == ["during:outage"], timeout=10,
             what="b sees a's new label after NATS is back")
    for d in (a, b):  # nats-py publishes and delivers before its reconnected callback logs
        wait_for(lambda d=d: "reconnected to NATS" in d.logs(), what=f"{d.name} logs it")
        assert d.logs().count("disconnected from NATS") == 1


def test_start_with_nats_down_serves_the_api_and_connects_later(lobbyd, nats) -> None:
    nats.stop()
    a = lobbyd("a", start=False)
    a.start(wait=False)
    wait_for(lambda: a.request("GET", "/v1/discovery")[0] == 200, what="API up without NATS")
    assert a.hostnames() == ["a"]
    nats.start()
    b = lobbyd("b")
    wait_for(lambda: a.hostnames() == ["a", "b"] == b.hostnames(), timeout=10,
             what="both listed after NATS came up")
    assert a.logs().count("NATS unreachable") == 1


def test_nats_url_list_user_password_and_token(lobbyd, tmp_path) -> None:
    from conftest import NatsServer, free_port

    secured = NatsServer(tmp_path, extra=["--user", "lobby", "--pass", "hunter2"],
                         client_auth={"user": "lobby", "pass": "hunter2"}).start()
    tokened = NatsServer(tmp_path, extra=["--auth", "t0ken-secret"],
                         client_auth={"auth_token": "t0ken-secret"}).start()
    try:
        dead = f"nats://127.0.0.1:{free_port()}"
        a = lobbyd("a", nats=secured,
                   NATS_URL=f"{dead},nats://lobby:hunter2@127.0.0.1:{secured.port}")
        b = lobbyd("b", nats=secured, NATS_URL=f"nats://lobby:hunter2@127.0.0.1:{secured.port}")
        wait_for(lambda: a.hostnames() == ["a", "b"], what="a and b via user:pass")
        c = lobbyd("c", nats=tokened, NATS_URL=f"nats://t0ken-secret@127.0.0.1:{tokened.port}")
        assert c.hostnames() == ["c"]
        wrong = lobbyd("wrong", start=False,
                       NATS_URL=f"nats://lobby:wrong-pass@127.0.0.1:{secured.port}")
        wrong.start(wait=False)
        wait_for(lambda: "NATS unreachable" in wrong.logs(), what="auth failure logged")
        assert wrong.request("GET", "/v1/discovery")[0] == 200
        for d in (a, b, c, wrong):
            for secret in ("hunter2", "t0ken-secret", "wrong-pass"):
                assert secret not in d.logs(), (d.name, secret)
    finally:
        secured.stop()
        tokened.stop()


def test_hostname_defaults_to_the_machines(lobbyd) -> None:
    import socket

    a = lobbyd("ignored", start=False)
    del a.env["HOSTNAME"]
    a.start(wait=False)
    wait_for(lambda: a.get_json("/v1/discovery")["hostname"] == socket.gethostname(),
             what="machine hostname")


def test_a_hostname_change_says_goodbye_for_the_old_name(lobbyd, nats, monkeypatch) -> None:
    """lobbyd runs in a UTS namespace of its own, whose hostname the test changes."""
    import shutil
    import subprocess

    from conftest import lobbyd_command, skip_unless_required

    if os.geteuid() != 0:
        skip_unless_required("a UTS namespace needs root")

    monkeypatch.setenv("LOBBYD_CMD", shlex.join(
        [shutil.which("unshare") or "unshare", "--uts", *lobbyd_command()]))
    watcher = lobbyd("watcher")
    a = lobbyd("renamed", start=False)
    del a.env["HOSTNAME"]  # follow the machine's (the namespace's) hostname
    a.start(wait=False)
    subprocess.run(["nsenter", "--uts", "-t", str(a.proc.pid), "hostname", "old-name"],
                   check=True)
    wait_for(lambda: "old-name" in watcher.hostnames(), what="old name listed")
    sub = nats.client()
    sub.subscribe(SUBJECT)
    subprocess.run(["nsenter", "--uts", "-t", str(a.proc.pid), "hostname", "new-name"],
                   check=True)
    # well within TTL (5 s): only the goodbye can explain the old name's departure
    wait_for(lambda: "new-name" in watcher.hostnames() and
             "old-name" not in watcher.hostnames(), timeout=3, what="rename seen")
    goodbyes = [json.loads(p) for _s, p in sub.messages(0.5) if b'"goodbye"' in p]
    assert [g["discovery"]["hostname"] for g in goodbyes] == ["old-name"]


def test_plain_nats_py_lists_joins_and_says_goodbye_with_the_fast_path(lobbyd) -> None:
    """LOBBYD_PLAIN_NATS=1: lobbyd on public nats-py only (the fallback when nats-py is
    not a tested version) lists, syncs and says goodbye alongside the fast path."""
    plain = {"LOBBYD_PLAIN_NATS": "1", "KEEP_ALIVE": "60", "TTL": "120"}
    a = lobbyd("a", LABELS="service:web", **plain)
    b = lobbyd("b", KEEP_ALIVE="60", TTL="120")  # nats-py's internals
    wait_for(lambda: a.hostnames() == ["a", "b"] == b.hostnames(), what="a and b")
    b.kill()  # c learns b from a plain peer's answer, a keep-alive is a minute away
    c = lobbyd("c", **plain)
    wait_for(lambda: c.hostnames() == ["a", "b", "c"], timeout=15, what="c learns all")
    assert c.labels_of("a") == ["service:web"]
    wait_for(lambda: "learned 2 hosts from a peer" in c.logs(), what="the sync logged")
    assert c.stop() == 0
    wait_for(lambda: a.hostnames() == ["a", "b"], timeout=10, what="c's goodbye heard")
    assert "using plain nats-py" in a.logs()
    if not os.environ.get("LOBBYD_PLAIN_NATS"):  # (nox -s plain_nats: everyone is plain)
        assert "plain nats-py" not in b.logs()
    assert "Traceback" not in a.logs() + c.logs()
