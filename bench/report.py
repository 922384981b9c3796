"""Markdown table of a bench result file, for the README.

    python bench/report.py bench/results/lobbyd-20261124T001640Z.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TARGETS = {
    "ingest@1000": ("38k/s", "-"),
    "ingest@10000": ("8k/s", ">= 80k/s (10x Go)"),
    "ingest@100000": ("-", ">= 80k/s"),
    "steady@10000": ("36-41% of a core; RSS 18 MB (peak 31)", "<= 13% of a core; RSS <= 40 MB"),
    "steady@100000": ("-", "RSS <= 100 MB"),
    "idle_rss": ("9.3 MB", "<= 30 MB"),
    "http@1000": ("-", "-"),
    "http@10000": ("83 req/s, p99 237 ms", ">= 1,245 req/s, p99 < 15 ms"),
    "propagation": ("2-4 ms", "p99 < 5 ms"),
    "goodbye": ("1-3 ms", "p99 < 5 ms"),
    "join": ("0-5 s", "<= 200 ms after connecting"),
    "dead@ttl30_clean15": ("40-41 s", "TTL + 1 s after the last packet"),
    "dead@ttl5_clean60": ("-", "TTL + 1 s after the last packet"),
    "startup_source": ("6-8 ms", "(report)"),
    "startup_binary": ("6-8 ms", "< 400 ms"),
    "nats_fanout": ("-", "(scale envelope)"),
}


def num(v: float, unit: str) -> str:
    if unit in ("pkt/s", "req/s", "deliveries/s"):
        return f"{v / 1000:.1f}k" if v >= 10000 else f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return f"{v:.1f}"


def load(runs: list[dict]) -> str:
    la = [r["load"]["loadavg_start"][0] for r in runs if "load" in r]
    other = [r["load"]["other_cpu_pct"] for r in runs if "load" in r]
    if not la:
        return ""
    return f"load {min(la):.1f}-{max(la):.1f}, others {min(other):.0f}-{max(other):.0f}%"


INGEST_RULE = "2 runs in a row with lag <= max(2 % of the run, 50 ms) and CPU < 95 %"


def detail(key: str, r: dict) -> str:
    runs = r["runs"]
    if key.startswith("ingest@"):
        if any("sustained_target" not in x for x in runs):  # a file of the earlier method
            return ("earlier method: the sender's rate of the best single paced run, 0.5 s "
                    "lag allowed (flatters; not comparable with daemon-side figures)")
        targets = [x["sustained_target"] for x in runs]
        drains = [x["burst"]["drain_rate_estimate"] for x in runs]
        return (f"daemon-side rate, {INGEST_RULE}; sustained target "
                f"{num(min(targets), 'pkt/s')}-{num(max(targets), 'pkt/s')}/s; burst estimate "
                f"{num(min(drains), 'pkt/s')}-{num(max(drains), 'pkt/s')}/s; registry exact "
                f"in every run: {all(x['exact'] and x['burst']['exact'] for x in runs)}")
    if key.startswith("steady@"):
        return (f"RSS {statistics.median([x['rss_mb'] for x in runs]):.1f} MB "
                f"(peak {max(x['peak_mb'] for x in runs):.1f}) at {runs[0]['rate']:.0f} msg/s")
    if key.startswith("http@"):
        parts = []
        for case in runs[0]["cases"]:
            rps = [x["cases"][case]["rps"] for x in runs]
            p99 = [x["cases"][case].get("p99_ms", 0) for x in runs]
            parts.append(f"`{case}` {statistics.median(rps):,.0f}/s "
                         f"(p99 {statistics.median(p99):.0f} ms)")
        return "; ".join(parts)
    if key in ("propagation", "goodbye"):
        return (f"p99 {statistics.median([x['p99_ms'] for x in runs]):.1f} ms "
                f"({min(x['p99_ms'] for x in runs):.1f}-{max(x['p99_ms'] for x in runs):.1f})")
    if key == "join":
        after = [v for x in runs for v in x["ready_to_all_lobbyd_ms"] if v is not None]
        ready = [v for x in runs for v in x["exec_to_ready_ms"]]
        sim = [v for x in runs for v in x["exec_to_all_simulated_ms"] if v is not None]
        return (f"first 200 -> all lobbyd: p50 {statistics.median(after):.0f} ms, max "
                f"{max(after):.0f} ms; exec -> first 200 p50 {statistics.median(ready):.0f} ms; "
                f"all {runs[0]['simulated_hosts']} simulated (Go-like) hosts: p50 "
                f"{statistics.median(sim):.0f} ms")
    if key.startswith("dead@"):
        x = runs[0]
        return (f"after the last packet: {x['from_last_packet_s']} s (TTL {x['ttl']}, "
                f"CLEAN_EVERY {x['clean_every']})")
    if key.startswith("startup"):
        s = [v for x in runs for v in x["samples"]]
        return f"{len(s)} starts, p90 {sorted(s)[int(0.9 * (len(s) - 1))]:.0f} ms"
    if key == "nats_fanout":
        x = runs[0]
        return (f"{x['subscribers']} subscribers, nats-server at {x['nats_cpu_pct']:.0f}% cpu, "
                f"one nats-server on this machine")
    return ""


def main(path: str) -> None:
    doc = json.loads(Path(path).read_text())
    print(f"`{doc['meta']['label']}`, {doc['meta']['started']}, {doc['meta']['runs']} runs "
          f"per figure, code {doc['meta'].get('code', {})}\n")
    print("| figure | lobbyd median | min-max | detail | Go daemon | target | "
          "background load |")
    print("|---|---|---|---|---|---|---|")
    for key, r in doc["figures"].items():
        go, target = TARGETS.get(key, ("", ""))
        if "error" in r or r.get("median") is None:
            print(f"| {key} | failed | | {r.get('error', '')[:80]} | {go} | {target} | |")
            continue
        u = r["unit"]
        print(f"| {key} | {num(r['median'], u)} {u} | {num(r['min'], u)}-{num(r['max'], u)} | "
              f"{detail(key, r)} | {go} | {target} | {load(r['runs'])} |")


if __name__ == "__main__":
    main(sys.argv[1])
