"""The ImageNet classifier (model/imagenet/): its spec, and two real photos (scikit-image's cat and coffee cup) through
the service's own worker path and `xray-pipeline process`, which must put the right classes in the top 5.

Needs the model built by `make imagenet-model` (`make test` builds it first); without it these tests fail, saying so.
"""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TEST_PSEUDONYM_KEY, TEXT_OPTIONS

from model.imagenet.build import PHOTOS, SAMPLES_FOLDER, SPEC_TEMPLATE, WEIGHTS_NAME, imagenet_model_dir, imagenet_spec
from service.cli import main
from service.engine.messages import Analysis, ImageLimits
from service.engine.pool import InferenceEngine
from service.imaging.codec import decode_image
from service.models.source import resolve_model
from service.models.spec import ModelSpec
from service.outputs import output_metadata
from service.settings import ModelCacheSettings, Settings, load_settings
from service.storage import make_s3_client

#: ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)
#: coffee mug, espresso, cup.
COFFEE_CLASSES = (504, 967, 968)
CLASS_NAMES: list[str] = yaml.safe_load(SPEC_TEMPLATE.read_text(encoding="utf-8"))["output"]["class_names"]
CATS = {CLASS_NAMES[index] for index in CAT_CLASSES}
COFFEE = {CLASS_NAMES[index] for index in COFFEE_CLASSES}
#: Photo -> the classes one of which must be in its top 5.
EXPECTED = {"chelsea.png": CATS, "coffee.png": COFFEE}


def test_the_spec_describes_efficientnet_lite0_and_names_the_1000_imagenet_classes() -> None:
    spec = ModelSpec.parse(SPEC_TEMPLATE.read_text(encoding="utf-8"), source=str(SPEC_TEMPLATE))
    assert (spec.name, spec.version, spec.backend, spec.weights) == ("efficientnet-lite0", "0.1.0", "onnx",
                                                                     Path(WEIGHTS_NAME))
    assert (spec.input.width, spec.input.height, spec.input.color_mode) == (224, 224, "rgb")
    assert (spec.input.center_crop, spec.input.resize) == (0.875, "cubic")
    assert spec.input.scale_coefficients == pytest.approx((1 / 128, -127 / 128))  # (x - 127) / 128
    assert (spec.output.kind, spec.output.top_k, spec.output.positive_class) == ("logits", 5, None)
    names = spec.output.class_names
    assert len(names) == len(set(names)) == 1000
    # The indices this file's checks rely on are the classes they mean.
    assert {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"} == CATS
    assert {"coffee mug", "espresso", "cup"} == COFFEE
    # Names travel in S3 metadata (ASCII) as `name:probability` pairs joined by commas.
    assert all(name.isascii() and "," not in name and ":" not in name for name in names)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    folder = imagenet_model_dir(ModelCacheSettings().model_cache_dir)
    if not (folder / WEIGHTS_NAME).is_file():
        pytest.fail(f"the ImageNet model is not built in {folder}: run `make imagenet-model` (make test does)")
    return folder


def test_the_built_spec_is_served_through_model_uri_like_any_model(model_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_URI", str(imagenet_spec(ModelCacheSettings().model_cache_dir)))
    monkeypatch.delenv("MODEL_BACKEND", raising=False)
    spec = resolve_model(load_settings(Settings, dev_mode=True), make_s3_client)
    assert spec.backend == "onnx" and spec.weights == (model_dir / WEIGHTS_NAME).resolve()
    assert (model_dir / SPEC_TEMPLATE.name).read_bytes() == SPEC_TEMPLATE.read_bytes(), (
        "the built spec is an older copy: `make imagenet-model` refreshes it")


def analyze_in_a_worker(spec: ModelSpec, images: list[bytes]) -> list[Analysis]:
    """The images through a real spawned worker, together (one batch): decode, crop, resize, scale, ONNX Runtime,
    interpret, stamp, as the service does."""
    engine = InferenceEngine(spec, workers=1, threads_per_worker=1, limits=ImageLimits(10**8, 10**8),
                             deid_key=b"imagenet-test-key", batch_max_size=len(images), text=TEXT_OPTIONS)

    async def run() -> list[Analysis]:
        await engine.start()
        try:
            return list(await asyncio.gather(*(engine.analyze(image, anonymize_always=False) for image in images)))
        finally:
            await engine.stop()

    return asyncio.run(run())


def test_the_sample_photos_get_their_classes_in_the_top_5_through_a_worker(model_dir: Path) -> None:
    spec = ModelSpec.load(model_dir / SPEC_TEMPLATE.name)
    photos = {name: (model_dir / SAMPLES_FOLDER / name).read_bytes() for name in PHOTOS}
    analyses = dict(zip(photos, analyze_in_a_worker(spec, list(photos.values())), strict=True))
    for name, analysis in analyses.items():
        prediction = analysis.prediction
        top = [label for label, _ in prediction.top]
        assert len(top) == 5 and EXPECTED[name] & set(top), f"{name}: top 5 {prediction.top}"
        probabilities = [probability for _, probability in prediction.top]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-9
        # A multi-class model stamps its top class with its probability; its metadata carries the top 5.
        assert prediction.risk is None and not prediction.is_positive and prediction.label == top[0]
        assert prediction.stamp_text == f"{top[0]} {probabilities[0] * 100:.1f}%"
        assert output_metadata(analysis, spec, "etag")["top"].count(":") == 5
        # The stamped copy is the photo, same format and size; nothing asked for an anonymized one.
        original = decode_image(photos[name], max_bytes=10**8, max_pixels=10**8)
        stamped = decode_image(analysis.stamped, max_bytes=10**8, max_pixels=10**8)
        assert (stamped.format, stamped.pixels.shape) == ("png", original.pixels.shape)
        assert not np.array_equal(stamped.pixels, original.pixels)  # the label is drawn on it
        assert analysis.anonymized is None
    # The top class itself, as measured when the model was made (model/README.md): not a margin call for either.
    assert analyses["chelsea.png"].prediction.label in CATS
    assert analyses["coffee.png"].prediction.label == "espresso"


def test_process_labels_a_folder_of_photos_with_the_imagenet_model(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator tool, with MODEL_URI set as an operator sets it: no server, no bucket."""
    for name in ("DEV_MODE", "MODEL_SPEC", "MODEL_BACKEND", "ANONYMIZE_WHEN", "WORKERS", "BATCH_MAX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODEL_URI", str(model_dir / SPEC_TEMPLATE.name))
    monkeypatch.setenv("PSEUDONYM_KEY", TEST_PSEUDONYM_KEY)
    monkeypatch.setenv("WORKER_THREADS", "1")
    out = tmp_path / "out"
    assert main(["process", str(model_dir / SAMPLES_FOLDER), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text(encoding="utf-8"))))
    assert [row["status"] for row in rows] == ["processed", "processed"]
    assert sorted(row["label"] in CATS for row in rows) == [False, True]
    assert sorted(row["label"] in COFFEE for row in rows) == [False, True]
    assert sorted(path.name for path in (out / "processed").iterdir()) == ["chelsea-processed.png",
                                                                             "coffee-processed.png"]
