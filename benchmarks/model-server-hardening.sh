#!/usr/bin/env bash
# What the model server's hardening costs: the grpc_load bench at concurrency 64, built from
# the commit before the hardening and from this tree, run alternately (base, this, base,
# this, ...) so a slow spell on the machine hits both. Every run carries its own no-op
# ceiling, so the two builds are compared by their shares of it, run by run; both run the
# same servers (ceiling, batching off, batching on). A third run per alternation prices this
# tree's variants against its plain server: a management token, TLS and the token, and the
# overload limits lifted. Writes benchmarks/results/model-server-hardening.json.
#
#   bash benchmarks/model-server-hardening.sh            # 5 alternations, ~12 minutes
#   VIGIL_HARDENING_RUNS=9 bash benchmarks/model-server-hardening.sh
set -euo pipefail
cd "$(dirname "$0")/.."
base_commit="${VIGIL_HARDENING_BASE:-5a0f36e}"
runs="${VIGIL_HARDENING_RUNS:-5}"
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
same="model-server, batching off|model-server, batching on"
variants="model-server, batching off|model-server, batching off, management token|model-server, batching off, TLS and management token|model-server, batching off, limits lifted"
for run in $(seq 1 "$runs"); do
    for build in base this variants; do
        echo "run $run: $build" >&2
        case $build in
        # The base bench has the ceiling and batching off and on: it runs them all.
        base) VIGIL_BENCH_CONCURRENCY=64 "$base_bin" --bench 2>"$logs/$build-$run.log" >/dev/null ;;
        # The same three servers, so both builds' rounds take as long.
        this) VIGIL_BENCH_CONCURRENCY=64 VIGIL_BENCH_SERVERS="$same" "$this_bin" --bench 2>"$logs/$build-$run.log" >/dev/null ;;
        variants) VIGIL_BENCH_CONCURRENCY=64 VIGIL_BENCH_SERVERS="$variants" "$this_bin" --bench 2>"$logs/$build-$run.log" >/dev/null ;;
        esac
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
builds = ("base", "this", "variants")
per_run = [{build: parse(f"{logs}/{build}-{i}.log") for build in builds} for i in range(1, runs + 1)]
summary = {}
for build in builds:
    for name in sorted({name for r in per_run for name in r[build]}):
        shares = [r[build][name]["share"] for r in per_run if name in r[build]]
        rps = [r[build][name]["rps"] for r in per_run if name in r[build]]
        summary.setdefault(build, {})[name] = {
            "share_of_ceiling_median": round(statistics.median(shares), 3),
            "share_of_ceiling_by_run": shares,
            "requests_per_second_by_run": rps,
        }
off = "model-server, batching off"
def ratio(build_a, name_a, build_b, name_b):
    try:
        a = summary[build_a][name_a]["share_of_ceiling_median"]
        return round(a / summary[build_b][name_b]["share_of_ceiling_median"], 3)
    except KeyError:
        return None
report = {
    "benchmark": "grpc_load at concurrency 64 (1x18 float32 autoencoder Predict, 4 connections, loopback, 2 cores): "
                 "the commit before the hardening (base) vs this tree running the same servers (this), alternated, "
                 "and this tree's batching-off variants (variants) in the same alternation",
    "base_commit": base_commit,
    "runs": runs,
    "servers": summary,
    "hardened_vs_base_batching_off": ratio("this", off, "base", off),
    "hardened_vs_base_batching_on": ratio("this", "model-server, batching on", "base", "model-server, batching on"),
    "token_vs_plain": ratio("variants", off + ", management token", "variants", off),
    "tls_and_token_vs_plain": ratio("variants", off + ", TLS and management token", "variants", off),
    "limits_lifted_vs_hardened": ratio("variants", off + ", limits lifted", "variants", off),
}
out = os.path.join("benchmarks", "results", "model-server-hardening.json")
open(out, "w").write(json.dumps(report, indent=2, sort_keys=True) + "\n")
print(json.dumps(report, indent=2, sort_keys=True))
print(f"wrote {out}", file=sys.stderr)
EOF
