"""Pictures of bench results: one PNG per question, every implementation side by side.

    python bench/plots.py                         # newest result of each --label
    python bench/plots.py --dir bench/results --out bench/results/plots
    python bench/plots.py a.json b.json           # exactly these

bench/run.py calls it after a full run. Each --label in the results directory (lobbyd,
go, ...) is one series: its newest full run (a smoke run when there is no full one).
A run of `--only kv` (DISCOVERY_MODE=kv, issue 13) counts apart: kv.png draws the
newest of those against the broadcast (its steady CPU from the newest run having it),
and the other pictures keep their own newest runs.
matplotlib is needed (the bench session installs it); without it nothing is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ticker = None  # matplotlib.ticker, imported by draw()
SIZES = (1000, 10000, 100000)


def kinds(doc: dict) -> set[str]:
    """"kv" if the result has figures of DISCOVERY_MODE=kv, "broadcast" if it has others."""
    keys = doc.get("figures") or {}
    return {"kv" if key.startswith("kv@") else "broadcast" for key in keys}


def newest_per_label(directory: Path) -> list[dict]:
    """The newest result of every label (full runs before smoke runs), and apart from
    it the newest kv result of every label: a kv-only run hides no other figures."""
    best: dict[tuple[str, str], tuple[tuple[bool, str], dict]] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            meta = doc["meta"]
        except (ValueError, KeyError, OSError):
            continue  # not a bench result (a profile, a stray file)
        rank = (not meta.get("smoke", False), meta.get("started", ""))
        label = meta.get("label", path.stem)
        for kind in kinds(doc):
            if (label, kind) not in best or rank > best[label, kind][0]:
                best[label, kind] = (rank, doc)
    docs: list[dict] = []
    for _, doc in sorted(best.values(), key=lambda item: item[1]["meta"]["label"]):
        if not any(doc is seen for seen in docs):
            docs.append(doc)
    return docs


def median(fig: dict | None) -> float | None:
    return None if not fig or "median" not in fig else fig["median"]


def subtitle(docs: list[dict]) -> str:
    parts = []
    for doc in docs:
        meta = doc["meta"]
        parts.append(f"{meta['label']} @ {meta.get('code', {}).get('git_head', '?')} "
                     f"({meta.get('started', '?')}{', smoke' if meta.get('smoke') else ''})")
    return "; ".join(parts)


def save(plt, fig, docs: list[dict], path: Path) -> Path:
    """The figure, captioned with where its figures come from, as a PNG at `path`."""
    fig.suptitle(subtitle(docs), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scale(plt, docs: list[dict], out: Path) -> Path:
    """Ingest capacity, CPU and RSS against fleet size."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for doc in docs:
        figs, label = doc["figures"], doc["meta"]["label"]
        for prefix, style, name in (("ingest@", "o-", "NATS"), ("ingest_redis@", "s--", "Redis")):
            xs = [n for n in SIZES if median(figs.get(f"{prefix}{n}")) is not None]
            if xs:
                axes[0].plot(xs, [median(figs[f"{prefix}{n}"]) / 1000 for n in xs], style,
                             label=f"{label} ({name})")
        xs = [n for n in SIZES if median(figs.get(f"steady@{n}")) is not None]
        if xs:
            axes[1].plot(xs, [median(figs[f"steady@{n}"]) for n in xs], "o-",
                         label=f"{label} (stable labels)")
            axes[2].plot(xs, [figs[f"steady@{n}"]["runs"][0]["rss_mb"] for n in xs], "o-",
                         label=f"{label} (steady, RSS)")
        churn = median(figs.get("churn@10000"))
        if churn is not None:
            axes[1].plot([10000], [churn], "x", markersize=10, label=f"{label} (label churn)")
        idle = median(figs.get("idle_rss"))
        if idle is not None:
            axes[2].plot([1], [idle], "^", label=f"{label} (idle)")
    axes[0].set(title="Ingest capacity (sustained)", ylabel="thousand packets/s")
    axes[1].set(title="CPU at keep-alive rate (N/5 packets/s)", ylabel="% of one core")
    axes[2].set(title="Resident memory", ylabel="MB")
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("hosts in the fleet (idle: 1)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save(plt, fig, docs, out / "scale.png")


def plot_http(plt, docs: list[dict], out: Path) -> Path | None:
    """GET throughput of each case next to the ceiling measured in the same run."""
    rows = []  # (label, case, rps, ceiling rps, p99)
    for doc in docs:
        http = doc["figures"].get("http@10000")
        if not http or "runs" not in http:
            continue
        for case in http["runs"][0]["cases"]:
            # each case from the run with its median share of the ceiling (as report.py)
            runs = sorted((r["cases"][case] for r in http["runs"] if case in r["cases"]),
                          key=lambda c: c.get("pct_of_ceiling", c["rps"]))
            c = runs[len(runs) // 2]
            rows.append((doc["meta"]["label"], case, c["rps"], c.get("ceiling", {}).get("rps"),
                         c.get("p99_ms")))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(rows) + 1.8))
    names = [f"{label}: {case}" for label, case, *_ in rows]
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r[2] for r in rows], height=0.4, label="measured")
    ax.barh([y - 0.2 for y in ys], [r[3] or 0 for r in rows], height=0.4, color="lightgray",
            label="ceiling: minimal asyncio server, same bytes, same run")
    for y, (_, _, rps, ceiling, p99) in zip(ys, rows):
        pct = f"{100 * rps / ceiling:.0f}% of ceiling, " if ceiling else ""
        ax.text(rps, y + 0.2, f" {rps:.0f}/s ({pct}p99 {p99} ms)", va="center", fontsize=8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("requests/s (wrk, keep-alive; 10k hosts keep-alive meanwhile)")
    ax.set_title("GET at 10k hosts against the machine's ceiling", loc="left")
    ax.set_xlim(0, 1.45 * max(max(r[2], r[3] or 0) for r in rows))
    ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2)
    ax.grid(True, axis="x", alpha=0.3)
    return save(plt, fig, docs, out / "http.png")


def plot_latency(plt, docs: list[dict], out: Path) -> Path | None:
    """Distributions (empirical CDFs) of label and goodbye propagation."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    drawn = False
    for ax, key, title in ((axes[0], "propagation", "Label change: POST on A -> seen on B"),
                           (axes[1], "goodbye", "Goodbye: SIGTERM of A -> gone from B")):
        for doc in docs:
            fig_ = doc["figures"].get(key)
            if not fig_ or "runs" not in fig_:
                continue
            samples = sorted(x for run in fig_["runs"] for x in run.get("samples_ms", []))
            if not samples:
                continue
            ys = [(k + 1) / len(samples) for k in range(len(samples))]
            ax.step(samples, ys, where="post", label=f"{doc['meta']['label']} "
                    f"(p50 {samples[len(samples) // 2]:.1f} ms, n={len(samples)})")
            drawn = True
        ax.set(title=title, xlabel="ms (log scale)", ylabel="fraction of changes seen")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if not drawn:
        plt.close(fig)
        return None
    return save(plt, fig, docs, out / "latency.png")


def kv_run(doc: dict, n: int) -> dict | None:
    fig = doc["figures"].get(f"kv@{n}")
    return fig["runs"][0] if fig and fig.get("runs") and "error" not in fig["runs"][0] else None


def plot_kv(plt, docs: list[dict], out: Path) -> Path | None:
    """DISCOVERY_MODE=kv against the broadcast at 10k and 100k hosts, log scale:
    what reaches each lobbyd, what it costs it, what NATS delivers."""
    kv_docs = [doc for doc in docs if "kv" in kinds(doc)]
    if not kv_docs:
        return None
    doc = max(kv_docs, key=lambda d: d["meta"].get("started", ""))
    sizes = [n for n in (10000, 100000) if kv_run(doc, n)]
    if not sizes:
        return None
    runs = {n: kv_run(doc, n) for n in sizes}
    steady = {}  # broadcast lobbyd CPU, measured by `--only steady` (newest run having it)
    for other in sorted(docs, key=lambda d: d["meta"].get("started", "")):
        for n in sizes:
            if median(other["figures"].get(f"steady@{n}")) is not None:
                steady[n] = (median(other["figures"][f"steady@{n}"]), other)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    xs = list(range(len(sizes)))
    names = [f"{n:,} hosts" for n in sizes]
    computed = dict(color="white", edgecolor="tab:red", hatch="//")

    def bars(ax, series: list[tuple[str, list[float | None], dict]]) -> None:
        width = 0.8 / len(series)
        for k, (label, values, style) in enumerate(series):
            at = [x - 0.4 + width * (k + 0.5) for x in xs]
            shown = [(x, v) for x, v in zip(at, values) if v is not None]
            if not shown:
                continue
            ax.bar([x for x, _ in shown], [max(v, 1e-3) for _, v in shown], width=width,
                   label=label, **style)
            for x, v in shown:
                ax.text(x, max(v, 1e-3) * 1.15, f"{v:,.3g}" if v < 1000 else f"{v:,.0f}",
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs)
        ax.set_xticklabels(names)
        ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 30)  # room for the labels and the legend

    bars(axes[0], [
        ("broadcast: N/KEEP_ALIVE (computed)",
         [runs[n]["broadcast_packets_per_s"] for n in sizes], computed),
        ("kv, measured (label changes only)", [max(runs[n]["packets_per_s"]) for n in sizes],
         dict(color="tab:blue"))])
    axes[0].set(title="Packets into each lobbyd", ylabel="packets/s (log scale)")

    def cpu(n: int, reaper: bool) -> float | None:
        values = [c for c, r in zip(runs[n]["lobbyd_cpu_pct"], runs[n]["reapers"]) if r == reaper]
        return max(values) if values else None

    bars(axes[1], [
        ("broadcast, measured (--only steady)",
         [steady[n][0] if n in steady else None for n in sizes], dict(color="tab:red")),
        ("kv, not a reaper", [cpu(n, False) for n in sizes], dict(color="tab:blue")),
        ("kv, a reaper (3 per fleet)", [cpu(n, True) for n in sizes],
         dict(color="tab:cyan"))])
    axes[1].set(title="lobbyd CPU at steady state", ylabel="% of one core (log scale)")

    bars(axes[2], [
        ("broadcast: N²/KEEP_ALIVE (computed)",
         [runs[n]["broadcast_deliveries_per_s"] for n in sizes], computed),
        ("kv: messages into NATS, measured", [runs[n]["nats_in_msgs_per_s"] for n in sizes],
         dict(color="tab:gray")),
        ("kv: deliveries out of NATS, measured",
         [runs[n]["nats_out_msgs_per_s"] for n in sizes], dict(color="tab:blue"))])
    axes[2].set(title="NATS, whole fleet", ylabel="messages/s (log scale)")
    loads = ", ".join(f"{n:,}: other processes {runs[n]['load']['other_cpu_pct']:.0f}% CPU"
                      for n in sizes)
    fig.text(0.5, 0.005, f"KEEP_ALIVE {runs[sizes[0]]['keep_alive']} s; machine load during "
             f"the kv windows ({loads})", ha="center", fontsize=7)
    sources = [doc] + [d for d in {id(d): d for _, d in steady.values()}.values()
                       if d is not doc]
    return save(plt, fig, sources, out / "kv.png")


def draw(docs: list[dict], out: Path) -> list[Path]:
    global ticker
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print("plots: matplotlib not installed: no pictures", file=sys.stderr)
        return []
    out.mkdir(parents=True, exist_ok=True)
    broadcast = [doc for doc in docs if "broadcast" in kinds(doc)]
    made = [plot_kv(plt, docs, out)]
    if broadcast:
        made += [plot_scale(plt, broadcast, out), plot_http(plt, broadcast, out),
                 plot_latency(plt, broadcast, out)]
    return [path for path in made if path is not None]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="result files (default: --dir)")
    p.add_argument("--dir", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=None, help="default: <dir>/plots")
    a = p.parse_args()
    docs = [json.loads(f.read_text()) for f in a.files] if a.files else newest_per_label(a.dir)
    if not docs:
        print(f"plots: no results in {a.dir}", file=sys.stderr)
        return 1
    for path in draw(docs, a.out or a.dir / "plots"):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
