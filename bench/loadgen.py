"""Simulated hosts: publishes SPEC `hi` envelopes for N fake hostnames on NATS.

Runs as its own process (so it does not share a GIL with the harness), speaks the
NATS wire protocol on a raw socket, and pre-builds every frame before the clock
starts, so one core publishes several hundred thousand packets a second.

Host i is `h000042.bench.invalid` with realistic, mostly shared labels and one
sequence label `seq:K`. In `paced` mode packet k goes to host k % N with
K = seq0 + k // N (the harness knows every host's final K and checks the daemon's
registry against it); in `keepalive` mode every host repeats one fixed packet,
as a fleet at steady state does.

Protocol with the harness: one JSON line `{"ready": ...}` on stdout once the frames
are built and the socket is connected; it then waits for one line on stdin and
starts; at the end one JSON line with what it sent. Bounded in count AND time:
--count (paced) or --duration (keepalive), and --max-seconds in every mode.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time

SERVICES = ("web", "smtp", "db", "cache")


def hostname(i: int) -> str:
    return f"h{i:06d}.bench.invalid"


def labels(i: int, seq: int) -> list[str]:
    return [f"location:dc{i % 4}", "prometheus:node", "prometheus:node:port:9100",
            f"public_ip6:2001:db8::{i:x}", f"seq:{seq}", f"service:{SERVICES[i % 4]}"]


def envelope(host: str, labs: list[str], message: str = "hi") -> bytes:
    return json.dumps({"discovery": {"hostname": host, "labels": labs, "last_check": 0},
                       "message": message}, separators=(",", ":")).encode()


def frame(subject: bytes, payload: bytes) -> bytes:
    return b"PUB " + subject + b" " + str(len(payload)).encode() + b"\r\n" + payload + b"\r\n"


class Conn:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self._line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,'
                          b'"name":"bench-loadgen"}\r\n')
        self.flush()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("NATS closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def flush(self) -> None:
        self.sock.sendall(b"PING\r\n")
        while True:
            line = self._line()
            if line == b"PONG":
                return
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise ConnectionError(line.decode())


class RedisConn:
    """The same interface over Redis: PUBLISH commands (RESP, pipelined) on a raw socket.

    Redis answers every PUBLISH with an integer; a thread reads those answers away
    so the server never stalls on a full socket, and flush() is a PING whose PONG
    comes after every earlier answer.
    """

    def __init__(self, port: int):
        import threading
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pongs = threading.Semaphore(0)
        self.errors: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.flush()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\r\n")
            for line in lines:
                if line == b"+PONG":
                    self.pongs.release()
                elif line.startswith(b"-"):
                    self.errors.append(line)

    def flush(self) -> None:
        self.sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        if not self.pongs.acquire(timeout=120):
            raise ConnectionError("Redis did not answer PING")
        if self.errors:
            raise ConnectionError(self.errors[0].decode())


def redis_frame(channel: bytes, payload: bytes) -> bytes:
    return (b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n" % (len(channel), channel, len(payload))
            + payload + b"\r\n")


def build_paced(subject: bytes, hosts: int, seq0: int, count: int, offset: int,
                redis: bool = False) -> list[bytes]:
    """Frames for packets k = 0..count-1: host (offset + k) % hosts, seq seq0 + k // hosts."""
    # The envelope of host i is prefix_i + str(seq) + suffix_i: build the halves once.
    halves = []
    for i in range(hosts):
        body = envelope(hostname(i), labels(i, 0))
        a, b = body.split(b'"seq:0"', 1)
        halves.append((a + b'"seq:', b'"' + b))
    head = b"PUB " + subject + b" "
    out = []
    for k in range(count):
        i = (offset + k) % hosts
        a, b = halves[i]
        payload = a + str(seq0 + k // hosts).encode() + b
        if redis:
            out.append(redis_frame(subject, payload))
        else:
            out.append(head + str(len(payload)).encode() + b"\r\n" + payload + b"\r\n")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--subject", default="lobby.discovery")
    p.add_argument("--hosts", type=int, required=True)
    p.add_argument("--mode", choices=("paced", "keepalive"), default="paced")
    p.add_argument("--rate", type=float, default=0, help="packets/s; 0 = as fast as possible")
    p.add_argument("--count", type=int, default=0, help="paced: packets to send")
    p.add_argument("--seq0", type=int, default=0)
    p.add_argument("--duration", type=float, default=10, help="keepalive: seconds")
    p.add_argument("--sentinel", default="", help="after the bulk, a hi with label sentinel:X")
    p.add_argument("--relabel-every", type=int, default=0,
                   help="keepalive: every K-th packet gives its host a new seq label")
    p.add_argument("--redis", action="store_true", help="publish on Redis (--subject is the "
                   "channel, --port Redis's)")
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--wait-go", action="store_true", help="wait for a line on stdin to start")
    a = p.parse_args()

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    subject = a.subject.encode()
    if a.mode == "paced":
        frames = build_paced(subject, a.hosts, a.seq0, a.count, 0, a.redis)
        total = len(frames)
    else:
        frames = build_paced(subject, a.hosts, a.seq0, a.hosts, 0, a.redis)
        total = int(a.rate * a.duration) if a.rate else a.hosts
    relabels = 0

    def packet(k: int) -> bytes:
        nonlocal relabels
        i = k % nframes
        if a.relabel_every and k % a.relabel_every == a.relabel_every - 1:
            relabels += 1  # the host keeps its new label from now on
            frames[i] = build_paced(subject, a.hosts, a.seq0 + relabels, 1, i, a.redis)[0]
        return frames[i]
    conn = RedisConn(a.port) if a.redis else Conn(a.port)
    print(json.dumps({"ready": True, "frames": len(frames)}), flush=True)
    if a.wait_go:
        sys.stdin.readline()

    hard = time.monotonic() + a.max_seconds
    t0 = time.monotonic()
    sent = 0
    behind_max = 0.0
    nframes = len(frames)
    while sent < total and not stop["now"]:
        now = time.monotonic()
        if now > hard:
            break
        if a.rate:
            target = min(total, int((now - t0) * a.rate) + 1)
            if target <= sent:
                time.sleep(0.0005)
                continue
            target = min(target, sent + 20000)
            behind_max = max(behind_max, (target - sent) / a.rate)
        else:
            target = min(total, sent + 4000)
        if a.mode == "paced":
            chunk = b"".join(frames[sent:target])
        else:
            chunk = b"".join(packet(k) for k in range(sent, target))
        conn.sock.sendall(chunk)
        sent = target
    t_last = time.monotonic()
    conn.flush()
    t_flushed = time.monotonic()
    t_sentinel = None
    if a.sentinel:
        body = envelope("zz-sentinel.bench.invalid", [f"sentinel:{a.sentinel}"])
        conn.sock.sendall(redis_frame(subject, body) if a.redis else frame(subject, body))
        conn.flush()
        t_sentinel = time.monotonic()
    elapsed = max(1e-9, t_last - t0)
    print(json.dumps({"sent": sent, "t_first": t0, "t_last": t_last, "t_flushed": t_flushed,
                      "t_sentinel": t_sentinel, "rate": sent / elapsed,
                      "behind_max_s": round(behind_max, 4), "stopped": stop["now"],
                      "relabels": relabels}),
          flush=True)
    conn.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
