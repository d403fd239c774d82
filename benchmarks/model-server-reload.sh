#!/usr/bin/env bash
# Serving latency of one model while a ~100 MB model loads beside it, and process RSS
# before/with/after that model. Exports the large model with TensorFlow (cached venv),
# then runs the release-profile bench. Writes benchmarks/results/model-server-reload.json.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VIGIL_TF_VENV:-$HOME/.cache/vigil-ci/tf-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/fixtures/requirements.txt
fi
large="${TMPDIR:-/tmp}/vigil-large-model"
if [ ! -f "$large/1/saved_model.pb" ]; then
  rm -rf "$large"
  TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/python" benchmarks/export_large_model.py "$large"
fi
VIGIL_LARGE_MODEL="$large" cargo bench -p model-server --bench reload_under_load
