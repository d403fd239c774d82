#!/usr/bin/env bash
# Vigil's whole test suite: the README's test command, and what .ci/run runs.
# Needs the Rust toolchain; installs what its checks run against (Prometheus, Mosquitto,
# tansu, the official clients). Fixtures are committed; `cargo test` starts servers in-process.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "lints (cargo clippy -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (cargo test --workspace)"
# tests/observability.rs evaluates the Grafana dashboard on a real Prometheus (Debian's).
if ! command -v prometheus >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing prometheus from Debian"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
VIGIL_PROMETHEUS="$(command -v prometheus)" VIGIL_REQUIRE_PROMETHEUS=1 cargo test --workspace --locked

# After the tests on purpose: the chart's last check runs the binaries `cargo test` built
# with the flags, environment and files the chart renders (the rest takes seconds).
step "Helm chart: lint, render, validate against Kubernetes, run the services with its config (tests/helm/check.sh)"
VIGIL_HELM_REQUIRE_BINARIES=1 bash tests/helm/check.sh

# Uses the venv the chart check just made (PyYAML); no Docker engine is needed.
step "deploy/: Dockerfiles, compose stack and dashboard against the services' code (deploy/check_deploy.py)"
"${VIGIL_CI_CACHE:-$HOME/.cache/vigil-ci}/k8s-validate-venv/bin/python" deploy/check_deploy.py

step "compatibility with the official clients (tensorflow-serving-api, tritonclient)"
bash tests/compat/run.sh

step "system test: device simulator against Mosquitto"
bash tests/system/simulator_mosquitto.sh

step "system test: ingest against Mosquitto (crash, shared subscription, TLS, seed data)"
bash tests/system/ingest_mosquitto.sh

step "system test: ingest's MQTT proxy with Paho 3.1.1/5, mosquitto_pub and curl, on tansu (kill -9 of a replica, ACL, seed data)"
bash tests/system/ingest_proxy.sh

step "fault system test: every service killed in turn and poison records, on Mosquitto and tansu (tests/system/pipeline_faults.sh)"
bash tests/system/pipeline_faults.sh

# CI's disk is small: a build that outgrows it fails with "No space left on device".
step "disk taken by the build"
du -sh "$CARGO_TARGET_DIR" || true
