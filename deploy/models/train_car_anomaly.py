#!/usr/bin/env python3
"""Train Vigil's car anomaly model on the device simulator's readings and export it.

The model is an autoencoder over the 17 measured signals of a `SensorReading` (the firmware
version is an identifier, not a measurement, so it is not an input). Everything a caller
needs travels inside the SavedModel, so no service restates a constant:

- inputs: one float32 tensor of shape [batch] per signal, named after the proto field
  (`coolant_temp`, ...): the signature itself is the feature list, and order cannot drift;
- scaling: the training data's mean and standard deviation are constants in the graph, so
  the model takes raw readings; so is the healthy range the network's input is clipped to;
- outputs: `anomaly_score` (the reconstruction error of the worst signal: each signal's
  absolute error in the scaled space, in units of that signal's 99.9th-percentile error on
  healthy readings, then the maximum over signals) and `threshold` (the version's
  threshold, per row), so a caller decides `score > threshold` with the threshold of the
  version that answered. The maximum, not the mean: most faults show in one or two
  signals, and a mean over 17 lets the healthy rest dilute them (a worn shock absorber
  at a standstill, one accelerometer at four times its neighbours, scored below the
  threshold as a mean; as a maximum it is flagged);
- `assets.extra/vigil-model.json`: features, scaling, threshold policy and evaluation, for
  people and tools.

Data comes from the simulator itself (`device-simulator generate`): healthy cars for
training (seed 1001), a separate healthy validation fleet for the threshold (seed 1002),
and a labelled hold-out fleet with faults (seed 2002) for precision and recall.

Run from the repository root (TensorFlow from tests/fixtures/requirements.txt):

    python3 deploy/models/train_car_anomaly.py

Writes deploy/models/car-anomaly/{1,2}/, deploy/models/car-anomaly/evaluation.md and
tests/fixtures/car_anomaly_golden.json (readings and TensorFlow's scores, for the Rust
parity test).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL_DIR = os.path.join(ROOT, "deploy", "models", "car-anomaly")
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "car_anomaly_golden.json")
NOT_FEATURES = {"device_id", "event_time", "sequence", "fault", "control_unit_firmware"}

# Two versions for canary rollouts: v2 has more capacity.
VERSIONS = {
    1: {"hidden": (32, 10, 32), "threshold_quantile": 0.999, "epochs": 30},
    2: {"hidden": (64, 14, 64), "threshold_quantile": 0.999, "epochs": 30},
}

# Each signal's error is measured in units of this quantile of its healthy errors.
ERROR_SCALE_QUANTILE = 0.999


def simulate(binary, path, seed, cars, seconds, fault_share):
    args = [binary, "generate", "--out", path, "--seed", str(seed), "--cars", str(cars),
            "--seconds", str(seconds), "--fault-share", str(fault_share),
            "--fault-onset-min", "60", "--fault-onset-max", str(seconds * 2 // 3)]
    subprocess.run(args, check=True)
    with open(path) as f:
        return [json.loads(line) for line in f]


def matrix(readings, features):
    return np.array([[r[f] for f in features] for r in readings], dtype=np.float32)


class CarAnomaly(tf.Module):
    """Raw readings in, anomaly score and threshold out."""

    def __init__(self, features, mean, std, low, high, error_scale, network, threshold):
        super().__init__()
        self.features = features
        self.mean = tf.constant(mean, dtype=tf.float32)
        self.std = tf.constant(std, dtype=tf.float32)
        self.low = tf.constant((low - mean) / std, dtype=tf.float32)
        self.high = tf.constant((high - mean) / std, dtype=tf.float32)
        self.error_scale = tf.constant(error_scale, dtype=tf.float32)
        self.network = network
        self.threshold_value = tf.constant(threshold, dtype=tf.float32)
        spec = {f: tf.TensorSpec([None], tf.float32, name=f) for f in features}
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, readings):
        x = tf.stack([readings[f] for f in self.features], axis=1)
        scaled = (x - self.mean) / self.std
        # The network sees the reading clipped to the healthy training range, so it cannot
        # reconstruct a value no healthy car reports; the error is taken against the
        # unclipped reading, so such a value always shows.
        reconstruction = self.network(tf.minimum(tf.maximum(scaled, self.low), self.high))
        score = tf.reduce_max(tf.abs(reconstruction - scaled) / self.error_scale, axis=1)
        threshold = score * 0.0 + self.threshold_value
        return {"anomaly_score": score, "threshold": threshold}


def build_network(n, hidden, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((n,))
    h = inputs
    for width in hidden:
        h = keras.layers.Dense(width, activation="tanh")(h)
    # Linear output: the scaled inputs are negative as often as positive.
    outputs = keras.layers.Dense(n)(h)
    return keras.Model(inputs, outputs)


def precision_recall(scores, threshold, faulty):
    flagged = scores > threshold
    tp = int(np.sum(flagged & faulty))
    fp = int(np.sum(flagged & ~faulty))
    fn = int(np.sum(~flagged & faulty))
    return {"precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1),
            "true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "normal_readings": int(np.sum(~faulty)), "faulty_readings": int(np.sum(faulty))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--simulator", default=os.path.join(ROOT, "target", "debug", "device-simulator"))
    parser.add_argument("--work", default="/tmp/vigil-car-anomaly")
    args = parser.parse_args()
    if not os.path.exists(args.simulator):
        subprocess.run(["cargo", "build", "-q", "-p", "device-simulator"], cwd=ROOT, check=True)
    os.makedirs(args.work, exist_ok=True)
    w = lambda name: os.path.join(args.work, name)  # noqa: E731

    train = simulate(args.simulator, w("train.jsonl"), 1001, 200, 1800, 0.0)
    validation = simulate(args.simulator, w("validation.jsonl"), 1002, 60, 1800, 0.0)
    holdout = simulate(args.simulator, w("holdout.jsonl"), 2002, 100, 1800, 0.3)
    features = [k for k in train[0] if k not in NOT_FEATURES]
    x_train, x_val, x_hold = matrix(train, features), matrix(validation, features), matrix(holdout, features)
    faulty = np.array([r["fault"] != "none" for r in holdout])
    mean = x_train.mean(axis=0)
    std = np.maximum(x_train.std(axis=0), 1e-3)
    low, high = x_train.min(axis=0), x_train.max(axis=0)
    print(f"{len(train)} training, {len(validation)} validation, {len(holdout)} hold-out readings "
          f"({faulty.mean():.1%} faulty); features: {', '.join(features)}")

    # Replace the versions; evaluation.md beside them is written by hand from the figures.
    for version in VERSIONS:
        shutil.rmtree(os.path.join(MODEL_DIR, str(version)), ignore_errors=True)
    report = {"features": features, "versions": {}}
    golden = {"model": "car-anomaly", "readings": [], "versions": {}}
    # A few hold-out readings of every kind, for the Rust parity test.
    picks = []
    for kind in sorted({r["fault"] for r in holdout}):
        picks += [r for r in holdout if r["fault"] == kind][:4]
    golden["readings"] = picks

    for version, params in VERSIONS.items():
        network = build_network(len(features), params["hidden"], seed=version)
        network.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
        s_train = (x_train - mean) / std
        network.fit(s_train, s_train, epochs=params["epochs"], batch_size=512, shuffle=True, verbose=0)

        # Healthy validation fleet: its first half sets each feature's error scale (the
        # network sees the clipped reading, as in serving), its second half the threshold.
        half = len(x_val) // 2
        s_val = (x_val[:half] - mean) / std
        s_clipped = np.clip(s_val, (low - mean) / std, (high - mean) / std)
        errors = np.abs(network.predict(s_clipped, verbose=0) - s_val)
        error_scale = np.maximum(np.quantile(errors, ERROR_SCALE_QUANTILE, axis=0), 1e-3)
        probe = CarAnomaly(features, mean, std, low, high, error_scale, network, 0.0)
        val_scores = probe.serve({f: x_val[half:, i] for i, f in enumerate(features)})["anomaly_score"].numpy()
        threshold = float(np.quantile(val_scores, params["threshold_quantile"]))
        module = CarAnomaly(features, mean, std, low, high, error_scale, network, threshold)

        path = os.path.join(MODEL_DIR, str(version))
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
        # Evaluate the export as TF Serving would run it: reload and call the signature.
        loaded = tf.saved_model.load(path).signatures["serving_default"]
        hold_out = loaded(**{f: tf.constant(x_hold[:, i]) for i, f in enumerate(features)})
        scores = hold_out["anomaly_score"].numpy()
        metrics = precision_recall(scores, threshold, faulty)
        by_kind = {}
        for kind in sorted({r["fault"] for r in holdout} - {"none"}):
            rows = np.array([r["fault"] == kind for r in holdout])
            by_kind[kind] = float(np.mean(scores[rows] > threshold))
        entry = {"hidden_layers": list(params["hidden"]), "epochs": params["epochs"],
                 "threshold_policy": f"{params['threshold_quantile']} quantile of healthy validation scores",
                 "threshold": threshold, **metrics, "recall_by_fault": by_kind}
        report["versions"][str(version)] = entry
        print(f"v{version}: threshold {threshold:.4f} precision {metrics['precision']:.4f} "
              f"recall {metrics['recall']:.4f} by fault {json.dumps(by_kind)}")

        os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
        with open(os.path.join(path, "assets.extra", "vigil-model.json"), "w") as f:
            json.dump({"model": "car-anomaly", "version": version, "features": features,
                       "scaling": {"mean": mean.tolist(), "std": std.tolist()},
                       "healthy_range": {"low": low.tolist(), "high": high.tolist()},
                       "error_scale": error_scale.tolist(), **entry}, f, indent=2)
        outputs = loaded(**{f: tf.constant([r[f] for r in picks], dtype=tf.float32) for f in features})
        golden["versions"][str(version)] = {
            "threshold": threshold,
            "anomaly_score": outputs["anomaly_score"].numpy().tolist(),
            "hold_out": {"seed": 2002, "cars": 100, "seconds": 1800, "fault_share": 0.3, **metrics},
        }

    with open(os.path.join(MODEL_DIR, "evaluation.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(GOLDEN, "w") as f:
        json.dump(golden, f, indent=1)
    print("exported", ", ".join(f"{MODEL_DIR}/{v}" for v in VERSIONS))


if __name__ == "__main__":
    sys.exit(main())
