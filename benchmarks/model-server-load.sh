#!/usr/bin/env bash
# Predict throughput and latency at concurrency 1-256: no-op tonic server (ceiling),
# model-server with batching off and on, in one run. Writes
# benchmarks/results/model-server-load.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p model-server --bench grpc_load
