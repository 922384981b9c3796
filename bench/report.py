"""Markdown table of a bench result file, for the README.

    python bench/report.py bench/results/lobbyd-20261124T001640Z.json
    python bench/report.py --targets FILE     # the performance targets, met or not
    python bench/report.py --readme FILE [KV_FILE]   # the README's Performance table

A target is judged on the unrounded figure, and the row shows the figure as compared.
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
    "consul@10000": ("-", ">= 80 % of the same-bytes Python server"),
    "consul_watch@10000": ("-", "(report: Consul's held queries vs Lobby's)"),
    "dns@10000": ("-", ">= 50 % of dnsmasq's queries/s, p99 < 5 ms at that rate"),
    "propagation": ("2-4 ms", "p99 < 5 ms"),
    "goodbye": ("1-3 ms", "p99 < 5 ms"),
    "join": ("0-5 s", "<= 200 ms after connecting"),
    "dead@ttl30_clean15": ("40-41 s", "TTL + 1 s after the last packet"),
    "dead@ttl5_clean60": ("-", "TTL + 1 s after the last packet"),
    "idle_rss_binary": ("9.3 MB", "whole tree <= 22 MB, start-up peak <= 35 MB"),
    "idle_rss_deb": ("9.3 MB", "whole tree <= 20 MB"),
    "startup_source": ("6-8 ms", "(report)"),
    "startup_binary": ("6-8 ms", "< 400 ms"),
    "startup_deb": ("6-8 ms", "<= 100 ms"),
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
    if key.startswith(("http@", "consul@")):
        parts = []
        for case in runs[0]["cases"]:
            rps = [x["cases"][case]["rps"] for x in runs]
            p99 = [x["cases"][case].get("p99_ms", 0) for x in runs]
            parts.append(f"`{case}` {statistics.median(rps):,.0f}/s "
                         f"(p99 {statistics.median(p99):.0f} ms)")
        return "; ".join(parts)
    if key.startswith("consul_watch@"):
        x = runs[len(runs) // 2]
        return "; ".join(
            f"{kind} `{x[kind]['path']}`: {x[kind]['held']} held, wake p50 {x[kind]['p50_ms']} "
            f"ms p99 {x[kind]['p99_ms']} ms, RSS {x[kind]['rss_mb_without']} -> "
            f"{x[kind]['rss_mb_with']} MB" for kind in ("lobby", "consul"))
    if key.startswith("dns@"):
        x = runs[len(runs) // 2]
        return "; ".join(
            f"{q} {c['qps']:,.0f}/s = {c['pct_of_dnsmasq']:.0f} % of dnsmasq's "
            f"{c['dnsmasq_qps']:,.0f}/s, p99 {c['p99_ms']} ms at {c['rate']:,}/s (dnsmasq "
            f"{c['dnsmasq_p99_ms']} ms)" for q, c in x["cases"].items())
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


def background(run: dict) -> str:
    x = run.get("load")
    if not x:
        return ""
    return f"load {x['loadavg_start'][0]:.1f}, others {x['other_cpu_pct']:.0f} %"


def http_case(doc: dict, case: str, key: str = "http@10000") -> tuple[dict, dict] | None:
    """The median run's case of figure `key` (by lobbyd's share of the ceiling)."""
    fig = doc["figures"].get(key)
    if not fig or "runs" not in fig:
        return None
    runs = sorted((r for r in fig["runs"] if case in r.get("cases", {})),
                  key=lambda r: r["cases"][case]["pct_of_ceiling"])
    if not runs:
        return None
    run = runs[len(runs) // 2]
    return run["cases"][case], run


def median_run(doc: dict, key: str) -> dict | None:
    fig = doc["figures"].get(key)
    if not fig or "runs" not in fig or fig.get("median") is None:
        return None
    runs = sorted((r for r in fig["runs"] if r.get("unit")), key=lambda r: r["value"])
    return runs[len(runs) // 2] if runs else None


def exact(v: float) -> str:
    """A figure as it was compared: no rounding that could turn 79.98 into 80."""
    return f"{v:,.4f}".rstrip("0").rstrip(".")


def dns_target(c: dict) -> tuple[str, bool]:
    """A DNS question's figure as compared, and whether it meets its target."""
    return (f"{c['qps']:,.0f} / {c['dnsmasq_qps']:,.0f} q/s = {exact(c['pct_of_dnsmasq'])} %; "
            f"p99 {exact(c['p99_ms'])} ms at {c['rate']:,}/s",
            c["pct_of_dnsmasq"] >= 50 and c["p99_ms"] < 5)


def target_rows(doc: dict) -> list[tuple[str, str, str, str]]:
    """The targets: (target, figure as compared, met, background), from the median run."""
    rows = []
    for case, name, floor, key in (
            ("/v1/discoveries c8", "GET /v1/discoveries, 10k hosts, 8 conns, stable", 100,
             "http@10000"),
            ("/v1/discoveries c8 label-churn", "same under label churn (2,000/s)", 80,
             "http@10000"),
            ("/v1/discoveries gzip c8", "same, gzip", 100, "http@10000"),
            ("/v1/prometheus/node c8", "GET /v1/prometheus/node, 10k hosts", 100, "http@10000"),
            ("/v1/health/service/api c8", "Consul's GET /v1/health/service/api, 100 of 10k "
             "hosts offer api", 80, "consul@10000"),
            ("/v1/catalog/services c8", "Consul's GET /v1/catalog/services, 10k hosts", 80,
             "consul@10000")):
        got = http_case(doc, case, key)
        if got is None:
            continue
        c, run = got
        # from the two rates, not the stored share (older files rounded it: 79.98 -> 80.0)
        pct, p99 = 100 * c["rps"] / c["ceiling"]["rps"], c["p99_ms"]
        nginx = (f"; {exact(100 * c['rps'] / c['nginx']['rps'])} % of nginx's "
                 f"{c['nginx']['rps']:,} (sendfile, same bytes)" if "nginx" in c else "")
        rows.append((f"1. {name}: >= {floor} % of the same-bytes Python server, p99 < 15 ms",
                     f"{c['rps']:,} / {c['ceiling']['rps']:,} req/s = {exact(pct)} %; "
                     f"p99 {exact(p99)} ms (Python server {c['ceiling']['p99_ms']:.1f}){nginx}",
                     "yes" if pct >= floor and p99 < 15 else "no", background(c)))
    checks = [
        ("steady@10000", "2. stable fleet, 10k hosts, 2,000 pkt/s: <= 5 % of a core",
         lambda r: (f"{exact(r['value'])} %", r["value"] <= 5)),
        ("churn@10000", "2. label churn, same: <= 13 %",
         lambda r: (f"{exact(r['value'])} %", r["value"] <= 13)),
        ("ingest@100000", "3. ingest capacity, 100k hosts: >= 80k pkt/s, registry exact",
         lambda r: (f"{r['value']:,} pkt/s, exact {r['exact']}",
                    r["value"] >= 80000 and r["exact"])),
        ("idle_rss_binary", "4. idle RSS, static binary: <= 25 MB",
         lambda r: (f"{exact(r['value'])} MB (with its loaders {r.get('tree_mb', 0):.1f})",
                    r["value"] <= 25)),
        ("idle_rss", "4. idle RSS from source: <= 28 MB",
         lambda r: (f"{exact(r['value'])} MB", r["value"] <= 28)),
        ("steady@10000", "4. RSS at 10k hosts: <= 40 MB",
         lambda r: (f"{exact(r['rss_mb'])} MB (peak {r['peak_mb']:.1f})", r["rss_mb"] <= 40)),
        ("steady@100000", "4. RSS at 100k hosts: <= 100 MB",
         lambda r: (f"{exact(r['rss_mb'])} MB (peak {r['peak_mb']:.1f})",
                    r["rss_mb"] <= 100)),
        ("startup_binary", "6. start-up of the static binary, exec -> first 200: < 300 ms",
         lambda r: (f"{exact(r['value'])} ms", r["value"] < 300)),
        ("idle_rss_binary", "7. static binary, idle: whole tree <= 22 MB, start-up peak "
         "(the processes' high-water marks) <= 35 MB",
         lambda r: (f"tree {exact(r.get('tree_mb', 0))} MB, peak "
                    f"{exact(r.get('peak_tree_mb', 0))} MB",
                    r.get("tree_mb", 99) <= 22 and r.get("peak_tree_mb", 99) <= 35)),
        ("idle_rss_deb", "7. the .deb's lobbyd, idle: whole tree <= 20 MB",
         lambda r: (f"tree {exact(r.get('tree_mb', 0))} MB in {r.get('processes')} process(es)",
                    r.get("tree_mb", 99) <= 20)),
        ("startup_deb", "7. start-up of the .deb's lobbyd, exec -> first 200: <= 100 ms",
         lambda r: (f"{exact(r['value'])} ms", r["value"] <= 100)),
        *(("dns@10000", f"DNS `NAME.service.lobby` {q}, 100 of 10k hosts: >= 50 % of "
           "dnsmasq's queries/s (same records, same run), p99 < 5 ms at half its rate",
           lambda r, q=q: dns_target(r["cases"][q])) for q in ("A", "SRV")),
    ]
    for key, name, judge in checks:
        run = median_run(doc, key)
        if run is None:
            rows.append((name, "not measured", "-", ""))
            continue
        figure, met = judge(run)
        rows.append((name, figure, "yes" if met else "no", background(run)))
    return rows


def targets(path: str) -> None:
    doc = json.loads(Path(path).read_text())
    meta = doc["meta"]
    print(f"`{Path(path).name}`: {meta['runs']} runs per figure (median run shown), "
          f"commit `{meta.get('code', {}).get('git_head', '?')}`, {meta['started']}\n")
    print("| target | figure (as compared, unrounded) | met | background |")
    print("|---|---|---|---|")
    for row in target_rows(doc):
        print("| " + " | ".join(row) + " |")


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


DASH = "\u2013"  # the README's ranges: 4.2\u20139.4 ms


def readme_rows(doc: dict, kv: dict | None) -> list[tuple[str, str]]:
    """The README's Performance table: every figure from the median run of its figure in
    this one file (each row's parts from that same run), kv rows from KV_FILE's."""
    f = doc["figures"]

    def run(key: str) -> dict:
        got = median_run(doc, key)
        assert got is not None, f"{key} not in this file"
        return got

    def k(v: float) -> str:
        return f"{v / 1000:.1f}k"

    def span(key: str, field: str, unit: str, fmt: str = ".1f") -> str:
        values = [r[field] for r in f[key]["runs"] if r.get("unit")]
        lo, hi = min(values), max(values)
        return f"{lo:{fmt}} {unit}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else \
            f"{lo:{fmt}}{DASH}{hi:{fmt}} {unit}"

    rows = [
        ("ingest: packets/s one lobbyd sustains, registry exact (1k / 10k / 100k hosts)",
         f"{k(run('ingest@1000')['value'])} / {k(run('ingest@10000')['value'])} / "
         f"**{k(run('ingest@100000')['value'])}**"),
        ("the same over Redis (1k / 10k hosts)",
         f"{k(run('ingest_redis@1000')['value'])} / {k(run('ingest_redis@10000')['value'])}"),
        ("CPU at 10k hosts, KEEP_ALIVE 5 (2,000 packets/s): stable labels / each packet a "
         "label change; at 100k hosts",
         f"**{run('steady@10000')['value']:.1f} %** / {run('churn@10000')['value']:.1f} %; "
         f"{run('steady@100000')['value']:.1f} % of a core"),
        ("RSS idle (static binary / from source); at 10k / 100k hosts",
         f"{run('idle_rss_binary')['value']:.1f} MB / {run('idle_rss')['value']:.1f} MB; "
         f"{run('steady@10000')['rss_mb']:.1f} MB / {run('steady@100000')['rss_mb']:.1f} MB"),
    ]
    c, _ = http_case(doc, "/v1/discoveries c8")
    shares = sorted(100 * r["cases"]["/v1/discoveries c8"]["rps"] /
                    r["cases"]["/v1/discoveries c8"]["ceiling"]["rps"]
                    for r in f["http@10000"]["runs"])
    nginx = (f"; {100 * c['rps'] / c['nginx']['rps']:.0f} % of nginx with sendfile"
             if "nginx" in c else "")
    rows.append(("`GET /v1/discoveries`, 10k hosts (2.5 MB), 8 connections",
                 f"{c['rps']:,.0f} req/s, p99 {c['p99_ms']:.1f} ms "
                 f"({100 * c['rps'] / c['ceiling']['rps']:.0f} % of a Python server that only "
                 f"sends the same bytes; runs {shares[0]:.0f}{DASH}{shares[-1]:.0f} %{nginx})"))
    gz, _ = http_case(doc, "/v1/discoveries gzip c8")
    prom, _ = http_case(doc, "/v1/prometheus/node c8")
    rows.append(("the same gzipped / `/v1/prometheus/node` (10k targets)",
                 f"{gz['rps']:,.0f} req/s, p99 {gz['p99_ms']:.1f} ms / "
                 f"{prom['rps']:,.0f} req/s, p99 {prom['p99_ms']:.1f} ms"))
    rows.append(("label change on A → seen on B / goodbye",
                 f"p50 {run('propagation')['p50_ms']:.1f} ms, p99 "
                 f"{span('propagation', 'p99_ms', 'ms')} / p50 "
                 f"{run('goodbye')['p50_ms']:.1f} ms, p99 {span('goodbye', 'p99_ms', 'ms')}"))
    watch = run("watch@10000")
    watchers = sum(w["held"] + w["streams"] for w in watch["watchers"])
    rows.append((f"label change → all {watchers} watchers answered (10k hosts)",
                 f"p99 {watch['value']:.0f} ms"))
    page = run("page@10000")
    rows.append(("the page at 10k hosts: list on screen (first paint; change batches p99)",
                 f"{page['value']:.0f} ms ({page['fcp_ms']:.0f} ms; "
                 f"{page['batch_p99_ms']:.1f} ms)"))
    join = run("join")
    rows.append((f"start-up of the static binary, exec → first answer; a new lobbyd lists "
                 f"{join['peers']} peers and {join['simulated_hosts']:,} hosts",
                 f"{run('startup_binary')['value']:.0f} ms; {join['value']:.0f} ms"))
    if kv:
        x = kv["figures"]["kv@100000"]["runs"][0]
        plain = [c for c, reaper in zip(x["lobbyd_cpu_pct"], x["reapers"]) if not reaper]
        reaping = [c for c, reaper in zip(x["lobbyd_cpu_pct"], x["reapers"]) if reaper]
        rows.append(("`DISCOVERY_MODE=kv`, 100k hosts: CPU of a lobbyd (of one of the 3 "
                     "reapers) / a new lobbyd lists the fleet",
                     f"{max(plain)} % of a core ({min(reaping)}{DASH}{max(reaping)} %) / "
                     f"{x['join_s']} s"))
    return rows


def readme(path: str, kv_path: str | None) -> None:
    doc = json.loads(Path(path).read_text())
    kv = json.loads(Path(kv_path).read_text()) if kv_path else None
    meta = doc["meta"]
    kv_note = (f" (kv mode: `{Path(kv_path).name}` at "
               f"`{kv['meta'].get('code', {}).get('git_head', '?')}`)" if kv else "")
    others = [r["load"]["other_cpu_pct"] for fig in doc["figures"].values()
              for r in fig.get("runs", []) if isinstance(r.get("load"), dict)]
    print(f"The latest full bench (`nox -s bench`, median of {meta['runs']} runs): commit "
          f"`{meta.get('code', {}).get('git_head', '?')}`, {meta['started'][:10]}, on a "
          f"{meta['cores']}-core machine (other processes used {min(others):.0f}{DASH}"
          f"{max(others):.0f} % of a core during its figures), "
          f"`bench/results/{Path(path).name}`{kv_note}; each figure from the run with its "
          f"median, printed by `python bench/report.py --readme`.\n")
    print("| figure | lobbyd |\n|---|---|")
    for name, value in readme_rows(doc, kv):
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    if sys.argv[1] == "--targets":
        targets(sys.argv[2])
    elif sys.argv[1] == "--readme":
        readme(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        main(sys.argv[1])
