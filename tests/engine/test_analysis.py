"""One batch's analysis: decode once, one model call at the batch's own size, per-item errors, both outputs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import BINARY, encode, shared_text_detector, write_spec, xray_like

from service.engine.analysis import analyze_batch, finish_batch, predict_batch
from service.engine.messages import Analysis, AnalysisRequest, ImageLimits
from service.errors import UnprocessableObject
from service.imaging.codec import decode_image
from service.imaging.detection import ProposedText, TextDetector, TextFindings
from service.models.spec import ModelSpec

LIMITS = ImageLimits(max_bytes=10**7, max_pixels=10**7)


@pytest.fixture
def spec(tmp_path: Path) -> ModelSpec:
    return ModelSpec.load(write_spec(tmp_path, BINARY))


class BrightnessModel:
    """A stand-in for the compiled model call (not for any real service part): logits from mean brightness."""

    def __init__(self) -> None:
        self.batch_shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batch_shapes.append(batch.shape)
        brightness = batch.mean(axis=(1, 2, 3))  # -1 (black) .. 1 (white)
        return np.stack([-4 * brightness, 4 * brightness], axis=1)


def test_the_model_sees_the_batch_at_its_own_size_without_padding(spec: ModelSpec) -> None:
    model = BrightnessModel()
    requests = [AnalysisRequest(encode(xray_like(level)), anonymize_always=False) for level in (230, 20, 230)]
    outcomes = analyze_batch(requests, spec=spec, predict=model, limits=LIMITS,
                             detector=shared_text_detector())
    assert model.batch_shapes == [(3, 150, 150, 3)]
    assert [outcome.prediction.label for outcome in outcomes if isinstance(outcome, Analysis)] == [
        "Pneumonia", "Normal", "Pneumonia"
    ]


def test_a_bad_image_fails_alone_and_is_never_sent_to_the_model(spec: ModelSpec) -> None:
    model = BrightnessModel()
    requests = [
        AnalysisRequest(b"not an image", anonymize_always=True),
        AnalysisRequest(encode(xray_like(230)), anonymize_always=True),
    ]
    bad, good = analyze_batch(requests, spec=spec, predict=model, limits=LIMITS,
                             detector=shared_text_detector())
    assert isinstance(bad, UnprocessableObject) and bad.reason == "not-an-image"
    assert isinstance(good, Analysis) and good.anonymized is not None
    assert model.batch_shapes == [(1, 150, 150, 3)]


def test_a_batch_of_only_bad_images_never_calls_the_model(spec: ModelSpec) -> None:
    model = BrightnessModel()
    outcomes = analyze_batch([AnalysisRequest(b"", anonymize_always=False)], spec=spec, predict=model, limits=LIMITS,
                             detector=shared_text_detector())
    assert isinstance(outcomes[0], UnprocessableObject)
    assert model.batch_shapes == []


def test_a_failing_model_call_fails_its_images_but_keeps_their_own_errors(spec: ModelSpec) -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("model exploded")

    requests = [AnalysisRequest(b"not an image", anonymize_always=False),
                AnalysisRequest(encode(xray_like(230)), anonymize_always=False)]
    bad, failed = finish_batch(predict_batch(requests, spec=spec, predict=broken, limits=LIMITS), spec=spec,
                                 detector=shared_text_detector())
    assert isinstance(bad, UnprocessableObject)
    assert isinstance(failed, RuntimeError) and "exploded" in str(failed)


class RecordingExecutor(ThreadPoolExecutor):
    """A one-thread executor that keeps the futures it hands out."""

    def __init__(self) -> None:
        super().__init__(1)
        self.futures: list[Future[Any]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.futures.append(super().submit(fn, *args, **kwargs))
        return self.futures[-1]


def test_text_is_searched_beside_the_model_and_gives_the_same_outputs(spec: ModelSpec) -> None:
    """With an executor for the text search, each decoded image's search runs while the model does (the model
    here waits for them: were they waiting for the model, they would never finish), and the outputs are those of
    searching after the model."""
    detector = shared_text_detector()
    requests = [AnalysisRequest(encode(xray_like(level)), anonymize_always=True) for level in (230, 20)]
    model = BrightnessModel()
    searched_first: list[bool] = []

    with RecordingExecutor() as executor:

        def model_waiting_for_the_searches(batch: np.ndarray) -> np.ndarray:
            deadline = time.monotonic() + 60
            while not all(search.done() for search in executor.futures) and time.monotonic() < deadline:
                time.sleep(0.01)
            searched_first.append(all(search.done() for search in executor.futures))
            return model(batch)

        predicted = predict_batch(requests, spec=spec, predict=model_waiting_for_the_searches, limits=LIMITS,
                                  text_search=(detector, executor))
        beside = finish_batch(predicted, spec=spec, detector=detector)
    after = analyze_batch(requests, spec=spec, predict=BrightnessModel(), limits=LIMITS, detector=detector)
    assert len(executor.futures) == 2 and searched_first == [True]
    for together, alone in zip(beside, after, strict=True):
        assert isinstance(together, Analysis) and isinstance(alone, Analysis)
        assert (together.stamped, together.anonymized, together.prediction) == (
            alone.stamped, alone.anonymized, alone.prediction)
        assert together.timings["detect"] > 0


def test_a_failed_model_call_cancels_the_text_searches_not_yet_started(spec: ModelSpec) -> None:
    """The batch's images are answered with the model's error, so their text searches would be wasted CPU: those
    still queued are cancelled."""
    requests = [AnalysisRequest(encode(xray_like(level)), anonymize_always=True) for level in (230, 20)]
    busy = threading.Event()

    def failing_model(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("the model failed")

    with RecordingExecutor() as executor:
        executor.submit(busy.wait, 60)  # holds the one thread, so neither search can start
        try:
            predicted = predict_batch(requests, spec=spec, predict=failing_model, limits=LIMITS,
                                      text_search=(shared_text_detector(), executor))
        finally:
            busy.set()
    assert len(executor.futures) == 3
    assert all(search.cancelled() for search in executor.futures[1:])
    assert all(isinstance(item, RuntimeError) for item in predicted.decoded)


def test_gray_uploads_stay_gray_and_positive_ones_get_an_anonymized_copy(spec: ModelSpec) -> None:
    requests = [AnalysisRequest(encode(xray_like(230)), anonymize_always=False),
                AnalysisRequest(encode(xray_like(20)), anonymize_always=False)]
    positive, negative = analyze_batch(requests, spec=spec, predict=BrightnessModel(), limits=LIMITS,
                             detector=shared_text_detector())
    assert isinstance(positive, Analysis) and isinstance(negative, Analysis)
    assert positive.anonymized is not None and negative.anonymized is None  # ANONYMIZE_WHEN=positive
    stamped = decode_image(positive.stamped, max_bytes=10**7, max_pixels=10**7)
    assert stamped.format == positive.image_format and stamped.pixels.ndim == 2


class CountingDetector:
    """The real text cascade, counting how often its expensive parts run: the detector and recognizer over every
    proposal (`verify`), the detector over one of the stamp's places (`finds_text`)."""

    def __init__(self, detector: TextDetector) -> None:
        self.detector = detector
        self.verified = self.looked = 0

    def find(self, pixels: np.ndarray) -> TextFindings:
        return self.verify(pixels, self.propose(pixels))

    def propose(self, pixels: np.ndarray) -> ProposedText:
        return self.detector.propose(pixels)

    def verify(self, pixels: np.ndarray, proposed: ProposedText) -> TextFindings:
        self.verified += 1
        return self.detector.verify(pixels, proposed)

    def finds_text(self, pixels: np.ndarray, proposed: ProposedText, box: tuple[int, int, int, int]) -> bool:
        self.looked += 1
        return self.detector.finds_text(pixels, proposed, box)


def with_a_name_where_the_stamp_goes(brightness: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """An X-ray-like image with a name burned into its bottom-left corner (the stamp's first choice); and its box."""
    pixels = xray_like(brightness)
    cv2.putText(pixels, "DOE JOHN 1961", (12, 455), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255 - brightness, 2)
    return pixels, (8, 430, 200, 35)


@pytest.mark.parametrize("beside_the_model", [True, False], ids=["beside the model", "after it"])
def test_only_images_that_get_an_anonymized_copy_have_their_proposals_verified(
    spec: ModelSpec, beside_the_model: bool
) -> None:
    """With ANONYMIZE_WHEN=positive, a negative image needs its text only to keep the stamp off it: the line search's
    proposals do that, and the detector and recognizer never run for it. A positive image's outputs are those of
    ANONYMIZE_WHEN=always."""
    (positive, box), (negative, _) = with_a_name_where_the_stamp_goes(230), with_a_name_where_the_stamp_goes(20)
    requests = [AnalysisRequest(encode(pixels), anonymize_always=False) for pixels in (positive, negative)]
    detector = CountingDetector(shared_text_detector())
    with RecordingExecutor() as executor:
        predicted = predict_batch(requests, spec=spec, predict=BrightnessModel(), limits=LIMITS,
                                  text_search=(detector, executor) if beside_the_model else None)  # type: ignore[arg-type]
        positive_out, negative_out = finish_batch(predicted, spec=spec, detector=detector)  # type: ignore[arg-type]
    # The negative's proposals left its stamp places free of them: no closer look was needed either.
    assert (detector.verified, detector.looked) == (1, 0)
    assert isinstance(positive_out, Analysis) and isinstance(negative_out, Analysis)
    assert negative_out.anonymized is None and negative_out.text_regions == 0 and negative_out.timings["detect"] > 0
    always = analyze_batch([AnalysisRequest(requests[0].data, anonymize_always=True)], spec=spec,
                           predict=BrightnessModel(), limits=LIMITS, detector=shared_text_detector())[0]
    assert isinstance(always, Analysis)
    assert (positive_out.stamped, positive_out.anonymized) == (always.stamped, always.anonymized)
    assert positive_out.text_regions >= 1
    # The negative's stamp went elsewhere: the name's corner is as it was, within the noise of one more JPEG pass
    # (at most ~20 levels at the strokes' edges; the label's white letters on its black box differ by ~200).
    stamped = decode_image(negative_out.stamped, max_bytes=10**7, max_pixels=10**7).pixels
    x, y, width, height = box
    original = decode_image(requests[1].data, max_bytes=10**7, max_pixels=10**7).pixels
    difference = np.abs(stamped[y : y + height, x : x + width].astype(int) - original[y : y + height, x : x + width])
    assert difference.max() < 60
