"""The machine's HTTP ceiling: a minimal asyncio server answering every request with the
very same bytes lobbyd sent for one request (head and body, fetched once at start).

    python bench/ceiling.py --from-port 8080 --path /v1/discoveries [--header 'K: V']

It does no work per request but find the end of the request head and write the cached
answer (as a naive server does: through Python, with asyncio's transport). The HTTP
figures report lobbyd as a percentage of what this reaches in the same bench run,
alternating with lobbyd. Prints one JSON line {"port": P} when it listens; runs until
SIGTERM, or --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket


def fetch(port: int, path: str, headers: list[str]) -> bytes:
    """One whole keep-alive response of the server on `port` (head and body), as sent."""
    extra = "".join(f"{h}\r\n" for h in headers)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed before the head")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if not m:
            raise ValueError("no Content-Length")
        size = int(m.group(1))
        while len(body) < size:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed mid-body")
            body += chunk
        if not head.startswith(b"HTTP/1.1 200") or b"keep-alive" not in head.lower():
            raise ValueError(f"unexpected head {head[:200]!r}")
        return head + b"\r\n\r\n" + body[:size]


async def serve(answer: bytes, max_seconds: float) -> None:
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(one, "127.0.0.1", 0, limit=1 << 16)
    print(json.dumps({"port": server.sockets[0].getsockname()[1], "bytes": len(answer)}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-port", type=int, required=True, help="lobbyd's API port")
    p.add_argument("--path", default="/v1/discoveries")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--max-seconds", type=float, default=600)
    a = p.parse_args()
    asyncio.run(serve(fetch(a.from_port, a.path, a.header), a.max_seconds))


if __name__ == "__main__":
    main()
