"""DISCOVERY_SUBJECTS=per-host: each host publishes on a subject (a channel) of its own, and
the server's permissions, not the daemons' good will, stop one host speaking for another.

Real nats-server with an `authorization { users = [...] }` block, real redis-server with
ACL users: each host's user may publish on its own subject only. A third party holding
host b's credentials then cannot get a packet for host a accepted by any route.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import ROOT, Lobbyd, NatsServer, RedisServer, daemon_env, run_lobbyd, wait_for
from harness import resp_command
from natsraw import RawNats

SUBJECT = "lobby.discovery"
HOSTS = ("a", "b", "c", "d")


def envelope(hostname: str, labels: list[str], message: str = "hi") -> bytes:
    return json.dumps({"discovery": {"hostname": hostname, "labels": labels, "last_check": 0},
                       "message": message}, separators=(",", ":")).encode()


def nats_config(path: Path) -> Path:
    """The README's config: each host's user publishes on its own subject only."""
    users = [f'{{user: {h}, password: "p{h}", permissions: {{publish: "{SUBJECT}.host.{h}", '
             f'subscribe: "{SUBJECT}.host.>"}}}}' for h in HOSTS]
    users.append('{user: watch, password: "pw", permissions: {publish: {deny: ">"}, '
                 'subscribe: ">"}}')
    path.write_text("authorization {\n  users = [\n    " + "\n    ".join(users) + "\n  ]\n}\n")
    return path


@pytest.fixture
def secured(tmp_path: Path):
    server = NatsServer(tmp_path, extra=["-c", str(nats_config(tmp_path / "nats.conf"))],
                        client_auth={"user": "watch", "pass": "pw"}).start()
    daemons: list[Lobbyd] = []

    def start(name: str, **env: str) -> Lobbyd:
        url = f"nats://{name}:p{name}@127.0.0.1:{server.port}"
        d = Lobbyd(daemon_env(name, url, tmp_path, DISCOVERY_SUBJECTS="per-host", **env),
                   tmp_path, name, server)
        daemons.append(d)
        return d.start()

    yield server, start
    for d in daemons:
        d.stop(signal.SIGKILL, timeout=5)
    server.stop()


def as_user(server: NatsServer, user: str) -> RawNats:
    return RawNats("127.0.0.1", server.port, user=user, **{"pass": f"p{user}"})


def server_says(client: RawNats) -> list[bytes]:
    """The lines the server sent up to the answer of a PING (its -ERRs among them)."""
    client.sock.sendall(b"PING\r\n")
    lines = []
    while (line := client._line()) != b"PONG":
        lines.append(line)
    return lines


def dropped(d: Lobbyd, reason: str) -> int:
    body = d.request("GET", "/metrics")[2].decode()
    match = re.search(rf'^lobbyd_packets_dropped_total{{reason="{reason}"}} (\d+)$', body, re.M)
    assert match, body
    return int(match.group(1))


def test_hosts_with_their_own_users_see_each_other_and_no_impostor_gets_in(secured) -> None:
    server, start = secured
    a, b, c = start("a", LABELS="role:a"), start("b"), start("c")
    for d in (a, b, c):
        wait_for(lambda d=d: d.hostnames() == ["a", "b", "c"], timeout=10,
                 what=f"{d.name} lists a, b, c")
    mallory = as_user(server, "b")  # a third party holding b's credentials
    # 1. a's own subject: NATS refuses the publish
    mallory.publish(f"{SUBJECT}.host.a", envelope("a", ["role:evil"]))
    assert any(b"Permissions Violation" in line for line in server_says(mallory))
    # 2. a's packet (and a goodbye for a) on b's subject: every daemon drops and counts them
    mallory.publish(f"{SUBJECT}.host.b", envelope("a", ["role:evil"]))
    mallory.publish(f"{SUBJECT}.host.b", envelope("a", [], "goodbye"))
    mallory.publish(f"{SUBJECT}.host.b", envelope("x", ["role:evil"]))
    # 3. the join sync: a request for a on b's subject is no request; b's own request gets
    #    each peer's own packet, on its own subject, and nothing about anyone else
    mallory.publish(f"{SUBJECT}.host.b", envelope("a", [], "sync"))
    mallory.publish(f"{SUBJECT}.host.b", envelope("b", [], "sync"))
    mallory.flush()
    for d in (a, b, c):
        wait_for(lambda d=d: dropped(d, "subject") == 4, what=f"{d.name} counts 4 drops")
    for d in (b, c):
        assert d.hostnames() == ["a", "b", "c"] and d.labels_of("a") == ["role:a"]
        assert "dropped a packet for 'a' sent on the subject of 'b'" in d.logs()
    mallory.close()


def test_a_joining_daemon_learns_every_host_from_its_own_packet(secured) -> None:
    server, start = secured
    slow = {"KEEP_ALIVE": "60", "TTL": "180"}  # no keep-alive during the test: only the sync
    a, b = start("a", **slow), start("b", **slow)
    wait_for(lambda: a.hostnames() == ["a", "b"] and b.hostnames() == ["a", "b"], timeout=15,
             what="a and b through the join sync")
    watcher = server.client()
    watcher.subscribe(f"{SUBJECT}.host.>")
    began = time.monotonic()
    c = start("c", **slow)
    wait_for(lambda: c.hostnames() == ["a", "b", "c"], timeout=15, what="c learns a and b")
    learned_in = time.monotonic() - began
    seen = watcher.messages(0.5)
    for subject, payload in seen:  # every packet speaks for the host of its subject
        assert json.loads(payload)["discovery"]["hostname"] == subject.rsplit(".host.", 1)[1]
    assert {subject for subject, _ in seen} >= {f"{SUBJECT}.host.a", f"{SUBJECT}.host.b"}
    # long before a keep-alive (60 s) could tell it (c's start-up counts: up to 15 s on a
    # loaded machine); nothing second-hand
    assert learned_in < 30 and "learned" not in c.logs()
    watcher.close()


def test_shared_and_per_host_daemons_do_not_hear_each_other(lobbyd) -> None:
    shared = lobbyd("s")
    per_host = lobbyd("p", DISCOVERY_SUBJECTS="per-host")
    time.sleep(2.5)  # two keep-alives each: long enough to have heard each other
    assert shared.hostnames() == ["s"] and per_host.hostnames() == ["p"]


@pytest.mark.parametrize("hostname", ["a*b", "a.>", "a..b", ".a", "a[1]"])
def test_a_hostname_that_cannot_be_a_subject_tail_is_a_config_error(hostname: str) -> None:
    done = run_lobbyd({"DISCOVERY_SUBJECTS": "per-host", "HOSTNAME": hostname,
                       "DISABLE_API": "1"})
    assert done.returncode == 78, done
    assert "HOSTNAME=" in done.stderr and "per-host" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_per_host_and_kv_is_a_config_error() -> None:
    done = run_lobbyd({"DISCOVERY_SUBJECTS": "per-host", "DISCOVERY_MODE": "kv",
                       "HOSTNAME": "a", "DISABLE_API": "1"})
    assert done.returncode == 78 and "does not work with DISCOVERY_MODE=kv" in done.stderr


# ----------------------------------------------------------------- Redis ACL users

CHANNEL = "lobby:discovery"


def redis_acl(server: RedisServer, user: str) -> None:
    """The README's ACL: publish on its own channel; PSUBSCRIBE to every host's channel
    in a selector of its own (a channel pattern alone would allow PUBLISH there too)."""
    server.cli("ACL", "SETUSER", user, "on", f">p{user}", "resetchannels",
               f"&{CHANNEL}:host:{user}", "-@all", "+ping", "+publish", "+client|setname",
               f"(+psubscribe +punsubscribe &{CHANNEL}:host:*)")


def redis_as(server: RedisServer, user: str, *command: str | bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(resp_command("AUTH", user, f"p{user}") + resp_command(*command))
        data = b""
        while data.count(b"\r\n") < 2:
            data += sock.recv(4096)
        return data


def test_redis_acl_users_see_each_other_and_no_impostor_gets_in(tmp_path: Path, redis,
                                                                lobbyd) -> None:
    for user in ("a", "b", "c"):
        redis_acl(redis, user)

    def start(name: str) -> Lobbyd:
        d = lobbyd(name, start=False, DRIVER="Redis", REDIS_PORT=redis.port,
                   REDIS_USERNAME=name, REDIS_PASSWORD=f"p{name}", DISCOVERY_SUBJECTS="per-host")
        return d.start(wait=False)

    a, b, c = start("a"), start("b"), start("c")
    for d in (a, b, c):
        wait_for(lambda d=d: d.hostnames() == ["a", "b", "c"], timeout=10,
                 what=f"{d.name} lists a, b, c over Redis")
    evil = envelope("a", ["role:evil"])
    assert b"NOPERM" in redis_as(redis, "b", "PUBLISH", f"{CHANNEL}:host:a", evil)
    assert b"NOPERM" in redis_as(redis, "b", "PUBLISH", CHANNEL, evil)
    for payload in (evil, envelope("a", [], "goodbye"), envelope("a", [], "sync")):
        assert redis_as(redis, "b", "PUBLISH", f"{CHANNEL}:host:b", payload).endswith(b":3\r\n")
    for d in (a, c):
        wait_for(lambda d=d: dropped(d, "subject") == 3, what=f"{d.name} counts 3 drops")
        assert d.hostnames() == ["a", "b", "c"] and d.labels_of("a") == []
    health = json.loads(a.request("GET", "/v1/health")[2])
    assert health["status"] == "ok" and health["drivers"][0]["subjects"] == "per-host"


# ----------------------------------------------------------------- the README's configs

def readme_block(after: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.compile(r"```\n(.*?)```", re.S).search(text, text.index(after))
    assert match, after
    return match.group(1)


def test_the_readmes_nats_config_works_as_it_says(tmp_path: Path) -> None:
    config = readme_block("## Per-host subjects").replace('"..."', '"secret"')
    assert "authorization" in config
    (tmp_path / "readme.conf").write_text(config)
    server = NatsServer(tmp_path, extra=["-c", str(tmp_path / "readme.conf")],
                        client_auth={"user": "web1", "pass": "secret"}).start()
    daemons = []
    try:
        for name in ("web1", "db1"):
            url = f"nats://{name}:secret@127.0.0.1:{server.port}"
            daemons.append(Lobbyd(daemon_env(name, url, tmp_path, DISCOVERY_SUBJECTS="per-host"),
                                  tmp_path, name, server).start())
        for d in daemons:
            wait_for(lambda d=d: d.hostnames() == ["db1", "web1"], what=f"{d.name} lists both")
        web1 = server.client()
        web1.publish(f"{SUBJECT}.host.db1", envelope("db1", ["evil"]))
        assert any(b"Permissions Violation" in line for line in server_says(web1))
        web1.close()
    finally:
        for d in daemons:
            d.stop(signal.SIGKILL, timeout=5)
        server.stop()


def test_the_readmes_redis_acl_works_as_it_says(redis, lobbyd) -> None:
    text = (ROOT / "README.md").read_text()
    line = re.search(r"^ACL SETUSER web1 .*$", text[text.index("## Per-host subjects"):],
                     re.M).group(0)  # type: ignore[union-attr]
    for name in ("web1", "db1"):
        redis.cli(*shlex.split(line.replace("web1", name).replace(">...", ">secret")))
    daemons = [lobbyd(name, start=False, DRIVER="Redis", REDIS_PORT=redis.port,
                      REDIS_USERNAME=name, REDIS_PASSWORD="secret",
                      DISCOVERY_SUBJECTS="per-host").start(wait=False)
               for name in ("web1", "db1")]
    for d in daemons:
        wait_for(lambda d=d: d.hostnames() == ["db1", "web1"], timeout=10,
                 what=f"{d.name} lists both over Redis")
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
        sock.sendall(resp_command("AUTH", "web1", "secret") +
                     resp_command("PUBLISH", f"{CHANNEL}:host:db1", envelope("db1", ["evil"])))
        data = b""
        while data.count(b"\r\n") < 2:
            data += sock.recv(4096)
    assert b"NOPERM" in data
