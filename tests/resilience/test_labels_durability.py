"""Faults 5 and 7 of issue 4: runtime labels survive kill -9 at any moment, a read-only or
full labels directory, and SIGTERM during a burst of API writes and NATS traffic."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

from .conftest import SUBJECT, record, remount, tcp_connections, tmpfs

ROUNDS = int(os.environ.get("RESILIENCE_CRASH_ROUNDS", "100"))
SEED = int(os.environ.get("RESILIENCE_SEED", str(int(time.time()))))
RUNTIME = "_runtime"


def make_label(prefix: str, rnd: int, i: int) -> str:
    base = f"{prefix}:r{rnd:03d}-{i:04d}"
    return f"{base}-{hashlib.sha1(base.encode()).hexdigest()[:6]}"


LABEL_RE = re.compile(r"^(?P<base>[a-z]+:r\d{3}-\d{4})-(?P<sum>[0-9a-f]{6})$")


def intact(label: str) -> bool:
    m = LABEL_RE.match(label)
    return bool(m) and hashlib.sha1(m["base"].encode()).hexdigest()[:6] == m["sum"]


def runtime_lines(path: Path) -> list[str]:
    """The runtime file must decode as UTF-8 and every line must be a whole label
    (# comment lines allowed)."""
    if not path.exists():
        return []
    text = path.read_bytes().decode("utf-8")
    return [ln for ln in (x.strip() for x in text.split("\n")) if ln and not ln.startswith("#")]


def stray_files(labels_dir: Path) -> list[str]:
    """Files a crash left behind that would be read as label files (not dot-files)."""
    if not labels_dir.exists():  # nothing was ever written
        return []
    return sorted(p.name for p in labels_dir.iterdir()
                  if p.name not in (RUNTIME, "static") and not p.name.startswith("."))


def py_spy_dump(pid: int) -> str:
    """Thread stacks of a hung daemon (diagnostics only; needs py-spy)."""
    if not shutil.which("py-spy"):
        return "(py-spy not installed)"
    res = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True,
                         text=True, timeout=30)
    return (res.stdout + res.stderr)[-6000:]


#: what a POST that a kill cuts short sees once its request was sent: the daemon died
#: with the request in its socket, so the connection is reset or closed without an answer
CUT_SHORT = (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
             http.client.IncompleteRead, http.client.BadStatusLine)


class Poster(threading.Thread):
    """POSTs fresh labels one request after the other until the daemon dies (bounded).

    Each request is timed: sent (the whole request written) and done (answer read, or the
    connection cut). A kill landed *during a request* when the connection broke after the
    request was sent; refused at connect means the daemon was already gone; anything else
    is an error the test reports."""

    def __init__(self, d, prefix: str, rnd: int, max_requests: int = 400,
                 max_time: float = 8.0):
        super().__init__(daemon=True)
        self.d, self.prefix, self.rnd = d, prefix, rnd
        self.max_requests, self.max_time = max_requests, max_time
        self.acked: list[str] = []
        self.unacked: list[str] = []
        self.interrupted = False  # the connection broke after the request was sent
        self.refused = False  # the daemon was gone before the request went out
        self.errors: list[str] = []
        self.spans: list[tuple[float, float]] = []  # (sent, done) of every request
        self.waiting: float | None = None  # a request is sent and not answered yet
        self.rejected: list[tuple[int, bytes]] = []
        self.rng = random.Random(SEED * 1000 + rnd)

    def in_flight_at(self, moment: float) -> bool:
        """A request had been sent and was not answered yet at `moment`."""
        return any(sent <= moment <= done for sent, done in self.spans)

    def run(self) -> None:
        end = time.monotonic() + self.max_time
        i = 0
        for _ in range(self.max_requests):
            if time.monotonic() > end:
                break
            batch = [make_label(self.prefix, self.rnd, i + k)
                     for k in range(self.rng.randint(1, 3))]
            i += len(batch)
            conn = http.client.HTTPConnection("127.0.0.1", self.d.port, timeout=5)
            sent = None
            try:
                conn.connect()
                conn.request("POST", "/v1/labels", ("\n".join(batch) + "\n").encode())
                sent = self.waiting = time.monotonic()
                resp = conn.getresponse()
                status, body = resp.status, resp.read()
            except ConnectionRefusedError:
                self.refused = sent is None
                if sent is not None:
                    self.errors.append("refused after the request was sent")
                self.unacked += batch
                return
            except CUT_SHORT as exc:
                if sent is None:  # the kill landed while connecting/sending
                    self.refused = True
                else:
                    self.interrupted = True
                    self.spans.append((sent, time.monotonic()))
                self.unacked += batch
                if sent is None and not isinstance(exc, (ConnectionResetError,
                                                         BrokenPipeError)):
                    self.errors.append(repr(exc))
                return
            except Exception as exc:  # a timeout, say: not what a kill looks like
                self.errors.append(repr(exc))
                self.unacked += batch
                return
            finally:
                self.waiting = None
                conn.close()
            self.spans.append((sent, time.monotonic()))
            if status == 200:
                self.acked += batch
            else:
                self.rejected.append((status, body))
                self.unacked += batch


def test_kill9_during_label_writes_loses_nothing(lobbyd, tmp_path):
    """Fault 5: 100 rounds of POST /v1/labels + kill -9 at a random moment (often with a
    request in flight). After each restart the runtime file parses, holds every label whose
    POST got a 200, and the daemon publishes them."""
    rng = random.Random(SEED)
    d = lobbyd("crash.test", start=False, LABELS="env:fixed", LOG_LEVEL="INFO")
    labels_dir = Path(d.env["LABELS_PATH"])
    labels_dir.mkdir(parents=True)
    (labels_dir / "static").write_text("static:one\n")
    runtime = labels_dir / RUNTIME
    acked_total = in_flight_kills = refused_kills = rejected = 0
    restart_times: list[float] = []
    leftovers_max = 0
    previous_acked: list[str] = []
    t_begin = time.monotonic()
    for rnd in range(ROUNDS):
        t = time.monotonic()
        d.start()
        restart_times.append(time.monotonic() - t)
        lines = runtime_lines(runtime)
        torn = [ln for ln in lines if not intact(ln)]
        assert not torn, f"round {rnd}: torn/foreign lines in the runtime file: {torn[:5]}"
        lost = sorted(set(previous_acked) - set(lines))
        assert not lost, f"round {rnd}: acknowledged labels lost from the file: {lost[:5]}"
        published = set(d.get_json("/v1/discovery")["labels"])
        assert {"env:fixed", "static:one"} <= published, published
        lost = sorted(set(previous_acked) - published)
        assert not lost, f"round {rnd}: acknowledged labels not published: {lost[:5]}"
        extra = sorted(published - set(lines) - {"env:fixed", "static:one"})
        assert not extra, f"round {rnd}: published labels from nowhere: {extra[:5]}"
        strays = stray_files(labels_dir)
        assert not strays, f"round {rnd}: a crash left files read as label files: {strays}"
        leftovers_max = max(leftovers_max,
                            sum(1 for p in labels_dir.iterdir() if p.name.startswith(".")))
        # keep the file small: drop what earlier rounds wrote (acknowledged or not)
        if lines:
            status, _, body = d.request("DELETE", "/v1/labels", "\n".join(lines))
            assert status == 200, (status, body)
            assert not set(lines) & set(d.get_json("/v1/discovery")["labels"])
        poster = Poster(d, "crash", rnd)
        poster.start()
        time.sleep(rng.uniform(0.0, 0.25))
        d.kill()
        poster.join(timeout=10)
        assert not poster.is_alive(), f"round {rnd}: the POST loop did not end after kill -9"
        previous_acked = poster.acked
        acked_total += len(poster.acked)
        in_flight_kills += poster.interrupted
        refused_kills += poster.refused
        rejected += len(poster.rejected)
        assert not poster.rejected, f"round {rnd}: POST rejected: {poster.rejected[:3]}"
        assert not poster.errors, f"round {rnd}: not what a kill looks like: {poster.errors}"
    d.start()
    lines = runtime_lines(runtime)
    assert set(previous_acked) <= set(lines)
    assert all(intact(ln) for ln in lines)
    record("5 kill -9 during POST", rounds=ROUNDS, seed=SEED, labels_acked=acked_total,
           kills_with_request_in_flight=in_flight_kills, kills_between_requests=refused_kills,
           labels_lost=0, torn_files=0,
           restart_to_api_s_median=round(sorted(restart_times)[len(restart_times) // 2], 3),
           dot_leftovers_max=leftovers_max, duration_s=round(time.monotonic() - t_begin, 1))
    # "nothing lost" means something only if much was acknowledged and the kills did land
    # mid-request (a kill after 0-250 ms of back-to-back POSTs nearly always does)
    assert acked_total >= 5 * ROUNDS and in_flight_kills >= ROUNDS // 2, \
        f"{acked_total} labels acknowledged (floor {5 * ROUNDS}), {in_flight_kills} of " \
        f"{ROUNDS} kills landed during a request (floor {ROUNDS // 2})"


def _next_packet_labels(sub, hostname: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, payload = sub.next_msg(max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            break
        env = json.loads(payload)
        if env["discovery"]["hostname"] == hostname and env["message"] == "hi":
            return env["discovery"]["labels"]
    raise AssertionError(f"no packet from {hostname} within {timeout}s")


def _assert_clear_error(status: int, headers: dict, body: bytes, what: str) -> None:
    assert 400 <= status < 600, f"{what}: expected a 4xx/5xx, got {status} {body!r}"
    assert headers.get("content-type", "").startswith("text/plain"), headers
    assert len(body.strip()) >= 10, f"{what}: error message not useful: {body!r}"


def test_readonly_labels_dir(lobbyd, nats, tmp_path):
    """Fault 5b: labels directory read-only: POST fails with a clear 4xx/5xx, the daemon
    keeps running and keeps publishing the labels it had; it recovers when writable."""
    mnt = tmp_path / "ro-labels"
    with tmpfs(mnt, "1m"):
        d = lobbyd("ro.test", LABELS_PATH=str(mnt), LOG_LEVEL="INFO")
        assert d.request("POST", "/v1/labels", "keep:one\nkeep:two")[0] == 200
        runtime_before = (mnt / RUNTIME).read_bytes()
        remount(mnt, "ro")
        status, headers, body = d.request("POST", "/v1/labels", "fail:ro")
        _assert_clear_error(status, headers, body, "POST on a read-only directory")
        status2, headers2, body2 = d.request("DELETE", "/v1/labels", "keep:one")
        _assert_clear_error(status2, headers2, body2, "DELETE on a read-only directory")
        assert d.proc.poll() is None
        published = d.get_json("/v1/discovery")["labels"]
        assert {"keep:one", "keep:two"} <= set(published) and "fail:ro" not in published
        sub = nats.client()
        sub.subscribe(SUBJECT)
        on_wire = _next_packet_labels(sub, "ro.test")
        assert {"keep:one", "keep:two"} <= set(on_wire) and "fail:ro" not in on_wire
        assert (mnt / RUNTIME).read_bytes() == runtime_before
        remount(mnt, "rw")
        assert d.request("POST", "/v1/labels", "after:ro")[0] == 200
        assert {"keep:one", "keep:two", "after:ro"} <= set(d.get_json("/v1/discovery")["labels"])
        sub.close()
        d.stop()
    record("5 read-only labels dir", post_status=status, delete_status=status2,
           message=body.decode(errors="replace")[:80], labels_lost=0, daemon_crashed=0)


def test_full_disk(lobbyd, nats, tmp_path):
    """Fault 5c: the labels directory on a full (tiny tmpfs) disk: POST fails with a clear
    4xx/5xx, the runtime file is not truncated, published labels stay; recovery after."""
    mnt = tmp_path / "full-labels"
    with tmpfs(mnt, "64k"):
        d = lobbyd("full.test", LABELS_PATH=str(mnt), LOG_LEVEL="INFO")
        assert d.request("POST", "/v1/labels", "keep:one\nkeep:two")[0] == 200
        runtime_before = (mnt / RUNTIME).read_bytes()
        filler = mnt / ".filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for _ in range(10_000):  # until ENOSPC
                os.write(fd, b"# filler\n" * 512)
        except OSError:
            pass
        finally:
            os.close(fd)
        failures = []
        for i in range(5):
            status, headers, body = d.request("POST", "/v1/labels", f"fail:full{i}\n" + "x" * 900)
            _assert_clear_error(status, headers, body, "POST on a full disk")
            failures.append(status)
        assert d.proc.poll() is None
        assert (mnt / RUNTIME).read_bytes() == runtime_before, "runtime file changed on ENOSPC"
        published = set(d.get_json("/v1/discovery")["labels"])
        assert {"keep:one", "keep:two"} <= published
        assert not any(lb.startswith("fail:") for lb in published)
        sub = nats.client()
        sub.subscribe(SUBJECT)
        on_wire = set(_next_packet_labels(sub, "full.test"))
        assert {"keep:one", "keep:two"} <= on_wire
        sub.close()
        strays = stray_files(mnt)
        filler.unlink()
        assert not strays, f"failed writes left files read as label files: {strays}"
        assert d.request("POST", "/v1/labels", "after:full")[0] == 200
        assert {"keep:one", "keep:two", "after:full"} <= set(d.get_json("/v1/discovery")["labels"])
        d.restart()
        assert {"keep:one", "keep:two", "after:full"} <= set(d.get_json("/v1/discovery")["labels"])
        d.stop()
    record("5 full disk", attempts=len(failures), statuses=sorted(set(failures)),
           message=body.decode(errors="replace")[:80], labels_lost=0, daemon_crashed=0)


class Burst(threading.Thread):
    """Valid keep-alives from many fake hosts on the subject, as fast as possible (bounded)."""

    def __init__(self, nats, hosts: int = 50, max_msgs: int = 20_000, max_time: float = 5.0):
        super().__init__(daemon=True)
        self.client = nats.client()
        self.hosts, self.max_msgs, self.max_time = hosts, max_msgs, max_time
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.max_time
        while self.sent < self.max_msgs and time.monotonic() < end and not self.stop.is_set():
            batch = b"".join(
                (lambda p: b"PUB %s %d\r\n%s\r\n" % (SUBJECT.encode(), len(p), p))(json.dumps(
                    {"discovery": {"hostname": f"burst{(self.sent + k) % self.hosts}.test",
                                   "labels": ["service:burst"], "last_check": 0},
                     "message": "hi"}).encode())
                for k in range(100))
            self.client.sock.sendall(batch)
            self.sent += 100
            time.sleep(0.002)
        self.client.close()


class Collector(threading.Thread):
    """Every packet from one hostname, with arrival times (bounded)."""

    def __init__(self, nats, hostname: str, max_time: float = 30.0):
        super().__init__(daemon=True)
        self.client = nats.client()
        self.client.subscribe(SUBJECT)
        self.hostname, self.max_time = hostname, max_time
        self.packets: list[tuple[float, str]] = []
        self.markers: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.max_time
        while not self.stop.is_set() and time.monotonic() < end:
            try:
                _, payload = self.client.next_msg(0.2)
            except (TimeoutError, OSError):
                continue
            if self.hostname.encode() not in payload and b"marker.test" not in payload:
                continue
            try:
                env = json.loads(payload)
                name = env["discovery"]["hostname"]
                if name == self.hostname:
                    self.packets.append((time.monotonic(), env["message"]))
                elif name == "marker.test":
                    self.markers.append(env["discovery"]["labels"][0])
            except (ValueError, KeyError, TypeError, IndexError):
                continue
        self.client.close()


class HeldPost:
    """A POST of one label with the last byte of its body held back: a request in flight
    for as long as the test likes. finish() sends that byte and reads the answer."""

    def __init__(self, port: int, label: str):
        self.label = label
        self.body = f"{label}\n".encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"POST /v1/labels HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body[:-1])

    def finish(self) -> bytes:
        """The answer's first line; b"" if the connection was cut without one."""
        answer = b""
        with self.sock, contextlib.suppress(ConnectionResetError, BrokenPipeError):
            self.sock.sendall(self.body[-1:])
            while b"\r\n" not in answer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        return answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize("rounds", [20])
def test_sigterm_during_burst(lobbyd, nats, rounds):
    """Fault 7: SIGTERM while API writes and NATS traffic pour in: exit 0 well under 2 s,
    goodbye on the wire, runtime file whole with every acknowledged label. In every round
    one POST is in flight for sure (its body short of its last byte): it must not delay
    the exit, nor be applied in part."""
    rng = random.Random(SEED + 7)
    d = lobbyd("term.test", start=False, LOG_LEVEL="INFO")
    labels_dir = Path(d.env["LABELS_PATH"])
    exit_times, acked_total, goodbyes, during_request, held_confirmed = [], 0, [], 0, 0
    marker = nats.client()
    for rnd in range(rounds):
        collector = Collector(nats, "term.test")
        collector.start()
        d.start()
        burst = Burst(nats)
        burst.start()
        poster = Poster(d, "term", rnd)
        poster.start()
        time.sleep(rng.uniform(0.2, 0.6))
        held = HeldPost(d.port, make_label("held", rnd, 0))
        # in flight for sure: lobbyd has accepted the held POST's connection (the kernel
        # alone would complete the handshake and queue it unseen)
        held_port = held.sock.getsockname()[1]
        wait_for(lambda p=held_port: any(remote == p for _, remote in tcp_connections(d.proc.pid)),
                 timeout=5, what=f"round {rnd}: lobbyd holding the held POST's connection")
        held_confirmed += 1
        # aim the signal at a request in flight (bounded: 200 polls); whether it landed
        # inside one is measured afterwards from the request's own times
        for _ in range(200):
            if poster.waiting is not None or not poster.is_alive():
                break
            time.sleep(0.0005)
        proc = d.proc
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stacks = py_spy_dump(proc.pid)
            proc.kill()
            proc.wait()
            d.proc = None
            raise AssertionError(f"round {rnd}: no exit 10 s after SIGTERM; stacks:\n{stacks}"
                                 ) from None
        took = time.monotonic() - t0
        d.proc = None
        poster.join(timeout=10)
        held_answer = held.finish()  # the daemon is gone: nothing can answer it now
        burst.stop.set()
        burst.join(timeout=10)
        wait_for(lambda c=collector, t=t0: any(m == "goodbye" and at >= t
                                               for at, m in c.packets),
                 timeout=3, what=f"round {rnd}: goodbye from term.test after SIGTERM")
        # term.test has exited (and flushed): a marker published now reaches the collector
        # after anything it sent, so the goodbyes before the marker are all there were
        marker.publish_json(SUBJECT, {"discovery": {"hostname": "marker.test",
                                                    "labels": [f"round:{rnd}"],
                                                    "last_check": 0}, "message": "hi"})
        marker.flush()
        wait_for(lambda c=collector, r=rnd: f"round:{r}" in c.markers, timeout=5,
                 what=f"round {rnd}: the marker after term.test's exit")
        collector.stop.set()
        collector.join(timeout=5)
        goodbyes.append(sum(1 for at, m in collector.packets if m == "goodbye" and at >= t0))
        during_request += poster.in_flight_at(t0)
        exit_times.append(took)
        assert code == 0, f"round {rnd}: exit status {code} after SIGTERM"
        assert took < 2.0, f"round {rnd}: took {took:.2f}s to exit after SIGTERM"
        lines = runtime_lines(labels_dir / RUNTIME)
        assert all(intact(ln) for ln in lines), f"round {rnd}: torn runtime file"
        lost = sorted(set(poster.acked) - set(lines))
        assert not lost, f"round {rnd}: acknowledged labels lost: {lost[:5]}"
        assert not stray_files(labels_dir), stray_files(labels_dir)
        assert not poster.errors, f"round {rnd}: not what a shutdown looks like: {poster.errors}"
        assert goodbyes[-1] == 1, f"round {rnd}: {goodbyes[-1]} goodbyes after one SIGTERM"
        assert held_answer == b"", f"round {rnd}: {held_answer!r} to a POST short of its body"
        assert held.label not in lines, f"round {rnd}: a POST short of its body was applied"
        acked_total += len(poster.acked)
    marker.close()
    record("7 SIGTERM during burst", rounds=rounds, labels_acked=acked_total, labels_lost=0,
           goodbyes=sum(goodbyes), rounds_with_one_goodbye=goodbyes.count(1),
           sigterm_during_a_request=held_confirmed, held_requests_cut=rounds,
           sigterm_during_an_aimed_request=during_request, exit_s_max=round(max(exit_times), 3),
           exit_s_median=round(sorted(exit_times)[len(exit_times) // 2], 3))
    # Aimed at a POST in flight, the signal lands inside one in 3-19 of 20 rounds (on a
    # busy machine the answer often comes first): a figure, not a floor. The held POST
    # is in flight in every round by construction.
    assert acked_total >= 5 * rounds, f"{acked_total} labels acknowledged (floor {5 * rounds})"
