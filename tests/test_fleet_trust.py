"""What a client of the shared subject can no longer do to a fleet: speak for a daemon to
that daemon itself, make every daemon send its whole registry again and again (or onto
the discovery subject), or grow a registry without bound. Real nats-server, real lobbyd
processes; the attacker is a raw NATS client."""

from __future__ import annotations

import json

from conftest import wait_for

SUBJECT = "lobby.discovery"


def envelope(hostname: str, labels: list[str], message: str = "hi") -> bytes:
    return json.dumps({"discovery": {"hostname": hostname, "labels": labels, "last_check": 0},
                       "message": message}, separators=(",", ":")).encode()


def test_a_packet_claiming_our_hostname_never_shows_and_ours_goes_out_again(lobbyd,
                                                                            nats) -> None:
    slow = {"KEEP_ALIVE": "60", "TTL": "180"}  # a republished packet is no keep-alive
    a = lobbyd("a", LABELS="role:real", **slow)
    b = lobbyd("b", **slow)
    wait_for(lambda: b.labels_of("a") == ["role:real"], what="b lists a")
    watcher = nats.client()
    watcher.subscribe(SUBJECT)
    mallory = nats.client()
    for _ in range(100):
        mallory.publish(SUBJECT, envelope("a", ["role:fake"]))
    mallory.publish(SUBJECT, envelope("a", [], "goodbye"))
    mallory.flush()
    seen = []
    for _ in range(20):  # what a answers about itself, while the flood is applied
        seen += [d["labels"] for d in a.get_json("/v1/discoveries") if d["hostname"] == "a"]
    assert seen == [["role:real"]] * 20
    # a published its own packet again at once (a keep-alive is a minute away) ...
    wait_for(lambda: any(json.loads(payload)["discovery"] == {
        "hostname": "a", "labels": ["role:real"], "last_check": json.loads(payload)[
            "discovery"]["last_check"]} for _, payload in watcher.messages(0.2)),
        timeout=5, what="a's packet published again")
    # ... so b, which believed the impostor, lists a's own labels again
    wait_for(lambda: b.labels_of("a") == ["role:real"], timeout=5, what="b lists a's labels")
    assert a.labels_of("a") == ["role:real"]
    # a republished at the first impostor: the rest of the flood may still be coming in
    wait_for(lambda: a.metric("lobbyd_impostor_packets_total") >= 101, what="101 counted")
    assert a.metric("lobbyd_impostor_packets_total") == 101
    assert 1 <= a.logs().count("claiming to be this host ('a')") <= 5  # rate-limited
    watcher.close()
    mallory.close()


def join_request_answers(nats, requests: int, inbox: str = "_INBOX.test") -> tuple[int, int]:
    """(messages, bytes) that `requests` two-byte join requests bring to their inbox."""
    client = nats.client()
    client.subscribe(inbox + ".>")
    for i in range(requests):
        client.publish(SUBJECT + ".sync", b"{}", reply=f"{inbox}.{i}")
    client.flush()
    got = client.messages(2.0)
    if requests == 1:  # one answer, whole (its last chunk says done), however slow the machine

        def whole() -> bool:
            got.extend(client.messages(0.1))
            return any(payload.endswith(b'"done":true}') for _, payload in got)

        wait_for(whole, what="the whole answer")
    client.close()
    return len(got), sum(len(payload) for _, payload in got)


def test_a_burst_of_join_requests_costs_a_few_answers(lobbyd, nats) -> None:
    a = lobbyd("a")
    pub = nats.client()
    names = [f"host{i:03d}.example.com" for i in range(300)]
    for name in names:
        pub.publish(SUBJECT, envelope(name, ["service:web", "role:x"]))
    pub.flush()
    wait_for(lambda: len(a.hostnames()) == 301, what="a lists 300 hosts")
    one_count, one_size = join_request_answers(nats, 1)
    assert one_count >= 1 and one_size > 300 * 30  # a whole registry
    count, size = join_request_answers(nats, 50)
    # a burst of SYNC_ANSWER_BURST (4, daemons starting together), then one a second: not 50
    assert size <= 5 * one_size, (count, size, one_size)
    wait_for(lambda: a.metric("lobbyd_sync_answers_refused_total") >= 45,
             what="the refusals counted")
    pub.close()


def test_a_join_answer_never_goes_to_the_discovery_subject(lobbyd, nats) -> None:
    a = lobbyd("a")
    listener = nats.client()
    listener.subscribe(SUBJECT)
    listener.subscribe("elsewhere")
    asker = nats.client()
    asker.publish(SUBJECT + ".sync", b"{}", reply=SUBJECT)
    asker.publish(SUBJECT + ".sync", b"{}", reply="elsewhere")
    asker.flush()
    got = [payload for _, payload in listener.messages(2.0)]
    assert not [payload for payload in got if b'"hosts"' in payload], got
    wait_for(lambda: "is not an inbox" in a.logs(), what="the refusal logged")
    # an inbox still gets its answer: the refusal was for the subject
    assert join_request_answers(nats, 1)[0] >= 1
    listener.close()
    asker.close()


def test_a_flood_of_made_up_hosts_stops_at_max_hosts(lobbyd, nats) -> None:
    a = lobbyd("a", MAX_HOSTS="50")
    b = lobbyd("b", LABELS="v:1")
    wait_for(lambda: a.hostnames() == ["a", "b"], what="a lists b")
    mallory = nats.client()
    for i in range(1000):
        mallory.publish(SUBJECT, envelope(f"fake{i:04d}", ["x:y"]))
    mallory.publish(SUBJECT, envelope("fake0000", ["marker"]))  # after the flood, in order
    mallory.flush()
    wait_for(lambda: a.labels_of("fake0000") == ["marker"], what="the flood applied")
    names = a.hostnames()
    assert len(names) == 50 and "a" in names and "b" in names
    assert a.metric('lobbyd_packets_dropped_total{reason="registry_full"}') == 952
    b.request("POST", "/v1/labels", "v:2")  # a host it knows still changes
    wait_for(lambda: a.labels_of("b") == ["v:1", "v:2"], what="b's new label")
    assert 1 <= a.logs().count("registry full (MAX_HOSTS=50)") <= 5
    mallory.close()
