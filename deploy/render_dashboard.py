#!/usr/bin/env python3
"""Render a few panels of the Grafana dashboard from a live Prometheus to a PNG.

Usage: render_dashboard.py PROMETHEUS_URL OUT.png [--minutes N] [--rate-interval 5s]

Reads the panels' queries from grafana/dashboards/embedgate.json, substitutes
the variables the way Grafana does ($tenant, $model: .* ; $price: its
default; $__rate_interval, $__range), runs them with /api/v1/query_range over
the last N minutes and plots them in a grid. Needs matplotlib (Debian
python3-matplotlib). docs/dashboard.png was made with it against the
Prometheus of `cargo test --test operating` (EMBEDGATE_KEEP_PROMETHEUS=FILE
keeps that Prometheus running and writes its URL to FILE; touch FILE.done
to let the test finish).
"""

import argparse
import json
import os
import re
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PANELS = [
    "Requests by cache status",
    "Hit ratio per tenant and model",
    "Units by tenant and model",
    "Cost per team per day per model",
    "Errors by code",
    "Upstream responses by status",
    "Upstream latency",
    "Quota remaining",
    "Load shedding",
    "Usage mismatches (1h)",
    "Unknown outcomes (1h)",
    "Ledger backlog",
]


def panels(dashboard):
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def substitute(expr, price, rate_interval, range_):
    for name, value in (
        ("$__rate_interval", rate_interval),
        ("$__range", range_),
        ("$tenant", ".*"),
        ("$model", ".*"),
        ("$price", price),
    ):
        expr = expr.replace(name, value)
    return expr


def legend(fmt, metric):
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt or "")
    return " ".join(text.split()) or json.dumps(metric)


def query_range(url, expr, start, end, step):
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prometheus")
    ap.add_argument("out")
    ap.add_argument("--minutes", type=float, default=2)
    ap.add_argument("--rate-interval", default="5s")
    args = ap.parse_args()
    with open(os.path.join(HERE, "grafana", "dashboards", "embedgate.json")) as f:
        dash = json.load(f)
    price = next(v["query"] for v in dash["templating"]["list"] if v["name"] == "price")
    by_title = {p["title"]: p for p in panels(dash)}
    end = time.time()
    start = end - args.minutes * 60
    step = max(1, int(args.minutes * 60 / 240))
    cols = 3
    rows = (len(PANELS) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(18, 3.4 * rows))
    fig.suptitle(f"{dash['title']}  (all tenants, all models, price {price})", fontsize=14)
    for ax, title in zip(axes.flat, PANELS):
        panel = by_title[title]
        ax.set_title(title, fontsize=10, loc="left")
        for t in panel["targets"]:
            expr = substitute(t["expr"], price, args.rate_interval, f"{int(args.minutes * 60)}s")
            for series in query_range(args.prometheus, expr, start, end, step):
                xs = [float(v[0]) - end for v in series["values"]]
                ys = [float(v[1]) for v in series["values"]]
                ax.plot(xs, ys, label=legend(t.get("legendFormat"), series["metric"]), linewidth=1.2)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if unit:
            ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("seconds before now", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
