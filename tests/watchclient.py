"""Test clients for SPEC 8: held (blocking) requests and a Server-Sent Events reader.

Both run on threads against a real lobbyd; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from conftest import wait_for

SUBJECT = "lobby.discovery"
_pool = ThreadPoolExecutor(max_workers=32)


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def index_of(port: int, path: str) -> int:
    status, headers, body = get(port, path)
    assert status == 200, (status, body)
    return int(headers["x-lobby-index"])


def hold(port: int, path: str, index: int, wait: str = "60s") -> Future:
    """Start a blocking query on a thread; the Future gives (status, headers, body, seconds)."""
    sep = "&" if "?" in path else "?"

    def run() -> tuple[int, dict[str, str], bytes, float]:
        started = time.monotonic()
        status, headers, body = get(port, f"{path}{sep}index={index}&wait={wait}", timeout=90)
        return status, headers, body, time.monotonic() - started

    return _pool.submit(run)


def returned(future: Future, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, float]:
    return future.result(timeout=timeout)


def envelope(hostname: str, labels: list[str] | None, message: str = "hi") -> dict:
    return {"discovery": {"hostname": hostname, "labels": labels, "last_check": 0},
            "message": message}


class EventReader:
    """Reads /v1/events on a thread and keeps every event as (event, id, data)."""

    def __init__(self, port: int, query: str = ""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"GET /v1/events{query} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        self.events: list[tuple[str, int | None, object]] = []
        self.comments = 0
        self.head = b""
        self.closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            self.head, buf = buf.split(b"\r\n\r\n", 1)
            while True:
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    self._parse(block.decode())
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
        except OSError:
            return
        finally:
            self.closed = True

    def _parse(self, block: str) -> None:
        event, event_id, data = "message", None, []
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(": ")
            if name == "event":
                event = value
            elif name == "id":
                event_id = int(value)
            elif name == "data":
                data.append(value)
        if data:
            with self._lock:
                self.events.append((event, event_id, json.loads("\n".join(data))))

    def wait(self, count: int, timeout: float = 10.0) -> list[tuple[str, int | None, object]]:
        wait_for(lambda: len(self.events) >= count, timeout=timeout,
                 what=f"{count} events (have {self.events})")
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        # shutdown first: close() alone leaves the socket open while the thread reads it
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
