"""A tiny synchronous NATS protocol client for tests.

It speaks the wire protocol directly (CONNECT/PUB/SUB/MSG/PING), so the tests
see packets byte for byte as another implementation (the Go daemon) would, and
need no event loop.
"""

from __future__ import annotations

import json
import socket
import time


class RawNats:
    def __init__(self, host: str, port: int, timeout: float = 5.0, **auth: str):
        """`auth`: user and pass, or auth_token, as nats-server's CONNECT expects them."""
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.reply = ""  #: the reply subject of the message read last ("" if it had none)
        self.info = json.loads(self._line()[5:])
        options = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                   "protocol": 1, **auth}
        self.sock.sendall(b"CONNECT " + json.dumps(options).encode() + b"\r\n")
        self.flush()
        self.sid = 0

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return False
        if not chunk:
            raise ConnectionError("NATS closed the connection")
        self.buf += chunk
        return True

    def _line(self, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buf:
            if not self._fill(max(0.01, deadline - time.monotonic())) and \
                    time.monotonic() >= deadline:
                raise TimeoutError("no line from NATS")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def subscribe(self, subject: str, queue: str = "") -> int:
        self.sid += 1
        self.sock.sendall(f"SUB {subject} {queue + ' ' if queue else ''}{self.sid}\r\n".encode())
        self.flush()
        return self.sid

    def publish(self, subject: str, payload: bytes | str, reply: str | None = None) -> None:
        if isinstance(payload, str):
            payload = payload.encode()
        head = f"PUB {subject} {reply + ' ' if reply else ''}{len(payload)}\r\n".encode()
        self.sock.sendall(head + payload + b"\r\n")

    def publish_json(self, subject: str, obj: object) -> None:
        self.publish(subject, json.dumps(obj))

    def flush(self) -> None:
        """Round trip: everything sent before has been processed by the server."""
        self.sock.sendall(b"PING\r\n")
        while True:
            line = self._line()
            if line == b"PONG":
                return
            if line.startswith(b"MSG") or line.startswith(b"HMSG"):
                self._pending_msg(line)

    pending: list[tuple[str, bytes]]

    def _pending_msg(self, line: bytes) -> None:
        if not hasattr(self, "pending"):
            self.pending = []
        self.pending.append(self._read_msg(line))

    def _read_msg(self, line: bytes) -> tuple[str, bytes]:
        parts = line.split()
        self.reply = parts[3].decode() if len(parts) == (6 if parts[0] == b"HMSG" else 5) else ""
        size = int(parts[-1])
        while len(self.buf) < size + 2:
            self._fill(5.0)
        payload, self.buf = self.buf[:size], self.buf[size + 2:]
        if parts[0] == b"HMSG":
            hdr_len = int(parts[-2])
            payload = payload[hdr_len:]
        return parts[1].decode(), payload

    def next_msg(self, timeout: float = 5.0) -> tuple[str, bytes]:
        if getattr(self, "pending", None):
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message")
            line = self._line(remaining)
            if line.startswith(b"MSG") or line.startswith(b"HMSG"):
                return self._read_msg(line)
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")

    def messages(self, duration: float) -> list[tuple[str, bytes]]:
        """Every message that arrives within `duration` seconds."""
        out: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + duration
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out
            try:
                out.append(self.next_msg(remaining))
            except TimeoutError:
                return out

    def close(self) -> None:
        self.sock.close()
