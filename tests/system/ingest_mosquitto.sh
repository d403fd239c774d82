#!/usr/bin/env bash
# System test: ingest against a real, independent MQTT broker (Mosquitto from Debian's
# packages, installed here when missing). Mosquitto gets a plain listener and a TLS listener
# with password authentication (a throwaway CA and server certificate made here); the
# tests in services/ingest/tests/mosquitto.rs then kill the ingest process mid-stream and
# count every reading in Kafka, split a fleet across two replicas of a shared
# subscription, connect over TLS, and push the seed demo's own data through.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
source tests/system/lib.sh
need_debian_packages mosquitto mosquitto mosquitto_passwd mosquitto openssl openssl

find_seed_data every_payload_the_seed_demo_publishes

work="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# A CA and a server certificate for 127.0.0.1, valid for a day.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=vigil-test-ca" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$work/san.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
  -days 1 -extfile "$work/san.ext" -out "$work/server.pem" 2>/dev/null
password="pw-$RANDOM$RANDOM"
mosquitto_passwd -b -c "$work/passwords" vigil-ingest "$password"
# Mosquitto started as root drops to its own user, which must read these.
chmod 0755 "$work"
chmod 0644 "$work"/*

plain="$(free_port)"
tls="$(free_port)"
# A broker sized for a fleet: enough queued messages per offline session to cover an ingest
# restart (Mosquitto's default of 1000 would drop readings while ingest is down).
cat > "$work/mosquitto.conf" <<CONF
per_listener_settings true
persistence false
max_queued_messages 100000
max_inflight_messages 1000
listener $plain 127.0.0.1
allow_anonymous true
listener $tls 127.0.0.1
allow_anonymous false
password_file $work/passwords
cafile $work/ca.pem
certfile $work/server.pem
keyfile $work/server.key
CONF
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
wait_for_port "$plain" || { cat "$work/mosquitto.log"; exit 1; }
wait_for_port "$tls" || { cat "$work/mosquitto.log"; exit 1; }

export VIGIL_MOSQUITTO_URL="mqtt://127.0.0.1:$plain"
export VIGIL_MOSQUITTO_TLS_URL="mqtts://127.0.0.1:$tls"
export VIGIL_MOSQUITTO_CA="$work/ca.pem"
export VIGIL_MOSQUITTO_USER=vigil-ingest
export VIGIL_MOSQUITTO_PASSWORD="$password"
# --workspace rather than -p ingest: the features `cargo test --workspace` built with, so
# nothing recompiles.
if ! cargo test -q --locked --workspace --test mosquitto -- --ignored --test-threads 1 "${SKIP_SEED[@]}"; then
  echo "--- mosquitto log"; tail -50 "$work/mosquitto.log"
  exit 1
fi
