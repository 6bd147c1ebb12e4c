"""What crosses the pipe between the web process and one worker process, in both directions, and what one
image's analysis is made of.

Each message is a small frozen dataclass, pickled by multiprocessing; the parent's reader thread and the worker's
loop match on the type, so a new message is a new class here rather than a new magic string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from service.models.spec import Prediction

# --- what one image's analysis is made of (the web process and the worker share these) ----------------------

CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "tiff": "image/tiff",
    "bmp": "image/bmp",
    "webp": "image/webp",
    "dicom": "application/dicom",
}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class TextOptions:
    """How a worker finds burned-in text (service.imaging.detection): its models' folder, and whether orientation
    markers are kept."""

    models: Path
    keep_markers: bool = True


@dataclass(frozen=True)
class Analysis:
    """What a worker returns for one image: the prediction and both encoded outputs."""

    prediction: Prediction
    image_format: str
    stamped: bytes
    #: None when the anonymization policy did not ask for a copy.
    anonymized: bytes | None
    text_regions: int
    #: Seconds this image spent in each worker stage (decode, infer, stamp, anonymize when done). Measured here,
    #: in the worker, and observed by the web process (service.metrics), which alone keeps metrics.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES.get(self.image_format, "application/octet-stream")


@dataclass(frozen=True)
class AnalysisRequest:
    """One image to analyze: its encoded bytes (workers decode; arrays never cross the process boundary)."""

    data: bytes
    anonymize_always: bool
    #: PSEUDONYM_KEY: keys the de-identification of DICOM headers (new UIDs, patient pseudonym).
    deid_key: bytes = field(default=b"", repr=False)
    #: DICOM_OUTPUT_SYNTAX: the transfer syntax of DICOM outputs (service.dicom.write.OUTPUT_SYNTAXES).
    dicom_output_syntax: str = "source"


#: A batch's per-item outcome: the analysis, or the error that belongs to that item alone.
AnalysisOutcome = Analysis | Exception


# --- parent -> worker --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnalyzeBatch:
    """Analyze these images together; the worker answers with `ModelFree`, then `BatchResults` in the same order."""

    requests: list[AnalysisRequest]


@dataclass(frozen=True)
class Stop:
    """Finish what you hold, then exit."""


# --- worker -> parent --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The model is loaded and warm: the worker takes batches from now on."""

    pid: int


@dataclass(frozen=True)
class LoadFailed:
    """The model could not be loaded; the worker exits after saying why."""

    reason: str


@dataclass(frozen=True)
class ModelFree:
    """The model is done with the oldest batch (still being finished): the worker can take another."""


@dataclass(frozen=True)
class BatchResults:
    """One outcome per request of the oldest unanswered batch, in its order."""

    outcomes: list[AnalysisOutcome]


ToWorker = AnalyzeBatch | Stop
FromWorker = Ready | LoadFailed | ModelFree | BatchResults
