"""Reading an untrusted DICOM Part 10 object: its header, its stored pixel values (every frame), and an 8-bit
display rendering of each frame for the model and the text search.

Checks run cheapest first, as for other images: the header is parsed, then the pixel description is checked
(pixels present, transfer syntax decodable, declared size within the pixel limit) before a byte is decoded.
pydicom's warnings and exception texts can quote header values (patient names): none of them is passed on;
every failure becomes an `UnprocessableObject` whose message this module wrote.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from service.dicom.display import DisplayCurve, display_curve, to_display
from service.errors import UnprocessableObject
from service.imaging.codec import check_byte_count

# pydicom logs through this logger, sometimes quoting values; the service's own lines are the only ones wanted.
logging.getLogger("pydicom").disabled = True


@contextmanager
def pydicom_quiet() -> Iterator[None]:
    """pydicom's warnings quote header values (an undecodable name, a malformed date): none may escape, whether
    to a log or to a test run with warnings as errors. Values decode lazily, on first use, so every use of a
    header runs inside this."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

#: Photometric interpretations whose pixels we can render and write back. Palette colour, YBR_ICT/RCT (only
#: ever inside JPEG 2000, decoded to RGB) and the retired ones are converted or refused by pydicom itself.
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: The frame given to the model: a projection radiograph has one; for a multi-frame object the first is the
#: one a viewer opens on. Every frame is searched for burned-in text and cleaned.
CLASSIFIED_FRAME = 0
#: pydicom tries GDCM first where it is one of several decoders; these are faster (CPU per 2 MP 12-bit CR
#: measured here: JPEG-LS 63 -> 35 ms with pyjpegls, JPEG 2000 215 -> 186 ms with pylibjpeg-openjpeg).
_FASTEST_DECODERS = {
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
}


@dataclass
class DicomImage:
    """One decoded DICOM object."""

    #: The header as read (PixelData still holds the encoded bytes; writers replace it).
    dataset: Dataset
    transfer_syntax: UID
    #: Stored values of every frame: (frames, rows, columns) or (frames, rows, columns, 3) RGB.
    frames: np.ndarray
    #: Photometric interpretation of `frames` (after pydicom's colour conversion: YBR becomes RGB).
    photometric: str
    #: Maps stored values to display values (monochrome only; None for colour).
    curve: DisplayCurve | None
    _display: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def modality(self) -> str:
        return self._code_string("Modality")

    @property
    def body_part(self) -> str:
        return self._code_string("BodyPartExamined")

    def _code_string(self, keyword: str) -> str:
        """A code string of the header, upper case; "" when absent or when pydicom cannot decode it."""
        with pydicom_quiet():
            try:
                return str(self.dataset.get(keyword, "") or "").strip().upper()
            except Exception:
                return ""

    @property
    def bits_stored(self) -> int:
        """BitsStored of `frames` as they will be written (decoded colour is always full-depth)."""
        full_depth = self.frames.dtype.itemsize * 8
        if self.curve is None:
            return full_depth
        try:
            return min(max(int(self.dataset.BitsStored), 1), full_depth)
        except (AttributeError, TypeError, ValueError):
            return full_depth

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    def display(self, index: int) -> np.ndarray:
        """Frame `index` as the model and the text search see it: HxW uint8 gray, or HxWx3 uint8 BGR."""
        if index not in self._display:
            self._display[index] = to_display(self.frames[index], self.curve)
        return self._display[index]


def read_dicom(data: bytes, *, max_bytes: int, max_pixels: int) -> DicomImage:
    """Parse and decode a Part 10 object, or raise `UnprocessableObject` (never with a header value in it)."""
    check_byte_count(data, max_bytes)
    with pydicom_quiet():
        dataset = _parse(data)
        transfer_syntax = _transfer_syntax(dataset)
        frame_count, samples = _check_pixel_description(dataset, max_pixels)
        frames, photometric = _decode(dataset, transfer_syntax, frame_count, samples)
        curve = display_curve(dataset, frames) if photometric in _MONOCHROME else None
    return DicomImage(dataset=dataset, transfer_syntax=transfer_syntax, frames=frames, photometric=photometric,
                      curve=curve)


def _parse(data: bytes) -> Dataset:
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        # Elements stay raw (pydicom decodes a value when it is used): the processed copy then writes back the
        # bytes of values it never touched, even those no character set decodes. A malformed one that is used
        # fails where it is used, with a message of ours.
        truncated = not _ends_where_its_last_element_does(dataset, len(data))
    except Exception:
        truncated = True
    if truncated:
        raise UnprocessableObject("DICOM data is corrupt or truncated", reason="corrupt-dicom")
    return dataset


def _ends_where_its_last_element_does(dataset: Dataset, size: int) -> bool:
    """pydicom stops silently where the data ends, even inside an element: a file cut short would otherwise read
    as a complete object that merely lacks its later elements (its pixel data above all)."""
    if not len(dataset):
        return False  # cut in the preamble or File Meta, or a data set pydicom gave up on (a sequence cut short)
    if dataset.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return True  # a deflated data set's offsets are in the inflated stream; its inflation fails if cut
    last = dataset.get_item(max(dataset.keys()))
    length, value_at = getattr(last, "length", None), getattr(last, "value_tell", None)
    if length is None or value_at is None or length == 0xFFFFFFFF:
        return True  # an undefined length (a sequence, encapsulated pixels): its own parsing finds the end
    return value_at + length == size


def _transfer_syntax(dataset: Dataset) -> UID:
    meta = getattr(dataset, "file_meta", None)
    transfer_syntax = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else ""))
    if "PixelData" not in dataset:
        sop_class = UID(str(dataset.get("SOPClassUID", "")))
        kind = f" ({sop_class.name})" if sop_class.is_valid and sop_class.name != sop_class else ""
        if "Image Storage" in kind:
            # An image object always has pixel data: this one was cut short exactly between two elements.
            raise UnprocessableObject(f"the DICOM image{kind} ends before its pixel data: it is truncated",
                                      reason="corrupt-dicom")
        raise UnprocessableObject(f"the DICOM object{kind} has no pixel data", reason="no-pixel-data")
    if not transfer_syntax.is_valid:
        raise UnprocessableObject("the DICOM object names no valid transfer syntax", reason="unsupported-dicom")
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        name = transfer_syntax.name if transfer_syntax.name != transfer_syntax else "an unknown transfer syntax"
        raise UnprocessableObject(
            f"DICOM transfer syntax {name} ({transfer_syntax}) is not supported", reason="unsupported-dicom"
        )
    return transfer_syntax


def _check_pixel_description(dataset: Dataset, max_pixels: int) -> tuple[int, int]:
    """The frame count and samples per pixel, once the declared size is known to fit the pixel limit."""
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frame_count = int(dataset.get("NumberOfFrames", 1) or 1)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        bits_allocated = int(dataset.BitsAllocated)
        photometric = str(dataset.PhotometricInterpretation).strip().upper()
    except Exception:
        raise UnprocessableObject("the DICOM pixel description is missing or malformed",
                                  reason="corrupt-dicom") from None
    if rows <= 0 or columns <= 0 or frame_count <= 0 or samples not in (1, 3):
        raise UnprocessableObject("the DICOM pixel description is malformed", reason="corrupt-dicom")
    if bits_allocated not in (8, 16) or (samples == 3 and bits_allocated != 8 and photometric != "RGB"):
        raise UnprocessableObject(f"DICOM pixels of {bits_allocated} bits allocated are not supported",
                                  reason="unsupported-dicom")
    if photometric not in (*_MONOCHROME, "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT",
                           "PALETTE COLOR"):
        raise UnprocessableObject("the DICOM photometric interpretation is not supported", reason="unsupported-dicom")
    # Every frame is decoded (each is searched for burned-in text), so the limit is on all of them together.
    if rows * columns * frame_count > max_pixels:
        raise UnprocessableObject(
            f"DICOM pixel data is {frame_count} frame(s) of {columns}x{rows}, over the limit of {max_pixels} "
            "pixels", reason="too-many-pixels",
        )
    return frame_count, samples


def _decode(dataset: Dataset, transfer_syntax: UID, frame_count: int, samples: int) -> tuple[np.ndarray, str]:
    decoder = get_decoder(transfer_syntax)
    fastest = _FASTEST_DECODERS.get(transfer_syntax)
    # The fastest plugin, then (if it fails) every one installed, as pydicom tries them.
    plugins = [fastest, ""] if fastest in decoder.available_plugins else [""]
    for plugin in plugins:
        try:
            frames, details = decoder.as_array(dataset, as_rgb=True, decoding_plugin=plugin)
            break
        except Exception:
            continue
    else:
        raise UnprocessableObject("DICOM pixel data is corrupt, truncated or cannot be decoded",
                                  reason="corrupt-dicom")
    photometric = str(details.get("photometric_interpretation", dataset.PhotometricInterpretation)).upper()
    if photometric == "PALETTE COLOR":
        try:
            frames = pydicom.pixels.apply_color_lut(frames, dataset)
        except Exception:
            raise UnprocessableObject("the DICOM palette is malformed", reason="corrupt-dicom") from None
        photometric = "RGB"
    if frame_count == 1:
        frames = frames[np.newaxis]  # pydicom drops the frame axis of a single frame
    if frames.ndim != (3 if samples == 1 else 4) or frames.shape[0] != frame_count:
        raise UnprocessableObject("DICOM pixel data does not match its description", reason="corrupt-dicom")
    return frames, photometric
