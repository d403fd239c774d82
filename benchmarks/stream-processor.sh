#!/usr/bin/env bash
# Readings topic -> scores topic through the stream processor, next to a pass-through
# consumer -> producer with no RPC, on the same broker: on librdkafka's mock cluster and
# on tansu (an independent Kafka-protocol broker, installed when missing: tests/system/lib.sh).
# Everything is on loopback. Writes benchmarks/results/stream-processor.json.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/system/lib.sh
need_tansu

work="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cargo bench -p stream-processor --bench pipeline --no-run
cargo bench -p stream-processor --bench pipeline
port="$(free_port)"
start_tansu "$port" "$work/tansu.log"
VIGIL_BENCH_KAFKA="127.0.0.1:$port" VIGIL_BENCH_KAFKA_NAME="tansu $TANSU_VERSION (memory storage)" \
  VIGIL_BENCH_BROKER_PID="$TANSU_PID" \
  cargo bench -p stream-processor --bench pipeline
