"""Builds a tiny Keras classifier and its spec in seconds, for tests: `python tests/tiny_model.py OUT_DIR`.

Its risk is a fixed function of brightness (global average pooling, then a dense layer with set weights), so
tests can choose the outcome: a bright image is positive (risk near 1), a dark one negative (risk near 0).
Run as a subprocess so the test process never imports TensorFlow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SPEC = """\
name: tiny-brightness
version: "1"
backend: keras
weights: tiny.keras
input: {width: 32, height: 32, color_mode: rgb, resize: area, scale: x/127.5-1}
output: {kind: logits, class_names: [NORMAL, PNEUMONIA], positive_class: PNEUMONIA, top_k: 2}
labels: {positive: Pneumonia, negative: Normal, uncertain: Unsure, positive_threshold: 0.8, negative_threshold: 0.6}
"""


def build(out_dir: Path) -> Path:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    inputs = keras.Input(shape=(32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(2)(pooled)
    model = keras.Model(inputs, outputs)
    # logit(PNEUMONIA) - logit(NORMAL) = 3 * (sum of channel means), each mean in [-1, 1].
    model.layers[-1].set_weights([np.array([[0.0, 3.0]] * 3, np.float32), np.zeros(2, np.float32)])
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "tiny.keras")
    spec_path = out_dir / "tiny.yaml"
    spec_path.write_text(SPEC)
    return spec_path


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
