#!/usr/bin/env bash
# Compatibility with the clients users already have: our protos against the official ones,
# then tensorflow-serving-api and tritonclient (gRPC and HTTP) against the real model-server process.
# Installs the clients into a reusable venv on first use (about a minute), then reuses it.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

venv="${VIGIL_COMPAT_VENV:-$HOME/.cache/vigil-ci/tf-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import tensorflow_serving.apis, tritonclient.grpc, tritonclient.http, grpc_tools.protoc, tensorflow" 2>/dev/null; then
    "$venv/bin/pip" install --quiet -r tests/compat/requirements.txt
    "$venv/bin/pip" install --quiet --no-deps tensorflow-serving-api==2.21.0
fi
export TF_CPP_MIN_LOG_LEVEL=3
# The TLS checks make their test certificates with the openssl command line.
source tests/system/lib.sh
need_debian_packages openssl openssl

# The same build as `cargo test --workspace` (same features, so nothing recompiles after
# the test step); it leaves each service binary in target/debug.
cargo test --workspace --locked --no-run --quiet
descriptors=$(ls -t "$CARGO_TARGET_DIR"/debug/build/proto-*/out/descriptors.bin | head -1)
"$venv/bin/python" tests/compat/check_proto_wire_compat.py "$descriptors"
"$venv/bin/python" tests/compat/official_clients.py "$CARGO_TARGET_DIR/debug/model-server"
