"""Reading DICOM objects (`service.dicom.read`): every frame's stored values, the display rendering through the
modality LUT, the window and the presentation, and failures that are always an `UnprocessableObject` with a reason
and a message of the service's own (never a header value, a pydicom warning or a log line quoting one)."""

from __future__ import annotations

import io
import logging
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_factory import Patient, Study, make_dicom, make_no_pixels, new_study, phi_values, read
from pydicom import uid
from pydicom.dataset import Dataset

from service.dicom.read import DicomImage, read_dicom
from service.errors import UnprocessableObject

MAX_PIXELS = 10**8
BURNED = ("DOE JANE MARIE", "PID-4471-0815 12.04.1961")
#: Stands for patient data in a header where every text value is patient data.
MARKER = "ZQXPHIMARK"


def _read(data: bytes) -> DicomImage:
    return read_dicom(data, max_bytes=len(data), max_pixels=MAX_PIXELS)


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict[str, Any]
    #: What the reader reports (colour is always converted to RGB).
    photometric: str
    dtype: str
    lossless: bool = True

    @property
    def frames(self) -> int:
        return int(self.kwargs.get("frames", 1))

    @property
    def shape(self) -> tuple[int, ...]:
        rows, columns = self.kwargs.get("rows", 512), self.kwargs.get("columns", 512)
        colour = self.photometric == "RGB"
        return (self.frames, rows, columns, *((3,) if colour else ()))


MATRIX = [
    Case("cr-mono1-12bit-rle", dict(modality="CR", photometric="MONOCHROME1", bits_stored=12,
                                    transfer_syntax=uid.RLELossless), "MONOCHROME1", "uint16"),
    Case("dx-mono2-16bit-explicit", dict(modality="DX", bits_stored=16, transfer_syntax=uid.ExplicitVRLittleEndian),
         "MONOCHROME2", "uint16"),
    Case("ct-signed16-rescale-implicit", dict(modality="CT", signed=True, bits_stored=16, rescale=(1.0, -1024.0),
                                              transfer_syntax=uid.ImplicitVRLittleEndian), "MONOCHROME2", "int16"),
    Case("mr-12bit-jpegls", dict(modality="MR", bits_stored=12, transfer_syntax=uid.JPEGLSLossless),
         "MONOCHROME2", "uint16"),
    Case("us-rgb-jpeg-baseline-ybr422", dict(modality="US", photometric="RGB", bits_stored=8,
                                             transfer_syntax=uid.JPEGBaseline8Bit), "RGB", "uint8", lossless=False),
    Case("pt-rgb-j2k-lossless", dict(modality="PT", photometric="RGB", bits_stored=8,
                                     transfer_syntax=uid.JPEG2000Lossless), "RGB", "uint8"),
    Case("cr-12bit-jpeg-lossless-sv1", dict(modality="CR", transfer_syntax=uid.JPEGLosslessSV1),
         "MONOCHROME2", "uint16"),
    Case("cr-deflated", dict(modality="CR", transfer_syntax=uid.DeflatedExplicitVRLittleEndian),
         "MONOCHROME2", "uint16"),
    Case("ct-3frames-rle", dict(modality="CT", frames=3, rows=256, columns=256, transfer_syntax=uid.RLELossless),
         "MONOCHROME2", "uint16"),
    Case("us-rgb-3frames-jpeg-baseline", dict(modality="US", photometric="RGB", bits_stored=8, frames=3, rows=128,
                                              columns=128, transfer_syntax=uid.JPEGBaseline8Bit),
         "RGB", "uint8", lossless=False),
]
MONOCHROME = [case for case in MATRIX if case.photometric != "RGB"]
by_case = pytest.mark.parametrize("case", MATRIX, ids=[case.name for case in MATRIX])
by_monochrome_case = pytest.mark.parametrize("case", MONOCHROME, ids=[case.name for case in MONOCHROME])


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[bytes, DicomImage]]:
    """Each matrix object (with burned-in text), built and read once for every test that inspects it."""
    objects = {}
    for case in MATRIX:
        data = make_dicom(burned_in=BURNED, **case.kwargs)
        objects[case.name] = (data, _read(data))
    return objects


def _stored_reference(case: Case) -> np.ndarray:
    """The case's stored values as pydicom reads them from the same object written uncompressed (frames first)."""
    pixels = read(make_dicom(burned_in=BURNED, **{**case.kwargs, "transfer_syntax": uid.ExplicitVRLittleEndian}))
    array = pixels.pixel_array
    return array if case.frames > 1 else array[np.newaxis]


# ------------------------------------------------------------------------------------------ stored values


@by_case
def test_frames_are_the_stored_values_of_every_frame(case: Case, built: dict[str, tuple[bytes, DicomImage]]) -> None:
    data, image = built[case.name]
    assert image.frames.shape == case.shape and image.frames.dtype == case.dtype
    assert image.frame_count == case.frames
    assert image.photometric == case.photometric
    assert image.transfer_syntax == case.kwargs["transfer_syntax"] == read(data).file_meta.TransferSyntaxUID
    if case.kwargs["transfer_syntax"] == uid.JPEGBaseline8Bit:  # colour JPEG baseline is YBR_FULL_422 in the file
        assert image.dataset.PhotometricInterpretation == "YBR_FULL_422"
    reference = _stored_reference(case)
    if case.lossless:
        np.testing.assert_array_equal(image.frames, reference)
    else:  # JPEG baseline (YBR_FULL_422 in the file): close to the RGB it was made from
        assert np.abs(image.frames.astype(np.int32) - reference).mean() < 3.0
    if case.frames > 1:  # each frame its own, not the first repeated
        assert not np.array_equal(image.frames[0], image.frames[1])


@by_case
def test_display_is_8_bit_gray_or_bgr_for_every_frame(case: Case, built: dict[str, tuple[bytes, DicomImage]]) -> None:
    _, image = built[case.name]
    for index in range(image.frame_count):
        display = image.display(index)
        assert display.dtype == np.uint8
        assert display.shape == case.shape[1:]
        assert display.std() > 20
        if case.photometric == "RGB":  # 8-bit RGB stored values, shown in OpenCV's BGR order
            assert image.curve is None
            np.testing.assert_array_equal(display[..., ::-1], image.frames[index])
    if case.frames > 1:
        assert not np.array_equal(image.display(0), image.display(case.frames - 1))


@by_monochrome_case
def test_the_curve_white_and_black_values_display_white_and_black(
    case: Case, built: dict[str, tuple[bytes, DicomImage]]
) -> None:
    _, image = built[case.name]
    curve = image.curve
    assert curve is not None
    probe = np.array([[curve.white, curve.black]], dtype=image.frames.dtype)
    np.testing.assert_array_equal(curve.apply(probe), [[255, 0]])
    bits = image.bits_stored
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if image.frames.dtype.kind == "i" else (0, (1 << bits) - 1)
    assert low <= curve.black <= high and low <= curve.white <= high
    # Stamped with these, a label shows white on black: MONOCHROME1 is white at its lowest values.
    assert (curve.white < curve.black) == (case.photometric == "MONOCHROME1")


def test_burned_in_text_at_the_maximum_of_a_signed_ct_displays_white(
    built: dict[str, tuple[bytes, DicomImage]],
) -> None:
    _, image = built["ct-signed16-rescale-implicit"]
    text = image.frames[0] == np.iinfo(np.int16).max  # far above the 40/400 HU window, as consoles burn it
    assert np.count_nonzero(text) > 100
    assert (image.display(0)[text] == 255).all()
    assert image.curve is not None and image.curve.white == np.iinfo(np.int16).max


# --------------------------------------------------------------------------------------------- the curve


def _anatomy(**kwargs: Any) -> np.ndarray:
    """Stored values of a synthetic object's first frame, MONOCHROME2 sense."""
    return np.asarray(read(make_dicom(**kwargs)).pixel_array)


@pytest.mark.parametrize("window", [(2100.0, 1800.0), None], ids=["window-in-file", "no-window"])
def test_monochrome1_displays_inverted_relative_to_the_same_values_as_monochrome2(
    window: tuple[float, float] | None,
) -> None:
    pixels = _anatomy(modality="CR", rows=256, columns=256, window=None)
    shown = {
        photometric: _read(make_dicom(modality="CR", photometric=photometric, pixels=pixels, window=window)).display(0)
        for photometric in ("MONOCHROME1", "MONOCHROME2")
    }
    total = shown["MONOCHROME1"].astype(np.int32) + shown["MONOCHROME2"]
    assert np.abs(total - 255).max() <= 1
    assert shown["MONOCHROME2"].std() > 30


@dataclass(frozen=True)
class Window:
    name: str
    kwargs: dict[str, Any]
    #: Stored values expected white (>= 250), black (<= 5), and mid-grey (the window's centre).
    white: tuple[int, ...]
    black: tuple[int, ...]
    grey: tuple[int, ...] = ()
    edit: dict[str, Any] = field(default_factory=dict)


WINDOWS = [
    # A 12-bit DX, window 2000/1000: 2500 (centre + width/2) is white, 1500 (centre - width/2) black.
    Window("dx-12bit", dict(modality="DX", bits_stored=12, window=(2000.0, 1000.0)), white=(2500, 4095),
           black=(1500, 0), grey=(2000,)),
    Window("cr-12bit-monochrome1", dict(modality="CR", bits_stored=12, photometric="MONOCHROME1",
                                        window=(2000.0, 1000.0)), white=(1500, 0), black=(2500, 4095), grey=(2000,)),
    # A signed CT, window 40/400 HU through the rescale (1, -1024): 240 HU is stored 1264, -160 HU 864.
    Window("ct-signed-rescale", dict(modality="CT", bits_stored=16, signed=True, rescale=(1.0, -1024.0),
                                     window=(40.0, 400.0)), white=(1264, 32767), black=(864, -2000), grey=(1064,)),
    # A rescale slope of 0.5 and intercept -1000: 240 HU is stored 2480, -160 HU 1680.
    Window("ct-rescale-slope", dict(modality="CT", bits_stored=16, signed=True, rescale=(0.5, -1000.0),
                                    window=(40.0, 400.0)), white=(2480,), black=(1680,), grey=(2080,)),
    # Several windows: the first is the default one.
    Window("dx-two-windows", dict(modality="DX", bits_stored=12, window=None), white=(2500,), black=(1500,),
           grey=(2000,), edit=dict(WindowCenter=[2000, 600], WindowWidth=[1000, 300])),
]


def _edited(data: bytes, **attributes: Any) -> bytes:
    ds = read(data)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("window", WINDOWS, ids=[window.name for window in WINDOWS])
def test_the_window_in_the_file_is_honoured(window: Window) -> None:
    probes = [*window.white, *window.black, *window.grey]
    signed = window.kwargs.get("signed", False)
    pixels = np.full((64, 64), window.grey[0] if window.grey else probes[0], np.int16 if signed else np.uint16)
    pixels[0, : len(probes)] = probes
    data = make_dicom(rows=64, columns=64, pixels=pixels, **window.kwargs)
    if window.edit:
        data = _edited(data, **window.edit)
    shown = _read(data).display(0)[0, : len(probes)].tolist()
    whites = shown[: len(window.white)]
    blacks = shown[len(window.white) : len(window.white) + len(window.black)]
    greys = shown[len(window.white) + len(window.black) :]
    assert all(value >= 250 for value in whites), shown
    assert all(value <= 5 for value in blacks), shown
    assert all(110 <= value <= 145 for value in greys), shown


NO_WINDOW = {
    "cr-12bit": dict(modality="CR", bits_stored=12),
    "cr-12bit-monochrome1": dict(modality="CR", bits_stored=12, photometric="MONOCHROME1"),
    "mr-12bit": dict(modality="MR", bits_stored=12),
    "ct-signed": dict(modality="CT", bits_stored=16, signed=True),
}


@pytest.mark.parametrize("kwargs", NO_WINDOW.values(), ids=NO_WINDOW.keys())
def test_a_file_without_a_window_uses_its_grey_range(kwargs: dict[str, Any]) -> None:
    shown = _read(make_dicom(rows=256, columns=256, window=None, **kwargs)).display(0)
    saturated = np.count_nonzero((shown == 0) | (shown == 255)) / shown.size
    assert shown.std() > 40
    # A CT's padding outside its circular field of view and the air around the body are black in any window.
    assert saturated < (0.6 if kwargs["modality"] == "CT" else 0.1)


def test_a_16_bit_radiograph_using_a_narrow_range_is_not_shown_black() -> None:
    """Values between 1000 and 3000 of 65535, and no window: the default window spans the values, not the type."""
    anatomy = _anatomy(modality="DX", rows=256, columns=256, bits_stored=12, window=None).astype(np.float64)
    pixels = (1000 + anatomy / 4095 * 2000).astype(np.uint16)
    shown = _read(make_dicom(modality="DX", bits_stored=16, pixels=pixels, window=None)).display(0)
    assert shown.std() > 40 and np.median(shown) > 30
    assert np.count_nonzero((shown == 0) | (shown == 255)) / shown.size < 0.1


# --------------------------------------------------------------------------------------------- bad input


_TEXT_VRS = ("PN", "LO", "SH", "LT", "ST", "UT", "UC", "AE", "DA", "TM", "DT", "AS")


def _marked(data: bytes) -> bytes:
    """`data` with every text, date and name value at every depth (private ones included) set to MARKER: a header
    where anything a message could quote is patient data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MARKER is no valid date, time or age
        ds = read(data)
        for element in ds.iterall():
            structural = element.keyword in ("SpecificCharacterSet", "PhotometricInterpretation")
            if element.VR in (*_TEXT_VRS, "CS") and not structural:
                element.value = MARKER
            elif element.tag.is_private and element.VR in ("OB", "UN"):
                element.value = MARKER.encode() * 4
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with(data: bytes, edit: Callable[[Dataset], None]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read(data)
        edit(ds)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _transfer_syntax(value: str) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = value

    return edit


def _size(rows: int, columns: int) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.Rows, ds.Columns = rows, columns

    return edit


def _photometric_marker(ds: Dataset) -> None:
    ds.PhotometricInterpretation = MARKER


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


def _cut(data: bytes, where: str) -> bytes:
    """`data` truncated: right after DICM, inside the File Meta, inside a value of the data set, exactly before the
    pixel data element, inside that element's own header, or in the middle of the pixel data."""
    pixels = data.rfind(_PIXEL_DATA_TAG)
    if where == "preamble":
        return data[:132]
    if where == "file-meta":
        return data[:150]
    if pixels < 0:  # deflated: the data set is one compressed stream
        return data[: {"mid-header": len(data) // 8, "mid-pixels": len(data) // 2}[where]]
    marker = data.find(MARKER.encode(), pixels // 2)
    assert marker > 0
    positions = {
        "mid-value": marker + 4,
        "before-pixel-data": pixels,
        "pixel-element-header": pixels + 6,
        "mid-pixels": (pixels + len(data)) // 2,
    }
    return data[: positions[where]]


SYNTAXES = {
    "explicit": uid.ExplicitVRLittleEndian,
    "implicit": uid.ImplicitVRLittleEndian,
    "deflated": uid.DeflatedExplicitVRLittleEndian,
    "rle": uid.RLELossless,
    "jpegls": uid.JPEGLSLossless,
}
#: The failure objects' UIDs are fixed: where a cut falls (inside a value or between two elements) must not
#: depend on the length of a random UID.
FIXED_STUDY_UID = "1.2.826.0.1.3680043.8.498.11"
FIXED_SERIES_UID = "1.2.826.0.1.3680043.8.498.12"
FIXED_SOP_UID = "1.2.826.0.1.3680043.8.498.13"
@dataclass(frozen=True)
class Failure:
    name: str
    build: Callable[[Patient, Study], bytes]
    reason: str
    #: Text the message must hold (the SOP class, the transfer syntax...).
    names: tuple[str, ...] = ()


def _object(syntax: str, **kwargs: Any) -> Callable[[Patient, Study], bytes]:
    def build(patient: Patient, study: Study) -> bytes:
        return make_dicom(modality="CR", rows=64, columns=64, transfer_syntax=SYNTAXES[syntax], patient=patient,
                          study=study, series_uid=FIXED_SERIES_UID, sop_uid=FIXED_SOP_UID, **kwargs)

    return build


def _truncated(syntax: str, where: str) -> Callable[[Patient, Study], bytes]:
    return lambda patient, study: _cut(_marked(_object(syntax)(patient, study)), where)


def _edited_object(syntax: str, edit: Callable[[Dataset], None]) -> Callable[[Patient, Study], bytes]:
    return lambda patient, study: _with(_marked(_object(syntax)(patient, study)), edit)


#: Where a file is cut: pydicom reads many of these without an error (a data set cut between two elements reads as
#: a shorter one, an encapsulated pixel data element cut short is dropped), so the service checks for them itself.
TRUNCATIONS = [
    ("explicit", "preamble"), ("explicit", "file-meta"), ("explicit", "mid-value"), ("explicit", "before-pixel-data"),
    ("explicit", "pixel-element-header"), ("explicit", "mid-pixels"),
    ("implicit", "mid-value"), ("implicit", "before-pixel-data"), ("implicit", "mid-pixels"),
    ("deflated", "mid-header"), ("deflated", "mid-pixels"),
    ("rle", "mid-value"), ("rle", "pixel-element-header"), ("rle", "mid-pixels"),
    ("jpegls", "mid-pixels"),
]  # fmt: skip
FAILURES = [
    Failure("sr-without-pixels", lambda patient, study: _marked(make_no_pixels("SR", patient=patient, study=study)),
            "no-pixel-data", names=("Basic Text SR Storage",)),
    Failure("pr-without-pixels", lambda patient, study: _marked(make_no_pixels("PR", patient=patient, study=study)),
            "no-pixel-data", names=("Grayscale Softcopy Presentation State Storage",)),
    *[Failure(f"truncated-{syntax}-{where}", _truncated(syntax, where), "corrupt-dicom")
      for syntax, where in TRUNCATIONS],
    Failure("mpeg2-syntax-on-rle", _edited_object("rle", _transfer_syntax("1.2.840.10008.1.2.4.100")),
            "unsupported-dicom", names=("MPEG2", "1.2.840.10008.1.2.4.100")),
    Failure("unknown-syntax-on-rle", _edited_object("rle", _transfer_syntax("1.2.3.4.5")), "unsupported-dicom",
            names=("1.2.3.4.5",)),
    Failure("unknown-syntax-on-explicit", _edited_object("explicit", _transfer_syntax("1.2.3.4.5")),
            "unsupported-dicom", names=("1.2.3.4.5",)),
    Failure("photometric-is-patient-text", _edited_object("explicit", _photometric_marker), "unsupported-dicom"),
    Failure("40000-square-explicit", _edited_object("explicit", _size(40000, 40000)), "too-many-pixels",
            names=("40000x40000",)),
    Failure("40000-square-rle", _edited_object("rle", _size(40000, 40000)), "too-many-pixels",
            names=("40000x40000",)),
]


def _failure_params() -> Iterator[Any]:
    for failure in FAILURES:
        yield pytest.param(failure, id=failure.name)


@contextmanager
def _quiet_about(values: list[str], caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails if a warning escapes the block (whatever it says), or if a log record of it quotes one of `values`."""
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [str(warning.message) for warning in caught] == []
    logged = [record.getMessage() for record in caplog.records]
    assert [line for line in logged if any(value in line for value in values)] == []


def _patient_values(patient: Patient, study: Study) -> list[str]:
    return [*phi_values(patient, study=study), MARKER]


@pytest.mark.parametrize("failure", list(_failure_params()))
def test_bad_objects_fail_with_their_reason_and_no_patient_value(
    failure: Failure, caplog: pytest.LogCaptureFixture
) -> None:
    patient, study = Patient(), new_study(study_uid=FIXED_STUDY_UID)
    data = failure.build(patient, study)
    values = _patient_values(patient, study)
    with _quiet_about(values, caplog), pytest.raises(UnprocessableObject) as raised:  # never another exception type
        _read(data)
    message = raised.value.message
    assert str(raised.value) == message
    assert [value for value in values if value in message] == []
    assert all(name in message for name in failure.names), message
    assert raised.value.reason == failure.reason, message


@pytest.mark.parametrize("syntax", ["explicit", "rle", "deflated"])
def test_a_truncated_object_is_unprocessable_wherever_it_is_cut(
    syntax: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Wherever it is cut, an object gets a clean refusal, never a crash. The
    last 8 bytes are left alone: an encapsulated object cut there has lost only its sequence delimiter."""
    patient, study = Patient(), new_study(study_uid=FIXED_STUDY_UID)
    data = _marked(_object(syntax)(patient, study))
    values = _patient_values(patient, study)
    for cut in range(0, len(data) - 8, max(1, len(data) // 60)):
        with _quiet_about(values, caplog), pytest.raises(UnprocessableObject) as raised:
            _read(data[:cut])
        assert [value for value in values if value in raised.value.message] == [], cut


@pytest.mark.parametrize("syntax", ["explicit", "rle"])
def test_too_many_pixels_is_refused_before_decoding(syntax: str) -> None:
    data = _with(_object(syntax)(Patient(), new_study()), _size(40000, 40000))
    assert len(data) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(UnprocessableObject) as raised:
            _read(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert raised.value.reason == "too-many-pixels"
    assert peak < 20 * 2**20  # 1.6 gigapixels were never allocated


def test_an_object_over_the_byte_limit_is_refused_unread() -> None:
    data = _object("explicit")(Patient(), new_study())
    with pytest.raises(UnprocessableObject) as raised:
        read_dicom(data, max_bytes=len(data) - 1, max_pixels=MAX_PIXELS)
    assert raised.value.reason == "too-large"


def test_a_malformed_header_reads_without_warnings_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Every text value set to a patient marker (dates and code strings included, which pydicom warns about): the
    object is still read, and nothing quoting the marker escapes as a warning or a log record."""
    patient, study = Patient(), new_study()
    data = _marked(make_dicom(modality="CR", rows=64, columns=64, patient=patient, study=study))
    with _quiet_about(_patient_values(patient, study), caplog):
        image = _read(data)
        assert image.frames.shape == (1, 64, 64) and image.display(0).dtype == np.uint8
        assert (image.modality, image.body_part) == (MARKER, MARKER)


def test_the_read_dataset_is_the_header_of_the_object() -> None:
    patient, study = Patient(), new_study()
    image = _read(make_dicom(modality="DX", rows=64, columns=64, patient=patient, study=study))
    assert isinstance(image.dataset, pydicom.Dataset)
    assert (image.modality, image.body_part) == ("DX", "CHEST")
    assert image.dataset.StudyInstanceUID == study.study_uid and image.dataset.PatientID == patient.patient_id


@pytest.mark.parametrize(("syntax", "fastest"), [(uid.JPEGLSLossless, "pyjpegls"), (uid.JPEG2000Lossless, "pylibjpeg")])
def test_the_fastest_decoder_decodes_and_the_others_stand_in_when_it_fails(
    syntax: str, fastest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where several plugins decode a syntax, the fastest is asked first (pydicom would try GDCM first: about twice
    as slow on JPEG-LS); if it fails, the object is still read, by the others, to the same values."""
    data = make_dicom(modality="DX", bits_stored=12, transfer_syntax=syntax, rows=128, columns=160)
    decoder = pydicom.pixels.get_decoder(syntax)
    as_array = type(decoder).as_array
    asked: list[str] = []

    def recorded(self: Any, src: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("decoding_plugin", ""))
        return as_array(self, src, **kwargs)

    monkeypatch.setattr(type(decoder), "as_array", recorded)
    expected = _read(data).frames
    assert asked == [fastest]
    assert np.array_equal(expected[0], read(data).pixel_array)

    def failing(self: Any, src: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("decoding_plugin", ""))
        if kwargs.get("decoding_plugin") == fastest:
            raise RuntimeError("the plugin failed")
        return as_array(self, src, **kwargs)

    asked.clear()
    monkeypatch.setattr(type(decoder), "as_array", failing)
    assert np.array_equal(_read(data).frames, expected)
    assert asked == [fastest, ""]
