"""Model backends behind one interface: load a spec's weights into a compiled batch call.

`keras` runs the `.keras` file with TensorFlow (a `tf.function` with a fixed input signature); `onnx` runs an
exported `.onnx` file with ONNX Runtime and never imports TensorFlow. Both are imported lazily, inside workers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ConfigurationError
from service.models.library_pages import release_clean_library_pages
from service.models.spec import ModelSpec

if TYPE_CHECKING:
    import numpy as np

#: A compiled model call: float32 batch (n, height, width, channels) -> raw outputs (n, k).
PredictBatch = Callable[["np.ndarray"], "np.ndarray"]

_RUNTIMES = {"keras": ("tensorflow", "keras"), "onnx": ("onnxruntime", "onnx")}
#: ONNX Runtime runs a batch this many images at a time. Its activations grow with the batch (~70 MB at 8 for the
#: default Xception at 150 px, ~30 at 4), its CPU per image does not: 4 at a time cost no more CPU than 8 (44-47 ms
#: per image against 47-50, medians of alternating runs), and keep enough work per call for its threads.
ONNX_IMAGES_PER_RUN = 4


def check_backend_installed(spec: ModelSpec) -> None:
    """Fail at start-up, in the web process and without importing it, when the backend's runtime is missing."""
    module, extra = _RUNTIMES[spec.backend]
    if importlib.util.find_spec(module) is None:
        raise ConfigurationError(
            f"MODEL_URI: the {spec.backend} backend needs {module}: pip install 'xray-pipeline[{extra}]'"
        )


def load_predict(spec: ModelSpec, threads: int) -> PredictBatch:
    """Load the model once and warm it; returns the batch call (float32 NHWC in, raw outputs out)."""
    import numpy as np  # here, not above: the web process imports this module, and only workers need numpy

    loaders = {"keras": _load_keras, "onnx": _load_onnx}
    predict = loaders[spec.backend](spec, threads)
    predict(np.zeros((1, spec.input.height, spec.input.width, spec.input.channels), np.float32))
    return predict


def _load_keras(spec: ModelSpec, threads: int) -> PredictBatch:
    import tensorflow as tf

    # Threads must be set before TensorFlow runs anything; workers x threads should not exceed the cores.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    import numpy as np

    # Before the model loads, so that the worker's peak is not the import's pages plus the model.
    release_clean_library_pages(Path(tf.__file__).parent)
    model = keras.saving.load_model(spec.weights, compile=False)
    signature = tf.TensorSpec([None, spec.input.height, spec.input.width, spec.input.channels], tf.float32)
    # One trace for every batch size: a compiled graph instead of an eager call per request.
    # No Python control flow to convert: autograph off (it would also litter /tmp with generated files).
    compiled = tf.function(
        lambda batch: model(batch, training=False), input_signature=[signature], autograph=False
    )

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.asarray(compiled(tf.constant(batch, dtype=tf.float32)))

    return predict


def _load_onnx(spec: ModelSpec, threads: int) -> PredictBatch:
    import numpy as np
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle pool threads block instead of spinning: the worker's imaging thread and the web process share
    # these cores, and spinning would bill them CPU for waiting.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Without the arena, a batch's activations go back to the system after the call instead of being kept at
    # the largest batch's size: about 70 MB less at peak and 140 MB less at rest for Xception, at no measurable
    # cost in speed.
    options.enable_cpu_mem_arena = False
    # Without the arena, a memory pattern is one allocation of the whole run's activations, page-faulted afresh on
    # every call: without it, the same peak less ~20 MB, and 3-5 % less CPU per image (measured at batch 4 and 8).
    options.enable_mem_pattern = False
    session = onnxruntime.InferenceSession(str(spec.weights), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: images.astype(np.float32, copy=False)})[0])

    def predict(batch: np.ndarray) -> np.ndarray:
        if len(batch) <= ONNX_IMAGES_PER_RUN:
            return run(batch)
        return np.concatenate([run(batch[start:start + ONNX_IMAGES_PER_RUN])
                               for start in range(0, len(batch), ONNX_IMAGES_PER_RUN)])

    return predict
