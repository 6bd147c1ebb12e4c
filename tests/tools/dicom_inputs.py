"""DICOM inputs for the tool tests: one patient's study as a PACS export holds it (named `.dcm`, without a suffix, by
a SOP Instance UID), a CT outside the model's domain, and a model spec that knows its domain (the tiny model's)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from dicom_factory import Patient, Study, leaked_phi, make_dicom
from pydicom.uid import JPEGLSLossless, RLELossless

#: The folder (or prefix) of the study: a patient's name, as exports name them.
FOLDER = "Doe Jane+Marie %41"
BURNED_IN = ["DOE JANE MARIE", "PID 4471 0815"]
#: Name below FOLDER -> make_dicom options. Chest CR and DX are assessed; the CT is not (outside the domain).
DICOM_STUDY = {
    "CR chest 0001.dcm": {"modality": "CR", "photometric": "MONOCHROME1", "transfer_syntax": RLELossless,
                          "burned_in": BURNED_IN},
    "IM0002": {"modality": "DX", "rows": 256, "columns": 256, "transfer_syntax": JPEGLSLossless},
    "CT 0003.dcm": {"modality": "CT", "signed": True, "bits_stored": 16, "rows": 256, "columns": 256},
    "1.2.840.4471.0815.4": {"modality": "DX", "rows": 256, "columns": 256, "seed": 4},
}
NOT_ASSESSED = {"CT 0003.dcm"}


def study_files(patient: Patient, study: Study) -> dict[str, bytes]:
    """The study's objects by their name below FOLDER."""
    return {name: make_dicom(patient=patient, study=study, **options) for name, options in DICOM_STUDY.items()}


def chest_model(tiny_spec: Path, folder: Path) -> Path:
    """The tiny model's spec with the default model's domain (chest CR and DX), its weights linked beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.keras").symlink_to(tiny_spec.parent / "tiny.keras")
    spec = folder / "tiny-chest.yaml"
    spec.write_text(tiny_spec.read_text() + "domain: {modalities: [CR, DX], body_parts: [CHEST]}\n")
    return spec


def assert_deidentified(data: bytes, patient: Patient, study: Study) -> None:
    """An anonymized DICOM copy: no header value of the patient or study, flagged as de-identified."""
    assert leaked_phi(data, patient, study=study) == []
    clean = pydicom.dcmread(io.BytesIO(data))
    assert clean.PatientIdentityRemoved == "YES" and clean.BurnedInAnnotation == "NO"
    assert str(clean.PatientName) != patient.name
