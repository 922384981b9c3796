"""The machine's real HTTP ceiling for one answer: Debian's nginx, one worker process,
`sendfile on`, serving the very body lobbyd sent as a static file (gzip bytes with
`Content-Encoding: gzip` when lobbyd's answer was gzipped). Alternated with lobbyd and with
bench/ceiling.py (a minimal Python server sending the same bytes) in the same turns.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # harness.py

from harness import free_port, stop_process, wait_for


def split_answer(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


class NginxCeiling:
    """nginx -c <generated conf>: listens on a free loopback port until close()."""

    def __init__(self, workdir: Path, answer: bytes):
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise RuntimeError("nginx not found: apt-get install nginx-light (or nginx)")
        head, body = split_answer(answer)
        gzipped = re.search(rb"(?i)\r\ncontent-encoding:\s*gzip", head) is not None
        self.port = free_port()
        self.dir = workdir / f"nginx-{self.port}"
        (self.dir / "tmp").mkdir(parents=True)
        (self.dir / "answer").write_bytes(body)
        self.body_bytes = len(body)
        user = "user root;\n" if os.geteuid() == 0 else ""  # the files are root's 0700 dirs
        (self.dir / "nginx.conf").write_text(f"""{user}worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    client_body_temp_path {self.dir}/tmp;
    proxy_temp_path {self.dir}/tmp;
    fastcgi_temp_path {self.dir}/tmp;
    uwsgi_temp_path {self.dir}/tmp;
    scgi_temp_path {self.dir}/tmp;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.dir};
        location / {{
            default_type "application/json; charset=UTF-8";
            {'add_header Content-Encoding gzip;' if gzipped else ''}
            try_files /answer =404;
        }}
    }}
}}
""")
        self.proc = subprocess.Popen([nginx, "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                                      "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self._serves, timeout=15, what=f"nginx on {self.port}")
        self.pids = [self.proc.pid, *self._workers()]

    def _serves(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx exited: {(self.dir / 'error.log').read_text()[-2000:]}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            got = b""
            while chunk := s.recv(1 << 20):
                got += chunk
        head, body = split_answer(got)
        return head.startswith(b"HTTP/1.1 200") and len(body) == self.body_bytes

    def _workers(self) -> list[int]:
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(k) for k in kids.split()]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def close(self) -> None:
        stop_process(self.proc)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists()
                                                  for p in self.pids[1:]):
            time.sleep(0.05)  # the worker follows its master
        shutil.rmtree(self.dir, ignore_errors=True)
