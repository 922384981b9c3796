"""In-process cost of the API's hot answers: one lobbyd module's Daemon (not started:
no NATS), its registry filled with N hosts, its HTTP server on loopback, and a client
in the same event loop asking over one kept-alive connection.

    python bench/inprocess_http.py PATH/lobbyd.py [--hosts 10000] [--requests 300]

Prints one JSON object: microseconds per request (median and best of the batches)
for each case. Run it for two versions in turns: the machine's noise is then shared.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import hostname, labels

CASES = {
    "stable": (b"GET /v1/discoveries HTTP/1.1\r\nHost: localhost\r\n\r\n", 0),
    "churn": (b"GET /v1/discoveries HTTP/1.1\r\nHost: localhost\r\n\r\n", 2),
    "gzip": (b"GET /v1/discoveries HTTP/1.1\r\nHost: localhost\r\n"
             b"Accept-Encoding: gzip\r\n\r\n", 0),
    "prometheus": (b"GET /v1/prometheus/node HTTP/1.1\r\nHost: localhost\r\n\r\n", 0),
    "resolve": (b"GET /v1/resolve?label=service:web HTTP/1.1\r\nHost: localhost\r\n\r\n", 0),
}
LENGTH_RE = re.compile(rb"\r\nContent-Length: (\d+)\r\n")


def load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("lobbyd_measured", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


async def ask(loop: asyncio.AbstractEventLoop, sock: socket.socket, request: bytes,
              buffer: bytearray) -> int:
    """One request, its whole answer read; the answer's length."""
    await loop.sock_sendall(sock, request)
    view = memoryview(buffer)
    got = 0
    total = None
    while total is None or got < total:
        got += await loop.sock_recv_into(sock, view[got:])
        if total is None:
            end = buffer.find(b"\r\n\r\n", 0, got)
            if end >= 0:
                total = end + 4 + int(LENGTH_RE.search(buffer, 0, end + 2)[1])
    return total


async def measure(module: Any, hosts: int, requests: int) -> dict[str, dict[str, float]]:
    config = module.Config.from_env({"HOSTNAME": "bench-self", "LABELS": "service:web"})
    daemon = module.Daemon(config, {})
    now = time.time()
    for i in range(hosts):
        daemon.registry.apply_hi(hostname(i), tuple(sorted(labels(i, 0))), now)
    await daemon.http.start("127.0.0.1", 0)
    port = daemon.http.server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    buffer = bytearray(64 << 20)
    out = {}
    seq = 1
    try:
        for case, (request, changes) in CASES.items():
            for _ in range(20):  # warm: renderers, repeated heads
                await ask(loop, sock, request, buffer)
            batches = []
            for _batch in range(5):
                started = time.perf_counter()
                for k in range(requests):
                    now = time.time()
                    # a keep-alive per request, as a fleet sends them; `changes` label changes
                    i = (k * 7919) % hosts
                    daemon.registry.apply_hi(hostname(i), daemon.registry.hosts[hostname(i)][0],
                                             now)
                    for c in range(changes):
                        j = (k * 104729 + c * 31) % hosts
                        seq += 1
                        daemon.registry.apply_hi(hostname(j), tuple(sorted(labels(j, seq))), now)
                        daemon.registry_changed()
                    await ask(loop, sock, request, buffer)
                batches.append((time.perf_counter() - started) / requests * 1e6)
            out[case] = {"median_us": round(statistics.median(batches), 1),
                         "best_us": round(min(batches), 1)}
    finally:
        sock.close()
        await daemon.http.close()
        await asyncio.sleep(0.1)  # the server's side of the connection ends
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("--hosts", type=int, default=10000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    module = load(args.path)
    print(json.dumps({"path": args.path, **asyncio.run(measure(module, args.hosts,
                                                               args.requests))}))


if __name__ == "__main__":
    main()
