"""The default model outside the checkout: its spec ships in the package, `model fetch` puts it beside its weights in
MODEL_CACHE_DIR, and the default MODEL_URI points there (or start-up says how to get it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import MODEL_DIR, ROOT, SPEC_TEMPLATE

from service.errors import ConfigurationError
from service.models.fetch import default_model_dir, default_spec, validation_images
from service.settings import Settings, load_settings


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
