#!/usr/bin/env bash
# MQTT -> Kafka readings/s through ingest next to the ceiling of the same broker delivering
# to a subscriber that discards, for a fleet of 100 and of 2,000 cars, in one run.
# Everything is in-process on loopback (rumqttd, librdkafka's mock cluster).
# Writes benchmarks/results/ingest-bridge.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p ingest --bench bridge
