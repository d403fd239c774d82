#!/usr/bin/env bash
# What the model server's hardening costs: the grpc_load bench at concurrency 64, built from
# the commit before the hardening and from this tree, run alternately (base, this, base,
# this, ...) so a slow spell on the machine hits both. Every run carries its own no-op
# ceiling, so the two builds are compared by their shares of it, run by run. This tree's
# run also has the server with its overload limits lifted, and TLS and token-auth variants
# where the bench has them. Writes benchmarks/results/model-server-hardening.json.
#
#   bash benchmarks/model-server-hardening.sh            # 3 alternations, ~6 minutes
#   VIGIL_HARDENING_RUNS=5 bash benchmarks/model-server-hardening.sh
set -euo pipefail
cd "$(dirname "$0")/.."
base_commit="${VIGIL_HARDENING_BASE:-5a0f36e}"
runs="${VIGIL_HARDENING_RUNS:-3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# The base build lives in a detached worktree under the target dir (not part of the repo).
base_tree="$CARGO_TARGET_DIR/hardening-base"
if [ ! -d "$base_tree" ]; then
    git worktree add --detach "$base_tree" "$base_commit"
fi

bench_binary() {
    (cd "$1" && cargo bench -p model-server --bench grpc_load --no-run --message-format=json 2>/dev/null) |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "grpc_load":
        print(m["executable"])'
}
base_bin=$(bench_binary "$base_tree" | tail -1)
this_bin=$(bench_binary "$PWD" | tail -1)
[ -x "$base_bin" ] && [ -x "$this_bin" ] || { echo "bench binaries not built" >&2; exit 1; }

logs=$(mktemp -d)
for run in $(seq 1 "$runs"); do
    for build in base this; do
        bin=$base_bin
        [ "$build" = this ] && bin=$this_bin
        echo "run $run: $build" >&2
        VIGIL_BENCH_CONCURRENCY=64 "$bin" --bench 2>"$logs/$build-$run.log" >/dev/null
        grep "median" "$logs/$build-$run.log" >&2
    done
done

python3 - "$logs" "$runs" "$base_commit" <<'EOF'
import json, os, re, statistics, sys
logs, runs, base_commit = sys.argv[1], int(sys.argv[2]), sys.argv[3]
line = re.compile(r"^\s+(.+?)\s+c=64\s+median\s+(\d+) req/s, ([\d.]+|null)")
def parse(path):
    out = {}
    for text in open(path):
        m = line.match(text)
        if m:
            out[m.group(1).strip()] = {"rps": float(m.group(2)), "share": float(m.group(3))}
    return out
per_run = [{"base": parse(f"{logs}/base-{i}.log"), "this": parse(f"{logs}/this-{i}.log")} for i in range(1, runs + 1)]
servers = sorted({name for r in per_run for build in r.values() for name in build})
summary = {}
for name in servers:
    for build in ("base", "this"):
        shares = [r[build][name]["share"] for r in per_run if name in r[build]]
        rps = [r[build][name]["rps"] for r in per_run if name in r[build]]
        if shares:
            summary.setdefault(name, {})[build] = {
                "share_of_ceiling_median": round(statistics.median(shares), 3),
                "share_of_ceiling_by_run": shares,
                "requests_per_second_by_run": rps,
            }
off = "model-server, batching off"
ratio = None
if off in summary and "base" in summary[off] and "this" in summary[off]:
    ratio = round(summary[off]["this"]["share_of_ceiling_median"] / summary[off]["base"]["share_of_ceiling_median"], 3)
report = {
    "benchmark": "grpc_load at concurrency 64 (1x18 float32 autoencoder Predict, 4 connections, loopback, 2 cores): "
                 "the commit before the hardening (base) vs this tree, alternated",
    "base_commit": base_commit,
    "runs": runs,
    "servers": summary,
    "hardened_vs_base_batching_off": ratio,
}
out = os.path.join("benchmarks", "results", "model-server-hardening.json")
open(out, "w").write(json.dumps(report, indent=2, sort_keys=True) + "\n")
print(json.dumps(report, indent=2, sort_keys=True))
print(f"wrote {out}", file=sys.stderr)
EOF
