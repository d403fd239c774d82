#!/usr/bin/env python3
"""Train Vigil's car anomaly model on the device simulator's readings and export it.

Three versions of one model, for canary rollouts between them. Each is an autoencoder over
the 17 measured signals of a `SensorReading` (the firmware version is an identifier, not a
measurement, so it is not an input). Everything a caller needs travels inside the
SavedModel, so no service restates a constant:

- inputs: one float32 tensor per signal, named after the proto field (`coolant_temp`,
  ...): the signature itself is the feature list, and order cannot drift. Versions 1 and 2
  score one reading (shape [batch]); version 3 scores a window, the device's last
  `WINDOW` readings (shape [batch, WINDOW], oldest first), as the stream processor keeps
  them (docs/windowed-models.md);
- scaling: the training data's mean and standard deviation are constants in the graph, so
  the model takes raw readings; so is the healthy range the network's input is clipped to;
- outputs: `anomaly_score` (the reconstruction error of the worst input feature: each
  feature's absolute error in the scaled space, in units of that feature's 99.9th-percentile
  error on healthy readings, then the maximum over features) and `threshold` (the
  version's threshold, per row), so a caller decides `score > threshold` with the threshold
  of the version that answered. The maximum, not the mean: most faults show in one or two
  signals, and a mean over 17 lets the healthy rest dilute them;
- `assets.extra/vigil-model.json`: features, scaling, threshold policy and evaluation, for
  people and tools.

Version 3's features, computed in the graph from the window, are per signal: the newest
value; how many of the newest readings repeat its exact value, less the fewest any signal
repeats (a sensor stuck at a rail repeats one value, while a healthy signal's noise never
does for long; a window padded at a device's first reading repeats every signal alike,
which cancels); and the newest value's distance from the mean of the readings before it
(sudden jumps and fast trends). Then two kinds of context a car's physics gives: each
wheel's tyre pressure and accelerometer over the mean of the other three wheels' (a worn
shock absorber lets its wheel move four times as much as the others, at any speed, even
stopped), and the coolant's rise while the engine is warm (a thermostat holds a warm
engine's coolant in its band, so a climb there is a failed pump or fan, while every
healthy cold start climbs as fast). Two dense autoencoders, one over the newest values and
one over the rest (why two: `WindowedCarAnomaly`). The engine runs Conv1D too, but not
TensorFlow 2's `While`, so no Keras LSTM.

Data comes from the simulator itself (`device-simulator generate`): healthy cars for
training (seed 1001), a separate healthy validation fleet for the threshold (seed 1002),
and a labelled hold-out fleet with faults (seed 2002) for precision, recall and detection
per fault.

Or, with `--kafka-brokers`, training and validation come from a time range of a real
readings topic (`vigil export-readings` writes it in the simulator's format): readings
labelled with a fault are left out, the rest are taken as healthy (an autoencoder's
premise: faults are rare), and every fourth device is kept for validation. The hold-out
stays the simulator's labelled fleet, the only data with known faults.

Run from the repository root (TensorFlow from tests/fixtures/requirements.txt):

    python3 deploy/models/train_car_anomaly.py                # every version
    python3 deploy/models/train_car_anomaly.py --versions 3   # retrain v3, evaluate all
    python3 deploy/models/train_car_anomaly.py --versions 3 --model-dir /tmp/my-model \
        --kafka-brokers localhost:9092 --kafka-from 2026-12-01T00:00:00Z --kafka-to 2026-12-02T00:00:00Z

Writes deploy/models/car-anomaly/{1,2,3}/ (the versions retrained),
deploy/models/car-anomaly/evaluation.json (evaluation.md beside it is written by hand from
its figures) and tests/fixtures/car_anomaly_golden.json (readings, windows and
TensorFlow's scores, for the Rust parity tests). With `--model-dir` elsewhere, only that
directory's versions and evaluation.json: the goldens belong to the bundled model.
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

# Versions for canary rollouts: v2 has more capacity than v1; v3 scores windows.
VERSIONS = {
    1: {"hidden": (32, 10, 32), "threshold_quantile": 0.999, "epochs": 30},
    2: {"hidden": (64, 14, 64), "threshold_quantile": 0.999, "epochs": 30},
    # Two autoencoders: one over the newest reading (as v2), one over the window's other
    # features (docs in WindowedCarAnomaly); the second one narrow for the engine's cost
    # per reading: 64 wide took 7.3 us a row against 6.3, with the same hold-out recall
    # (0.993) and 1.5 false alarms per healthy car-hour against 1.8.
    3: {"hidden": (64, 14, 64), "window_hidden": (32, 12, 32), "threshold_quantile": 0.9995, "epochs": 30,
        "window": 10},
}

# Each feature's error is measured in units of this quantile of its healthy errors.
ERROR_SCALE_QUANTILE = 0.999

# Seconds between two readings of a car in the simulator's output.
READING_INTERVAL_S = 1.0


def simulate(binary, path, seed, cars, seconds, fault_share):
    args = [binary, "generate", "--out", path, "--seed", str(seed), "--cars", str(cars),
            "--seconds", str(seconds), "--fault-share", str(fault_share),
            "--fault-onset-min", "60", "--fault-onset-max", str(seconds * 2 // 3)]
    subprocess.run(args, check=True)
    return load_jsonl(path)


def load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def from_kafka(args, path):
    """Training and validation readings from a time range of the readings topic, exported
    by `vigil export-readings`: unlabelled or healthy-labelled readings, split by device
    (every fourth device, in name order, for validation)."""
    command = [args.vigil, "export-readings", "--kafka-brokers", args.kafka_brokers, "--topic", args.kafka_topic,
               "--from", args.kafka_from, "--to", args.kafka_to, "--out", path]
    for prop in args.kafka_property:
        command += ["-X", prop]
    subprocess.run(command, check=True)
    readings = [r for r in load_jsonl(path) if r.get("fault", "none") == "none"]
    devices = sorted({r["device_id"] for r in readings})
    if len(devices) < 4 or len(readings) < 10_000:
        sys.exit(f"{path}: {len(readings)} healthy readings of {len(devices)} devices; training needs at least "
                 "10,000 readings of 4 devices: widen --kafka-from/--kafka-to")
    held = set(devices[3::4])
    return [r for r in readings if r["device_id"] not in held], [r for r in readings if r["device_id"] in held]


def matrix(readings, features):
    return np.array([[r[f] for f in features] for r in readings], dtype=np.float32)


def by_car(readings):
    """Each car's reading indices, in time order."""
    cars = {}
    for i, r in enumerate(readings):
        cars.setdefault(r["device_id"], []).append(i)
    return {car: sorted(rows, key=lambda i: readings[i]["sequence"]) for car, rows in cars.items()}


def windows(readings, features, k):
    """[readings, k, features]: each reading's window, its car's last k readings, oldest
    first; a car's first readings are padded in front with its oldest (the stream
    processor's rule, services/stream-processor/src/windows.rs)."""
    x = matrix(readings, features)
    out = np.zeros((len(readings), k, len(features)), np.float32)
    for rows in by_car(readings).values():
        rows = np.array(rows)
        lags = np.clip(np.arange(len(rows))[:, None] + np.arange(-k + 1, 1)[None, :], 0, None)
        out[rows] = x[rows][lags]
    return out


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


# Signals measured once per wheel: a fault at one wheel shows against the other three.
WHEEL_GROUPS = ("tire_pressure_", "accelerometer_")
# The coolant signal, and the temperature above which an engine is warm: a thermostat holds
# a warm engine's coolant in its band, so coolant still climbing there means a failed pump
# or fan, while a cold engine's coolant climbs as fast on every healthy start.
COOLANT, WARM_C, WARM_SPAN_C = "coolant_temp", 80.0, 10.0


def wheel_groups(features):
    """The first and last index of the signals measured at each wheel, one pair per kind;
    the kinds' signals are neighbours in the reading, one kind after the other."""
    groups = []
    for prefix in WHEEL_GROUPS:
        indices = [i for i, f in enumerate(features) if f.startswith(prefix)]
        assert indices == list(range(indices[0], indices[-1] + 1)), f"{prefix}* signals are not neighbours"
        assert not groups or groups[-1][1] + 1 == indices[0], "the wheel signals are not one block"
        groups.append((indices[0], indices[-1]))
    return groups


def window_features(w, signal_std, features):
    """Version 3's features from windows [n, signals, k] of raw readings (oldest first):
    per signal the newest value, its repeat run (relative to the fewest repeats of any
    signal, over k), and its jump from the mean of the readings before it (in units of the
    signal's std); then per wheel signal its newest value over the mean of the other
    wheels' (a worn shock absorber moves its wheel four times as much as the others, at
    any speed), and the coolant's rise while the engine is warm.

    Written for the engine's costs, which are mostly per graph node, and high for
    reductions: the window is one matrix of a row per device and signal, its lags the
    columns, and the sums over lags are matrix products."""
    n_signals, k = w.shape[1], w.shape[2]
    assert k <= 17, "the repeat run's bit length is exact for windows of up to 17 readings"
    rows = tf.reshape(w, [-1, k])
    newest = rows[:, k - 1:k]
    # The newest value's difference from each earlier one: exact for close floats, where
    # the newest less the earlier ones' mean loses a slow signal's (a battery's charge)
    # digits.
    differences = newest - rows[:, : k - 1]
    # The repeat run: readings from the newest back that equal it, without a gap (the
    # newest equals itself: the run starts at 1). Each earlier reading that differs from
    # the newest is a bit, the one next to the newest the highest, so the run is 1 plus
    # the zero bits above the highest set one: k less the bits' length. A sign and a log
    # cost the engine far less than a comparison and a cumulative sum. The length is exact
    # for windows of up to 17 readings: the log stays 0.72 / 2^(k-1) or more from the next
    # integer, above float32's error.
    differs = tf.sign(tf.abs(differences))
    bits = tf.matmul(differs, tf.constant(2.0 ** np.arange(k - 1, dtype=np.float32)[:, None]))
    run = (k - 1.0) - tf.floor(tf.math.log(bits + 0.5) * (1.0 / np.log(2.0)))
    jump = tf.matmul(differences, tf.fill((k - 1, 1), 1.0 / (k - 1)))
    newest, run, jump = (tf.reshape(x, [-1, n_signals]) for x in (newest, run, jump))
    repeats = (run - tf.reduce_min(run, axis=1, keepdims=True)) / float(k)
    # Both kinds of wheel signal are neighbours in the reading: one block, each wheel's
    # value over the mean of its kind's other wheels (a block-diagonal product).
    groups = wheel_groups(features)
    first, last = groups[0][0], groups[-1][1]
    others = np.zeros((last - first + 1, last - first + 1), np.float32)
    for a, b in groups:
        others[a - first:b - first + 1, a - first:b - first + 1] = (1.0 - np.eye(b - a + 1)) / (b - a)
    wheels = newest[:, first:last + 1]
    balance = wheels / tf.maximum(tf.abs(tf.matmul(wheels, tf.constant(others))), 1e-3)
    c = features.index(COOLANT)
    warm = tf.minimum(tf.maximum((newest[:, c:c + 1] - WARM_C) / WARM_SPAN_C, 0.0), 1.0)
    rise = tf.maximum(jump[:, c:c + 1], 0.0) * warm
    return tf.concat([newest, repeats, jump / signal_std, balance, rise], axis=1)


def window_feature_count(features):
    return 3 * len(features) + sum(last - first + 1 for first, last in wheel_groups(features)) + 1


class WindowedCarAnomaly(tf.Module):
    """Windows of raw readings in ([batch, k] per signal), anomaly score and threshold out.

    Two autoencoders, so that neither reconstructs from the other's features: one over the
    newest reading's signals, one over the rest (repeats, jumps, wheel balance, coolant
    rise). Trained as one, the newest values were reconstructed from the jumps too; a
    device's first readings, whose padded window has no jumps, then looked like faults
    mid-drive (at the start of `vigil up`, every car's first readings). The score is the
    worst feature of either."""

    def __init__(self, features, k, signal_std, mean, std, low, high, error_scale, networks, threshold):
        super().__init__()
        self.features = features
        self.signal_std = tf.constant(signal_std, dtype=tf.float32)
        self.mean = tf.constant(mean, dtype=tf.float32)
        self.std = tf.constant(std, dtype=tf.float32)
        self.low = tf.constant((low - mean) / std, dtype=tf.float32)
        self.high = tf.constant((high - mean) / std, dtype=tf.float32)
        self.error_scale = tf.constant(error_scale, dtype=tf.float32)
        self.reading_network, self.window_network = networks
        self.threshold_value = tf.constant(threshold, dtype=tf.float32)
        spec = {f: tf.TensorSpec([None, k], tf.float32, name=f) for f in features}
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, readings):
        w = tf.stack([readings[f] for f in self.features], axis=1)
        scaled = (window_features(w, self.signal_std, self.features) - self.mean) / self.std
        clipped = tf.minimum(tf.maximum(scaled, self.low), self.high)
        n = len(self.features)
        reconstruction = tf.concat(
            [self.reading_network(clipped[:, :n]), self.window_network(clipped[:, n:])], axis=1)
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


def per_fault(readings, flagged):
    """Detection as an operator asks it (the same figures as `vigil up`'s summary,
    services/vigil/src/detection.rs): per fault kind, and over every faulty car, the cars
    caught out of the cars that had it and the seconds from onset (its first labelled
    reading) to the first flagged reading; and flagged readings on cars without any fault
    per hour of their driving. Alerts are the alerts service's rule over these scores, so
    they are judged in `vigil up`, not here."""
    kinds = {}
    healthy_cars, healthy_readings, false_alarms = 0, 0, 0
    for rows in by_car(readings).values():
        labels = [readings[i]["fault"] for i in rows]
        faulty = [t for t, label in enumerate(labels) if label != "none"]
        if not faulty:
            healthy_cars += 1
            healthy_readings += len(rows)
            false_alarms += int(sum(flagged[i] for i in rows))
            continue
        onset = faulty[0]
        entry = kinds.setdefault(labels[onset], {"cars": 0, "caught": 0, "delays": []})
        entry["cars"] += 1
        hits = [t for t in faulty if flagged[rows[t]]]
        if hits:
            entry["caught"] += 1
            entry["delays"].append((hits[0] - onset) * READING_INTERVAL_S)

    def detection(entries):
        delays = [d for entry in entries for d in entry["delays"]]
        quantile = lambda q: float(np.quantile(delays, q, method="inverted_cdf")) if delays else None  # noqa: E731
        return {"cars": sum(e["cars"] for e in entries), "caught": sum(e["caught"] for e in entries),
                "onset_to_anomaly_p50_s": quantile(0.5), "onset_to_anomaly_p90_s": quantile(0.9)}

    table = {kind: detection([kinds[kind]]) for kind in sorted(kinds)}
    hours = healthy_readings * READING_INTERVAL_S / 3600
    return {"by_fault": table, "all_faults": detection(list(kinds.values())),
            "healthy_cars": healthy_cars, "healthy_car_hours": hours,
            "false_alarms": false_alarms, "false_alarms_per_healthy_car_hour": false_alarms / hours if hours else None}


def inputs_of(features, x):
    """The signature's keyword inputs for readings (x: [n, features]) or windows
    (x: [n, k, features])."""
    if x.ndim == 2:
        return {f: tf.constant(x[:, i]) for i, f in enumerate(features)}
    return {f: tf.constant(x[:, :, i]) for i, f in enumerate(features)}


def train_version(version, params, features, data, path):
    """Trains and exports one version; its metadata entry."""
    x_train, x_val = data["train"], data["validation"]
    window = params.get("window")
    if window:
        w_train, w_val = data["windows"][window]["train"], data["windows"][window]["validation"]
        signal_std = np.maximum(x_train.std(axis=0), 1e-3).astype(np.float32)
        f_train = window_features(tf.constant(np.swapaxes(w_train, 1, 2)), signal_std, features).numpy()
        f_val = window_features(tf.constant(np.swapaxes(w_val, 1, 2)), signal_std, features).numpy()
    else:
        f_train, f_val, w_val = x_train, x_val, x_val
    mean = f_train.mean(axis=0)
    std = np.maximum(f_train.std(axis=0), 1e-3)
    low, high = f_train.min(axis=0), f_train.max(axis=0)
    s_train = (f_train - mean) / std
    # Feature groups and their networks: the reading's signals (all of a one-reading
    # version's features), and for a windowed version its repeat and jump features.
    n = len(features)
    groups = [(slice(0, n), params["hidden"])]
    if window:
        groups.append((slice(n, window_feature_count(features)), params["window_hidden"]))
    networks = []
    for part, hidden in groups:
        network = build_network(part.stop - part.start, hidden, seed=version)
        network.compile(optimizer=keras.optimizers.Adam(2e-3), loss="mse")
        network.fit(s_train[:, part], s_train[:, part], epochs=params["epochs"], batch_size=512, shuffle=True,
                    verbose=0)
        networks.append(network)

    def reconstruct(clipped):
        return np.concatenate([network.predict(clipped[:, part], verbose=0, batch_size=4096)
                               for network, (part, _) in zip(networks, groups)], axis=1)

    # Healthy validation fleet: its first half sets each feature's error scale (the
    # network sees the clipped features, as in serving), its second half the threshold.
    half = len(f_val) // 2
    s_val = (f_val[:half] - mean) / std
    s_clipped = np.clip(s_val, (low - mean) / std, (high - mean) / std)
    errors = np.abs(reconstruct(s_clipped) - s_val)
    error_scale = np.maximum(np.quantile(errors, ERROR_SCALE_QUANTILE, axis=0), 1e-3)

    def module(threshold):
        if window:
            return WindowedCarAnomaly(features, window, signal_std, mean, std, low, high, error_scale, networks,
                                      threshold)
        return CarAnomaly(features, mean, std, low, high, error_scale, networks[0], threshold)

    probe = module(0.0)
    val_scores = probe.serve(inputs_of(features, w_val[half:]))["anomaly_score"].numpy()
    threshold = float(np.quantile(val_scores, params["threshold_quantile"]))
    exported = module(threshold)
    tf.saved_model.save(exported, path, signatures={"serving_default": exported.serve})
    meta = {"model": "car-anomaly", "version": version, "features": features,
            "network_inputs": ("per signal: newest value, repeat run, jump; per wheel signal: over the other "
                               "wheels; coolant rise while warm" if window else "the reading's signals"),
            "scaling": {"mean": mean.tolist(), "std": std.tolist()},
            "healthy_range": {"low": low.tolist(), "high": high.tolist()},
            "error_scale": error_scale.tolist(),
            "hidden_layers": list(params["hidden"]), "epochs": params["epochs"],
            "threshold_policy": f"{params['threshold_quantile']} quantile of healthy validation scores",
            "threshold": threshold}
    if window:
        meta["window"] = window
        meta["window_hidden_layers"] = list(params["window_hidden"])
        meta["signal_std"] = signal_std.tolist()
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--simulator", default=os.path.join(ROOT, "target", "debug", "device-simulator"))
    parser.add_argument("--work", default="/tmp/vigil-car-anomaly")
    parser.add_argument("--versions", default=",".join(str(v) for v in VERSIONS),
                        help="versions to train and export (the others are only evaluated), e.g. 3")
    parser.add_argument("--model-dir", default=MODEL_DIR,
                        help="where the versions are (and retrained ones go) [the bundled model]")
    kafka = parser.add_argument_group("training data from Kafka (instead of the simulator's healthy fleets)")
    kafka.add_argument("--kafka-brokers", help="bootstrap servers of the cluster with the readings topic")
    kafka.add_argument("--kafka-topic", default="vigil-readings")
    kafka.add_argument("--kafka-from",
                       help="the range's start: RFC 3339, or relative to now after = (--kafka-from=-6h)")
    kafka.add_argument("--kafka-to", default="now", help="the range's end, exclusive, as --kafka-from [now]")
    kafka.add_argument("--kafka-property", action="append", default=[], metavar="KEY=VALUE",
                       help="a librdkafka property (security.protocol, sasl.*, ssl.*), repeatable")
    kafka.add_argument("--vigil", default=os.path.join(ROOT, "target", "debug", "vigil"),
                       help="the vigil binary whose export-readings reads the topic")
    args = parser.parse_args()
    if args.kafka_brokers and not args.kafka_from:
        parser.error("--kafka-brokers needs --kafka-from")
    model_dir = os.path.abspath(args.model_dir)
    bundled = model_dir == MODEL_DIR
    retrain = {int(v) for v in args.versions.split(",") if v}
    binaries = [(args.simulator, "device-simulator")] + ([(args.vigil, "vigil")] if args.kafka_brokers else [])
    for binary, package in binaries:
        if not os.path.exists(binary):
            subprocess.run(["cargo", "build", "-q", "-p", package], cwd=ROOT, check=True)
    os.makedirs(args.work, exist_ok=True)
    w = lambda name: os.path.join(args.work, name)  # noqa: E731

    if args.kafka_brokers:
        train, validation = from_kafka(args, w("kafka.jsonl"))
    else:
        train = simulate(args.simulator, w("train.jsonl"), 1001, 200, 1800, 0.0)
        validation = simulate(args.simulator, w("validation.jsonl"), 1002, 60, 1800, 0.0)
    holdout = simulate(args.simulator, w("holdout.jsonl"), 2002, 100, 1800, 0.3)
    features = [k for k in train[0] if k not in NOT_FEATURES]
    faulty = np.array([r["fault"] != "none" for r in holdout])
    data = {"train": matrix(train, features), "validation": matrix(validation, features),
            "holdout": matrix(holdout, features), "windows": {}}
    for params in VERSIONS.values():
        k = params.get("window")
        if k and k not in data["windows"]:
            data["windows"][k] = {name: windows(rows, features, k)
                                  for name, rows in [("train", train), ("validation", validation), ("holdout", holdout)]}
    print(f"{len(train)} training, {len(validation)} validation, {len(holdout)} hold-out readings "
          f"({faulty.mean():.1%} faulty); features: {', '.join(features)}")

    # A few hold-out readings of every kind, for the per-reading versions' parity test;
    # for windowed versions, a stretch of consecutive readings of one car of every kind
    # around its onset (windows are built over the stretch alone, so its first readings
    # are padded as a device's first readings are).
    picks = []
    for kind in sorted({r["fault"] for r in holdout}):
        picks += [r for r in holdout if r["fault"] == kind][:4]
    stretches, kinds_seen = [], set()
    for rows in by_car(holdout).values():
        labels = [holdout[i]["fault"] for i in rows]
        kind = next((label for label in labels if label != "none"), "none")
        if kind in kinds_seen:
            continue
        kinds_seen.add(kind)
        onset = labels.index(kind) if kind != "none" else 100
        stretches.append([holdout[i] for i in rows[max(onset - 12, 0):onset + 12]])
    golden = {"model": "car-anomaly", "readings": picks, "sequences": stretches, "versions": {}}
    report = {"features": features, "versions": {}}

    for version, params in VERSIONS.items():
        path = os.path.join(model_dir, str(version))
        if version not in retrain and not os.path.exists(path):
            continue
        if version in retrain:
            shutil.rmtree(path, ignore_errors=True)
            meta = train_version(version, params, features, data, path)
        else:
            with open(os.path.join(path, "assets.extra", "vigil-model.json")) as f:
                meta = json.load(f)
        # Evaluate the export as TF Serving would run it: reload and call the signature.
        loaded = tf.saved_model.load(path).signatures["serving_default"]
        k = params.get("window")
        x_hold = data["windows"][k]["holdout"] if k else data["holdout"]
        scores = np.concatenate([
            loaded(**inputs_of(features, x_hold[i:i + 65536]))["anomaly_score"].numpy()
            for i in range(0, len(x_hold), 65536)])
        threshold = meta["threshold"]
        metrics = precision_recall(scores, threshold, faulty)
        by_kind = {}
        for kind in sorted({r["fault"] for r in holdout} - {"none"}):
            rows = np.array([r["fault"] == kind for r in holdout])
            by_kind[kind] = float(np.mean(scores[rows] > threshold))
        detection = per_fault(holdout, scores > threshold)
        for key in ("network_inputs", "window"):
            if key in meta:
                metrics[key] = meta[key]
        entry = {key: meta[key] for key in ("hidden_layers", "epochs", "threshold_policy", "threshold")}
        entry.update({**metrics, "recall_by_fault": by_kind, "per_fault": detection})
        report["versions"][str(version)] = entry
        print(f"v{version}: threshold {threshold:.4f} precision {metrics['precision']:.4f} "
              f"recall {metrics['recall']:.4f} by fault {json.dumps(by_kind)}")
        print(f"v{version} per fault: {json.dumps(detection)}")
        meta.update(entry)
        os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
        with open(os.path.join(path, "assets.extra", "vigil-model.json"), "w") as f:
            json.dump(meta, f, indent=2)

        hold_out = {"seed": 2002, "cars": 100, "seconds": 1800, "fault_share": 0.3, **metrics}
        if k:
            sequence_scores = []
            for stretch in stretches:
                x = windows(stretch, features, k)
                sequence_scores.append(loaded(**inputs_of(features, x))["anomaly_score"].numpy().tolist())
            golden["versions"][str(version)] = {"threshold": threshold, "window": k,
                                                "sequence_scores": sequence_scores, "hold_out": hold_out}
        else:
            outputs = loaded(**{f: tf.constant([r[f] for r in picks], dtype=tf.float32) for f in features})
            golden["versions"][str(version)] = {"threshold": threshold,
                                                "anomaly_score": outputs["anomaly_score"].numpy().tolist(),
                                                "hold_out": hold_out}

    report["training_data"] = (f"{args.kafka_topic} from {args.kafka_from} to {args.kafka_to}"
                               if args.kafka_brokers else "simulated healthy fleets (seeds 1001, 1002)")
    with open(os.path.join(model_dir, "evaluation.json"), "w") as f:
        json.dump(report, f, indent=2)
    if bundled:
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1)
    print("exported", ", ".join(f"{model_dir}/{v}" for v in sorted(retrain)))


if __name__ == "__main__":
    sys.exit(main())
