"""The two DICOM outputs of one analyzed object.

- The processed copy is a derived instance of the same patient and study: a new SOP Instance UID in a new derived
  Series, ImageType DERIVED\\SECONDARY, a reference to its source instance, the result burned into the pixels
  (BurnedInAnnotation YES) and written into the header (ImageComments, DerivationDescription).
- The anonymized copy is the source instance de-identified by PS3.15's basic profile with the Clean Pixel Data
  option: `service.dicom.deidentify` for the header, the caller's cleaned pixels, overlays removed, then
  BurnedInAnnotation NO.

Both are deterministic for the same input (at-least-once delivery may write them twice: the versions must be
identical): the derived UIDs are computed from the source's, never drawn at random.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, RLELossless

from service.dicom.deidentify import deidentify, map_uid
from service.dicom.read import DicomImage
from service.dicom.rle import RleRows
from service.dicom.write import encode_instance, header_without_pixels
from service.models.spec import Prediction

#: The derived instance's UIDs are a function of the source's; not secret (the processed copy identifies the
#: patient anyway), only distinct from the de-identification mapping, which is keyed with PSEUDONYM_KEY.
_DERIVED_UID_KEY = b"xray-pipeline derived instance"
#: The derived series is numbered after its source's, out of the range modalities use.
_DERIVED_SERIES_OFFSET = 1000
#: Overlay planes (60xx groups) are bitmaps that can hold burned-in text of their own; the basic profile removes
#: their data, so the planes go as a whole.
_OVERLAY_GROUPS = range(0x6000, 0x6100, 2)


def source_rows(image: DicomImage, transfer_syntax: UID) -> RleRows | None:
    """What both outputs share when they are written as RLE (`transfer_syntax`, service.dicom.write's
    output_transfer_syntax): the source's rows, encoded once (each output then differs from the source in a few rows
    only). None for any other transfer syntax."""
    if transfer_syntax != RLELossless:
        return None
    return RleRows(image.frames)


def processed_instance(
    image: DicomImage,
    stamped: np.ndarray,
    prediction: Prediction,
    *,
    model: str,
    transfer_syntax: UID,
    rows: RleRows | None = None,
) -> bytes:
    """The derived instance with `stamped` (every frame, stored values) as its pixels, in `transfer_syntax` (`rows`:
    see source_rows)."""
    header = header_without_pixels(image.dataset)
    source_class = str(header.get("SOPClassUID", ""))
    source_instance = str(header.get("SOPInstanceUID", ""))
    header.SOPInstanceUID = _derived_uid("instance", source_instance, model)
    header.SeriesInstanceUID = _derived_uid("series", str(header.get("SeriesInstanceUID", "")), model)
    header.SeriesNumber = _derived_series_number(header.get("SeriesNumber"))
    header.SeriesDescription = f"{model} result"[:64]
    header.ImageType = ["DERIVED", "SECONDARY"]
    result = f"{prediction.stamp_text} ({model}, xray-pipeline)"
    header.DerivationDescription = f"Result burned in: {result}"[:1024]
    header.ImageComments = result
    header.BurnedInAnnotation = "YES"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source_class
    reference.ReferencedSOPInstanceUID = source_instance
    header.SourceImageSequence = [reference]
    return encode_instance(header, stamped, photometric=image.photometric, bits_stored=image.bits_stored,
                           transfer_syntax=transfer_syntax, source_rows=rows)


def anonymized_instance(
    image: DicomImage, cleaned: np.ndarray, *, secret: bytes, transfer_syntax: UID, rows: RleRows | None = None
) -> bytes:
    """The source instance de-identified, with `cleaned` (every frame, burned-in text redacted) as its pixels, in
    `transfer_syntax` (`rows`: see source_rows)."""
    header = header_without_pixels(image.dataset)
    deidentify(header, secret=secret, pixels_cleaned=True)
    for element in list(header):
        if element.tag.group in _OVERLAY_GROUPS:
            del header[element.tag]
    header.BurnedInAnnotation = "NO"
    return encode_instance(header, cleaned, photometric=image.photometric, bits_stored=image.bits_stored,
                           transfer_syntax=transfer_syntax, source_rows=rows)


def _derived_uid(kind: str, source_uid: str, model: str) -> str:
    return map_uid(_DERIVED_UID_KEY, f"{kind}\x00{source_uid}\x00{model}")


def _derived_series_number(source: object) -> int:
    try:
        number = int(str(source))
    except (TypeError, ValueError):
        number = 0
    in_range = 0 <= number < 2**31 - 1 - _DERIVED_SERIES_OFFSET
    return _DERIVED_SERIES_OFFSET + (number if in_range else 0)
