"""Exports a large dense Keras model (about 100 MB of float32 weights) as a SavedModel, so
the reload benchmark has a load heavy enough to disturb serving if it could.

Usage: export_large_model.py OUT_DIR   (writes OUT_DIR/1/)
"""

import os
import sys

import keras
import numpy as np

out = sys.argv[1]
keras.utils.set_random_seed(7)
layers = [keras.Input(shape=(18,), name="sensors")]
layers += [keras.layers.Dense(2048, activation="relu") for _ in range(6)]
layers += [keras.layers.Dense(18)]
model = keras.Sequential(layers)
model(np.zeros((1, 18), np.float32))
model.export(os.path.join(out, "1"), verbose=False)
print(f"exported {model.count_params()} parameters to {out}/1")
