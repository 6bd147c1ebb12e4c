"""Model export: a Keras spec's model converted to ONNX, with a matching spec beside it.

`xray-pipeline model export --onnx` writes the `.onnx` file beside the `.keras` weights (where MODEL_BACKEND=onnx
looks for it) and `<name>.onnx.yaml`; the new spec differs only in backend and weights, so preprocessing and labels
stay identical. Uses Keras' own exporter (tf2onnx underneath).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from service.errors import ConfigurationError
from service.models.spec import BACKEND_SUFFIXES, ModelSpec


def export_onnx(spec_path: Path, out_dir: Path) -> Path:
    """Export and return the path of the new spec."""
    spec = ModelSpec.load(spec_path)
    if spec.backend != "keras":
        raise ConfigurationError(f"MODEL_URI: {spec_path} is already a {spec.backend} model")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.saving.load_model(spec.weights, compile=False)
    # Keras only exports a model whose input shapes are known from a call.
    model(np.zeros((1, spec.input.height, spec.input.width, spec.input.channels), np.float32))
    # Beside the Keras weights, so MODEL_BACKEND=onnx finds it from the original spec too.
    onnx_path = spec.weights.with_suffix(BACKEND_SUFFIXES["onnx"])
    model.export(str(onnx_path), format="onnx", verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    relative = Path(os.path.relpath(onnx_path, out_dir.resolve()))
    exported = spec.model_copy(update={"backend": "onnx", "weights": relative})
    spec_out = out_dir / f"{spec.name}.onnx.yaml"
    spec_out.write_text(
        f"# Exported from {spec_path.name} by `xray-pipeline model export --onnx`.\n"
        + yaml.safe_dump(exported.model_dump(mode="json"), sort_keys=False)
    )
    return spec_out
