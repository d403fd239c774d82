#!/usr/bin/env bash
# Ingest's intake paths side by side, each next to the Kafka side alone on the same broker:
# - bridge (benches/bridge.rs): MQTT -> Kafka readings/s through ingest next to the
#   ceiling of the same broker delivering to a subscriber that discards, for fleets of 100
#   and 2,000 cars, on the embedded rumqttd and on Mosquitto (Debian's, installed when
#   missing), with one session and (Mosquitto) with 4 sessions of a shared subscription;
# - proxy and HTTP (benches/proxy.rs): devices publishing QoS 1 straight to ingest's MQTT
#   proxy, and HTTP batches, plus publish-to-PUBACK latency at half the proxy's peak.
# Kafka is first librdkafka's mock cluster in the bench process, then tansu in its own
# process (installed when missing: tests/system/lib.sh), so the second run charges the
# bench process with ingest's work only. Everything is on loopback. Writes
# benchmarks/results/ingest-bridge.json and benchmarks/results/ingest-proxy.json.
set -euo pipefail
cd "$(dirname "$0")/.."
source tests/system/lib.sh
need_debian_packages mosquitto mosquitto
need_tansu

work="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port="$(free_port)"
# Room for a whole round queued in an offline session, and a window of 1000 in flight
# (Mosquitto's default of 20 would make any ack-after-write consumer latency-bound).
cat > "$work/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 1000000
max_inflight_messages 1000
CONF
chmod 0755 "$work"; chmod 0644 "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
wait_for_port "$port" || { cat "$work/mosquitto.log"; exit 1; }
cargo bench -p ingest --bench bridge --bench proxy --no-run
VIGIL_BENCH_MOSQUITTO_PORT="$port" cargo bench -p ingest --bench bridge
cargo bench -p ingest --bench proxy
kafka_port="$(free_port)"
start_tansu "$kafka_port" "$work/tansu.log"
export VIGIL_BENCH_KAFKA="127.0.0.1:$kafka_port" VIGIL_BENCH_KAFKA_NAME="tansu $TANSU_VERSION (memory storage)"
export VIGIL_BENCH_BROKER_PID="$TANSU_PID"
VIGIL_BENCH_MOSQUITTO_PORT="$port" cargo bench -p ingest --bench bridge
cargo bench -p ingest --bench proxy
