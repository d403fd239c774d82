#!/usr/bin/env python3
"""Evaluates every query of a Grafana dashboard on a real Prometheus, as Grafana would.

Usage:
    evaluate_dashboard.py [DASHBOARD.json] --prometheus URL [--var NAME=VALUE ...]
        [--rate-interval 30s] [--range 5m] [--may-be-empty 'METRIC: reason' ...]
        [--query EXPR ...]

Every panel target and query variable is sent to Prometheus' HTTP API (`/api/v1/query` at
the current time; `label_values(...)` through `/api/v1/series`) after Grafana's variables
are replaced: `$__rate_interval`, `$__range` and `$__interval` by the given durations, and
each dashboard variable by its `--var` value. A query must succeed and return data: a
non-empty vector or a scalar. One that uses a metric named by `--may-be-empty` may return
nothing (the reason is printed); any other empty answer, and any error, fails the run.
`--query` adds expressions of your own, held to the same rule.

Exit 0: every query answered; 1: some did not (each is named on stderr); 2: bad input.
Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_dashboard import dashboard_expressions, family, metrics_in_promql  # noqa: E402


def substitute(expr: str, variables: dict[str, str], durations: dict[str, str]) -> str:
    """Grafana's variable syntaxes ($name, ${name}, ${name:fmt}, [[name]]) replaced."""
    values = {**durations, **variables}

    def value(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        name = name.split(":", 1)[0]
        if name not in values:
            raise KeyError(name)
        return values[name]

    return re.sub(r"\$\{([^}]+)\}|\[\[([^\]]+)\]\]|\$(\w+)", value, expr)


def get(prometheus: str, path: str, params: list[tuple[str, str]]) -> dict:
    url = f"{prometheus.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            return json.load(error)
        except json.JSONDecodeError:
            return {"status": "error", "error": f"HTTP {error.code}"}


def has_data(answer: dict) -> bool:
    data = answer.get("data", {})
    if data.get("resultType") == "scalar":
        return True
    return bool(data.get("result"))


def evaluate(prometheus: str, expr: str) -> tuple[bool, str]:
    """(answered with data, what to say about it)."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", expr, re.S)
    if match:
        answer = get(prometheus, "/api/v1/series", [("match[]", match.group(1))])
        if answer.get("status") != "success":
            return False, f"error: {answer.get('error')}"
        found = sorted({series.get(match.group(2)) for series in answer["data"]} - {None})
        return bool(found), f"{match.group(2)} values {found}"
    answer = get(prometheus, "/api/v1/query", [("query", expr)])
    if answer.get("status") != "success":
        return False, f"error: {answer.get('error')}"
    data = answer["data"]
    count = 1 if data.get("resultType") == "scalar" else len(data.get("result", []))
    return has_data(answer), f"{count} series"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Evaluate every query of a Grafana dashboard on Prometheus.")
    parser.add_argument("dashboard", nargs="?", type=Path,
                        default=Path(__file__).resolve().parent / "dashboards" / "vigil.json")
    parser.add_argument("--prometheus", required=True, help="Prometheus' base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="a dashboard variable's value (regex variables: a regex, e.g. version=.*)")
    parser.add_argument("--rate-interval", default="30s", help="what $__rate_interval stands for")
    parser.add_argument("--range", default="5m", help="what $__range stands for")
    parser.add_argument("--interval", default="15s", help="what $__interval stands for")
    parser.add_argument("--may-be-empty", action="append", default=[], metavar="METRIC: reason",
                        help="a metric the run cannot reach, and why; queries using it may return nothing")
    parser.add_argument("--query", action="append", default=[], metavar="EXPR",
                        help="an extra expression that must return data too")
    args = parser.parse_args(argv)

    try:
        dashboard = json.loads(args.dashboard.read_text())
        variables = dict(v.split("=", 1) for v in args.var)
        excused = dict((part.strip() for part in item.split(":", 1)) for item in args.may_be_empty)
    except (OSError, json.JSONDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    variables.pop("datasource", None)
    durations = {"__rate_interval": args.rate_interval, "__range": args.range, "__interval": args.interval}
    exprs, variable_queries = dashboard_expressions(dashboard)
    failed = 0
    for expr in list(dict.fromkeys(variable_queries + exprs + args.query)):
        try:
            query = substitute(expr, variables, durations)
        except KeyError as name:
            print(f"error: {expr!r} uses ${name.args[0]}, which no --var gives", file=sys.stderr)
            return 2
        answered, note = evaluate(args.prometheus, query)
        reasons = sorted({excused[family(m)] for m in metrics_in_promql(query) if family(m) in excused})
        if answered:
            print(f"ok     {query}  ({note})")
        elif reasons and not note.startswith("error"):
            print(f"empty  {query}  (allowed: {'; '.join(reasons)})")
        else:
            failed += 1
            print(f"FAILED {query}  ({note})", file=sys.stderr)
    print(f"{len(dict.fromkeys(variable_queries + exprs + args.query))} queries, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
