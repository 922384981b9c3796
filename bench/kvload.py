"""Simulated hosts of DISCOVERY_MODE=kv: what N lobbyds would write into the buckets.

Each host writes its packet once into SUBJECT_hosts, then refreshes its liveness key
in SUBJECT_alive every KEEP_ALIVE seconds (paced evenly), and a few hosts a second
change a label (their packet is written again). After a reconnect (nats-server
restarted, its memory lost) it waits for the buckets to exist again and writes every
liveness key and packet at once, as every lobbyd does.

Protocol with the harness: one JSON line `{"ready": ...}` on stdout once every packet
is written, one JSON line at the end with what it sent. Bounded in time (--duration).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import nats
from loadgen import envelope, frame, hostname, labels

#: hosts written per PING of a bulk write (a chunk is about 6 MB)
BULK_CHUNK = 20_000


async def pong(reader: asyncio.StreamReader) -> None:
    """Up to the server's PONG: it has read everything sent before our PING."""
    while True:
        line = await asyncio.wait_for(reader.readline(), 30)
        if not line or line.startswith(b"-ERR"):
            raise ConnectionError(f"bulk write: {line!r}")
        if line.startswith(b"PONG"):
            return


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--hosts", type=int, required=True)
    ap.add_argument("--first", type=int, default=0, help="number of the first host")
    ap.add_argument("--keep-alive", type=float, default=5)
    ap.add_argument("--changes", type=float, default=1, help="label changes a second")
    ap.add_argument("--base", default="lobby_discovery", help="bucket name prefix")
    ap.add_argument("--duration", type=float, required=True)
    a = ap.parse_args()

    hosts = [hostname(i) for i in range(a.first, a.first + a.hosts)]
    seq = [0] * a.hosts
    lost = asyncio.Event()

    async def reconnected() -> None:
        lost.set()

    async def quiet(exc: Exception) -> None:  # the restart of nats-server is expected
        pass

    nc = await nats.connect(f"nats://127.0.0.1:{a.port}", max_reconnect_attempts=-1,
                            error_cb=quiet,
                            reconnect_time_wait=0.2, reconnected_cb=reconnected,
                            pending_size=256 * 1024 * 1024)
    js = nc.jetstream(timeout=2)
    data, alive = f"$KV.{a.base}_hosts.h.", f"$KV.{a.base}_alive.h."
    sent = {"alive": 0, "data": 0, "refills": 0}

    async def buckets() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                await js.stream_info(f"KV_{a.base}_hosts")
                await js.stream_info(f"KV_{a.base}_alive")
                return
            except Exception:
                await asyncio.sleep(0.05)
        raise TimeoutError("no buckets")

    packets = [envelope(host, labels(a.first + i, 0)) for i, host in enumerate(hosts)]
    # what a bulk write sends for each host, kept up to date with its label changes
    bulk = [frame(f"{alive}{host}".encode(), b"") + frame(f"{data}{host}".encode(), packets[i])
            for i, host in enumerate(hosts)]

    async def write_all() -> None:
        """Every host at once, as after a restart of nats-server: liveness key, packet.

        Pipelined over a raw connection of its own, in chunks each ended by a PING:
        one Python process stands in for N machines, and nats-py's publish() per
        message would make it, not the server or lobbyd, what a restart waits for.
        """
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        try:
            await reader.readline()  # INFO
            writer.write(b'CONNECT {"verbose":false,"pedantic":false,"name":"kvload"}\r\n')
            for start in range(0, len(hosts), BULK_CHUNK):
                writer.write(b"".join(bulk[start:start + BULK_CHUNK]))
                writer.write(b"PING\r\n")
                await writer.drain()
                await pong(reader)
        finally:
            writer.close()
        sent["alive"] += len(hosts)
        sent["data"] += len(hosts)

    await buckets()
    await write_all()
    print(json.dumps({"ready": len(hosts)}), flush=True)

    started = time.monotonic()
    tick, k, changed = 0.05, 0, 0
    per_tick = a.hosts * tick / a.keep_alive
    due, next_tick = 0.0, started
    while time.monotonic() - started < a.duration:
        if lost.is_set():
            lost.clear()
            await buckets()
            await write_all()
            sent["refills"] += 1
        due += per_tick
        while due >= 1:
            host = hosts[k % a.hosts]
            await nc.publish(alive + host, b"")
            k += 1
            due -= 1
            sent["alive"] += 1
        elapsed = time.monotonic() - started
        while changed < elapsed * a.changes:
            i = (changed * 7919) % a.hosts
            seq[i] += 1
            packets[i] = envelope(hosts[i], labels(a.first + i, seq[i]))
            bulk[i] = frame(f"{alive}{hosts[i]}".encode(), b"") + \
                frame(f"{data}{hosts[i]}".encode(), packets[i])
            await nc.publish(data + hosts[i], packets[i])
            changed += 1
            sent["data"] += 1
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
    await nc.drain()
    print(json.dumps(sent), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
