#!/usr/bin/env python3
"""Which metrics a Grafana dashboard uses, and whether the services really export them.

Usage:
    check_dashboard.py [DASHBOARD.json]
        Prints every metric name the dashboard's PromQL uses, one per line, sorted: the
        metric family as the service declares it (`x_bucket`, `x_sum` and `x_count` of a
        histogram print as `x`). Default dashboard: dashboards/vigil.json beside this file.

    check_dashboard.py [DASHBOARD.json] --against SCRAPE.txt [SCRAPE.txt ...] [--ignore NAME ...]
        Also reads Prometheus text-format scrapes (the bodies of the services' /metrics, one
        file each) and exits 1, naming each one on stderr, if the dashboard uses a metric
        that no scrape contains. Exit 0: every metric was found. Exit 2: bad input (a file
        missing or not JSON, no PromQL in the dashboard).

Notes for a test that scrapes running services:
- Series that Prometheus makes itself (`up`, `scrape_*`) are not service metrics: they are
  neither printed nor checked.
- The Rust prometheus crate leaves a labelled metric (a *Vec) out of /metrics entirely
  until it has one series: rollout, shadow, error and dead-letter metrics appear only
  after a rollout, a shadow run, an error or a dead letter. Drive traffic that touches
  them before scraping, or name the ones the scenario cannot reach with --ignore.
- Where a histogram is used by its family name (no suffix), `# TYPE` lines count; where it
  is used as `x_bucket`, `x_sum` or `x_count`, its family's `# TYPE ... histogram` (or
  summary) line counts too.

Expressions are read from panel targets (rows and collapsed rows included) and from query
variables (`label_values(metric, label)`, `query_result(expr)`). Only the standard library
is used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Made by Prometheus at scrape time, never by a service.
SYNTHETIC = {
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
}

# Words in PromQL that are not metric names when they are not followed by "(".
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "start", "end", "inf", "nan", "atan2",
}

IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)")


def strip_promql(expr: str) -> str:
    """Removes everything in an expression that can hold words which are not metric names."""
    # Grafana variables: $__rate_interval, ${var}, ${var:fmt}, $var, [[var]].
    expr = re.sub(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]", " ", expr)
    # String literals (label values, regexes), double-, single- or back-quoted.
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    # Label matchers, range and subquery selectors.
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    # Label lists of grouping and vector matching.
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    # offset 5m, @ 1700000000.
    expr = re.sub(r"\boffset\s+-?[0-9a-zA-Z.]+", " ", expr)
    expr = re.sub(r"@\s*[0-9.]+", " ", expr)
    # Numbers, including 1e3 and 0x1f, so their letters are not taken for names.
    expr = re.sub(r"(?<![\w:])(0[xX][0-9a-fA-F]+|\d+(\.\d*)?([eE][+-]?\d+)?)", " ", expr)
    return expr


def metrics_in_promql(expr: str) -> set[str]:
    """Metric names in one PromQL expression, as written (histogram suffixes kept)."""
    text = strip_promql(expr)
    names = set()
    for match in IDENTIFIER.finditer(text):
        name = match.group(1)
        rest = text[match.end():].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if name in KEYWORDS:
            continue
        names.add(name)
    return names


def metrics_in_variable_query(query: str) -> set[str]:
    """Metric names in a Prometheus query variable's query."""
    query = query.strip()
    match = re.fullmatch(r"label_values\((.*)\)", query, re.S)
    if match:
        inner = match.group(1)
        # label_values(label) has no metric; label_values(selector, label) has one.
        depth, split = 0, None
        for i, ch in enumerate(inner):
            if ch in "({[":
                depth += 1
            elif ch in ")}]":
                depth -= 1
            elif ch == "," and depth == 0:
                split = i
        return metrics_in_promql(inner[:split]) if split is not None else set()
    match = re.fullmatch(r"query_result\((.*)\)", query, re.S)
    if match:
        return metrics_in_promql(match.group(1))
    if query.startswith(("label_names(", "metrics(")):
        return set()
    return metrics_in_promql(query) if query else set()


def walk_panels(panels: list) -> list:
    found = []
    for panel in panels or []:
        found.append(panel)
        found.extend(walk_panels(panel.get("panels", [])))
    return found


def dashboard_expressions(dashboard: dict) -> tuple[list[str], list[str]]:
    """(panel target expressions, query variable queries) of a dashboard."""
    exprs = []
    for panel in walk_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []) or []:
            expr = target.get("expr")
            if isinstance(expr, str) and expr.strip():
                exprs.append(expr)
    queries = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and query.strip():
            queries.append(query)
    return exprs, queries


def dashboard_metrics(dashboard: dict) -> set[str]:
    """Every metric name the dashboard uses, as written, less Prometheus' own series."""
    exprs, queries = dashboard_expressions(dashboard)
    names = set()
    for expr in exprs:
        names |= metrics_in_promql(expr)
    for query in queries:
        names |= metrics_in_variable_query(query)
    return names - SYNTHETIC


def family(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_exposition(text: str) -> tuple[set[str], dict[str, str]]:
    """(sample names, {family: type}) of a Prometheus text-format (or OpenMetrics) page."""
    samples, types = set(), {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE":
                types[parts[2]] = parts[3]
            continue
        match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
        if match:
            samples.add(match.group(0))
    return samples, types


def is_exported(name: str, samples: set[str], types: dict[str, str]) -> bool:
    if name in samples or name in types:
        return True
    base = family(name)
    return base != name and types.get(base) in ("histogram", "summary", "gaugehistogram")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description="List the metrics a Grafana dashboard uses; with --against, check them against /metrics scrapes.")
    parser.add_argument("dashboard", nargs="?", type=Path,
                        default=Path(__file__).resolve().parent / "dashboards" / "vigil.json")
    parser.add_argument("--against", nargs="+", type=Path, metavar="SCRAPE",
                        help="Prometheus text-format files (a service's /metrics body each)")
    parser.add_argument("--ignore", nargs="+", action="extend", default=[], metavar="NAME",
                        help="metric names (as printed) not to require in the scrapes; may be repeated")
    args = parser.parse_args(argv)

    try:
        dashboard = json.loads(args.dashboard.read_text())
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: {args.dashboard}: {error}", file=sys.stderr)
        return 2
    used = dashboard_metrics(dashboard)
    if not used:
        print(f"error: {args.dashboard}: no PromQL metric found in any panel or variable", file=sys.stderr)
        return 2
    for name in sorted({family(n) for n in used}):
        print(name)
    if not args.against:
        return 0

    samples, types = set(), {}
    for path in args.against:
        try:
            page_samples, page_types = parse_exposition(path.read_text())
        except OSError as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return 2
        samples |= page_samples
        types.update(page_types)
    ignored = set(args.ignore)
    missing = sorted(n for n in used if family(n) not in ignored and n not in ignored
                     and not is_exported(n, samples, types))
    for name in missing:
        shown = name if family(name) == name else f"{name} (family {family(name)})"
        print(f"missing: {shown} is used by {args.dashboard.name} but no scrape has it", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
