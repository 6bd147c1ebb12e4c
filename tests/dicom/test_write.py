"""Writing new pixels as a Part 10 object: which transfer syntax the outputs get, by source and by the operator's
choice (DICOM_OUTPUT_SYNTAX), and what happens when the chosen encoder cannot hold the pixels."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset

from service.dicom.write import OUTPUT_SYNTAXES, encode_instance, output_transfer_syntax


@pytest.mark.parametrize(
    ("source", "choice", "written"),
    [
        # The source's own syntax where it is lossless and encodable here.
        (uid.ExplicitVRLittleEndian, "source", uid.ExplicitVRLittleEndian),
        (uid.ImplicitVRLittleEndian, "source", uid.ImplicitVRLittleEndian),
        (uid.RLELossless, "source", uid.RLELossless),
        (uid.JPEG2000Lossless, "source", uid.JPEG2000Lossless),
        # Lossy, or not encodable here: uncompressed, adding no second generation of loss.
        (uid.JPEGBaseline8Bit, "source", uid.ExplicitVRLittleEndian),
        (uid.JPEGLosslessSV1, "source", uid.ExplicitVRLittleEndian),
        (uid.HTJ2KLossless, "source", uid.ExplicitVRLittleEndian),
        # The operator's choice, whatever the source.
        (uid.JPEG2000Lossless, "rle", uid.RLELossless),
        (uid.JPEGBaseline8Bit, "jpeg-ls", uid.JPEGLSLossless),
        (uid.ImplicitVRLittleEndian, "jpeg-2000", uid.JPEG2000Lossless),
        (uid.RLELossless, "explicit", uid.ExplicitVRLittleEndian),
    ],
)
def test_output_transfer_syntax(source: uid.UID, choice: str, written: uid.UID) -> None:
    assert output_transfer_syntax(source, choice) == written


def test_every_choice_of_the_setting_has_a_syntax() -> None:
    from typing import get_args

    from service.settings import Settings

    choices = get_args(Settings.model_fields["dicom_output_syntax"].annotation)
    assert set(choices) == {"source", *OUTPUT_SYNTAXES}


def _header() -> Dataset:
    header = Dataset()
    header.SOPClassUID = uid.SecondaryCaptureImageStorage
    header.SOPInstanceUID = uid.generate_uid()
    return header


def test_pixels_the_chosen_encoder_cannot_hold_are_written_uncompressed() -> None:
    """JPEG-LS needs at least 2 bits stored: 1-bit pixels are written as explicit VR little endian, unchanged."""
    frames = np.random.default_rng(0).integers(0, 2, (1, 32, 48), dtype=np.uint8)
    data = encode_instance(_header(), frames, photometric="MONOCHROME2", bits_stored=1,
                           transfer_syntax=uid.JPEGLSLossless)
    written = pydicom.dcmread(io.BytesIO(data))
    assert written.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
    np.testing.assert_array_equal(written.pixel_array, frames[0])


@pytest.mark.parametrize("syntax", [uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless])
def test_a_chosen_lossless_syntax_keeps_every_value(syntax: uid.UID) -> None:
    frames = np.random.default_rng(1).integers(-2048, 2047, (2, 40, 56), dtype=np.int16)
    data = encode_instance(_header(), frames, photometric="MONOCHROME2", bits_stored=12, transfer_syntax=syntax)
    written = pydicom.dcmread(io.BytesIO(data))
    assert written.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(written.pixel_array, frames)
