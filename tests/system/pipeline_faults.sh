#!/usr/bin/env bash
# Fault system test: the whole pipeline as separate processes on two independent brokers,
# Mosquitto (Debian's) and tansu (a Kafka-protocol broker in its own process; see
# need_tansu in lib.sh), both installed here when missing. tests/pipeline_faults.rs then
# runs the real binaries (model server, ingest, stream processor, alerts, device
# simulator), kills each service with SIGKILL in turn while a fleet publishes, mixes in
# poison records, and checks that nothing acknowledged is lost, every reading is scored,
# repeats stay within the in-flight windows, scoring resumes within seconds, the alerts
# equal a recount from the scores and every poison record is a counted dead letter. It
# prints the figures it measured (docs/failure-model.md cites them). On the same tansu,
# `vigil export-readings` exports a time range (services/vigil/tests/export_cli.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
source tests/system/lib.sh
need_debian_packages mosquitto mosquitto
need_tansu
# The same build as `cargo test --workspace` (same features, so nothing recompiles after
# the test step); it leaves each service's binary in target/debug, where the test runs them.
cargo test --workspace --locked --no-run --quiet

work="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

kafka_port="$(free_port)"
start_tansu "$kafka_port" "$work/tansu.log"

mqtt_port="$(free_port)"
# Enough queued messages per offline session to cover ingest's restart (Mosquitto's
# default of 1000 would drop readings while ingest is down). No message_size_limit: the
# oversized poison payload must reach ingest, which has to deal with it.
cat > "$work/mosquitto.conf" <<CONF
listener $mqtt_port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
max_inflight_messages 1000
CONF
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
wait_for_port "$mqtt_port" || { cat "$work/mosquitto.log"; exit 1; }

export VIGIL_TANSU_BROKERS="127.0.0.1:$kafka_port"
export VIGIL_MOSQUITTO_URL="mqtt://127.0.0.1:$mqtt_port"
# --nocapture: the measured figures are printed for whoever reads the CI log.
if ! cargo test -q --locked --workspace --test pipeline_faults -- --ignored --test-threads 1 --nocapture; then
  echo "--- tansu log (last 40 lines)"; tail -40 "$work/tansu.log"
  echo "--- mosquitto log (last 40 lines)"; tail -40 "$work/mosquitto.log"
  exit 1
fi
# `vigil export-readings` on a real broker, which answers a range's start by timestamp
# (the mock cluster cannot): services/vigil/tests/export_cli.rs.
cargo test -q --locked -p vigil --test export_cli -- --ignored
