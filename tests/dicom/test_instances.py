"""The two DICOM outputs of an analyzed object, through what a worker runs (`analyze_batch` with the default
pneumonia spec and a constant model): the processed copy is a derived instance of the same patient and study with
the result burned in; the anonymized copy is de-identified in its header (PS3.15 basic profile, keyed UIDs and
pseudonym) and in its pixels (no burned-in text readable on any frame)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from conftest import SPEC_TEMPLATE, TEST_PSEUDONYM_KEY, TEXT_OPTIONS, shared_text_detector
from dicom_factory import Patient, Study, leaked_phi, make_dicom, new_study, phi_values, read
from ocr_oracle import View, attack_views, ink_box, tokens_read
from pydicom import uid
from pydicom.uid import UID

from service.dicom.read import DicomImage, read_dicom
from service.engine.analysis import analyze_batch
from service.engine.messages import Analysis, AnalysisOutcome, AnalysisRequest, ImageLimits
from service.errors import UnprocessableObject
from service.models.spec import NOT_ASSESSED, ModelSpec

ROOT = Path(__file__).resolve().parents[2]
DCMDUMP = "/usr/bin/dcmdump"
LIMITS = ImageLimits(max_bytes=10**8, max_pixels=10**8)
KEY = TEST_PSEUDONYM_KEY.encode()
OTHER_KEY = b"another-pseudonym-key-fedcba9876543210"
PATIENT = Patient()
BURNED = ("DOE JANE MARIE", "PID-4471-0815 12.04.1961")
#: The label of the constant model's output (logits -2, 2: a risk of 98.2 %).
POSITIVE = "Pneumonia"


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict[str, Any]
    #: Inside the spec's domain (CR, DX of the chest): classified; otherwise not assessed.
    classified: bool
    #: Transfer syntax of both outputs.
    output_syntax: UID
    #: DICOM_OUTPUT_SYNTAX.
    syntax_choice: str = "source"

    @property
    def frames(self) -> int:
        return int(self.kwargs.get("frames", 1))


CASES = [
    Case("cr-monochrome1-12bit-rle", dict(modality="CR", photometric="MONOCHROME1", bits_stored=12,
                                          transfer_syntax=uid.RLELossless), True, uid.RLELossless),
    Case("dx-12bit-jpegls", dict(modality="DX", bits_stored=12, transfer_syntax=uid.JPEGLSLossless), True,
         uid.JPEGLSLossless),
    Case("dx-12bit-3frames-explicit", dict(modality="DX", bits_stored=12, frames=3, rows=256, columns=256,
                                           transfer_syntax=uid.ExplicitVRLittleEndian),
         True, uid.ExplicitVRLittleEndian),
    Case("cr-deflated", dict(modality="CR", rows=256, columns=256, transfer_syntax=uid.DeflatedExplicitVRLittleEndian),
         True, uid.DeflatedExplicitVRLittleEndian),
    Case("ct-signed16-implicit", dict(modality="CT", signed=True, bits_stored=16,
                                      transfer_syntax=uid.ImplicitVRLittleEndian), False, uid.ImplicitVRLittleEndian),
    Case("pt-rgb-j2k-lossless", dict(modality="PT", photometric="RGB", bits_stored=8,
                                     transfer_syntax=uid.JPEG2000Lossless), False, uid.JPEG2000Lossless),
    # Lossy JPEG baseline is written uncompressed: no second generation of loss.
    Case("us-rgb-3frames-jpeg-baseline", dict(modality="US", photometric="RGB", bits_stored=8, frames=3, rows=256,
                                              columns=256, transfer_syntax=uid.JPEGBaseline8Bit), False,
         uid.ExplicitVRLittleEndian),
    # An operator's choice of output syntax (DICOM_OUTPUT_SYNTAX), lossless whatever the source.
    Case("pt-rgb-j2k-lossless-as-rle", dict(modality="PT", photometric="RGB", bits_stored=8, rows=256, columns=256,
                                            transfer_syntax=uid.JPEG2000Lossless), False, uid.RLELossless, "rle"),
    Case("dx-12bit-explicit-as-jpeg-ls", dict(modality="DX", bits_stored=12, rows=256, columns=256,
                                              transfer_syntax=uid.ExplicitVRLittleEndian), True, uid.JPEGLSLossless,
         "jpeg-ls"),
    Case("ct-signed16-jpegls-as-jpeg-2000", dict(modality="CT", signed=True, bits_stored=16,
                                                 transfer_syntax=uid.JPEGLSLossless), False, uid.JPEG2000Lossless,
         "jpeg-2000"),
    Case("cr-rle-as-explicit", dict(modality="CR", bits_stored=12, rows=256, columns=256,
                                    transfer_syntax=uid.RLELossless), True, uid.ExplicitVRLittleEndian, "explicit"),
]
by_case = pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])


class ConstantModel:
    """Stands in for the model: every image is positive; records the batch sizes it was called with."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(batch))
        return np.tile(np.array([[-2.0, 2.0]], np.float32), (len(batch), 1))


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    # The default model's spec as shipped; its weights need not exist, the model is a function here.
    return ModelSpec.parse(SPEC_TEMPLATE.read_text(), source=str(SPEC_TEMPLATE))


def _images(data: bytes) -> DicomImage:
    return read_dicom(data, max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels)


@dataclass
class Analyzed:
    case: Case
    study: Study
    source: bytes
    outcome: AnalysisOutcome

    @property
    def analysis(self) -> Analysis:
        assert isinstance(self.outcome, Analysis), self.outcome
        return self.outcome

    @property
    def processed(self) -> bytes:
        return self.analysis.stamped

    @property
    def anonymized(self) -> bytes:
        assert self.analysis.anonymized is not None
        return self.analysis.anonymized

    @cached_property
    def source_image(self) -> DicomImage:
        return _images(self.source)

    @cached_property
    def processed_image(self) -> DicomImage:
        return _images(self.processed)

    @cached_property
    def anonymized_image(self) -> DicomImage:
        return _images(self.anonymized)


def _analyze(sources: list[bytes], spec: ModelSpec, model: ConstantModel | None = None,
             key: bytes = KEY, syntaxes: list[str] | None = None) -> list[AnalysisOutcome]:
    requests = [AnalysisRequest(data, anonymize_always=False, deid_key=key, dicom_output_syntax=syntax)
                for data, syntax in zip(sources, syntaxes or ["source"] * len(sources), strict=True)]
    return analyze_batch(requests, spec=spec, predict=model or ConstantModel(), limits=LIMITS,
                         detector=shared_text_detector())


@pytest.fixture(scope="module")
def batch(spec: ModelSpec) -> tuple[dict[str, Analyzed], ConstantModel]:
    """Every case analyzed in one batch, as a worker receives them (each object its own study)."""
    studies = [new_study() for _ in CASES]
    sources = [make_dicom(burned_in=BURNED, patient=PATIENT, study=study, **case.kwargs)
               for case, study in zip(CASES, studies, strict=True)]
    model = ConstantModel()
    outcomes = _analyze(sources, spec, model, syntaxes=[case.syntax_choice for case in CASES])
    analyzed = {case.name: Analyzed(case, study, data, outcome)
                for case, study, data, outcome in zip(CASES, studies, sources, outcomes, strict=True)}
    return analyzed, model


@pytest.fixture
def analyzed(batch: tuple[dict[str, Analyzed], ConstantModel], case: Case) -> Analyzed:
    return batch[0][case.name]


@pytest.fixture(autouse=True)
def _single_threaded_tesseract(monkeypatch: pytest.MonkeyPatch) -> None:
    # The oracle runs several Tesseract processes at once: OpenMP threads on every core in each only fight.
    monkeypatch.setenv("OMP_THREAD_LIMIT", "1")


# ------------------------------------------------------------------------------------------------ the model


def test_only_objects_inside_the_domain_reach_the_model(batch: tuple[dict[str, Analyzed], ConstantModel]) -> None:
    analyzed, model = batch
    classified = [case for case in CASES if case.classified]
    assert model.batch_sizes == [len(classified)]  # one call, for the CR and DX objects only
    for case in CASES:
        prediction = analyzed[case.name].analysis.prediction
        if case.classified:
            assert (prediction.label, prediction.not_assessed_reason) == (POSITIVE, None)
            assert prediction.risk is not None and prediction.risk > 0.9
        else:
            assert (prediction.label, prediction.risk, prediction.is_positive) == (NOT_ASSESSED, None, False)
            assert prediction.not_assessed_reason is not None
            assert f"modality {case.kwargs['modality']}" in prediction.not_assessed_reason


def test_a_batch_outside_the_domain_never_calls_the_model(spec: ModelSpec) -> None:
    model = ConstantModel()
    sources = [make_dicom(modality=modality, rows=64, columns=64, **kwargs)
               for modality, kwargs in (("CT", dict(signed=True, bits_stored=16)), ("MR", {}),
                                        ("PT", dict(photometric="RGB", bits_stored=8)))]
    outcomes = _analyze(sources, spec, model)
    assert model.batch_sizes == []
    assert [outcome.prediction.label for outcome in outcomes if isinstance(outcome, Analysis)] == [NOT_ASSESSED] * 3


# ------------------------------------------------------------------------------------------- the processed copy


@by_case
def test_processed_is_a_derived_instance_of_the_same_patient_and_study(analyzed: Analyzed) -> None:
    source, processed = read(analyzed.source), read(analyzed.processed)
    assert processed.SOPInstanceUID != source.SOPInstanceUID
    assert processed.SeriesInstanceUID != source.SeriesInstanceUID
    assert processed.StudyInstanceUID == source.StudyInstanceUID == analyzed.study.study_uid
    assert processed.PatientID == source.PatientID == PATIENT.patient_id
    assert processed.PatientName == source.PatientName
    assert processed.SOPClassUID == source.SOPClassUID
    assert processed.file_meta.MediaStorageSOPInstanceUID == processed.SOPInstanceUID
    assert processed.file_meta.MediaStorageSOPClassUID == processed.SOPClassUID
    assert list(processed.ImageType) == ["DERIVED", "SECONDARY"]
    [reference] = processed.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert processed.BurnedInAnnotation == "YES"
    prediction = analyzed.analysis.prediction
    if analyzed.case.classified:
        assert prediction.label in processed.ImageComments
    else:  # the label is "not-assessed"; the comment says so in words, with the reason
        assert "Not assessed" in processed.ImageComments
        assert str(prediction.not_assessed_reason) in processed.ImageComments
    assert processed.file_meta.TransferSyntaxUID == analyzed.case.output_syntax
    if "LossyImageCompression" in source:  # written uncompressed, a lossy source stays flagged as one
        assert processed.LossyImageCompression == source.LossyImageCompression == "01"
    assert analyzed.analysis.image_format == "dicom" and analyzed.analysis.content_type == "application/dicom"


@by_case
def test_both_outputs_keep_the_pixel_description(analyzed: Analyzed) -> None:
    source = analyzed.source_image
    for output in (analyzed.processed_image, analyzed.anonymized_image):
        assert output.photometric == source.photometric
        assert output.frames.dtype == source.frames.dtype
        assert output.frame_count == source.frame_count == analyzed.case.frames
        assert output.bits_stored == source.bits_stored
        assert output.transfer_syntax == analyzed.case.output_syntax
    if analyzed.case.frames > 1:
        assert read(analyzed.processed).NumberOfFrames == read(analyzed.anonymized).NumberOfFrames == 3


@by_case
def test_dcmdump_reads_both_outputs(analyzed: Analyzed, tmp_path: Path) -> None:
    for name, data in (("processed", analyzed.processed), ("anonymized", analyzed.anonymized)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        dumped = subprocess.run([DCMDUMP, str(path)], capture_output=True, text=True, errors="replace", timeout=30)
        assert dumped.returncode == 0, (name, dumped.stderr)
        problems = [line for line in (dumped.stdout + dumped.stderr).splitlines() if line.startswith(("E:", "F:"))]
        assert problems == [], name


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Per frame, where `after` differs from `before` (any channel)."""
    differs = before != after
    return differs.any(axis=-1) if differs.ndim == 4 else differs


@by_case
def test_the_stamp_changes_a_small_area_of_every_frame_and_shows_white_on_black(analyzed: Analyzed) -> None:
    source, processed = analyzed.source_image, analyzed.processed_image
    assert processed.frames.shape == source.frames.shape, "the stamp added a band to the image"
    rows, columns = source.frames.shape[1:3]
    boxes = []
    for index, frame_changed in enumerate(_changed(source.frames, processed.frames)):
        assert 0 < np.count_nonzero(frame_changed) < 0.1 * rows * columns
        x, y, width, height = ink_box(frame_changed)
        assert height < 0.15 * rows and width * height < 0.2 * rows * columns
        label = processed.display(index)[y : y + height, x : x + width]
        gray = cv2.cvtColor(label, cv2.COLOR_BGR2GRAY) if label.ndim == 3 else label
        # White strokes on a black box, through the display curve (MONOCHROME1 stamps white as its lowest value).
        assert np.count_nonzero(gray >= 250) > 10 and np.count_nonzero(gray <= 5) > 0.3 * gray.size
        boxes.append((x, y, width, height))
    # One place on every frame (a frame's pixels that already had the stamp's value do not count as changed).
    assert max(abs(first - other) for box in boxes for first, other in zip(boxes[0], box, strict=True)) <= 3


# ------------------------------------------------------------------------------------------ the anonymized copy

_PSEUDONYM = re.compile(r"[0-9a-f]{32}")


@by_case
def test_anonymized_header_is_de_identified(analyzed: Analyzed) -> None:
    assert leaked_phi(analyzed.anonymized, PATIENT, study=analyzed.study) == []  # deflated data sets inflated
    ds = read(analyzed.anonymized)
    assert [str(element.tag) for element in ds.iterall() if element.tag.is_private] == []
    assert [str(element.tag) for element in ds.file_meta if element.tag.is_private] == []
    assert ds.PatientIdentityRemoved == "YES" and ds.BurnedInAnnotation == "NO"
    assert {"113100", "113101"} <= {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert ds.PatientName == ds.PatientID and _PSEUDONYM.fullmatch(ds.PatientID)
    assert ds.StudyInstanceUID != analyzed.study.study_uid
    source = read(analyzed.source)
    assert ds.SOPInstanceUID != source.SOPInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == analyzed.case.output_syntax


def test_one_patient_has_one_pseudonym(batch: tuple[dict[str, Analyzed], ConstantModel]) -> None:
    pseudonyms = {read(item.anonymized).PatientID for item in batch[0].values()}
    assert len(pseudonyms) == 1


def test_outputs_are_the_same_bytes_when_the_same_object_is_analyzed_again(
    batch: tuple[dict[str, Analyzed], ConstantModel], spec: ModelSpec
) -> None:
    """At-least-once delivery may analyze an object twice: both versions written must be identical."""
    analyzed = list(batch[0].values())
    again = _analyze([item.source for item in analyzed], spec, syntaxes=[item.case.syntax_choice for item in analyzed])
    for item, outcome in zip(analyzed, again, strict=True):
        assert isinstance(outcome, Analysis)
        assert outcome.stamped == item.processed, item.case.name
        assert outcome.anonymized == item.anonymized, item.case.name


def _anonymized_header(data: bytes, spec: ModelSpec, key: bytes = KEY) -> pydicom.Dataset:
    [outcome] = _analyze([data], spec, key=key)
    assert isinstance(outcome, Analysis) and outcome.anonymized is not None
    return read(outcome.anonymized)


def test_instances_of_one_study_get_one_new_study_uid_and_another_key_another(spec: ModelSpec) -> None:
    study = new_study()
    first = make_dicom(modality="CR", rows=128, columns=128, study=study, seed=1)
    second = make_dicom(modality="DX", rows=128, columns=128, study=study, seed=2)
    one, two = _anonymized_header(first, spec), _anonymized_header(second, spec)
    assert one.StudyInstanceUID == two.StudyInstanceUID != study.study_uid
    assert one.SeriesInstanceUID != two.SeriesInstanceUID  # two series of the study stay two
    assert one.PatientID == two.PatientID
    other = _anonymized_header(first, spec, key=OTHER_KEY)
    assert other.StudyInstanceUID not in (one.StudyInstanceUID, study.study_uid)
    assert other.PatientID != one.PatientID and _PSEUDONYM.fullmatch(other.PatientID)


_IN_ANOTHER_PROCESS = """
import io, sys
from pathlib import Path
import numpy as np, pydicom
from service.engine.analysis import analyze_batch
from service.engine.messages import AnalysisRequest, ImageLimits
from service.imaging.detection import TextDetector
from service.models.spec import ModelSpec
template, source, key = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), sys.argv[3].encode()
spec = ModelSpec.parse(template.read_text(), source=str(template))
[outcome] = analyze_batch([AnalysisRequest(source, anonymize_always=True, deid_key=key)], spec=spec,
                          predict=lambda batch: np.zeros((len(batch), 2), np.float32),
                          limits=ImageLimits(10**8, 10**8), detector=TextDetector.load(Path(sys.argv[4])))
ds = pydicom.dcmread(io.BytesIO(outcome.anonymized))
print(ds.StudyInstanceUID, ds.PatientID)
"""


def test_the_new_study_uid_is_the_same_in_another_process(spec: ModelSpec, tmp_path: Path) -> None:
    study = new_study()
    source = tmp_path / "source.dcm"
    source.write_bytes(make_dicom(modality="CR", rows=128, columns=128, study=study))
    here = _anonymized_header(source.read_bytes(), spec)
    run = subprocess.run([sys.executable, "-c", _IN_ANOTHER_PROCESS, str(SPEC_TEMPLATE), str(source),
                          TEST_PSEUDONYM_KEY, str(TEXT_OPTIONS.models)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [here.StudyInstanceUID, here.PatientID]


# --------------------------------------------------------------------------------------- the anonymized pixels


def _burned_ink(case: Case) -> np.ndarray:
    """Where the text is burned (its ink, every frame), from the same object made with and without it."""
    twin = {**case.kwargs, "transfer_syntax": uid.ExplicitVRLittleEndian}
    burned = _images(make_dicom(burned_in=BURNED, **twin)).frames
    plain = _images(make_dicom(**twin)).frames
    return _changed(plain, burned).any(axis=0)


def _burned_box(case: Case) -> tuple[int, int, int, int]:
    return ink_box(_burned_ink(case))


_TEXT_MARGIN = 8


def _text_crop(image: DicomImage, index: int, box: tuple[int, int, int, int]) -> np.ndarray:
    display = image.display(index)
    gray = cv2.cvtColor(display, cv2.COLOR_BGR2GRAY) if display.ndim == 3 else display
    x, y, width, height = box
    top, left = max(0, y - _TEXT_MARGIN), max(0, x - _TEXT_MARGIN)
    return gray[top : y + height + _TEXT_MARGIN, left : x + width + _TEXT_MARGIN]


def _stacked(crops: list[np.ndarray]) -> np.ndarray:
    """Crops one above the other on a white page, a blank line apart (one Tesseract call reads them all)."""
    width = max(crop.shape[1] for crop in crops)
    gap = np.full((24, width), 255, np.uint8)
    rows = [np.pad(crop, ((0, 0), (0, width - crop.shape[1])), constant_values=255) for crop in crops]
    return np.vstack([part for row in rows for part in (row, gap)])


def _stacked_attack_views(crops: list[np.ndarray]) -> list[View]:
    """Each attack view of every crop, one stacked page per kind of view."""
    per_view = zip(*(attack_views(crop) for crop in crops), strict=True)
    return [(_stacked(list(views)), 6) for views in per_view]


def test_burned_in_text_is_read_on_the_source_and_on_no_anonymized_frame(
    batch: tuple[dict[str, Analyzed], ConstantModel],
) -> None:
    """The OCR oracle reads the patient's name on each source display, and none of it on the display of any
    frame of any anonymized copy, however the crop is sharpened (the attack views of every frame, stacked so that
    a handful of Tesseract calls read them all; the same stacking of the source frames reads the name)."""
    analyzed = list(batch[0].values())
    before: list[list[View]] = []
    source_crops: list[np.ndarray] = []
    anonymized_crops: list[np.ndarray] = []
    for item in analyzed:
        box = _burned_box(item.case)
        source = _text_crop(item.source_image, 0, box)
        before.append([(cv2.resize(source, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC), 6)])
        for index in range(item.source_image.frame_count):
            source_crops.append(_text_crop(item.source_image, index, box))
            anonymized_crops.append(_text_crop(item.anonymized_image, index, box))
    assert len(anonymized_crops) == sum(case.frames for case in CASES)
    groups = [*before, _stacked_attack_views(source_crops), _stacked_attack_views(anonymized_crops)]
    *read_before, read_stacked, leaked = tokens_read(groups, BURNED)
    for item, tokens in zip(analyzed, read_before, strict=True):
        assert {"JANE", "MARIE"} & tokens, (item.case.name, tokens)  # the oracle reads this object's text
    assert {"JANE", "MARIE", "PID44710815", "12041961"} <= read_stacked  # and reads stacked pages
    assert leaked == set()


@by_case
def test_anonymized_pixels_outside_the_text_found_are_the_source_values(analyzed: Analyzed) -> None:
    """Bit for bit, every frame, whatever the output's transfer syntax: only the regions the text search found on
    the source display (the service's own search, rerun here) are redacted."""
    source, anonymized = analyzed.source_image, analyzed.anonymized_image
    assert anonymized.frames.shape == source.frames.shape
    for index in range(source.frame_count):
        kept = np.ones(source.frames.shape[1:3], bool)
        for x, y, width, height in shared_text_detector().find(source.display(index)).redact:
            kept[max(0, y) : y + height, max(0, x) : x + width] = False
        assert kept.any()
        np.testing.assert_array_equal(anonymized.frames[index][kept], source.frames[index][kept])
        assert not kept[_burned_ink(analyzed.case)].any()  # every pixel of the text is inside what was redacted


@by_case
def test_most_pixels_outside_the_burned_in_text_are_unchanged(analyzed: Analyzed) -> None:
    source, anonymized = analyzed.source_image, analyzed.anonymized_image
    x, y, width, height = _burned_box(analyzed.case)
    outside = np.ones(source.frames.shape[1:3], bool)
    top, left = max(0, y - _TEXT_MARGIN), max(0, x - _TEXT_MARGIN)
    outside[top : y + height + _TEXT_MARGIN, left : x + width + _TEXT_MARGIN] = False
    unchanged = ~_changed(source.frames, anonymized.frames)
    share = unchanged[:, outside].mean()
    assert share >= 0.95, f"{share:.1%} of the pixels outside the burned-in text are unchanged"


# ---------------------------------------------------------------------------------------------- hostile headers

#: SpecificCharacterSet of the factory's Latin-1 header ("ISO_IR 100"), replaced in place by a value of the same
#: length: an unknown term, UTF-8 over Latin-1 bytes, bytes no character set decodes, a broken ISO 2022 pair.
CHARSETS = {
    "unknown-term": b"ISO_IR 999",
    "utf8-declared-latin1-bytes": b"ISO_IR 192",
    "undecodable-bytes": b"ISO_IR\xff\xfe\xe90",
    "iso2022-fragment": b"\\ISO 2022 ",
}


@pytest.mark.parametrize("charset", CHARSETS.values(), ids=CHARSETS.keys())
def test_an_undecodable_character_set_gives_outputs_or_a_clean_refusal(
    charset: bytes, spec: ModelSpec, caplog: pytest.LogCaptureFixture
) -> None:
    patient, study = Patient(name="MÜLLER^JÖRG^KLAUS"), new_study()
    data = make_dicom(modality="CR", photometric="MONOCHROME1", transfer_syntax=uid.RLELossless, rows=128,
                      columns=128, patient=patient, study=study)
    assert data.count(b"ISO_IR 100") == 1
    data = data.replace(b"ISO_IR 100", charset)
    values = phi_values(patient, study=study)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [outcome] = _analyze([data], spec)
    assert [str(warning.message) for warning in caught] == []
    assert [record.getMessage() for record in caplog.records
            if any(value in record.getMessage() for value in values)] == []
    if isinstance(outcome, Analysis):
        assert outcome.anonymized is not None
        assert leaked_phi(outcome.anonymized, patient, study=study) == []
    else:
        assert isinstance(outcome, UnprocessableObject), repr(outcome)
        assert [value for value in values if value in outcome.message] == []


def test_the_processed_copy_keeps_the_patient_name_bytes_it_cannot_decode(spec: ModelSpec) -> None:
    patient = Patient(name="MÜLLER^JÖRG^KLAUS")
    data = make_dicom(modality="CR", rows=64, columns=64, patient=patient).replace(b"ISO_IR 100", b"ISO_IR 192")
    [outcome] = _analyze([data], spec)
    assert isinstance(outcome, Analysis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the source's names do not decode, by construction
        # The raw element (get_item does not decode it): the bytes as written.
        source, processed = (read(item).get_item(0x00100010).value.rstrip(b" ") for item in (data, outcome.stamped))
    assert source == patient.name.encode("latin-1")
    assert processed == source
