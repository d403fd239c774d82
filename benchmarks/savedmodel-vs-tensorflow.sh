#!/usr/bin/env bash
# Side by side, in one run: the engine (criterion, release profile) and TensorFlow 2.21
# (its own signature call) on the same SavedModel, single row and batch of 64.
# Writes benchmarks/results/savedmodel-vs-tensorflow.json and prints the ratios.
# Needs network access to PyPI once (the TensorFlow venv is cached under ~/.cache/vigil-ci).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
venv="${VIGIL_TF_VENV:-$HOME/.cache/vigil-ci/tf-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/fixtures/requirements.txt
fi
model=tests/fixtures/savedmodels/autoencoder/1

cargo bench -p savedmodel --bench inference -- --noplot
"$venv/bin/python" benchmarks/tensorflow_reference.py "$model" sensors 18 "$out/tensorflow-autoencoder.json"

target="${CARGO_TARGET_DIR:-target}"
python3 - "$target" "$out" <<'PY'
import json, sys, platform, os
target, out = sys.argv[1], sys.argv[2]
tf = json.load(open(f"{out}/tensorflow-autoencoder.json"))
rows = {}
for n in (1, 64):
    est = json.load(open(f"{target}/criterion/autoencoder/predict/{n}/new/estimates.json"))
    engine_us = est["mean"]["point_estimate"] / 1e3
    rows[n] = {
        "engine_us": round(engine_us, 2),
        "tensorflow_us": round(tf[f"predict/{n}"], 2),
        "speedup": round(tf[f"predict/{n}"] / engine_us, 1),
        "engine_us_per_row": round(engine_us / n, 3),
    }
result = {
    "benchmark": "autoencoder (18 -> 12 -> 6 -> 12 -> 18 dense), serving_default signature",
    "tensorflow_version": tf["tensorflow_version"],
    "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    "batch": rows,
}
json.dump(result, open(f"{out}/savedmodel-vs-tensorflow.json", "w"), indent=2)
print(json.dumps(result, indent=2))
PY
