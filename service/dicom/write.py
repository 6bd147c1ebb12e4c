"""Writing a data set with new pixels as a Part 10 object, in the source's transfer syntax where it can be, or in
the one the operator chose (DICOM_OUTPUT_SYNTAX).

By default lossless syntaxes with an encoder here (RLE, JPEG-LS lossless, JPEG 2000 lossless, deflated, the native
ones) are kept. Lossy sources (JPEG baseline/extended, lossy JPEG-LS and JPEG 2000) and syntaxes nobody here can
encode (JPEG lossless, HTJ2K) are written as explicit VR little endian: no second generation of loss is added, and
a lossy source stays flagged by its LossyImageCompression attribute. A chosen syntax is lossless too.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.valuerep import VR

from service.dicom.rle import RleRows

_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_LOSSLESS_ENCODED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
#: Palette colour is decoded to RGB: its lookup tables no longer describe the pixels written.
_PALETTE_TAGS = (0x00281101, 0x00281102, 0x00281103, 0x00281199, 0x00281201, 0x00281202, 0x00281203,
                 0x00281221, 0x00281222, 0x00281223)


#: DICOM_OUTPUT_SYNTAX's choices other than `source`.
OUTPUT_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg-2000": JPEG2000Lossless,
}


def output_transfer_syntax(source: UID, choice: str = "source") -> UID:
    """The transfer syntax of the outputs of an object stored in `source`: `choice` (a key of OUTPUT_SYNTAXES), or
    for `source` the source's own where it is lossless and can be encoded here; explicit VR little endian when the
    syntax's encoder is not installed."""
    wanted = source if choice == "source" else OUTPUT_SYNTAXES[choice]
    if wanted in _NATIVE:
        return wanted
    if wanted in _LOSSLESS_ENCODED and _can_encode(wanted):
        return wanted
    return ExplicitVRLittleEndian


def _can_encode(syntax: UID) -> bool:
    try:
        return bool(get_encoder(syntax).is_available)
    except NotImplementedError:
        return False


def header_without_pixels(dataset: Dataset) -> Dataset:
    """A copy of `dataset` without its pixel data (copying the encoded pixels would only be thrown away).

    Elements pydicom has not decoded yet are copied as their raw bytes (immutable, so shared): decoding them here
    would turn a value no character set decodes into replacement characters, and warn with the value.
    """
    header = Dataset()
    with warnings.catch_warnings():
        # pydicom decodes a private element to find its creator: its warning would quote the value.
        warnings.simplefilter("ignore")
        for element in dataset.elements():
            if element.tag != 0x7FE00010:
                header[element.tag] = element if isinstance(element, RawDataElement) else copy.deepcopy(element)
    header.set_original_encoding(dataset.is_implicit_VR, dataset.is_little_endian, dataset.original_character_set)
    return header


def encode_instance(
    dataset: Dataset,
    frames: np.ndarray,
    *,
    photometric: str,
    bits_stored: int,
    transfer_syntax: UID,
    source_rows: RleRows | None = None,
) -> bytes:
    """`dataset` (without pixel data) with `frames` (frames x rows x columns [x 3]) as its pixels, as Part 10
    bytes in `transfer_syntax` (one `output_transfer_syntax` chose). RLE frames are put together from
    `source_rows` when given (the source's rows, encoded once for both outputs), re-encoding only the rows that
    differ from the source's."""
    with warnings.catch_warnings():
        # pydicom's warnings can quote header values.
        warnings.simplefilter("ignore")
        # The output's own File Meta: the source's names the source instance and the application that wrote it.
        dataset.file_meta = FileMetaDataset()
        for tag in _PALETTE_TAGS:
            if tag in dataset:
                del dataset[tag]
        pixels = frames[0] if frames.shape[0] == 1 else frames
        had_frame_count = "NumberOfFrames" in dataset
        dataset.set_pixel_data(np.ascontiguousarray(pixels), photometric, bits_stored, generate_instance_uid=False)
        if had_frame_count and "NumberOfFrames" not in dataset:
            dataset.NumberOfFrames = 1  # a multi-frame IOD needs the attribute even for one frame
        if transfer_syntax == RLELossless and source_rows is not None:
            # What pydicom's compress() does with the frames its encoder returns.
            dataset.PixelData = encapsulate(source_rows.encoded_frames(frames))
            dataset["PixelData"].VR = VR.OB
            dataset["PixelData"].is_undefined_length = True
            dataset.file_meta.TransferSyntaxUID = transfer_syntax
        elif transfer_syntax in _LOSSLESS_ENCODED:
            try:
                dataset.compress(transfer_syntax, generate_instance_uid=False)
            except ValueError:
                # The encoder refuses pixels its syntax cannot hold (JPEG-LS: fewer than 2 bits stored), before it
                # changes anything: they are written uncompressed, losslessly all the same.
                dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        else:
            dataset.file_meta.TransferSyntaxUID = transfer_syntax
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
