"""DNS figure: queries/s and p99 latency of NAME.service.lobby A and SRV from lobbyd
(DNS_PORT) with 10,000 hosts in its registry, 100 of them offering NAME, against a
same-run ceiling: dnsmasq answering the very same records from a hosts file
(--addn-hosts) and --srv-host, in turns with lobbyd. The load is dnsperf (Debian
`dnsperf`, C): UDP with EDNS0 (4096 bytes), a bounded number of queries in flight, for a
bounded time; every query's latency is read off its verbose output for the p99.
"""

from __future__ import annotations

import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import free_port, stop_process
from natsraw import RawNats
from procs import LoadMeter

NAME = "dnsbench"
OFFERING = 100
#: dnsperf: clients (sockets) and queries in flight in all
CLIENTS, IN_FLIGHT = 2, 32


def instance(i: int) -> tuple[str, str]:
    """Host i of those offering NAME: a short hostname (100 SRV records of HOST.node.lobby
    fit a 4096-byte answer) and its IPv4 address."""
    return f"s{i:02d}", f"10.2.{i // 250}.{i % 250}"


def publish_instances(nats_port: int, subject: str) -> None:
    client = RawNats("127.0.0.1", nats_port)
    for i in range(OFFERING):
        host, address = instance(i)
        client.publish_json(subject, {"discovery": {"hostname": host, "labels": [
            f"service:{NAME}", f"service:{NAME}:port:8080", f"public_ip4:{address}"],
            "last_check": 0}, "message": "hi"})
    client.flush()
    client.close()


def query(port: int, qtype: int) -> tuple[int, int, bool]:
    """(rcode, answers, truncated) of one EDNS0 query for NAME.service.lobby."""
    wire = struct.pack("!6H", 0x1234, 0, 1, 0, 0, 1)
    for part in (NAME, "service", "lobby"):
        wire += bytes([len(part)]) + part.encode()
    wire += b"\0" + struct.pack("!HH", qtype, 1) + b"\0" + struct.pack("!HHIH", 41, 4096, 0, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(wire, ("127.0.0.1", port))
        reply = sock.recv(65536)
    flags, answers = struct.unpack("!H", reply[2:4])[0], struct.unpack("!H", reply[6:8])[0]
    return flags & 0x0F, answers, bool(flags & 0x0200)


def whole(port: int) -> bool:
    """Both questions answered in full: 100 A and 100 SRV records, nothing truncated."""
    try:
        return all(query(port, qtype) == (0, OFFERING, False) for qtype in (1, 33))
    except OSError:
        return False


class Dnsmasq:
    """dnsmasq with the same records: no upstream, no /etc/hosts, no config file."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        hosts = workdir / "dnsmasq-hosts"
        lines, srv = [], []
        for i in range(OFFERING):
            host, address = instance(i)
            lines += [f"{address} {NAME}.service.lobby", f"{address} {host}.node.lobby"]
            srv.append(f"--srv-host={NAME}.service.lobby,{host}.node.lobby,8080,1,1")
        hosts.write_text("\n".join(lines) + "\n")
        self.log = open(workdir / "dnsmasq.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["dnsmasq", "-C", "/dev/null", "--no-daemon", f"--port={self.port}", "--no-resolv",
             "--no-hosts", "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file",
             f"--addn-hosts={hosts}", "--edns-packet-max=4096", *srv],
            stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def dnsperf(port: int, qtype: str, seconds: float, workdir: Path, rate: float = 0) -> dict:
    """One bounded dnsperf run (as fast as answered, or at `rate` queries/s): queries/s,
    lost, rcodes, p50/p99 of every query."""
    data = workdir / f"queries-{qtype}"
    data.write_text(f"{NAME}.service.lobby {qtype}\n")
    out = workdir / f"dnsperf-{port}-{qtype}.txt"
    with open(out, "w") as sink:
        subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(data), "-e",
                        "-c", str(CLIENTS), "-q", str(IN_FLIGHT), "-l", str(seconds), "-t", "2",
                        *(["-Q", str(int(rate))] if rate else []), "-v"],
                       stdout=sink, stderr=subprocess.STDOUT, timeout=seconds + 30, check=True)
    text = out.read_text(errors="replace")
    # "> NOERROR NAME TYPE 0.000123" per answer; a lost query's line ("> T NAME TYPE") has
    # no time, and is counted in "Queries lost"
    latencies = [float(last) for line in text.splitlines() if line.startswith("> ")
                 and (last := line.rsplit(" ", 1)[-1]).replace(".", "", 1).isdigit()]
    qps = re.search(r"Queries per second:\s+([0-9.]+)", text)
    lost = re.search(r"Queries lost:\s+([0-9]+)", text)
    size = re.search(r"response ([0-9]+)", text)
    codes = re.search(r"Response codes:\s+(.*)", text)
    if qps is None or not latencies:
        raise RuntimeError(f"dnsperf said: {text[-400:]}")
    latencies.sort()
    out.unlink()
    return {"qps": round(float(qps.group(1))), "lost": int(lost.group(1)) if lost else -1,
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 3),
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 3),
            "answer_bytes": int(size.group(1)) if size else 0,
            "rcodes": codes.group(1).strip() if codes else ""}


def fig_dns(env_factory, prefill, subject: str, n: int, seconds: float, rounds: int) -> dict:
    """lobbyd (DNS_PORT) with n hosts, 100 offering NAME, and dnsmasq, in turns."""
    if not shutil.which("dnsperf") or not shutil.which("dnsmasq"):
        raise RuntimeError("needs dnsperf and dnsmasq (Debian: dnsperf, dnsmasq-base)")
    env = env_factory()
    dnsmasq = None
    try:
        port = free_port()
        d = env.daemon("bench-dns", TTL=86400, DNS_PORT=port)
        prefill(env, d, n)
        publish_instances(env.nats.port, subject)
        deadline = time.monotonic() + 30
        while not whole(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"lobbyd's DNS does not answer {OFFERING} records: "
                                   f"A {query(port, 1)}, SRV {query(port, 33)}")
            time.sleep(0.1)
        dnsmasq = Dnsmasq(env.dir)
        deadline = time.monotonic() + 10
        while not whole(dnsmasq.port):
            if time.monotonic() > deadline:
                raise RuntimeError("dnsmasq does not answer the same records")
            time.sleep(0.1)
        # the fleet's keep-alives meanwhile (n/5 packets/s), as in the HTTP figure
        total = 2 * 2 * (rounds + 1) * (seconds + 2) + 10
        g = env.loadgen(n, mode="keepalive", rate=n / 5, duration=total, max_seconds=total + 30)
        env.go(g)
        cases: dict[str, dict] = {}
        with LoadMeter(pace=True) as meter:
            for qtype in ("A", "SRV"):
                ours, theirs = [], []
                for _ in range(rounds):
                    ours.append(dnsperf(port, qtype, seconds, env.dir))
                    theirs.append(dnsperf(dnsmasq.port, qtype, seconds, env.dir))
                qps = statistics.median(r["qps"] for r in ours)
                ceiling = statistics.median(r["qps"] for r in theirs)
                # latency at the target's load: half of dnsmasq's queries/s, both servers
                rate = max(1000.0, ceiling / 2)
                paced = dnsperf(port, qtype, seconds, env.dir, rate)
                paced_theirs = dnsperf(dnsmasq.port, qtype, seconds, env.dir, rate)
                cases[qtype] = {
                    "qps": qps, "pct_of_dnsmasq": round(100 * qps / ceiling, 1) if ceiling else 0.0,
                    "dnsmasq_qps": ceiling, "rate": round(rate),
                    "p99_ms": paced["p99_ms"], "p50_ms": paced["p50_ms"],
                    "dnsmasq_p99_ms": paced_theirs["p99_ms"],
                    "p99_flat_out_ms": max(r["p99_ms"] for r in ours),
                    "dnsmasq_p99_flat_out_ms": max(r["p99_ms"] for r in theirs),
                    "runs": ours, "dnsmasq_runs": theirs, "paced": paced,
                    "dnsmasq_paced": paced_theirs}
        g.terminate()
        g.wait(10)
        if not whole(port):
            raise RuntimeError("lobbyd's DNS answers changed under load")
        return {"value": cases["A"]["qps"], "unit": "req/s", "cases": cases,
                "pct_of_ceiling": cases["A"]["pct_of_dnsmasq"],
                "srv_pct_of_ceiling": cases["SRV"]["pct_of_dnsmasq"],
                "clients": CLIENTS, "in_flight": IN_FLIGHT, "load": meter.stop()}
    finally:
        if dnsmasq is not None:
            dnsmasq.stop()
        env.close()
