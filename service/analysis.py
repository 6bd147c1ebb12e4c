"""One image's analysis: decode once, classify the uploaded pixels, stamp, anonymize, encode both outputs.

Runs inside an inference worker, so the web process never spends CPU on pixels and each image is decoded
exactly once. The model is passed in as a plain function over a preprocessed batch; this module imports no
machine-learning framework.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service import imaging
from service.model_spec import ModelSpec, Prediction

CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "tiff": "image/tiff",
    "bmp": "image/bmp",
    "webp": "image/webp",
}

#: A compiled model call: float32 batch (n, height, width, channels) -> raw outputs (n, k).
PredictBatch = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class Analysis:
    """What a worker returns for one image: the prediction and both encoded outputs."""

    prediction: Prediction
    image_format: str
    stamped: bytes
    #: None when the anonymization policy did not ask for a copy.
    anonymized: bytes | None
    text_regions: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(self.image_format, "application/octet-stream")


@dataclass(frozen=True)
class AnalysisRequest:
    """One image to analyze: its encoded bytes (workers decode; arrays never cross the process boundary)."""

    data: bytes
    anonymize_always: bool


#: A batch's per-item outcome: the analysis, or the error that belongs to that item alone.
AnalysisOutcome = Analysis | Exception


@dataclass
class PredictedBatch:
    """A batch between the model and the finishing stage: each item's decoded image (or its error) and output."""

    requests: Sequence[AnalysisRequest]
    decoded: list[imaging.DecodedImage | Exception]
    raw_outputs: np.ndarray | None


def analyze_batch(
    requests: Sequence[AnalysisRequest], *, spec: ModelSpec, predict: PredictBatch, limits: ImageLimits
) -> list[AnalysisOutcome]:
    """Decode each image once, run the model once for the whole batch, then stamp, anonymize and encode each.

    A bad image fails only its own item (`UnprocessableObject` in its place); the others are analyzed.
    """
    return finish_batch(predict_batch(requests, spec=spec, predict=predict, limits=limits), spec=spec)


def predict_batch(
    requests: Sequence[AnalysisRequest], *, spec: ModelSpec, predict: PredictBatch, limits: ImageLimits
) -> PredictedBatch:
    """The first stage: decode and preprocess each image, then one model call for every decodable one.

    The batch goes to the model at its own size: both backends run one graph for any batch size (a `None`
    batch dimension), so padding to fixed sizes would only spend model time on zeros.
    """
    decoded: list[imaging.DecodedImage | Exception] = []
    tensors = []
    for request in requests:
        try:
            image = imaging.decode_image(request.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
            # Inference sees the uploaded pixels, before any stamping or blurring.
            tensors.append(spec.preprocess(imaging.to_model_input(image.pixels)))
            decoded.append(image)
        except Exception as error:
            decoded.append(error)
    if not tensors:
        return PredictedBatch(requests, decoded, None)
    try:
        raw_outputs = predict(np.stack(tensors))
    except Exception as error:
        # A failed model call fails the batch's images (answered 500, so redelivered), not the worker: a crash
        # would cost a model reload.
        return PredictedBatch(requests, [item if isinstance(item, Exception) else error for item in decoded], None)
    return PredictedBatch(requests, decoded, raw_outputs)


def finish_batch(batch: PredictedBatch, *, spec: ModelSpec) -> list[AnalysisOutcome]:
    """The second stage: interpret each output, then stamp, anonymize and encode each image."""
    raw_outputs = iter(batch.raw_outputs if batch.raw_outputs is not None else [])
    results: list[AnalysisOutcome] = []
    for request, image in zip(batch.requests, batch.decoded, strict=True):
        if not isinstance(image, imaging.DecodedImage):
            results.append(image)
            continue
        raw = next(raw_outputs)
        try:
            results.append(_finish(image, spec.interpret(raw), request.anonymize_always))
        except Exception as error:
            results.append(error)
    return results


def _finish(decoded: imaging.DecodedImage, prediction: Prediction, anonymize_always: bool) -> Analysis:
    # Text is searched on the original, so the stamp is never mistaken for patient text and blurred.
    regions = imaging.find_text_regions(decoded.pixels)
    stamped = imaging.stamp_label(decoded.pixels, prediction.stamp_text, avoid=regions)
    anonymized = None
    if anonymize_always or prediction.is_positive:
        anonymized = imaging.encode_image(imaging.blur_text_regions(stamped, regions), decoded.format)
    return Analysis(
        prediction=prediction,
        image_format=decoded.format,
        stamped=imaging.encode_image(stamped, decoded.format),
        anonymized=anonymized,
        text_regions=len(regions),
    )
