#!/usr/bin/env bash
# System test: the device simulator publishes a labelled fleet to a real, independent MQTT
# broker (Mosquitto, from Debian's packages; installed here when missing), and Mosquitto's
# own client receives every reading on the seed's topics, valid, complete and in order.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

source tests/system/lib.sh
need_debian_packages mosquitto mosquitto mosquitto_sub mosquitto-clients
# The same build as `cargo test --workspace` (same features, so nothing recompiles after
# the test step); it leaves each service binary in target/debug.
cargo test --workspace --locked --no-run --quiet

work="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# Mosquitto cannot report a port it chose, so take a free one from the OS just before.
port="$(free_port)"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
wait_for_port "$port"

cars=40 readings=25
expected=$((cars * readings))
mosquitto_sub -h 127.0.0.1 -p "$port" -q 1 -t 'vehicles/sensor/data/+' -v -d -C "$expected" -W 120 \
  > "$work/received.txt" 2>&1 &
sub=$!
# -d writes the client's protocol log among the messages: wait for its SUBACK.
for _ in $(seq 100); do grep -q SUBACK "$work/received.txt" 2>/dev/null && break; sleep 0.1; done

"$CARGO_TARGET_DIR/debug/device-simulator" run --mqtt-url "mqtt://127.0.0.1:$port" --cars "$cars" \
  --readings "$readings" --interval-ms 20 --fault-share 0.5 --fault-onset-min 0.1 --fault-onset-max 0.3 \
  --admin-listen 127.0.0.1:0 \
  > "$work/report.json"
wait "$sub"

python3 - "$work/received.txt" "$work/report.json" "$cars" "$readings" <<'PY'
import collections, json, sys
received, report, cars, readings = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4])
sequences = collections.defaultdict(list)
labels = collections.Counter()
for line in open(received):
    if not line.startswith("vehicles/"):
        continue  # mosquitto_sub's protocol log (-d)
    topic, payload = line.rstrip("\n").split(" ", 1)
    reading = json.loads(payload)
    assert topic == "vehicles/sensor/data/" + reading["device_id"], (topic, reading["device_id"])
    assert len([k for k in reading if k not in ("device_id", "event_time", "sequence", "fault")]) == 18, reading
    sequences[reading["device_id"]].append(reading["sequence"])
    labels[reading["fault"]] += 1
assert len(sequences) == cars, f"{len(sequences)} cars seen, {cars} expected"
for device, seen in sequences.items():
    assert seen == list(range(1, readings + 1)), f"{device}: sequences {seen}"
assert report["published"] == report["acknowledged"] == cars * readings, report
assert labels["none"] > 0 and sum(v for k, v in labels.items() if k != "none") > 0, labels
print(f"mosquitto: {cars * readings} readings from {cars} cars received complete and in order; labels {dict(labels)}")
PY
