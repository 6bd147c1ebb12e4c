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


def analyze_batch(
    requests: Sequence[AnalysisRequest], *, spec: ModelSpec, predict: PredictBatch, limits: ImageLimits
) -> list[AnalysisOutcome]:
    """Decode each image once, run the model once for the whole batch, then stamp, anonymize and encode each.

    A bad image fails only its own item (`UnprocessableObject` in its place); the others are analyzed.
    """
    outcomes: list[AnalysisOutcome | imaging.DecodedImage] = []
    tensors = []
    for request in requests:
        try:
            decoded = imaging.decode_image(request.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
            # Inference sees the uploaded pixels, before any stamping or blurring.
            tensors.append(spec.preprocess(imaging.to_bgr8(decoded.pixels)))
            outcomes.append(decoded)
        except Exception as error:
            outcomes.append(error)
    raw_outputs = iter(predict(_padded(np.stack(tensors)))[: len(tensors)] if tensors else [])
    results: list[AnalysisOutcome] = []
    for request, outcome in zip(requests, outcomes, strict=True):
        if not isinstance(outcome, imaging.DecodedImage):
            results.append(outcome)
            continue
        raw = next(raw_outputs)
        try:
            results.append(_finish(outcome, spec.interpret(raw), request.anonymize_always))
        except Exception as error:
            results.append(error)
    return results


def _padded(batch: np.ndarray) -> np.ndarray:
    """Pad the batch to the next power of two so a few compiled shapes serve every batch size."""
    size = len(batch)
    target = 1 << (size - 1).bit_length()
    if target == size:
        return batch
    padding = np.zeros((target - size, *batch.shape[1:]), batch.dtype)
    return np.concatenate([batch, padding])


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
