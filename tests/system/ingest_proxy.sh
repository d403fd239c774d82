#!/usr/bin/env bash
# System test: ingest's MQTT proxy mode with the clients devices use, unmodified: Eclipse
# Paho for Python (MQTT 3.1.1 and 5; from PyPI into a venv under the CI cache),
# Mosquitto's mosquitto_pub (Debian's mosquitto-clients) and curl, against the real
# ingest binary writing to tansu, a Kafka-protocol broker in its own process. No MQTT
# broker runs. services/ingest/tests/proxy_clients.rs holds the tests: Paho, mosquitto_pub
# and curl reach Kafka through ingest alone, the seed demo's payloads land as readings or
# dead letters, logins and the ACL are refused with the protocols' codes, and kill -9 of one
# of two replicas while devices publish loses no acknowledged reading.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
source tests/system/lib.sh
need_debian_packages mosquitto_pub mosquitto-clients curl curl
need_tansu

paho_venv="${VIGIL_CI_CACHE:-$HOME/.cache/vigil-ci}/paho-venv"
if ! "$paho_venv/bin/python" -c 'import paho.mqtt' 2>/dev/null; then
  echo "installing paho-mqtt into $paho_venv"
  python3 -m venv "$paho_venv"
  "$paho_venv/bin/pip" install --quiet --disable-pip-version-check 'paho-mqtt>=2.1,<3'
fi

find_seed_data every_payload_the_seed_demo_publishes

work="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

kafka_port="$(free_port)"
start_tansu "$kafka_port" "$work/tansu.log"

export VIGIL_TANSU_BROKERS="127.0.0.1:$kafka_port"
export VIGIL_PAHO_PYTHON="$paho_venv/bin/python"
# --workspace: the features `cargo test --workspace` built with, so nothing recompiles.
if ! cargo test -q --locked --workspace --test proxy_clients -- --ignored --test-threads 1 --nocapture "${SKIP_SEED[@]}"; then
  echo "--- tansu log (last 40 lines)"; tail -40 "$work/tansu.log"
  exit 1
fi
