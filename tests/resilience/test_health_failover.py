"""GET /v1/health while a 3-node NATS cluster loses the node a daemon is attached to:
a quick reconnect to a surviving node shows as `reconnects` + 1 and the new server.

"Attached" is a NATS connection, as the node sees it: our subscription is listed. A TCP
socket alone is not one yet (INFO, CONNECT and a PING still go before the server's PONG),
and health rightly says `connected: false` for those milliseconds."""

from __future__ import annotations

import json
import signal
import time

from conftest import wait_for

from .conftest import record, tcp_connections


def attached_port(d, cluster) -> int | None:
    """The client port of the node that lists d's connection with its subscription."""
    local = {lp: rp for lp, rp in tcp_connections(d.pid) if rp in cluster.client_ports}
    for node in cluster.nodes:
        if node.running and set(local) & node.subscribed_client_ports():
            return node.port
    return None


def test_health_follows_a_failover_to_a_surviving_node(cluster3, fleet):
    d = fleet("hf.test", cluster3.urls(0))
    ports = cluster3.client_ports

    def health() -> tuple[int, dict]:
        status, _, body = d.request("GET", "/v1/health")
        return status, json.loads(body)

    port = wait_for(lambda: attached_port(d, cluster3), timeout=10, what="attached to a node")
    status, before = health()
    assert status == 200 and before["drivers"][0]["server"] == f"nats://127.0.0.1:{port}"
    assert before["drivers"][0]["reconnects"] == 0
    seen_503 = 0
    node = cluster3.by_port(port)
    killed = time.monotonic()
    node.stop(signal.SIGKILL)
    deadline = killed + 5
    while time.monotonic() < deadline:  # bounded: 5 s of polls every 20 ms
        status, now = health()
        seen_503 += status == 503
        driver = now["drivers"][0]
        if status == 200 and driver["reconnects"] == 1:
            break
        time.sleep(0.02)
    took = time.monotonic() - killed
    assert status == 200, now
    assert driver["reconnects"] == 1 and driver["connected"] is True
    assert driver["server"] != f"nats://127.0.0.1:{port}"
    assert int(driver["server"].rsplit(":", 1)[1]) in ports - {port}
    assert driver["since"] >= before["drivers"][0]["since"]
    record("health_failover", back_to_200_s=round(took, 3), polls_503=seen_503)
