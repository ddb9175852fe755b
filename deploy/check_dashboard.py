#!/usr/bin/env python3
"""Print the embedgate metric names that the Grafana dashboard queries.

Usage: python3 deploy/check_dashboard.py [path/to/dashboard.json]

Walks the dashboard JSON (panels, rows' nested panels, template variables),
collects every `expr` (and every Prometheus template-variable query), finds
metric names with the regex `embedgate_[a-z_]+`, strips the histogram series
suffixes `_bucket`, `_sum` and `_count`, and prints the distinct names sorted,
one per line. Exits 1 if the file holds no expression. Standard library only.
"""

import json
import os
import re
import sys

METRIC = re.compile(r"embedgate_[a-z_]+")
SUFFIXES = ("_bucket", "_sum", "_count")
DEFAULT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "grafana", "dashboards", "embedgate.json"
)


def expressions(node):
    """Yields every PromQL string in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "templating" and isinstance(value, dict):
                for var in value.get("list", []):
                    if var.get("type") != "query":
                        continue
                    query = var.get("query")
                    if isinstance(query, dict):
                        query = query.get("query")
                    if isinstance(query, str):
                        yield query
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def metric_names(dashboard):
    names = set()
    for expr in expressions(dashboard):
        for name in METRIC.findall(expr):
            for suffix in SUFFIXES:
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            names.add(name)
    return names


def main(argv):
    path = argv[1] if len(argv) > 1 else DEFAULT
    with open(path, encoding="utf-8") as f:
        dashboard = json.load(f)
    if not any(True for _ in expressions(dashboard)):
        print(f"{path}: no expressions found", file=sys.stderr)
        return 1
    for name in sorted(metric_names(dashboard)):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
