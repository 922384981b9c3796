"""Where lobbyd spends its time: py-spy attached to the daemon under the bench loads.

    python bench/profile.py                      # ingest @100k hosts and GET @10k hosts
    python bench/profile.py --only http --seconds 8

For each scenario it writes bench/results/profile-<scenario>.txt (the top functions
by own time and by inclusive time) and profile-<scenario>.speedscope.json (open
it at speedscope.app, or any speedscope viewer) - and prints the summaries.
Needs py-spy (PyPI) and root or ptrace rights; profiles lobbyd.py run from source.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpload
import run
from procs import lobbyd_command

RESULTS = Path(__file__).resolve().parent / "results"


def pyspy() -> str:
    path = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(path).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    return path


def record(pid: int, seconds: float, out: Path, fmt: str) -> subprocess.Popen:
    return subprocess.Popen([pyspy(), "record", "--pid", str(pid), "--rate", "200",
                             "--duration", str(int(seconds)), "--format", fmt,
                             "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _func(frame: str) -> str:
    """'Class.meth (path/file.py:123)' -> 'Class.meth (file.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})" if where else name


def _area(frame: str) -> str:
    where = frame.partition(" (")[2]
    for key, area in (("lobbyd.py", "lobbyd.py"), ("nats/", "nats-py"), ("json/", "json"),
                      ("asyncio/", "asyncio"), ("gzip", "gzip/zlib")):
        if key in where:
            return area
    return "other"


def summarize(raw: Path, top: int = 25) -> str:
    """Own (leaf) and inclusive share of samples per function, from collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    own_line: collections.Counter[str] = collections.Counter()
    area: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        # drop the thread/process header py-spy puts first
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[_func(frames[-1])] += count
        own_line[frames[-1]] += count
        area[_area(frames[-1])] += count
        for f in {_func(f) for f in frames}:
            incl[f] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples (200 Hz)", "", "own time by area (leaf frame's module):"]
    for f, c in area.most_common():
        lines.append(f"  {100 * c / total:5.1f}%  {f}")
    lines += ["", "own time by function:"]
    for f, c in own.most_common(top):
        lines.append(f"  {100 * c / total:5.1f}%  {f}")
    lines += ["", "own time by line:"]
    for f, c in own_line.most_common(top):
        lines.append(f"  {100 * c / total:5.1f}%  {f}")
    lines += ["", "inclusive time by function (lobbyd.py):"]
    shown = 0
    for f, c in incl.most_common():
        if "lobbyd.py" in f:
            lines.append(f"  {100 * c / total:5.1f}%  {f}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


def scenario_ingest(cmd: list[str], work: Path, n: int, seconds: float) -> Path:
    env = run.Env(cmd, work)
    try:
        d = env.daemon("bench-prof-ingest", TTL=86400)
        run.prefill(env, d, n)
        count = -(-min(400_000, max(n, 60_000 * int(seconds))) // n) * n
        g = env.loadgen(n, count=count, seq0=1, sentinel="prof")
        raw = RESULTS / "profile-ingest.raw.txt"
        p = record(d.pid, seconds, raw, "raw")
        time.sleep(1.0)  # py-spy attaches
        env.go(g)
        env.result(g)
        p.wait(seconds + 30)
        speed = record(d.pid, 1, RESULTS / "profile-ingest.speedscope.json", "speedscope")
        speed.wait(30)
        return raw
    finally:
        env.close()


def scenario_http(cmd: list[str], work: Path, n: int, seconds: float, path: str,
                  name: str, headers: dict[str, str] | None = None, churn: bool = False
                  ) -> Path:
    """GETs on 8 connections while the N hosts send N/5 packets/s: keep-alives, or with
    `churn` label changes (a new seq:K in every packet, as the bench's churn case)."""
    env = run.Env(cmd, work)
    try:
        d = env.daemon("bench-prof-http", TTL=86400)
        run.prefill(env, d, n)
        if churn:
            g = env.loadgen(n, rate=n / 5, count=int(n / 5 * (seconds + 20)), seq0=1,
                            max_seconds=seconds + 60)
        else:
            g = env.loadgen(n, mode="keepalive", rate=n / 5, duration=seconds + 20,
                            max_seconds=seconds + 60)
        env.go(g)
        raw = RESULTS / f"profile-{name}.raw.txt"
        p = record(d.pid, seconds, raw, "raw")
        time.sleep(0.5)
        res = httpload.http_load(d.port, path, 8, seconds - 1, headers)
        res.pop("raw", None)
        print(f"{name}: {res}", flush=True)
        p.wait(seconds + 30)
        return raw
    finally:
        env.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="ingest,http,http-churn,http-gzip,prometheus")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--ingest-hosts", type=int, default=100000)
    ap.add_argument("--http-hosts", type=int, default=10000)
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    cmd = lobbyd_command()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lobbyd-prof-"))
    raws: dict[str, Path] = {}
    try:
        if not only or "ingest" in only:
            raws["ingest"] = scenario_ingest(cmd, work, a.ingest_hosts, a.seconds)
        if not only or "http" in only:
            raws["http"] = scenario_http(cmd, work, a.http_hosts, a.seconds, "/v1/discoveries",
                                         "http")
        if "http-churn" in only:
            raws["http-churn"] = scenario_http(cmd, work, a.http_hosts, a.seconds,
                                               "/v1/discoveries", "http-churn", churn=True)
        if "http-gzip" in only:
            raws["http-gzip"] = scenario_http(cmd, work, a.http_hosts, a.seconds,
                                              "/v1/discoveries", "http-gzip",
                                              {"Accept-Encoding": "gzip"})
        if "prometheus" in only:
            raws["prometheus"] = scenario_http(cmd, work, a.http_hosts, a.seconds,
                                               "/v1/prometheus/node", "prometheus")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, raw in raws.items():
        text = summarize(raw)
        (RESULTS / f"profile-{name}.txt").write_text(text + "\n")
        print(f"\n===== {name} =====\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
