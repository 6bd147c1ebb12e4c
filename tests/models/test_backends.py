"""Backends: the ONNX export of a Keras model gives the same risks, and the onnx backend needs no TensorFlow."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TEXT_OPTIONS, encode, xray_like

from service.engine.messages import ImageLimits
from service.engine.pool import InferenceEngine
from service.errors import ConfigurationError
from service.models.spec import ModelSpec


@pytest.fixture(scope="module")
def onnx_spec(tiny_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "model", "export", "--onnx", "--spec", str(tiny_spec), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "tiny-brightness.onnx.yaml"


def risks(spec_path: Path, images: list[bytes]) -> list[float]:
    engine = InferenceEngine(ModelSpec.load(spec_path), workers=1, threads_per_worker=1,
                             limits=ImageLimits(10**7, 10**7), deid_key=b"k" * 16, batch_max_size=4,
                             text=TEXT_OPTIONS)

    async def run() -> list[float]:
        await engine.start()
        try:
            analyses = await asyncio.gather(*(engine.analyze(image, anonymize_always=False) for image in images))
            return [analysis.prediction.risk for analysis in analyses]  # type: ignore[misc]
        finally:
            await engine.stop()

    return asyncio.run(run())


def test_exported_spec_matches_the_original(tiny_spec: Path, onnx_spec: Path) -> None:
    original, exported = ModelSpec.load(tiny_spec), ModelSpec.load(onnx_spec)
    assert exported.backend == "onnx" and exported.weights.suffix == ".onnx"
    assert exported.model_copy(update={"backend": "keras", "weights": original.weights}) == original


def test_onnx_and_keras_agree(tiny_spec: Path, onnx_spec: Path) -> None:
    images = [encode(xray_like(brightness, seed=brightness)) for brightness in (20, 90, 128, 160, 230)]
    keras_risks, onnx_risks = risks(tiny_spec, images), risks(onnx_spec, images)
    assert keras_risks == pytest.approx(onnx_risks, abs=1e-4)
    assert min(keras_risks) < 0.1 < 0.9 < max(keras_risks)  # the comparison spans the whole range


def test_onnx_backend_never_imports_tensorflow(onnx_spec: Path) -> None:
    probe = (
        "import sys\n"
        "from service.models.backends import load_predict\n"
        "from service.models.spec import ModelSpec\n"
        f"load_predict(ModelSpec.load({str(onnx_spec)!r}), 1)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorflow', 'keras'})\n"
        "print(leaked); sys.exit(1 if leaked else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_onnx_runs_a_large_batch_in_parts_in_order(onnx_spec: Path) -> None:
    """A batch above ONNX_IMAGES_PER_RUN runs in several calls (less activation memory); the outputs come back as
    one array, in the batch's order, as if the batch had run at once."""
    from service.models.backends import ONNX_IMAGES_PER_RUN, load_predict

    spec = ModelSpec.load(onnx_spec)
    predict = load_predict(spec, 1)
    size = 2 * ONNX_IMAGES_PER_RUN + 1  # two full parts and a remainder
    brightness = np.linspace(0, 1, size, dtype=np.float32)[:, None, None, None]
    batch = np.broadcast_to(brightness, (size, spec.input.height, spec.input.width, spec.input.channels)).copy()
    outputs = predict(batch)
    assert outputs.shape[0] == size
    one_at_a_time = np.concatenate([predict(batch[index:index + 1]) for index in range(size)])
    np.testing.assert_allclose(outputs, one_at_a_time, atol=1e-5)
    assert len(np.unique(outputs.round(4), axis=0)) > 1  # distinct images, so the order is checked


def test_onnx_session_keeps_no_arena_and_no_memory_pattern(onnx_spec: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both would keep activations' memory between calls (see service.models.backends)."""
    import onnxruntime

    from service.models.backends import load_predict

    made: list[onnxruntime.SessionOptions] = []
    real_session = onnxruntime.InferenceSession

    def recording(path: str, options: onnxruntime.SessionOptions, **kwargs: object) -> onnxruntime.InferenceSession:
        made.append(options)
        return real_session(path, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    load_predict(ModelSpec.load(onnx_spec), 2)
    [options] = made
    assert options.enable_cpu_mem_arena is False and options.enable_mem_pattern is False
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)


def test_keras_hands_back_tensorflows_start_up_pages_before_loading_the_model(tiny_spec: Path) -> None:
    """In a subprocess: TensorFlow stays out of this one."""
    probe = (
        "import keras, tensorflow as tf\n"
        "from pathlib import Path\n"
        "from service.models import backends\n"
        "from service.models.spec import ModelSpec\n"
        "calls = []\n"
        "real_load = keras.saving.load_model\n"
        "backends.release_clean_library_pages = lambda directory: calls.append(('release', directory)) or 0\n"
        "keras.saving.load_model = lambda *args, **kwargs: calls.append(('load', None)) or real_load(*args, **kwargs)\n"
        f"backends.load_predict(ModelSpec.load({str(tiny_spec)!r}), 1)\n"
        "assert calls == [('release', Path(tf.__file__).parent), ('load', None)], calls\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_model_backend_switches_to_the_exported_weights(tiny_spec: Path, onnx_spec: Path) -> None:
    keras_spec = ModelSpec.load(tiny_spec)
    switched = keras_spec.for_backend("onnx")
    assert switched.backend == "onnx" and switched.weights == ModelSpec.load(onnx_spec).weights
    assert keras_spec.for_backend(None) is keras_spec and keras_spec.for_backend("keras") is keras_spec


def test_model_backend_without_exported_weights_names_the_fix(tmp_path: Path, tiny_spec: Path) -> None:
    (tmp_path / "tiny.keras").write_bytes((tiny_spec.parent / "tiny.keras").read_bytes())
    (tmp_path / "tiny.yaml").write_text(tiny_spec.read_text())
    with pytest.raises(ConfigurationError, match=r"MODEL_BACKEND: onnx needs .*tiny\.onnx.*model export --onnx"):
        ModelSpec.load(tmp_path / "tiny.yaml").for_backend("onnx")


def test_missing_runtime_is_a_start_up_error_naming_the_extra(onnx_spec: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from service.models.backends import check_backend_installed

    spec = ModelSpec.load(onnx_spec)
    check_backend_installed(spec)  # installed here: no error
    real_find_spec = importlib.util.find_spec

    def without_onnxruntime(name: str, *args: object) -> object:
        return None if name == "onnxruntime" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_onnxruntime)
    with pytest.raises(ConfigurationError, match=r"pip install 'xray-pipeline\[onnx\]'"):
        check_backend_installed(spec)
