#!/usr/bin/env python3
"""TensorFlow's own latency on a SavedModel signature: the reference the engine is compared to.

Usage: tensorflow_reference.py SAVEDMODEL_DIR INPUT_NAME FEATURES OUT_JSON
Times `loaded.signatures["serving_default"](**inputs)` (eager, as a Python client of the
SavedModel calls it) for 1 and 64 rows, after warm-up, and writes mean microseconds.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def mean_us(fn, seconds=3.0):
    for _ in range(200):  # warm-up: tracing, allocator, caches
        fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            fn()
        calls += 100
    return (time.perf_counter() - started) / calls * 1e6


def main(model_dir, input_name, features, out_path):
    signature = tf.saved_model.load(model_dir).signatures["serving_default"]
    results = {"tensorflow_version": tf.__version__}
    for rows in (1, 64):
        x = tf.constant(np.random.default_rng(0).normal(size=(rows, int(features))).astype(np.float32))
        results[f"predict/{rows}"] = mean_us(lambda: signature(**{input_name: x}))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
