#!/usr/bin/env bash
# Where the CPU goes while the stream processor runs at its peak: the pipeline bench's peak
# rounds of one mode (default: embedded; `batched`, `per-reading` or `pass-through` as
# the first argument) on tansu in its own process, under `perf record -a` (every CPU, so
# threads the processor starts later are seen too). Prints the CPU split between the bench
# process and tansu, then the bench process's samples by kind of work (allocation,
# librdkafka, kernel, model run, ...). Needs perf (linux-perf) and permission to sample
# the whole system. Writes benchmarks/results/stream-processor-profile-<mode>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/system/lib.sh
need_tansu
command -v perf > /dev/null || { echo "perf is not installed (Debian: apt-get install linux-perf)" >&2; exit 1; }
mode="${1:-embedded}"

work="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cargo bench -p stream-processor --bench pipeline --no-run
bench="$(cargo bench -p stream-processor --bench pipeline --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p')"
port="$(free_port)"
start_tansu "$port" "$work/tansu.log"
VIGIL_BENCH_KAFKA="127.0.0.1:$port" VIGIL_BENCH_KAFKA_NAME="tansu $TANSU_VERSION (memory storage)" \
  VIGIL_BENCH_CONSUMER="$mode" "$bench" > "$work/bench.log" 2>&1 &
bench_pid=$!
perf record -a -F 999 -o "$work/perf.data" -- \
  sh -c "while kill -0 $bench_pid 2>/dev/null; do sleep 0.2; done" > /dev/null 2>&1
out="benchmarks/results/stream-processor-profile-$mode.txt"
{
  echo "# perf record -a -F 999 over VIGIL_BENCH_CONSUMER=$mode peak rounds on tansu $TANSU_VERSION ($(date -u +%F))"
  grep 'readings/s' "$work/bench.log"
  echo
  echo "## CPU samples by process (0: idle; the run includes setup and group joins)"
  perf script -i "$work/perf.data" -F pid 2>/dev/null | sort | uniq -c | sort -rn | head -4 |
    awk -v bench="$bench_pid" -v tansu="$TANSU_PID" \
      '{ name = ($2 == bench) ? "bench process" : ($2 == tansu) ? "tansu" : ($2 == 0) ? "idle" : "other" ; print $1, name }'
  echo
  echo "## The bench process by kind of work (share of its samples)"
  perf report -i "$work/perf.data" --no-children --pid "$bench_pid" --sort dso,sym --stdio -g none 2>/dev/null |
    python3 benchmarks/perf_categories.py
} > "$out"
cat "$out"
