"""One image's analysis: decode once, classify the uploaded pixels, stamp, anonymize, encode both outputs.

Runs inside an inference worker, so the web process never spends CPU on pixels and each image is decoded
exactly once. The model is passed in as a plain function over a preprocessed batch; this module imports no
machine-learning framework.

A DICOM object (recognised by content) takes the same steps on its frames: the model sees the display rendering
of the classified frame, unless the object is outside the model's domain (then it is not assessed); every frame
is searched for text, stamped for the processed copy and cleaned for the anonymized one, which is always made.
The DICOM modules (pydicom and its codecs: about a third of a worker's start) are imported when the first DICOM
object arrives, or by the worker once it is ready (service.engine.worker), never before the worker says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service.dicom.sniff import is_dicom
from service.engine.messages import Analysis, AnalysisOutcome, AnalysisRequest, ImageLimits
from service.errors import UnprocessableObject
from service.imaging.codec import (
    DecodedImage,
    decode_image,
    encode_changed_rows,
    encode_image,
    to_8bit,
    to_model_input,
)
from service.imaging.detection import ProposedText, TextDetector, TextFindings
from service.imaging.redact import blur_text_regions
from service.imaging.stamp import stamp_label
from service.imaging.text import Box
from service.models.backends import PredictBatch
from service.models.preprocess import to_model_tensor
from service.models.spec import ModelSpec, Prediction

if TYPE_CHECKING:
    from service.dicom.read import DicomImage

    AnyImage = DecodedImage | DicomImage


@dataclass
class PredictedBatch:
    """A batch between the model and the finishing stage: each item's decoded image (or its error) and output."""

    requests: Sequence[AnalysisRequest]
    decoded: list[AnyImage | Exception]
    #: One model output per assessed image, in order; None when no image of the batch went to the model.
    raw_outputs: np.ndarray | None
    #: Seconds each item took to decode and preprocess (aligned with `requests`).
    decode_seconds: list[float] = field(default_factory=list)
    #: Seconds of the batch's one model call, shared by every item in it.
    infer_seconds: float = 0.0
    #: Per item: why the model did not assess it (a DICOM object outside the model's domain), else None.
    not_assessed: list[str | None] = field(default_factory=list)
    #: Per item: its text search, started on the worker's detector thread as soon as it was decoded (it needs
    #: no model output), with the seconds it took; None where it was not started (then the finisher searches).
    #: Only the proposals (`ProposedText`) where the prediction decides whether the image is anonymized.
    text_searches: list[Future[tuple[TextFindings | ProposedText, float]] | None] = field(default_factory=list)


def analyze_batch(
    requests: Sequence[AnalysisRequest],
    *,
    spec: ModelSpec,
    predict: PredictBatch,
    limits: ImageLimits,
    detector: TextDetector,
) -> list[AnalysisOutcome]:
    """Decode each image once, run the model once for the whole batch, then stamp, anonymize and encode each.

    A bad image fails only its own item (`UnprocessableObject` in its place); the others are analyzed.
    """
    return finish_batch(predict_batch(requests, spec=spec, predict=predict, limits=limits), spec=spec,
                        detector=detector)


def predict_batch(
    requests: Sequence[AnalysisRequest],
    *,
    spec: ModelSpec,
    predict: PredictBatch,
    limits: ImageLimits,
    text_search: tuple[TextDetector, Executor] | None = None,
) -> PredictedBatch:
    """The first stage: decode and preprocess each image, then one model call for every decodable one.

    The batch goes to the model at its own size: both backends run one graph for any batch size (a `None`
    batch dimension), so padding to fixed sizes would only spend model time on zeros.

    With `text_search` (a detector and the executor it runs on), each decoded image's text search starts at once,
    beside the model: at light load the cores are free, and an image then waits for the longer of the two, not for
    both. Where only a positive prediction makes an anonymized copy, only the search's cheap half (the proposals,
    which keep the stamp off any text) starts: the detector and the recognizer run only if the model says positive.
    """
    decoded: list[AnyImage | Exception] = []
    decode_seconds: list[float] = []
    not_assessed: list[str | None] = []
    searches: list[Future[tuple[TextFindings | ProposedText, float]] | None] = []
    tensors = []
    for request in requests:
        started = time.perf_counter()
        refusal = None
        try:
            image = _decode(request.data, limits)
            if not isinstance(image, DecodedImage):
                refusal = spec.domain.refusal(image.modality, image.body_part)
            if refusal is None:
                # Inference sees the uploaded pixels, before any stamping or blurring.
                tensors.append(to_model_tensor(spec, to_model_input(_model_pixels(image))))
            decoded.append(image)
        except Exception as error:
            decoded.append(error)
        not_assessed.append(refusal)
        decode_seconds.append(time.perf_counter() - started)
        item = decoded[-1]
        searching = text_search is not None and isinstance(item, DecodedImage)
        searches.append(text_search[1].submit(_timed_search, text_search[0], item.pixels, request.anonymize_always)
                        if searching else None)
    if not tensors:
        return PredictedBatch(requests, decoded, None, decode_seconds, not_assessed=not_assessed,
                              text_searches=searches)
    started = time.perf_counter()
    try:
        raw_outputs = predict(np.stack(tensors))
    except Exception as error:
        # A failed model call fails the batch's images (answered 500, so redelivered), not the worker: a crash
        # would cost a model reload. Their text searches are not needed any more: those not yet started never are.
        for search in searches:
            if search is not None:
                search.cancel()
        failed = [item if isinstance(item, Exception) else error for item in decoded]
        return PredictedBatch(requests, failed, None, decode_seconds, not_assessed=not_assessed,
                              text_searches=searches)
    return PredictedBatch(requests, decoded, raw_outputs, decode_seconds, time.perf_counter() - started,
                          not_assessed, searches)


def _timed_search(
    detector: TextDetector, pixels: np.ndarray, whole: bool
) -> tuple[TextFindings | ProposedText, float]:
    """The text of `pixels` if `whole`, else only the proposals; and the seconds it took."""
    started = time.perf_counter()
    return detector.find(pixels) if whole else detector.propose(pixels), time.perf_counter() - started


def _decode(data: bytes, limits: ImageLimits) -> AnyImage:
    if is_dicom(data):
        load_dicom_modules()
        from service.dicom.read import read_dicom

        return read_dicom(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    return decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)


#: One thread at a time imports the DICOM modules: two threads importing parts of one package at once can each
#: wait for a module the other is initialising, and Python then raises a deadlock RuntimeError in one of them (seen
#: under load: the worker's preload beside the first DICOM object's decode).
_DICOM_IMPORTS = threading.Lock()


def load_dicom_modules() -> None:
    """Import what DICOM objects need (pydicom, its codecs, the de-identification profile), if not yet imported."""
    with _DICOM_IMPORTS:
        import service.dicom.instances
        import service.dicom.read  # noqa: F401


def _model_pixels(image: AnyImage) -> np.ndarray:
    if isinstance(image, DecodedImage):
        return image.pixels
    from service.dicom.read import CLASSIFIED_FRAME

    return image.display(CLASSIFIED_FRAME)


def finish_batch(batch: PredictedBatch, *, spec: ModelSpec, detector: TextDetector) -> list[AnalysisOutcome]:
    """The second stage: interpret each output, then stamp, anonymize and encode each image."""
    raw_outputs = iter(batch.raw_outputs if batch.raw_outputs is not None else [])
    # A batch built by hand (tests) may carry no timings.
    decode_seconds = iter(batch.decode_seconds or [0.0] * len(batch.requests))
    not_assessed = iter(batch.not_assessed or [None] * len(batch.requests))
    searches = iter(batch.text_searches or [None] * len(batch.requests))
    results: list[AnalysisOutcome] = []
    for request, image, decode, refusal, search in zip(batch.requests, batch.decoded, decode_seconds, not_assessed,
                                                       searches, strict=True):
        if isinstance(image, Exception):
            results.append(image)
            continue
        timings = {"decode": decode, "infer": 0.0 if refusal else batch.infer_seconds}
        try:
            prediction = Prediction.not_assessed(refusal) if refusal else spec.interpret(next(raw_outputs))
            if isinstance(image, DecodedImage):
                searched, timings["detect"] = (search.result() if search
                                               else _timed_search(detector, image.pixels, request.anonymize_always))
                results.append(_finish(image, prediction, searched, request.anonymize_always, detector, timings))
            else:
                results.append(_finish_dicom(image, prediction, request, spec, detector, timings))
        except Exception as error:
            results.append(error)
    return results


def _finish(
    decoded: DecodedImage,
    prediction: Prediction,
    searched: TextFindings | ProposedText,
    anonymize_always: bool,
    detector: TextDetector,
    timings: dict[str, float],
) -> Analysis:
    """Stamp, anonymize and encode one image, given its text or only its proposals (searched on the original, so
    the stamp is never mistaken for patient text and blurred)."""
    anonymize = anonymize_always or prediction.is_positive
    text = searched
    if anonymize and isinstance(text, ProposedText):
        started = time.perf_counter()
        text = detector.verify(decoded.pixels, text)
        timings["detect"] += time.perf_counter() - started
    # Without an anonymized copy the proposals are all the stamp must avoid (text, and some anatomy with them);
    # where they cover every place (a photo's texture is proposed everywhere), the detector looks at each place.
    free = _FreePlaces(detector, decoded.pixels, text) if isinstance(text, ProposedText) else None
    started = time.perf_counter()
    stamped = stamp_label(decoded.pixels, prediction.stamp_text, avoid=text.all_text, free=free)
    stamped_encoded = encode_image(stamped, decoded.format)
    looked = free.seconds if free is not None else 0.0
    timings["stamp"] = time.perf_counter() - started - looked
    timings["detect"] += looked
    anonymized = None
    redact = text.redact if isinstance(text, TextFindings) else []
    if anonymize:
        started = time.perf_counter()
        # Only the redacted rows differ from the stamped copy: of a JPEG only they are encoded again.
        anonymized = encode_changed_rows(blur_text_regions(stamped, redact), decoded.format,
                                         unchanged_encoding=stamped_encoded,
                                         changed=[(y, y + height) for _, y, _, height in redact])
        timings["anonymize"] = time.perf_counter() - started
    return Analysis(
        prediction=prediction,
        image_format=decoded.format,
        stamped=stamped_encoded,
        anonymized=anonymized,
        text_regions=len(redact),
        timings=timings,
    )


class _FreePlaces:
    """stamp_label's `free`: whether a place of `pixels` holds no text the detector finds; and the seconds spent
    looking."""

    def __init__(self, detector: TextDetector, pixels: np.ndarray, proposed: ProposedText) -> None:
        self._detector = detector
        self._pixels = pixels
        self._proposed = proposed
        self.seconds = 0.0

    def __call__(self, place: Box) -> bool:
        started = time.perf_counter()
        try:
            if self._pixels.dtype != np.uint8:  # the 8-bit copy every look needs, made once (and only if asked)
                self._pixels = to_8bit(self._pixels)
            return not self._detector.finds_text(self._pixels, self._proposed, place)
        finally:
            self.seconds += time.perf_counter() - started


def _finish_dicom(
    image: DicomImage,
    prediction: Prediction,
    request: AnalysisRequest,
    spec: ModelSpec,
    detector: TextDetector,
    timings: dict[str, float],
) -> Analysis:
    from service.dicom.instances import anonymized_instance, processed_instance, source_rows
    from service.dicom.write import output_transfer_syntax

    if not request.deid_key:
        raise RuntimeError("DICOM de-identification needs PSEUDONYM_KEY; the request carried none")
    started = time.perf_counter()
    # Text is searched on what a viewer shows (stored values far outside the window are as white as the text).
    found = [detector.find(image.display(index)) for index in range(image.frame_count)]
    timings["detect"] = time.perf_counter() - started
    started = time.perf_counter()
    # One stamp position for every frame (avoiding the text of all of them), so every frame keeps one size.
    avoid: list[Box] = [box for text in found for box in text.all_text]
    white, black = (image.curve.white, image.curve.black) if image.curve is not None else (None, 0)
    stamped = np.stack([stamp_label(frame, prediction.stamp_text, avoid=avoid, white=white, black=black)
                        for frame in image.frames])
    model = f"{spec.name} {spec.version}"
    syntax = output_transfer_syntax(image.transfer_syntax, request.dicom_output_syntax)
    rows = source_rows(image, syntax)
    processed = _dicom_output(
        lambda: processed_instance(image, stamped, prediction, model=model, transfer_syntax=syntax, rows=rows)
    )
    timings["stamp"] = time.perf_counter() - started
    # Always de-identified, whatever the anonymization policy: a DICOM object carries patient data in its header
    # as well as its pixels, and an object the model did not assess still needs its anonymized copy.
    started = time.perf_counter()
    cleaned = np.stack([blur_text_regions(frame, text.redact) for frame, text in zip(image.frames, found, strict=True)])
    anonymized = _dicom_output(
        lambda: anonymized_instance(image, cleaned, secret=request.deid_key, transfer_syntax=syntax, rows=rows)
    )
    timings["anonymize"] = time.perf_counter() - started
    return Analysis(
        prediction=prediction,
        image_format="dicom",
        stamped=processed,
        anonymized=anonymized,
        text_regions=sum(len(text.redact) for text in found),
        timings=timings,
    )


def _dicom_output(write: Callable[[], bytes]) -> bytes:
    """Writing an output re-encodes header values pydicom could not encode or parse: such an object fails with a
    message of ours (pydicom's would quote the value)."""
    from service.dicom.read import pydicom_quiet

    try:
        with pydicom_quiet():
            return write()
    except UnprocessableObject:
        raise
    except Exception:
        raise UnprocessableObject("the DICOM object cannot be written back: its header or pixel description is "
                                  "malformed", reason="corrupt-dicom") from None
