"""The output contract, for the service and the operator tools alike: what becomes of an input (`Outcome`), the
names of its outputs, their metadata, the order they are written in, and the failure record of an input that
cannot be processed.

Object keys of medical images often carry the patient's name and birth date. Everything that leaves the
processed bucket (anonymized keys, logs, responses, failure records) uses the pseudonym instead: an HMAC of
bucket and key with PSEUDONYM_KEY, so it is stable across redeliveries but reveals nothing without the secret.

The processed copy is written last and records the source's eTag (`source-etag`): its presence with that eTag
marks the input as done, so a crash between the writes makes a redelivery redo both (overwriting the same
anonymized key) instead of skipping a half-done input.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

if TYPE_CHECKING:
    from service.engine.messages import Analysis
    from service.models.spec import ModelSpec

PROCESSED_MARK = "-processed"
DICOM_EXTENSION = ".dcm"
#: S3 keys are 1 to 1024 bytes of UTF-8.
MAX_KEY_BYTES = 1024
FAILURE_PREFIX = "_failed/"
#: Metadata of outputs and failure records: the eTag (or, for local files, sha256) of the input they came from.
SOURCE_ETAG = "source-etag"
#: Metadata of a processed copy: the version of the input it came from, on a versioned bucket.
SOURCE_VERSION_ID = "source-version-id"


class Outcome(StrEnum):
    """What became of one input, in responses, logs, metrics and the tools' reports."""

    PROCESSED = "processed"
    SKIPPED = "skipped"
    FAILED = "failed"
# Extensions kept on anonymized keys; anything else (which could itself be patient text) is replaced by the
# canonical extension of the decoded format.
_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".jp2"}
_CANONICAL_EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "tiff": ".tiff", "bmp": ".bmp", "webp": ".webp",
                         "dicom": DICOM_EXTENSION}
#: Extensions of DICOM keys, replaced by `.dcm` on the outputs (PACS exports often have none at all).
_DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic"}
#: S3 metadata of an output whose image the model did not assess: why (e.g. its modality is outside the domain).
NOT_ASSESSED_REASON = "not-assessed-reason"
#: The reason code of a processed input the model did not assess (a DICOM object outside its domain), in record
#: results, logs, metrics and the tools' reports.
NOT_ASSESSED_REASON_CODE = "outside-model-domain"


def pseudonym(secret: bytes, bucket: str, key: str) -> str:
    """A 128-bit keyed pseudonym of one object (same object, same pseudonym)."""
    digest = hmac.new(secret, f"{bucket}\x00{key}".encode(), hashlib.sha256).hexdigest()
    return digest[:32]


def processed_key(key: str, *, dicom: bool | None = None) -> str:
    """The original path with `-processed` before the extension: `a/b/scan.jpeg` -> `a/b/scan-processed.jpeg`.

    A DICOM object's processed copy always ends in `.dcm`: `a/IM0001` -> `a/IM0001-processed.dcm`. Whether the
    input is DICOM is known from its content (`dicom`); before it is fetched, `None` guesses from the key.
    """
    directory, name = posixpath.split(key)
    stem, extension = posixpath.splitext(name)
    if not stem:  # a dot-file such as ".jpeg": splitext puts everything in the stem
        stem, extension = name, ""
    if dicom is None:
        dicom = looks_like_dicom(key)
    if dicom:
        if extension.lower() not in _DICOM_EXTENSIONS:
            stem = f"{stem}{extension}"
        extension = DICOM_EXTENSION
    return posixpath.join(directory, f"{stem}{PROCESSED_MARK}{extension}")


def looks_like_dicom(key: str) -> bool:
    """A guess from the key alone, for looking up a processed copy before the input is fetched."""
    return posixpath.splitext(key)[1].lower() in _DICOM_EXTENSIONS


def anonymized_key(pseudonym_value: str, source_key: str, image_format: str) -> str:
    """`<pseudonym><ext>`: no part of the original path or name survives, only a known image extension (always
    `.dcm` for DICOM)."""
    extension = posixpath.splitext(source_key)[1].lower()
    if extension not in _IMAGE_EXTENSIONS or image_format == "dicom":
        extension = _CANONICAL_EXTENSIONS.get(image_format, "")
    return pseudonym_value + extension


def failure_key(pseudonym_value: str) -> str:
    """Where the durable record of a permanent failure goes, in the processed bucket."""
    return f"{FAILURE_PREFIX}{pseudonym_value}.json"


# --- what is written, in which order ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One object to write for an analyzed input. `key` is relative: the caller puts a processed copy in its
    processed bucket (or `processed/` folder) and an anonymized one in its anonymized bucket (or folder)."""

    kind: Literal["anonymized", "processed"]
    key: str
    body: bytes
    content_type: str
    metadata: dict[str, str]


def outputs_in_write_order(
    analysis: Analysis, spec: ModelSpec, *, alias: str, source_key: str, source_etag: str,
    source_version_id: str | None = None,
) -> list[Output]:
    """The outputs of one analyzed input, in the order they must be written: the anonymized copy (when the policy
    made one), then the processed copy, last (see the module's docstring)."""
    metadata = output_metadata(analysis, spec, source_etag)
    outputs = []
    if analysis.anonymized is not None:
        # No pseudonym in the anonymized copy's metadata: its key is the pseudonym already.
        outputs.append(Output("anonymized", anonymized_key(alias, source_key, analysis.image_format),
                              analysis.anonymized, analysis.content_type, metadata))
    processed_metadata = metadata | {"pseudonym": alias}
    if source_version_id:
        processed_metadata[SOURCE_VERSION_ID] = source_version_id
    outputs.append(Output("processed", processed_key(source_key, dicom=analysis.image_format == "dicom"),
                          analysis.stamped, analysis.content_type, processed_metadata))
    return outputs


def output_metadata(analysis: Analysis, spec: ModelSpec, source_etag: str) -> dict[str, str]:
    """The S3 metadata of both outputs: the result, the model that gave it, and the input it came from."""
    prediction = analysis.prediction
    metadata = {"label": prediction.label, "model-name": spec.name, "model-version": spec.version,
                SOURCE_ETAG: source_etag}
    if prediction.not_assessed_reason is not None:
        metadata[NOT_ASSESSED_REASON] = prediction.not_assessed_reason
    elif prediction.risk is not None:
        metadata["risk"] = f"{prediction.risk:.6f}"
    else:
        metadata["top"] = ",".join(f"{name}:{probability:.4f}" for name, probability in prediction.top)
    return metadata


def recorded_source_etag(metadata: Mapping[str, str] | None) -> str | None:
    """The source eTag a processed copy (or failure record) says it came from; None when there is none."""
    value = (metadata or {}).get(SOURCE_ETAG)
    # S3 returns metadata as it was stored; clients that percent-encode non-ASCII values would change nothing
    # of an eTag or a sha256, so decoding is safe and makes such a value comparable.
    return unquote(value) if value else None


def is_done(metadata: Mapping[str, str] | None, source_etag: str) -> bool:
    """Whether a processed copy with this metadata is the output of the input with this eTag."""
    return bool(source_etag) and recorded_source_etag(metadata) == source_etag


# --- failure records ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureRecord:
    """The durable record of a permanent failure: a JSON document at `failure_key(pseudonym)` in the processed
    bucket, so the verdict outlives the event (a dead-letter sink keeps only the first KB of an answer)."""

    pseudonym: str
    bucket: str
    reason: str
    message: str
    event_id: str
    event_name: str
    source_etag: str
    time: datetime
    service_version: str

    @property
    def key(self) -> str:
        return failure_key(self.pseudonym)

    @property
    def metadata(self) -> dict[str, str]:
        metadata = {"pseudonym": self.pseudonym, "reason": self.reason}
        if self.source_etag:
            metadata[SOURCE_ETAG] = self.source_etag
        return metadata

    def document(self) -> bytes:
        return json.dumps({
            "pseudonym": self.pseudonym,
            "bucket": self.bucket,
            "reason": self.reason,
            "message": self.message,
            "event_id": self.event_id,
            "event_name": self.event_name,
            "source_etag": self.source_etag,
            "time": self.time.isoformat(),
            "service_version": self.service_version,
        }, indent=2).encode()


def failure_on_record(metadata: Mapping[str, str] | None, source_etag: str) -> str | None:
    """The reason of a failure record (its metadata) about the input with this eTag; None if it is about
    another content or there is none."""
    if not source_etag or recorded_source_etag(metadata) != source_etag:
        return None
    return (metadata or {}).get("reason")
