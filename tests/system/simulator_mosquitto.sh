#!/usr/bin/env bash
# System test: the device simulator publishes a labelled fleet to a real, independent MQTT
# broker (Mosquitto, from Debian's packages; installed here when missing), and Mosquitto's
# own client receives every reading on the seed's topics, valid, complete and in order.
# Then the same over MQTT 5 with TLS, a client certificate and a login, from two replicas
# that split the fleet, a share of the readings carrying W3C trace context; and a wrong
# password gets nothing acknowledged.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

source tests/system/lib.sh
need_debian_packages mosquitto mosquitto mosquitto_sub mosquitto-clients openssl openssl
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

# --- MQTT 5, TLS with a client certificate, a login, two replicas, traced readings ---
pki="$work/pki"
mkdir -p "$pki"
quiet() { "$@" > /dev/null 2>&1; }
quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 1 -subj "/CN=vigil-test-ca"
quiet openssl req -newkey rsa:2048 -nodes -keyout "$pki/server.key" -out "$pki/server.csr" -subj "/CN=127.0.0.1"
printf 'subjectAltName=IP:127.0.0.1\n' > "$pki/san.ext"
quiet openssl x509 -req -in "$pki/server.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -out "$pki/server.crt" -days 1 -extfile "$pki/san.ext"
quiet openssl req -newkey rsa:2048 -nodes -keyout "$pki/client.key" -out "$pki/client.csr" -subj "/CN=fleet"
quiet openssl x509 -req -in "$pki/client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -out "$pki/client.crt" -days 1
mosquitto_passwd -b -c "$work/passwords" fleet fleet-secret
# Mosquitto started as root runs as its own user: let it read the test's files.
chmod 0755 "$work" "$pki"
chmod 0644 "$pki"/* "$work/passwords"
printf 'fleet-secret\n' > "$work/password"
printf 'wrong\n' > "$work/wrong-password"

tls_port="$(free_port)"
cat > "$work/mosquitto-tls.conf" <<CONF
listener $tls_port 127.0.0.1
cafile $pki/ca.crt
certfile $pki/server.crt
keyfile $pki/server.key
require_certificate true
allow_anonymous false
password_file $work/passwords
persistence false
CONF
mosquitto -c "$work/mosquitto-tls.conf" > "$work/mosquitto-tls.log" 2>&1 &
wait_for_port "$tls_port"

tls=(--cafile "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key")
cars=10 readings=10
expected=$((cars * readings))
mosquitto_sub -V 5 -h 127.0.0.1 -p "$tls_port" "${tls[@]}" -u fleet -P fleet-secret -q 1 \
  -t 'vehicles/sensor/data/+' -F '%t|%P|%p' -d -C "$expected" -W 120 > "$work/received-tls.txt" 2>&1 &
sub=$!
for _ in $(seq 100); do grep -q SUBACK "$work/received-tls.txt" 2>/dev/null && break; sleep 0.1; done

simulate() { # simulate REPLICA PASSWORD_FILE: MQTT 5 (the default), over TLS, logged in
  "$CARGO_TARGET_DIR/debug/device-simulator" run --mqtt-url "mqtts://127.0.0.1:$tls_port" \
    --tls-ca-file "$pki/ca.crt" --tls-cert-file "$pki/client.crt" --tls-key-file "$pki/client.key" \
    --mqtt-username fleet --mqtt-password-file "$2" --trace-share 0.5 \
    --replicas 2 --replica-index "$1" --cars "$cars" --readings "$readings" --interval-ms 20 \
    --admin-listen 127.0.0.1:0
}
simulate 0 "$work/password" > "$work/report-0.json" &
first=$!
simulate 1 "$work/password" > "$work/report-1.json"
wait "$first"
wait "$sub"

python3 - "$work/received-tls.txt" "$work/report-0.json" "$work/report-1.json" "$cars" "$readings" <<'PY'
import collections, json, re, sys
received, reports, cars, readings = sys.argv[1], [json.load(open(f)) for f in sys.argv[2:4]], int(sys.argv[4]), int(sys.argv[5])
sequences, traces = collections.defaultdict(list), set()
total = traced = 0
for line in open(received):
    if not line.startswith("vehicles/"):
        continue  # mosquitto_sub's protocol log (-d)
    topic, properties, payload = line.rstrip("\n").split("|", 2)
    reading = json.loads(payload)
    assert topic == "vehicles/sensor/data/" + reading["device_id"], (topic, reading["device_id"])
    sequences[reading["device_id"]].append(reading["sequence"])
    total += 1
    match = re.search(r"traceparent:(00-([0-9a-f]{32})-[0-9a-f]{16}-01)", properties)
    if match:
        traced += 1
        traces.add(match.group(2))
assert len(sequences) == cars, f"{len(sequences)} cars seen, {cars} expected"
for device, seen in sequences.items():
    assert seen == list(range(1, readings + 1)), f"{device}: sequences {seen}"
assert [r["published"] for r in reports] == [5 * readings, 5 * readings], reports
assert all(r["published"] == r["acknowledged"] for r in reports), reports
assert 0.25 * total <= traced <= 0.75 * total, f"{traced} of {total} readings traced, share 0.5 asked"
assert len(traces) == traced, "each traced reading starts its own trace"
print(f"mosquitto over TLS with a client certificate and a login, MQTT 5: {total} readings from two replicas "
      f"({reports[0]['published']} + {reports[1]['published']}), every car complete and in order; "
      f"{traced} carried a traceparent")
PY

# A wrong password: the broker refuses the connection, nothing is acknowledged, and the
# simulator says so with a failing exit once its drain time is up.
if simulate 0 "$work/wrong-password" > "$work/report-wrong.json" 2> "$work/wrong.log"; then
  echo "a wrong password must not publish successfully" >&2
  exit 1
fi
grep -q '"acknowledged":0' "$work/report-wrong.json" || { cat "$work/report-wrong.json" "$work/wrong.log" >&2; exit 1; }
grep -q "mqtt connection failed" "$work/wrong.log" || { cat "$work/wrong.log" >&2; exit 1; }
echo "mosquitto: a wrong password gets nothing acknowledged and a failing exit"
