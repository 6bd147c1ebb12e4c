"""What the benchmark measures: each configuration is a model spec served on one backend, fed its own images.

`keras` and `onnx` are the default pneumonia model (`make model`) on each backend, fed its 16 validation X-rays;
`imagenet` is the ImageNet photo classifier (`make imagenet-model`, ONNX), fed its two sample photos. The model
alone and the service are measured the same way for each; only the spec, the backend and the images differ.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from model.imagenet.build import PHOTOS, SAMPLES_FOLDER, imagenet_model_dir, imagenet_spec, is_built
from service.models.fetch import default_model_dir, validation_images
from service.settings import ModelCacheSettings

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ModelCacheSettings().model_cache_dir
# Where `make model` put the default model: MODEL_CACHE_DIR, as the service reads it.
MODEL_DIR = default_model_dir(CACHE_DIR)
DEFAULT_SPEC = MODEL_DIR / "pneumonia.yaml"
VALIDATION_IMAGES = tuple(sorted(validation_images(CACHE_DIR).glob("*.jpeg")))


@dataclass(frozen=True)
class Configuration:
    """One row group of the table: a spec (MODEL_URI) on a backend (MODEL_BACKEND), and the images sent to it."""

    name: str
    backend: str
    spec: Path
    images: tuple[Path, ...]
    #: The configuration targets stated for the X-ray model apply to (the ImageNet model has none of its own).
    xray: bool

    def ensure_built(self) -> None:
        """Build what is missing (the ONNX export, the ImageNet model) or exit saying which make target does."""
        if self.name == "imagenet":
            ensure_imagenet_model()
            return
        if len(self.images) != 16:
            sys.exit("the default model is not fetched: run `make model`")
        if self.backend == "onnx":
            ensure_onnx_model()


CONFIGURATIONS = {
    "keras": Configuration("keras", "keras", DEFAULT_SPEC, VALIDATION_IMAGES, xray=True),
    "onnx": Configuration("onnx", "onnx", DEFAULT_SPEC, VALIDATION_IMAGES, xray=True),
    "imagenet": Configuration("imagenet", "onnx", imagenet_spec(CACHE_DIR),
                              tuple(imagenet_model_dir(CACHE_DIR) / SAMPLES_FOLDER / name for name in sorted(PHOTOS)),
                              xray=False),
}


def ensure_onnx_model() -> None:
    if not (MODEL_DIR / "pneumonia_xception.onnx").is_file():
        print("exporting the ONNX model (~30 s) ...", flush=True)
        # The generated spec goes into the ignored cache, next to the weights: nothing untracked in model/.
        subprocess.run([sys.executable, "-m", "service.cli", "model", "export", "--onnx", "--out", str(MODEL_DIR)],
                       cwd=ROOT, check=True, capture_output=True, timeout=600)


def ensure_imagenet_model() -> None:
    if is_built(imagenet_model_dir(CACHE_DIR)):
        return
    print("building the ImageNet model (`make imagenet-model`, ~40-50 s) ...", flush=True)
    built = subprocess.run([sys.executable, "-m", "model.imagenet.build"], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    if built.returncode != 0:
        sys.exit(f"the ImageNet model could not be built; `make imagenet-model` builds it:\n{built.stderr[-2000:]}")
