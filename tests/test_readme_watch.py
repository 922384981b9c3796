"""The README's examples of SPEC 8 and 9, run as written against real daemons.

Each example is the code block after `<!-- example: NAME -->` in README.md, so
what a reader copies is what is tested. The file_sd example runs with a real
Prometheus (Debian package `prometheus`; CI installs it).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, skip_unless_required, wait_for
from harness import prometheus_targets, start_prometheus, stop_process

import lobbyd as L


def example(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert match, f"README has no example {name}"
    return match.group(1)


class Script:
    """A README shell example running in its own process group, its output on a queue."""

    def __init__(self, text: str, cwd: Path, **env: str):
        path = cwd / "example.sh"
        path.write_text(text)
        self.proc = subprocess.Popen(["sh", str(path)], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **env}, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.seen: list[str] = []

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, pattern: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s: {self.seen}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)


@pytest.fixture
def scripts():
    started: list[Script] = []

    def run(text: str, cwd: Path, **env: str) -> Script:
        started.append(Script(text, cwd, **env))
        return started[-1]

    yield run
    for script in started:
        script.stop()


def test_blocking_query_loop(lobbyd, scripts, tmp_path) -> None:
    a = lobbyd("a")
    loop = scripts(example("watch-db.sh"), tmp_path, LOBBYD=f"http://127.0.0.1:{a.port}")
    loop.expect(r"^--- index \d+$")
    loop.expect(r"^\[\]$")
    lobbyd("b", LABELS="service:db,role:x")
    loop.expect(r"^--- index \d+$")
    loop.expect(r'"hostname": "b"')


def test_event_stream_consumer(lobbyd, scripts, tmp_path) -> None:
    a = lobbyd("a", LABELS="service:web")
    events = scripts(example("events.sh"), tmp_path, LOBBYD=f"http://127.0.0.1:{a.port}")
    line = events.expect(r"^snapshot ")
    assert json.loads(line.split(" ", 1)[1])[0]["labels"] == ["service:web"]
    b = lobbyd("b", LABELS="service:db")
    assert json.loads(events.expect(r"^joined ").split(" ", 1)[1])["hostname"] == "b"
    b.stop()
    assert json.loads(events.expect(r"^left ").split(" ", 1)[1]) == {
        "hostname": "b", "reason": "goodbye"}


def test_lease_refresher_holds_the_label_while_the_service_runs(lobbyd, scripts,
                                                                tmp_path) -> None:
    a = lobbyd("a")
    b = lobbyd("b")
    # the example with a 3 s "service", a 2 s lease refreshed every 0.5 s
    text = example("lease.sh").replace("my-api-server", "sleep 3").replace(
        "ttl=30", "ttl=2").replace("sleep 10", "sleep 0.5")
    started = time.monotonic()
    scripts(text, tmp_path, LOBBYD=f"http://127.0.0.1:{a.port}")
    wait_for(lambda: "service:api" in (b.labels_of("a") or []), what="the lease on b")
    wait_for(lambda: "service:api" not in (b.labels_of("a") or []), timeout=10,
             what="the lease gone after the service")
    assert 3 + 2 - 0.6 <= time.monotonic() - started <= 3 + 2 + 1.5


def test_check_examples_are_valid() -> None:
    web = L.parse_check("web", example("web.check"))
    assert web.kind == "http" and web.labels == ("public_port:443", "service:web")
    assert web.interval == 5
    assert L.parse_check("postgres", example("postgres.check")).rise == 3
    replica = L.parse_check("replica", example("replica.check"))
    assert replica.argv == ("/usr/local/lib/lobby/replica-ok", "--max-lag", "30")


def instances(port: int) -> set[str]:
    return {t["labels"]["instance"] for t in prometheus_targets(port)}


def test_file_sd_sync_with_a_real_prometheus(lobbyd, scripts, tmp_path) -> None:
    if not shutil.which("prometheus"):
        skip_unless_required("needs Prometheus: apt-get install prometheus (CI installs it)")
    a = lobbyd("a", LABELS="prometheus:node,prometheus:node:location:prg")
    targets = tmp_path / "targets"
    targets.mkdir()
    out = targets / "lobbyd-node.json"
    scripts(example("lobbyd-file-sd.sh"), tmp_path, LOBBYD=f"http://127.0.0.1:{a.port}",
            JOB="node", OUT=str(out), WAIT="1s")
    wait_for(lambda: out.exists() and "a:9100" in out.read_text(), what="the target file")
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""global: {{scrape_interval: 1s}}
scrape_configs:
  - job_name: node
    file_sd_configs:
      - files: [{targets}/lobbyd-*.json]
        refresh_interval: 1s
""")
    prom, port = start_prometheus(config, tmp_path)
    try:
        wait_for(lambda: instances(port) == {"a:9100"}, timeout=30, what="Prometheus: a")
        target = prometheus_targets(port)[0]
        assert target["labels"]["location"] == "prg" and target["labels"]["job"] == "node"
        # unchanged answers (three 1 s waits run out) never rewrite the file
        before = out.stat()
        time.sleep(3.5)
        after = out.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        b = lobbyd("b", LABELS="prometheus:node,prometheus:node:port:9200")
        wait_for(lambda: instances(port) == {"a:9100", "b:9200"}, timeout=15,
                 what="Prometheus: b joined")
        b.stop()
        wait_for(lambda: instances(port) == {"a:9100"}, timeout=15, what="Prometheus: b left")
        # at most the temp file of the request in flight, never one left behind
        assert len([p for p in targets.iterdir() if p != out]) <= 1
    finally:
        stop_process(prom)
