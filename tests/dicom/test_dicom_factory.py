"""The synthetic DICOM factory: well-formed Part 10 in every transfer syntax, lossless where promised, read back by
pydicom and dcmtk, PHI where `phi_values` says it is, and burned-in text in the pixels."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_factory import (
    PRIVATE_CREATOR,
    Patient,
    leaked_phi,
    make_dicom,
    make_no_pixels,
    new_study,
    phi_values,
    read,
    searchable_bytes,
    synthetic_anatomy,
)
from ocr_oracle import tokens_read
from pydicom import uid
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut

DCMDUMP = "/usr/bin/dcmdump"

#: (id, make_dicom keywords, lossless, expected pixel_array shape, dtype, PhotometricInterpretation)
MATRIX: list[tuple[str, dict[str, Any], bool, tuple[int, ...], str, str]] = [
    ("cr-mono1-12bit-rle", dict(modality="CR", photometric="MONOCHROME1", bits_stored=12,
                                transfer_syntax=uid.RLELossless), True, (512, 512), "uint16", "MONOCHROME1"),
    ("dx-mono2-16bit-explicit", dict(modality="DX", bits_stored=16, transfer_syntax=uid.ExplicitVRLittleEndian),
     True, (512, 512), "uint16", "MONOCHROME2"),
    ("ct-signed16-rescale-implicit", dict(modality="CT", signed=True, bits_stored=16, rescale=(1.0, -1024.0),
                                          transfer_syntax=uid.ImplicitVRLittleEndian),
     True, (512, 512), "int16", "MONOCHROME2"),
    ("mr-12bit-jpegls", dict(modality="MR", bits_stored=12, transfer_syntax=uid.JPEGLSLossless),
     True, (512, 512), "uint16", "MONOCHROME2"),
    ("us-rgb-jpeg-baseline", dict(modality="US", photometric="RGB", bits_stored=8,
                                  transfer_syntax=uid.JPEGBaseline8Bit), False, (512, 512, 3), "uint8", "YBR_FULL_422"),
    ("pt-rgb-j2k-lossless", dict(modality="PT", photometric="RGB", bits_stored=8, transfer_syntax=uid.JPEG2000Lossless),
     True, (512, 512, 3), "uint8", "RGB"),
    ("ct-3frames-rle", dict(modality="CT", frames=3, rows=256, columns=256, transfer_syntax=uid.RLELossless),
     True, (3, 256, 256), "uint16", "MONOCHROME2"),
    ("cr-deflated", dict(modality="CR", transfer_syntax=uid.DeflatedExplicitVRLittleEndian),
     True, (512, 512), "uint16", "MONOCHROME2"),
    ("cr-12bit-jpeg-lossless-sv1", dict(modality="CR", transfer_syntax=uid.JPEGLosslessSV1),
     True, (512, 512), "uint16", "MONOCHROME2"),
    ("ct-signed-2frames-jpeg-lossless-sv1", dict(modality="CT", signed=True, bits_stored=16, frames=2, rows=256,
                                                 columns=256, transfer_syntax=uid.JPEGLosslessSV1),
     True, (2, 256, 256), "int16", "MONOCHROME2"),
    ("mg-10bit-secondary-capture-j2k", dict(modality="MG", bits_stored=10, transfer_syntax=uid.JPEG2000Lossless),
     True, (512, 512), "uint16", "MONOCHROME2"),
]
SOP_CLASS = {"CR": uid.ComputedRadiographyImageStorage, "DX": uid.DigitalXRayImageStorageForPresentation,
             "CT": uid.CTImageStorage, "MR": uid.MRImageStorage, "US": uid.UltrasoundImageStorage,
             "PT": uid.PositronEmissionTomographyImageStorage, "MG": uid.SecondaryCaptureImageStorage}
BURNED = ("DOE JANE MARIE", "PID-4471-0815 12.04.1961")
cases = pytest.mark.parametrize("case", [case[0] for case in MATRIX])


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[bytes, Any]]:
    """Each matrix object, built once (with burned-in text and a known study) for all the tests that inspect it."""
    objects = {}
    for case_id, kwargs, *_ in MATRIX:
        study = new_study()
        objects[case_id] = (make_dicom(study=study, burned_in=BURNED, **kwargs), study)
    return objects


def case_of(case_id: str) -> tuple[str, dict[str, Any], bool, tuple[int, ...], str, str]:
    return next(case for case in MATRIX if case[0] == case_id)


@cases
def test_object_is_part_10_with_the_requested_transfer_syntax(case: str, built: dict[str, tuple[bytes, Any]]) -> None:
    _, kwargs, _, _, _, photometric = case_of(case)
    data, study = built[case]
    assert data[128:132] == b"DICM" and len(data) > 132
    ds = read(data)
    assert ds.file_meta.TransferSyntaxUID == kwargs["transfer_syntax"]
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == SOP_CLASS[kwargs["modality"]]
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyInstanceUID == study.study_uid
    assert ds.Modality == kwargs["modality"]
    assert ds.PhotometricInterpretation == photometric
    assert ds.BurnedInAnnotation == "YES"
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.BitsAllocated == (8 if kwargs.get("bits_stored", 12) == 8 else 16)
    assert ds.BitsStored == kwargs.get("bits_stored", 12) and ds.HighBit == ds.BitsStored - 1
    assert ds.PixelRepresentation == int(kwargs.get("signed", False))


@cases
def test_pixels_read_back_with_the_stored_values(case: str, built: dict[str, tuple[bytes, Any]]) -> None:
    _, kwargs, lossless, shape, dtype, _ = case_of(case)
    pixels = read(built[case][0]).pixel_array
    assert pixels.shape == shape and pixels.dtype == dtype
    # The same seed builds the same stored values in every syntax: the uncompressed object is the reference.
    reference_kwargs = {**kwargs, "transfer_syntax": uid.ExplicitVRLittleEndian}
    reference = read(make_dicom(burned_in=BURNED, **reference_kwargs)).pixel_array
    if lossless:
        np.testing.assert_array_equal(pixels, reference)
    else:
        assert np.abs(pixels.astype(np.int32) - reference).mean() < 2.0


@cases
def test_dcmdump_reads_the_object(case: str, built: dict[str, tuple[bytes, Any]], tmp_path: Path) -> None:
    path = tmp_path / "object.dcm"
    path.write_bytes(built[case][0])
    dumped = subprocess.run([DCMDUMP, str(path)], capture_output=True, text=True, errors="replace", timeout=30)
    assert dumped.returncode == 0, dumped.stderr
    assert not [line for line in (dumped.stdout + dumped.stderr).splitlines() if line.startswith(("E:", "F:"))]
    assert "PatientName" in dumped.stdout


@cases
def test_every_phi_value_is_in_the_bytes(case: str, built: dict[str, tuple[bytes, Any]]) -> None:
    data, study = built[case]
    expected = phi_values(Patient(), study=study)
    assert leaked_phi(data, Patient(), study=study) == expected
    assert all(len(value) >= 6 for value in expected)
    assert {Patient().name, Patient().patient_id, study.study_uid, study.accession, "St. Example Hospital"} <= set(
        expected
    )


def test_a_deflated_data_set_hides_phi_from_a_naive_byte_search(built: dict[str, tuple[bytes, Any]]) -> None:
    data, _ = built["cr-deflated"]
    assert Patient().name.encode() not in data
    assert Patient().name.encode() in searchable_bytes(data)


@pytest.mark.parametrize(
    ("transfer_syntax", "bits_stored", "signed", "photometric"),
    [
        (uid.RLELossless, 12, False, "MONOCHROME2"),
        (uid.RLELossless, 16, True, "MONOCHROME2"),
        (uid.JPEGLSLossless, 12, False, "MONOCHROME1"),
        (uid.JPEGLSLossless, 8, False, "RGB"),
        (uid.JPEGLSLossless, 12, True, "MONOCHROME2"),
        (uid.JPEG2000Lossless, 16, True, "MONOCHROME2"),
        (uid.JPEG2000Lossless, 8, False, "RGB"),
        (uid.JPEGLosslessSV1, 12, False, "MONOCHROME2"),
        (uid.JPEGLosslessSV1, 16, True, "MONOCHROME2"),
        (uid.DeflatedExplicitVRLittleEndian, 10, False, "MONOCHROME2"),
        (uid.ImplicitVRLittleEndian, 8, False, "YBR_FULL"),
    ],
)
def test_explicit_pixels_round_trip_exactly(
    transfer_syntax: str, bits_stored: int, signed: bool, photometric: str
) -> None:
    rng = np.random.default_rng(7)
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    shape = (2, 48, 64, 3) if photometric in ("RGB", "YBR_FULL") else (2, 48, 64)
    dtype = np.dtype(("i" if signed else "u") + ("1" if bits_stored == 8 else "2"))
    pixels = rng.integers(low, high, size=shape, endpoint=True).astype(dtype)
    pixels[0, 0, 0], pixels[0, 0, 1] = low, high  # the extremes of the range survive too
    data = make_dicom(modality="OT", pixels=pixels, bits_stored=bits_stored, signed=signed, photometric=photometric,
                      transfer_syntax=transfer_syntax)
    ds = read(data)
    assert ds.NumberOfFrames == 2 and (ds.Rows, ds.Columns) == (48, 64)
    ds.pixel_array_options(as_rgb=False)  # YBR_FULL: compare the stored values, not a colour conversion
    np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_colour_jpeg_baseline_is_ybr_full_422_subsampled_4_2_2(built: dict[str, tuple[bytes, Any]]) -> None:
    ds = read(built["us-rgb-jpeg-baseline"][0])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    sof = frame.index(b"\xff\xc0")  # baseline DCT
    assert frame[sof + 9] == 3  # components
    assert frame[sof + 11] == 0x21 and frame[sof + 14] == frame[sof + 17] == 0x11  # Y 2x1, Cb and Cr 1x1
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"


def test_jpeg_lossless_uses_selection_value_1(built: dict[str, tuple[bytes, Any]]) -> None:
    ds = read(built["cr-12bit-jpeg-lossless-sv1"][0])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert frame[:4] == b"\xff\xd8\xff\xc3"  # SOI, then SOF3: lossless
    sos = frame.index(b"\xff\xda")
    components = frame[sos + 4]
    assert frame[sos + 5 + 2 * components] == 1  # Ss: the predictor


def test_multi_frame_and_sop_uids() -> None:
    study = new_study()
    data = make_dicom(modality="US", frames=4, rows=64, columns=80, bits_stored=8, study=study,
                      series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    ds = read(data)
    assert ds.NumberOfFrames == 4 and ds.pixel_array.shape == (4, 64, 80)
    assert ds.SOPClassUID == uid.UltrasoundMultiFrameImageStorage
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID) == (
        "1.2.3.4", "1.2.3.4.5", "1.2.3.4.5")
    assert not np.array_equal(ds.pixel_array[0], ds.pixel_array[1])  # every frame its own speckle


@pytest.mark.parametrize(
    ("modality", "rgb"), [("CR", False), ("DX", False), ("CT", False), ("MR", False), ("US", False), ("PT", False),
                          ("US", True), ("PT", True)]
)
def test_make_dicom_stores_the_synthetic_anatomy(modality: str, rgb: bool) -> None:
    kwargs: dict[str, Any] = dict(bits_stored=8 if rgb else 12, signed=False, rgb=rgb, seed=3)
    anatomy = synthetic_anatomy(modality, 128, 160, **kwargs)
    assert anatomy.shape == ((128, 160, 3) if rgb else (128, 160))
    np.testing.assert_array_equal(anatomy, synthetic_anatomy(modality, 128, 160, **kwargs))
    assert not np.array_equal(anatomy, synthetic_anatomy(modality, 128, 160, **{**kwargs, "seed": 4}))
    stored = read(make_dicom(modality=modality, rows=128, columns=160, photometric="RGB" if rgb else "MONOCHROME2",
                             bits_stored=kwargs["bits_stored"], seed=3)).pixel_array
    np.testing.assert_array_equal(stored, anatomy)
    assert anatomy.std() > 0.05 * anatomy.max()  # structure, not a flat field


def test_ct_anatomy_is_in_plausible_hounsfield_units() -> None:
    ds = read(make_dicom(modality="CT", signed=True, bits_stored=16, rows=256, columns=256))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.RescaleType) == (1.0, -1024.0, "HU")
    stored = ds.pixel_array
    assert stored.min() == -2000  # padding outside the field of view
    hu = apply_modality_lut(stored, ds)
    body = hu[stored > -2000]
    assert np.mean(np.abs(body + 1000) < 60) > 0.2  # air
    assert np.mean(np.abs(body - 40) < 40) > 0.1  # soft tissue
    assert np.mean(body > 700) > 0.003  # bone
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 400.0)


@pytest.mark.parametrize(
    ("kwargs", "ink"),
    [
        (dict(modality="CR", photometric="MONOCHROME1", bits_stored=12), 0),
        (dict(modality="CR", bits_stored=12), 4095),
        (dict(modality="CT", signed=True, bits_stored=16, frames=2), 32767),
        (dict(modality="US", photometric="RGB", bits_stored=8), 255),
    ],
)
def test_burned_in_text_changes_the_pixels_where_the_text_is(kwargs: dict[str, Any], ink: int) -> None:
    plain = read(make_dicom(rows=256, columns=256, **kwargs))
    burned = read(make_dicom(rows=256, columns=256, burned_in=BURNED, **kwargs))
    assert (plain.BurnedInAnnotation, burned.BurnedInAnnotation) == ("NO", "YES")
    before, after = plain.pixel_array, burned.pixel_array
    if kwargs.get("frames", 1) == 1:
        before, after = before[None], after[None]
    for frame_before, frame_after in zip(before, after, strict=True):  # every frame carries the text
        differs = frame_before != frame_after
        changed = np.argwhere(differs.any(axis=-1) if differs.ndim == 3 else differs)
        assert len(changed) > 200
        assert changed[:, 0].max() < 256 // 4 and changed[:, 1].min() < 256 // 8  # a block from the top-left
        assert np.count_nonzero(frame_after == ink) > np.count_nonzero(frame_before == ink) + 50


def test_burned_in_text_is_ocr_readable_on_the_windowed_display() -> None:
    ds = read(make_dicom(modality="CT", signed=True, bits_stored=16, burned_in=BURNED))
    hu = apply_modality_lut(ds.pixel_array, ds)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    display = np.rint(np.clip((hu - (center - width / 2)) / width, 0, 1) * 255).astype(np.uint8)
    [read_tokens] = tokens_read([[(display[:80, :320], 6)]], BURNED)
    assert {"JANE", "MARIE"} <= read_tokens


@pytest.mark.parametrize(("kind", "sop_class"), [("SR", uid.BasicTextSRStorage),
                                                 ("PR", uid.GrayscaleSoftcopyPresentationStateStorage)])
def test_objects_without_pixels(kind: str, sop_class: str, tmp_path: Path) -> None:
    study = new_study()
    data = make_no_pixels(kind, study=study, transfer_syntax=uid.ImplicitVRLittleEndian, rows=256, columns=256)
    assert data[128:132] == b"DICM"
    ds = read(data)
    assert "PixelData" not in ds
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == sop_class and ds.Modality == kind
    assert ds.PatientName == Patient().name and ds.StudyInstanceUID == study.study_uid
    if kind == "SR":
        assert ds.ContentSequence[0].PersonName == Patient().name
        assert Patient().name_text in ds.ContentSequence[2].ContentSequence[0].TextValue
    else:
        assert Patient().name_text in ds.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue
    leaked = leaked_phi(data, Patient(), study=study)
    assert {Patient().name, Patient().patient_id, Patient().name_text, study.study_uid, study.accession} <= set(leaked)
    path = tmp_path / "object.dcm"
    path.write_bytes(data)
    assert subprocess.run([DCMDUMP, str(path)], capture_output=True, timeout=30).returncode == 0


def test_make_no_pixels_rejects_what_it_cannot_write() -> None:
    with pytest.raises(TypeError):
        make_no_pixels("SR", colour=True)
    with pytest.raises(ValueError):
        make_no_pixels("SR", transfer_syntax=uid.RLELossless)


@pytest.mark.parametrize(("name", "charset"), [("MÜLLER^JÖRG", "ISO_IR 100"), ("ŁUKASIEWICZ^JAN", "ISO_IR 192")])
def test_non_ascii_names_round_trip(name: str, charset: str) -> None:
    patient = Patient(name=name)
    study = new_study()
    data = make_dicom(patient=patient, study=study, rows=64, columns=64)
    ds = read(data)
    assert ds.SpecificCharacterSet == charset
    assert ds.PatientName == name and ds.OtherPatientIDsSequence[0].PatientID == patient.patient_id
    assert name.encode("latin-1" if charset == "ISO_IR 100" else "utf-8") in data
    assert name in leaked_phi(data, patient, study=study)


def test_header_carries_what_a_modality_writes() -> None:
    study = new_study()
    ds = read(make_dicom(study=study, rows=64, columns=64))
    assert ds.ImageType == ["ORIGINAL", "PRIMARY"] and ds.ViewPosition == "PA" and ds.BodyPartExamined == "CHEST"
    assert ds.InstitutionName == "St. Example Hospital" and "DOE JANE" in ds.StudyDescription
    assert "DOE JANE" in ds.ImageComments and ds.AccessionNumber == study.accession
    assert ds.RequestAttributesSequence[0].ReferencedStudySequence[0].ReferencedSOPInstanceUID == study.study_uid
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID in phi_values(Patient(), study=study)
    block = ds.private_block(0x0009, PRIVATE_CREATOR)
    assert block[0x10].value == Patient().name and block[0x11].value == Patient().patient_id
    assert "FrameOfReferenceUID" not in ds and "RescaleSlope" not in ds
    assert {"WindowCenter", "WindowWidth", "PatientAge", "PatientAddress", "OtherPatientIDs"} <= set(ds.dir())

    bare = read(make_dicom(rows=64, columns=64, body_part=None, window=None, phi_in_sequences=False,
                           private_tags=False, rescale=(2.0, -10.0)))
    assert not {"BodyPartExamined", "WindowCenter", "RequestAttributesSequence", "OtherPatientIDsSequence",
                "ReferencedImageSequence"} & set(bare.dir())
    assert not any(element.tag.is_private for element in bare)
    assert (float(bare.RescaleSlope), float(bare.RescaleIntercept)) == (2.0, -10.0)
    for modality in ("CT", "MR", "PT"):
        assert "FrameOfReferenceUID" in read(make_dicom(modality=modality, rows=32, columns=32))
    windowed = read(make_dicom(rows=64, columns=64, window=(1000.0, 500.0)))
    assert (float(windowed.WindowCenter), float(windowed.WindowWidth)) == (1000.0, 500.0)


def test_gray_and_ybr_full_variants() -> None:
    gray = read(make_dicom(modality="DX", bits_stored=8, frames=2, rows=96, columns=128,
                           transfer_syntax=uid.JPEGBaseline8Bit, burned_in=BURNED))
    assert gray.PhotometricInterpretation == "MONOCHROME2" and gray.pixel_array.shape == (2, 96, 128)
    reference = read(make_dicom(modality="DX", bits_stored=8, frames=2, rows=96, columns=128, burned_in=BURNED))
    assert np.abs(gray.pixel_array.astype(np.int32) - reference.pixel_array).mean() < 2.0

    ybr = read(make_dicom(modality="US", photometric="YBR_FULL", bits_stored=8, rows=128, columns=128,
                          transfer_syntax=uid.RLELossless, burned_in=BURNED))
    rgb = read(make_dicom(modality="US", photometric="RGB", bits_stored=8, rows=128, columns=128, burned_in=BURNED))
    assert ybr.PhotometricInterpretation == "YBR_FULL"
    # pydicom converts YBR_FULL to RGB on reading: the burned text is white there too, like the RGB original.
    assert np.abs(ybr.pixel_array.astype(np.int32) - rgb.pixel_array).mean() < 2.0


def test_a_naive_de_identification_still_leaks_through_sequences_and_private_tags() -> None:
    """What the leak tests rely on: blanking the top-level attributes is not enough to pass them."""
    study = new_study()
    for nested in (True, False):
        ds = read(make_dicom(study=study, rows=32, columns=32, phi_in_sequences=nested, private_tags=nested))
        ds.PatientName, ds.PatientID = "ANON", "ANON"
        ds.OtherPatientNames = "ANON"  # holds another name in PN form
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        leaked = leaked_phi(buffer.getvalue(), Patient(), study=study)
        assert (Patient().name in leaked) is nested  # the PN form: only private tags still hold it
        assert Patient().patient_id in leaked  # in sequences and private tags, and always in ImageComments
        assert Patient().name_text in leaked  # free text: StudyDescription, ImageComments
