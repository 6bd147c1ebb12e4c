"""`xray-pipeline demo`, the newcomer's first run, against the session's RGW (what `make demo` runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import ROOT

from service.tools.demo import DICOM_BIRTH_DATE, DICOM_PATIENT, DICOM_PATIENT_ID

pytestmark = [pytest.mark.rgw, pytest.mark.model]


def test_demo_processes_all_validation_xrays_and_one_dicom(rgw: Any, tmp_path: Path) -> None:
    out = tmp_path / "demo-output"
    env = os.environ | rgw.env()
    env.pop("PSEUDONYM_KEY", None)
    done = subprocess.run([sys.executable, "-m", "service.cli", "demo", "--out", str(out)], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line[:2].isdigit() and line[2:4] == "  "]
    assert len(rows) == 17
    assert "17 images;" in done.stdout
    for folder in ("input", "processed", "anonymized"):
        assert len(list((out / folder).glob("*.jpeg"))) == 16, folder
        assert [path.name for path in (out / folder).glob("*.dcm")] == ["16.dcm"], folder
    # The DICOM upload: a CR like the X-ray it was made from, its anonymized copy a .dcm naming a pseudonym.
    source = pydicom.dcmread(out / "input" / "16.dcm")
    assert (source.Modality, source.PhotometricInterpretation, source.BitsStored) == ("CR", "MONOCHROME1", 12)
    assert source.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless and source.PatientName == DICOM_PATIENT
    assert re.search(r"xray-demo-anonymized/[0-9a-f]{32}\.dcm", rows[16])
    anonymized = pydicom.dcmread(out / "anonymized" / "16.dcm")
    assert re.fullmatch(r"[0-9a-f]{32}", str(anonymized.PatientName)) and anonymized.PatientIdentityRemoved == "YES"
    data = (out / "anonymized" / "16.dcm").read_bytes()
    assert not [value for value in (DICOM_PATIENT, DICOM_PATIENT_ID, DICOM_BIRTH_DATE) if value.encode() in data]
    assert f"PatientName {anonymized.PatientName} (a keyed pseudonym)" in done.stdout
    assert pydicom.dcmread(out / "processed" / "16.dcm").ImageType == ["DERIVED", "SECONDARY"]
    # The table shows pseudonyms, never the patient-like keys the demo uploaded, nor the DICOM's patient.
    assert "Mcgehee" not in done.stdout and "DEMO" not in done.stdout
