"""One image's analysis: decode once, classify the uploaded pixels, stamp, anonymize, encode both outputs.

Runs inside an inference worker, so the web process never spends CPU on pixels and each image is decoded
exactly once. The model is passed in as a plain function over a preprocessed batch; this module imports no
machine-learning framework.
"""

from __future__ import annotations

from collections.abc import Callable
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


def analyze_image(
    data: bytes, *, spec: ModelSpec, predict: PredictBatch, limits: ImageLimits, anonymize_always: bool
) -> Analysis:
    """Raise `UnprocessableObject` for anything that is not a usable image."""
    decoded = imaging.decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    # Inference sees the uploaded pixels, before any stamping or blurring.
    batch = spec.preprocess(imaging.to_bgr8(decoded.pixels))[np.newaxis]
    prediction = spec.interpret(predict(batch)[0])
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
