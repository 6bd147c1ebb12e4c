"""Header de-identification by PS3.15 Annex E: no original identifying value survives anywhere in the written file,
the whole table is applied (checked against the table itself), identities and UIDs map consistently, and malformed
input neither raises nor leaks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, ComputedRadiographyImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import validate_value

from service.dicom.deidentify import deidentify, map_uid, patient_pseudonym

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"test-secret-0123456789abcdef0123"
OTHER_SECRET = b"another-secret-fedcba9876543210"
DCMDUMP = Path("/usr/bin/dcmdump")

# Identifying values of the rich header: distinctive, so that a byte search cannot match by chance.
PATIENT_NAME = "Quintanilla^Evangelina^Maribel"
PATIENT_ID = "MRN-88412937"
STUDY_UID = "1.2.840.99999.7.1.20190314.1"
SERIES_UID = "1.2.840.99999.7.2.20190314.1"
FRAME_OF_REFERENCE_UID = "1.2.840.99999.7.4.20190314.1"
REFERENCED_SOP_UID = "1.2.840.99999.7.5.20190314.77"
PHI_TEXT = {
    "PatientBirthDate": "19620527",
    "OtherPatientIDs": "OTHERID-55123",
    "OtherPatientNames": "Quintanilla-Ruiz^Eva",
    "PatientAddress": "1428 Elm Street Springwood",
    "PatientAge": "056Y",
    "PatientTelephoneNumbers": "555-0142-8871",
    "InstitutionName": "Saint Brigid Hospital",
    "InstitutionAddress": "77 Harbour Road Dunmore",
    "ReferringPhysicianName": "Okonkwo^Chidinma",
    "PerformingPhysicianName": "Lindqvist^Torbjorn",
    "OperatorsName": "Haverkamp^Wilhelmina",
    "RequestingPhysician": "Szczepanski^Bartlomiej",
    "AccessionNumber": "ACC7729104",
    "StudyID": "STU551902",
    "StudyDate": "20190314",
    "StudyTime": "143512",
    "SeriesDate": "20190315",
    "SeriesTime": "143647",
    "AcquisitionDateTime": "20190316143702",
    "ContentDate": "20190317",
    "ContentTime": "143755",
    "InstanceCreationDate": "20190318",
    "StudyDescription": "XR CHEST PA for Quintanilla",
    "SeriesDescription": "PA upright Evangelina",
    "ImageComments": "portable, ward 7 bed 3 Maribel",
    "DeviceSerialNumber": "SN-4471-XQ",
    "StationName": "CRSTATION19",
    "ProtocolName": "CHEST Quintanilla protocol",
    "AdditionalPatientHistory": "smoker since 1985 per Okonkwo",
    "MedicalRecordLocator": "LOC-992-117",
    "InstitutionalDepartmentName": "Radiology Wing Alpha-Kestrel",
}
NESTED_PHI = {
    "RequestingService": "Pulmonology Kestrel",
    "ScheduledPerformingPhysicianName": "Abernathy^Cornelius",
    "RequestedProcedureID": "RPID-30017",
    "ScheduledProcedureStepID": "SPSID-44102",
    "IssuerOfPatientID": "HOSPITAL-ISSUER-XYZ",
    "ReferencedPatientUID": "1.2.840.99999.7.9.31",
}
OVERLAY_COMMENT = "overlay by Haverkamp"
CURVE_DATA = b"curve Quintanilla"
PRIVATE_TEXT = "private Quintanilla Evangelina"


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _code(value: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def _with_private(item: pydicom.Dataset, group: int) -> pydicom.Dataset:
    item.private_block(group, "ACME PHI 1.0", create=True).add_new(0x01, "LO", PRIVATE_TEXT)
    return item


def cr_header(
    patient_id: str = PATIENT_ID,
    patient_name: str = PATIENT_NAME,
    study_uid: str = STUDY_UID,
    sop_uid: str = "1.2.840.99999.7.3.20190314.1",
) -> pydicom.Dataset:
    """A computed radiography header as modalities send them: ~30 identifying attributes, identifying content nested
    in sequences, private elements at several depths, a reference sequence, an overlay and a curve."""
    ds = pydicom.Dataset()
    ds.file_meta = _file_meta(sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientSex = "F"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "ACME Imaging"
    for keyword, value in PHI_TEXT.items():
        setattr(ds, keyword, value)

    request = pydicom.Dataset()
    request.RequestedProcedureID = NESTED_PHI["RequestedProcedureID"]
    request.RequestingService = NESTED_PHI["RequestingService"]
    step = pydicom.Dataset()
    step.ScheduledProcedureStepID = NESTED_PHI["ScheduledProcedureStepID"]
    step.ScheduledPerformingPhysicianName = NESTED_PHI["ScheduledPerformingPhysicianName"]
    request.ScheduledProcedureStepSequence = [step]
    ds.RequestAttributesSequence = [request]

    other_id = pydicom.Dataset()
    other_id.PatientID = "OTHERID-SEQ-66120"
    other_id.IssuerOfPatientID = NESTED_PHI["IssuerOfPatientID"]
    ds.OtherPatientIDsSequence = [other_id]
    referenced_patient = pydicom.Dataset()
    referenced_patient.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.1"
    referenced_patient.ReferencedSOPInstanceUID = NESTED_PHI["ReferencedPatientUID"]
    ds.ReferencedPatientSequence = [referenced_patient]

    reference = _with_private(pydicom.Dataset(), 0x0011)
    reference.ReferencedSOPClassUID = ComputedRadiographyImageStorage
    reference.ReferencedSOPInstanceUID = REFERENCED_SOP_UID
    ds.ReferencedImageSequence = [reference]

    # A kept sequence with identifying content two and three levels down: the profile applies at every depth.
    view = _with_private(_code("399348003", "postero-anterior"), 0x0013)
    modifier = _with_private(_code("10904000", "orthostatic"), 0x0015)
    modifier.OperatorsName = "Nested^Operatorname"
    modifier.AcquisitionDate = "20190319"
    view.ViewModifierCodeSequence = [modifier]
    ds.ViewCodeSequence = [view]

    _with_private(ds, 0x0009)
    ds.private_block(0x0029, "ACME CSA 1.0", create=True).add_new(0x10, "OB", PRIVATE_TEXT.encode())

    ds.add_new(0x60000010, "US", 4)  # OverlayRows
    ds.add_new(0x60000011, "US", 4)  # OverlayColumns
    ds.add_new(0x60003000, "OW", b"\x0f\x00" * 1)
    ds.add_new(0x60004000, "LT", OVERLAY_COMMENT)
    ds.add_new(0x60024000, "LT", OVERLAY_COMMENT)
    ds.add_new(0x50000005, "US", 2)  # CurveDimensions
    ds.add_new(0x50003000, "OB", CURVE_DATA)

    ds.Rows, ds.Columns = 4, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.add_new(0x7FE00010, "OB", bytes(range(0x80, 0x90)))  # PixelData
    return ds


def to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def from_bytes(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(data))


def all_phi() -> list[str]:
    """Every identifying value of `cr_header`, and the parts of the names."""
    values = [PATIENT_NAME, PATIENT_ID, STUDY_UID, SERIES_UID, FRAME_OF_REFERENCE_UID, REFERENCED_SOP_UID]
    values += ["1.2.840.99999.7.3.20190314.1", "OTHERID-SEQ-66120", OVERLAY_COMMENT, "Nested^Operatorname"]
    values += ["20190319", *PHI_TEXT.values(), *NESTED_PHI.values()]
    name_parts = [part for value in values if "^" in value for part in value.split("^")]
    return [*values, *name_parts, "Quintanilla", "Evangelina", "Maribel"]


def walk_items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from walk_items(item)


@pytest.fixture(params=["in memory", "read from a file", "read from an implicit VR file"])
def header(request: pytest.FixtureRequest) -> pydicom.Dataset:
    """The rich header as built, and as the service gets it: read from bytes, values still raw (and without VRs when
    the file is implicit VR)."""
    ds = cr_header()
    if request.param == "in memory":
        return ds
    if request.param == "read from an implicit VR file":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return from_bytes(to_bytes(ds))


def test_no_identifying_value_survives_anywhere_in_the_written_file(header: pydicom.Dataset) -> None:
    deidentify(header, secret=SECRET, pixels_cleaned=True)
    data = to_bytes(header)

    leaked = [value for value in all_phi() if value.encode() in data]
    assert leaked == []
    assert CURVE_DATA not in data
    assert PRIVATE_TEXT.encode() not in data
    # Pixel data is the caller's: untouched.
    assert from_bytes(data).PixelData == bytes(range(0x80, 0x90))


def test_identity_is_a_keyed_pseudonym_of_the_patient() -> None:
    first, second = cr_header(sop_uid="1.2.840.99999.7.3.1"), cr_header(sop_uid="1.2.840.99999.7.3.2")
    other_patient = cr_header(patient_id="MRN-00000002", patient_name="Other^Person")
    expected = patient_pseudonym(SECRET, first)
    for ds in (first, second, other_patient):
        deidentify(ds, secret=SECRET, pixels_cleaned=False)

    assert first.PatientName == first.PatientID == expected
    assert len(expected) == 32
    assert second.PatientID == expected
    assert other_patient.PatientID != expected
    assert patient_pseudonym(OTHER_SECRET, cr_header()) != expected


def test_pseudonym_without_patient_id_comes_from_name_and_birth_date() -> None:
    without_id = cr_header(patient_id="")
    other_birth_date = cr_header(patient_id="")
    other_birth_date.PatientBirthDate = "19620528"
    nobody = pydicom.Dataset()

    assert patient_pseudonym(SECRET, without_id) != patient_pseudonym(SECRET, cr_header())
    assert patient_pseudonym(SECRET, without_id) != patient_pseudonym(SECRET, other_birth_date)
    assert patient_pseudonym(SECRET, nobody) == "ANONYMOUS"


def test_uids_map_consistently_across_instances_and_keep_references() -> None:
    first, second = cr_header(sop_uid="1.2.840.99999.7.3.1"), cr_header(sop_uid="1.2.840.99999.7.3.2")
    for ds in (first, second):
        deidentify(ds, secret=SECRET, pixels_cleaned=False)

    assert first.StudyInstanceUID == second.StudyInstanceUID == map_uid(SECRET, STUDY_UID)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SOPInstanceUID == map_uid(SECRET, "1.2.840.99999.7.3.1")
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.FrameOfReferenceUID == map_uid(SECRET, FRAME_OF_REFERENCE_UID)
    for uid in (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID):
        assert uid.startswith("2.25.")
        assert UID(uid).is_valid
    reference = first.ReferencedImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == map_uid(SECRET, REFERENCED_SOP_UID)
    # Class UIDs identify nobody: kept, so the objects stay what they are.
    assert reference.ReferencedSOPClassUID == ComputedRadiographyImageStorage
    assert first.SOPClassUID == ComputedRadiographyImageStorage
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert map_uid(OTHER_SECRET, STUDY_UID) != map_uid(SECRET, STUDY_UID)


def test_uid_mapping_is_the_same_in_another_process() -> None:
    # Pods share nothing but the secret: another interpreter must compute the same UID.
    program = (
        "import sys; from service.dicom.deidentify import map_uid; "
        "print(map_uid(bytes.fromhex(sys.argv[1]), sys.argv[2]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, SECRET.hex(), STUDY_UID],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == map_uid(SECRET, STUDY_UID)


def test_records_what_was_done(header: pydicom.Dataset) -> None:
    deidentify(header, secret=SECRET, pixels_cleaned=True)
    ds = from_bytes(to_bytes(header))

    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert all(len(value) <= 64 for value in ds.DeidentificationMethod)
    codes = [(item.CodeValue, item.CodingSchemeDesignator) for item in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113101", "DCM")]
    assert "BurnedInAnnotation" not in ds

    uncleaned = cr_header()
    deidentify(uncleaned, secret=SECRET, pixels_cleaned=False)
    assert [item.CodeValue for item in uncleaned.DeidentificationMethodCodeSequence] == ["113100"]


def test_private_elements_and_repeating_groups_are_gone_at_every_depth(header: pydicom.Dataset) -> None:
    deidentify(header, secret=SECRET, pixels_cleaned=False)
    ds = from_bytes(to_bytes(header))

    items = list(walk_items(ds))
    assert len(items) > 3  # the reference and the nested view code items are still there
    assert [element.tag for item in items for element in item if element.tag.is_private] == []
    assert [element.tag for element in ds if element.tag.group == 0x5000] == []
    for removed in (0x60003000, 0x60004000, 0x60024000):
        assert removed not in ds
    # Overlay attributes the table does not list are kept.
    assert ds[0x60000010].value == 4


def test_sequences_get_their_action_and_nested_items_get_the_profile() -> None:
    ds = cr_header()
    ds.ContentSequence = [_code("1", "content by Quintanilla")]  # D
    ds.ReferencedStudySequence = [pydicom.Dataset()]  # X/Z
    ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = STUDY_UID
    deidentify(ds, secret=SECRET, pixels_cleaned=False)

    assert ds.ContentSequence == Sequence([])
    assert ds.ReferencedStudySequence == Sequence([])
    assert "RequestAttributesSequence" not in ds  # X
    assert "OtherPatientIDsSequence" not in ds
    assert "ReferencedPatientSequence" not in ds
    modifier = ds.ViewCodeSequence[0].ViewModifierCodeSequence[0]
    assert modifier.OperatorsName == "ANONYMOUS"  # X/Z/D, three levels down
    assert modifier.AcquisitionDate == ""  # X/Z
    assert modifier.CodeValue == "10904000"  # not in the table: kept


# What this service does for each of the table's codes (service.dicom.profile documents the choices).
EXPECTED_ACTION = {
    "X_TAGS": "X",
    "Z_TAGS": "Z",
    "D_TAGS": "D",
    "U_TAGS": "U",
    "Z_D_TAGS": "D",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "D",
    "X_Z_D_TAGS": "D",
}
# A valid value per simple string VR: the marker an action must remove, empty or replace.
MARKER_BY_VR = {
    "AE": "MARKERAE",
    "AS": "042Y",
    "CS": "MARKER",
    "DA": "19700101",
    "DS": "42",
    "DT": "19700101120000",
    "IS": "42",
    "LO": "MARKER",
    "LT": "MARKER",
    "PN": "MARKER^NAME",
    "SH": "MARKER",
    "ST": "MARKER",
    "TM": "120000",
    "UC": "MARKER",
    "UT": "MARKER",
}


def table_sample() -> dict[int, str]:
    """Every single-tag entry of the 2026c table whose keyword pydicom knows and whose VR is a simple string VR (or
    UI), with the action it must get."""
    table = dicom_anonymization_database_selector("dicomfields_2026c")
    sample = {}
    for category, action in EXPECTED_ACTION.items():
        for entry in table[category]:
            if len(entry) != 2:
                continue
            tag = (entry[0] << 16) | entry[1]
            if keyword_for_tag(tag) and dictionary_VR(tag) in {*MARKER_BY_VR, "UI"}:
                sample[tag] = action
    return sample


def test_every_table_entry_gets_its_action() -> None:
    sample = table_sample()
    assert len(sample) > 450  # the table, not a hand-picked list
    ds = pydicom.Dataset()
    marker_uids = {}
    for index, tag in enumerate(sample):
        vr = dictionary_VR(tag)
        if vr == "UI":
            marker_uids[tag] = f"1.2.840.99999.8.{index}"
        ds.add_new(tag, vr, marker_uids.get(tag) or MARKER_BY_VR[vr])
    pseudonym = patient_pseudonym(SECRET, ds)

    deidentify(ds, secret=SECRET, pixels_cleaned=False)

    wrong = {}
    for tag, action in sample.items():
        keyword = keyword_for_tag(tag)
        if keyword in {"PatientName", "PatientID"}:
            outcome_ok = ds[tag].value == pseudonym
        elif action == "X":
            outcome_ok = tag not in ds
        elif action == "Z":
            outcome_ok = tag in ds and ds[tag].is_empty
        elif tag in marker_uids:  # U, or D of a UI: the keyed mapping
            outcome_ok = tag in ds and ds[tag].value == map_uid(SECRET, marker_uids[tag])
        else:
            vr = dictionary_VR(tag)
            outcome_ok = tag in ds and not ds[tag].is_empty and ds[tag].value != MARKER_BY_VR[vr]
        if not outcome_ok:
            wrong[keyword] = action
    assert wrong == {}
    # Every dummy is valid for its VR.
    for element in ds:
        if element.VR != "SQ":
            for value in element.value if element.VM > 1 else [element.value]:
                validate_value(element.VR, value, config.RAISE)


def test_repeating_group_entries_apply_to_every_group_of_the_range() -> None:
    ds = pydicom.Dataset()
    for group in (0x5000, 0x5002, 0x50FE):
        ds.add_new((group << 16) | 0x0005, "US", 1)
        ds.add_new((group << 16) | 0x3000, "OB", CURVE_DATA)
    for group in (0x6000, 0x6010, 0x60FE):
        ds.add_new((group << 16) | 0x0010, "US", 4)
        ds.add_new((group << 16) | 0x3000, "OW", b"\x01\x00")
        ds.add_new((group << 16) | 0x4000, "LT", OVERLAY_COMMENT)

    deidentify(ds, secret=SECRET, pixels_cleaned=False)

    kept = {element.tag for element in ds if element.tag.group in range(0x5000, 0x6100)}
    assert kept == {0x60000010, 0x60100010, 0x60FE0010}


def malformed_header() -> pydicom.Dataset:
    """Values as broken senders write them, inserted raw as a reader leaves them: pydicom never validated them."""
    ds = cr_header()

    def raw(tag: int, vr: str, value: bytes) -> None:
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, is_implicit_VR=False, is_little_endian=True)

    raw(0x00080005, "CS", b"ISO_IR 192")  # UTF-8, which the names below are not
    raw(0x00100010, "PN", b"Qu\xffint\xfe^Eva\x01ngelina")
    raw(0x00100030, "DA", b"notadate")
    raw(0x00080020, "DA", b"2019-03-14")
    raw(0x001021C0, "US", b"\x01\x02\x03")  # PregnancyStatus, wrong length
    raw(0x00280010, "US", b"\x04\x00\x00")  # Rows, wrong length, not in the table: kept as it came
    raw(0x0020000D, "LO", STUDY_UID.encode() + b" ")  # a UID with a wrong VR
    raw(0x00081030, "UN", b"Study of Quintanilla")  # StudyDescription (X) as UN
    raw(0x00080050, "UN", b"ACC7729104")  # AccessionNumber (Z) as UN
    raw(0x00081010, "UN", b"CRSTATION19 ")  # StationName (X/Z/D) as UN
    raw(0x00082218, "SQ", b"\x01\x02\x03")  # AnatomicRegionSequence (kept), truncated: pydicom cannot parse it
    raw(0x00081090, "UN", b"Model \xc3\x28")  # ManufacturerModelName, not in the table, as UN
    # As if read from a file in this encoding: pydicom writes the raw values back as they are, undecoded.
    ds.set_original_encoding(False, True, convert_encodings(["ISO_IR 192"]))
    return ds


def test_malformed_values_do_not_raise_and_are_treated_by_their_tag() -> None:
    ds = malformed_header()
    deidentify(ds, secret=SECRET, pixels_cleaned=False)
    data = to_bytes(ds)

    assert b"Qu\xffint" not in data
    assert b"notadate" not in data
    assert b"2019-03-14" not in data
    assert 0x001021C0 not in ds
    assert ds.StudyInstanceUID == map_uid(SECRET, STUDY_UID)
    assert "StudyDescription" not in ds
    # A sequence that cannot be read cannot be checked: it goes.
    assert "AnatomicRegionSequence" not in ds
    # UN elements get their action in the VR the dictionary gives their tag.
    assert (ds["AccessionNumber"].VR, ds.AccessionNumber) == ("SH", "")
    assert (ds["StationName"].VR, ds.StationName) == ("SH", "ANONYMIZED")
    again = from_bytes(data)
    assert again.PatientIdentityRemoved == "YES"


def test_malformed_file_read_from_bytes_does_not_raise() -> None:
    ds = from_bytes(to_bytes(malformed_header()))
    deidentify(ds, secret=SECRET, pixels_cleaned=False)
    assert b"notadate" not in to_bytes(ds)
    assert "AnatomicRegionSequence" not in ds


@pytest.mark.skipif(not DCMDUMP.exists(), reason="dcmtk's dcmdump is not installed")
def test_dcmtk_reads_the_output(header: pydicom.Dataset, tmp_path: Path) -> None:
    deidentify(header, secret=SECRET, pixels_cleaned=True)
    path = tmp_path / "deidentified.dcm"
    path.write_bytes(to_bytes(header))

    result = subprocess.run([str(DCMDUMP), "+E", "+L", str(path)], capture_output=True, timeout=30)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    output = result.stdout.decode("latin-1")
    assert "PatientIdentityRemoved" in output
    assert [value for value in all_phi() if value in output] == []
