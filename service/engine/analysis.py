"""One image's analysis: decode once, classify the uploaded pixels, stamp, anonymize, encode both outputs.

Runs inside an inference worker, so the web process never spends CPU on pixels and each image is decoded
exactly once. The model is passed in as a plain function over a preprocessed batch; this module imports no
machine-learning framework.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.engine.messages import Analysis, AnalysisOutcome, AnalysisRequest, ImageLimits
from service.imaging.codec import DecodedImage, decode_image, encode_image, to_model_input
from service.imaging.redact import blur_text_regions
from service.imaging.stamp import stamp_label
from service.imaging.text import find_text_regions
from service.models.backends import PredictBatch
from service.models.preprocess import to_model_tensor
from service.models.spec import ModelSpec, Prediction


@dataclass
class PredictedBatch:
    """A batch between the model and the finishing stage: each item's decoded image (or its error) and output."""

    requests: Sequence[AnalysisRequest]
    decoded: list[DecodedImage | Exception]
    raw_outputs: np.ndarray | None
    #: Seconds each item took to decode and preprocess (aligned with `requests`).
    decode_seconds: list[float] = field(default_factory=list)
    #: Seconds of the batch's one model call, shared by every item in it.
    infer_seconds: float = 0.0


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
    decoded: list[DecodedImage | Exception] = []
    decode_seconds: list[float] = []
    tensors = []
    for request in requests:
        started = time.perf_counter()
        try:
            image = decode_image(request.data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
            # Inference sees the uploaded pixels, before any stamping or blurring.
            tensors.append(to_model_tensor(spec, to_model_input(image.pixels)))
            decoded.append(image)
        except Exception as error:
            decoded.append(error)
        decode_seconds.append(time.perf_counter() - started)
    if not tensors:
        return PredictedBatch(requests, decoded, None, decode_seconds)
    started = time.perf_counter()
    try:
        raw_outputs = predict(np.stack(tensors))
    except Exception as error:
        # A failed model call fails the batch's images (answered 500, so redelivered), not the worker: a crash
        # would cost a model reload.
        failed = [item if isinstance(item, Exception) else error for item in decoded]
        return PredictedBatch(requests, failed, None, decode_seconds)
    return PredictedBatch(requests, decoded, raw_outputs, decode_seconds, time.perf_counter() - started)


def finish_batch(batch: PredictedBatch, *, spec: ModelSpec) -> list[AnalysisOutcome]:
    """The second stage: interpret each output, then stamp, anonymize and encode each image."""
    raw_outputs = iter(batch.raw_outputs if batch.raw_outputs is not None else [])
    # A batch built by hand (tests) may carry no timings.
    decode_seconds = iter(batch.decode_seconds or [0.0] * len(batch.requests))
    results: list[AnalysisOutcome] = []
    for request, image, decode in zip(batch.requests, batch.decoded, decode_seconds, strict=True):
        if not isinstance(image, DecodedImage):
            results.append(image)
            continue
        raw = next(raw_outputs)
        timings = {"decode": decode, "infer": batch.infer_seconds}
        try:
            results.append(_finish(image, spec.interpret(raw), request.anonymize_always, timings))
        except Exception as error:
            results.append(error)
    return results


def _finish(
    decoded: DecodedImage, prediction: Prediction, anonymize_always: bool, timings: dict[str, float]
) -> Analysis:
    started = time.perf_counter()
    # Text is searched on the original, so the stamp is never mistaken for patient text and blurred.
    regions = find_text_regions(decoded.pixels)
    stamped = stamp_label(decoded.pixels, prediction.stamp_text, avoid=regions)
    stamped_encoded = encode_image(stamped, decoded.format)
    timings["stamp"] = time.perf_counter() - started
    anonymized = None
    if anonymize_always or prediction.is_positive:
        started = time.perf_counter()
        anonymized = encode_image(blur_text_regions(stamped, regions), decoded.format)
        timings["anonymize"] = time.perf_counter() - started
    return Analysis(
        prediction=prediction,
        image_format=decoded.format,
        stamped=stamped_encoded,
        anonymized=anonymized,
        text_regions=len(regions),
        timings=timings,
    )
