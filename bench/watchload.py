"""Many watchers of one lobbyd (SPEC 8): blocking queries and event streams.

Runs as its own process (asyncio, one connection per watcher). The harness
drives it with lines on stdin and reads one JSON line per command on stdout:

    (start)   -> {"ready": true, "held": N, "streams": M}   all connected and armed
    arm       -> {"armed": true}         forget the previous answers
    collect   -> {"times": [...], "missing": K, "untouched_woken": U, "streams_open": S}
                 once every watcher of a touched answer has its answer (or after 15 s);
                 times are time.monotonic() (CLOCK_MONOTONIC, the same clock as the
                 harness's) of each answer's arrival
    quit

A held request re-arms with the index of its answer at the next `arm`, not at
once: re-arming a thousand requests while the daemon still writes the answers
would measure the re-arming too. Bounded: every wait has a deadline, and
--max-seconds ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


def answer_index(headers: dict[str, str]) -> int:
    """X-Lobby-Index, or X-Consul-Index on Consul's routes."""
    return int(headers.get("x-lobby-index") or headers["x-consul-index"])


class Held:
    def __init__(self, port: int, path: str, touched: bool):
        self.port, self.path, self.touched = port, path, touched
        self.index = 0
        self.answered: float | None = None
        self.woken = 0

    async def start(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                 limit=64 << 20)
        _status, headers, _body = await self.request(self.path)
        self.index = answer_index(headers)
        self.task: asyncio.Future[None] | None = None
        self.arm()

    def arm(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self.wait())

    async def request(self, path: str) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers, body

    async def wait(self) -> None:
        """One blocking query; it ends when the answer changed (or after 10 minutes)."""
        sep = "&" if "?" in self.path else "?"
        _status, headers, _body = await self.request(
            f"{self.path}{sep}index={self.index}&wait=10m")
        now = time.monotonic()
        index = answer_index(headers)
        if index != self.index:
            self.woken += 1
            if self.answered is None:
                self.answered = now
        self.index = index


class Stream:
    def __init__(self, port: int, query: str):
        self.port, self.query = port, query
        self.answered: float | None = None
        self.open = False
        self.touched = True

    async def start(self) -> None:
        # the snapshot of a big fleet is one line of megabytes
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                 limit=64 << 20)
        self.writer.write(f"GET /v1/events{self.query} HTTP/1.1\r\n"
                          "Host: localhost\r\n\r\n".encode())
        await self.reader.readuntil(b"\r\n\r\n")
        await self.reader.readuntil(b"\n\n")  # the snapshot
        self.open = True
        self.task = asyncio.ensure_future(self.loop())

    async def loop(self) -> None:
        try:
            while True:
                block = await self.reader.readuntil(b"\n\n")
                if b"\nevent: " in b"\n" + block and self.answered is None:
                    self.answered = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.open = False


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--plan", required=True,
                   help='JSON list of ["held"|"stream", path-or-query, count, touched]')
    p.add_argument("--max-seconds", type=float, default=600)
    a = p.parse_args()
    loop = asyncio.get_running_loop()
    loop.call_later(a.max_seconds, sys.exit, 3)
    held: list[Held] = []
    streams: list[Stream] = []
    for kind, target, count, touched in json.loads(a.plan):
        for _ in range(count):
            if kind == "held":
                held.append(Held(a.port, target, touched))
            else:
                streams.append(Stream(a.port, target))
    for batch in range(0, len(held) + len(streams), 100):
        await asyncio.gather(*(w.start() for w in (held + streams)[batch:batch + 100]))
    print(json.dumps({"ready": True, "held": len(held), "streams": len(streams)}), flush=True)
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while True:
        command = (await stdin.readline()).decode().strip()
        if command in ("", "quit"):
            return 0
        if command == "arm":
            for w in [*held, *streams]:
                w.answered = None
            for h in held:
                h.arm()
            print(json.dumps({"armed": True}), flush=True)
        elif command == "collect":
            watchers = [w for w in [*held, *streams] if w.touched]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(w.answered is None for w in watchers):
                await asyncio.sleep(0.005)
            print(json.dumps({
                "times": [w.answered for w in watchers if w.answered is not None],
                "missing": sum(w.answered is None for w in watchers),
                "untouched_woken": sum(w.woken for w in held if not w.touched),
                "streams_open": sum(s.open for s in streams)}), flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
