#!/usr/bin/env python3
"""Render packaging/grafana-dashboard.json from a running Prometheus into one PNG.

Grafana itself is not in the package registries the project builds from, so this draws each
panel the way Grafana would lay it out (its gridPos on a 24-column grid), from the panel's own
PromQL queries evaluated by Prometheus's HTTP API (query_range) over the last --minutes. It
exits 1, naming them, when a panel has no data: the check that the dashboard an operator
imports shows something for every panel once Prometheus scrapes `tessera serve --metrics`.

Needs matplotlib (Debian: python3-matplotlib).

    render-dashboard.py [--dashboard FILE] [--prometheus URL] [--minutes N]
                        [--instance REGEX] [--out dashboard.png]
"""

import argparse
import json
import math
import sys
import time
import urllib.parse
import urllib.request

# Grafana units used by the dashboard -> (scale, axis label).
UNITS = {
    "reqps": (1, "requests/s"),
    "s": (1000, "ms"),
    "Bps": (1 / 1e6, "MB/s"),
    "bytes": (1 / 2**20, "MiB"),
    "x": (1, "x"),
    "percentunit": (100, "%"),
}
# Labels that say nothing on a one-server legend.
QUIET_LABELS = {"__name__", "instance", "job"}


def query_range(base, expr, start, end, step):
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{q}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def legend(metric, expr, several_targets):
    labels = {k: v for k, v in metric.items() if k not in QUIET_LABELS}
    name = metric.get("__name__")
    if labels:
        text = " ".join(f"{v}" for _, v in sorted(labels.items()))
        return f"{name} {text}" if name and several_targets else text
    if name:
        return name
    return expr if len(expr) < 40 else expr[:37] + "..."


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dashboard", default="packaging/grafana-dashboard.json")
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--instance", default=".*", help="value of the $instance variable")
    ap.add_argument("--out", default="dashboard.png")
    a = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    d = json.load(open(a.dashboard))
    panels = d["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    end = time.time()
    start = end - a.minutes * 60
    step = max(1.0, (end - start) / 300)

    fig = plt.figure(figsize=(16, rows * 0.5), dpi=80)
    fig.suptitle(f"{d['title']} (last {a.minutes:g} min, from {a.prometheus})", fontsize=13)
    grid = GridSpec(rows, 24, figure=fig, hspace=2.4, wspace=1.2, top=0.94, bottom=0.04)
    empty = []
    # The time axis starts at the first sample any panel has (a short run is not a sliver).
    axes = []
    first = 0.0
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=11, loc="left")
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        scale, label = UNITS.get(unit, (1, unit))
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        targets = p.get("targets", [])
        drawn = 0
        for t in targets:
            expr = t["expr"].replace("$instance", a.instance)
            for s in query_range(a.prometheus, expr, start, end, step):
                pts = [(float(ts) - end, float(v)) for ts, v in s["values"]]
                pts = [(x, y * scale) for x, y in pts if math.isfinite(y)]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                first = min(first, xs[0])
                ax.plot(xs, ys, linewidth=1.2, label=legend(s["metric"], expr, len(targets) > 1))
                drawn += 1
        axes.append(ax)
        ax.set_xlabel("seconds before now", fontsize=7)
        if drawn:
            ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes)
            empty.append(p["title"])
        print(f"{p['title']}: {drawn} series", file=sys.stderr)
    for ax in axes:
        ax.set_xlim(min(first, -10), 0)
    fig.savefig(a.out)
    print(f"wrote {a.out}", file=sys.stderr)
    if empty:
        print("panels with no data: " + ", ".join(empty), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
