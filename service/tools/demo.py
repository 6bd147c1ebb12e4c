"""The local demo: real uploads, real Ceph notifications, the real service, the default model.

Given an S3 endpoint in the environment (`make demo` boots a throwaway Ceph RGW for it), it creates the buckets,
starts `xray-pipeline serve`, points a bucket notification at it, uploads the model's 16 validation X-rays with
fake patient text burned in and patient-like keys, and one of them again as a DICOM chest X-ray (a CR with a fake
patient in its header and burned into its pixels), waits for both outputs of each, prints a table and saves the
images for viewing.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import unicodedata
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from service.errors import ConfigurationError
from service.imaging.patient_text import burn_patient_text
from service.models.fetch import validation_images
from service.outputs import anonymized_key, processed_key
from service.settings import ANONYMIZED_SUFFIX, PROCESSED_SUFFIX, ModelCacheSettings, S3Settings, load_settings
from service.tools.notify import NotificationAdmin, TopicOptions

# Invented people: the demo shows that names like these never leave the processed bucket.
FAKE_PATIENTS = [
    ("Anna Mcgehee", "1941-11-26"), ("José Núñez", "1958-03-02"), ("Mary+Ann O'Neil", "1970-07-19"),
    ("Jürgen Groß", "1949-12-31"), ("Li Wei", "1985-05-05"), ("Fatima Zahra", "1962-08-14"),
    ("Ola Nordmann", "1979-01-23"), ("Chloé Dubois", "1990-10-10"),
]
POSITIONS = ["top-left", "top-right", "bottom-left", "bottom-right"]
#: The DICOM upload's invented patient, in its header and burned into its pixels.
DICOM_PATIENT = "DEMO^PATIENT"
DICOM_PATIENT_ID = "DEMO-4711"
DICOM_BIRTH_DATE = "19500101"


class DemoSettings(S3Settings, ModelCacheSettings):
    """The demo's S3 and, for its default images (the default model's X-rays), MODEL_CACHE_DIR."""


@dataclass
class DemoUpload:
    source: Path
    key: str
    truth: str
    dicom: bool = False

    @property
    def extension(self) -> str:
        return ".dcm" if self.dicom else ".jpeg"


def run_demo(*, images: str | None, out: str, bucket: str) -> int:
    settings = load_settings(DemoSettings)
    if settings.s3_endpoint_url is None:
        raise ConfigurationError("S3_ENDPOINT_URL: not set (run the demo with `make demo`)")
    folder = Path(images) if images else validation_images(settings.model_cache_dir)
    sources = sorted(folder.glob("*") if images else folder.glob("*.jpeg"))
    if not sources:
        raise ConfigurationError(f"no images in {folder} (run `xray-pipeline model fetch` first)")
    output_dir = Path(out)
    shutil.rmtree(output_dir, ignore_errors=True)
    (output_dir / "input").mkdir(parents=True)
    admin = NotificationAdmin(settings)
    s3 = admin.s3
    for name in (bucket, bucket + PROCESSED_SUFFIX, bucket + ANONYMIZED_SUFFIX):
        _create_bucket(s3, name)

    port = _free_port()
    service = _start_service(port, output_dir / "service.log")
    try:
        _wait_ready(service, port)
        arn = admin.ensure_topic(
            "xray-demo",
            # Non-persistent: Ceph pushes inside each upload, which keeps the demo quick and ordered.
            TopicOptions(push_endpoint=f"http://127.0.0.1:{port}/", persistent=False, opaque_data="xray-demo"),
        )
        admin.ensure_notification(bucket, arn, notification_id="xray-demo", regex=r".*\.(jpe?g|png|dcm)$")
        uploads = _upload(s3, bucket, sources, output_dir / "input")
        rows = _collect(s3, bucket, uploads, output_dir)
    finally:
        service.terminate()
        service.wait(timeout=60)
    _print_table(rows)
    _print_dicom(uploads, rows, output_dir)
    print(f"\nimages saved under {output_dir}/ (input/, processed/, anonymized/)")
    print(f"service log: {output_dir}/service.log")
    return 0 if all(row["label"] != "-" for row in rows) else 1


def _create_bucket(s3: Any, name: str) -> None:
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_service(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "PSEUDONYM_KEY": secrets.token_hex(32),
        # Every image gets an anonymized copy in the demo, so all three versions can be compared.
        "ANONYMIZE_WHEN": "always",
        # service.log is for the person running the demo, not for a log collector.
        "LOG_FORMAT": "text",
    }
    log = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log, stderr=log)


def _wait_ready(service: subprocess.Popen[bytes], port: int, timeout_s: float = 300) -> None:
    print("starting the service (loading the model in a worker) ...", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError("the service exited during start-up; see service.log")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the service did not become ready in time")


def _upload(s3: Any, bucket: str, sources: list[Path], input_dir: Path) -> list[DemoUpload]:
    uploads = []
    for index, source in enumerate(sources):
        name, birth = FAKE_PATIENTS[index % len(FAKE_PATIENTS)]
        study = 3600 + index
        pixels = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
        # Scanners burn ASCII; the key keeps the name as typed, accents and all.
        printable = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
        lines = [printable, f"ID {study}  DOB {birth}"]
        burned = burn_patient_text(pixels, lines, position=POSITIONS[index % len(POSITIONS)])
        ok, encoded = cv2.imencode(".jpeg", burned, [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        truth = "PNEUMONIA" if "bacteria" in source.name or "virus" in source.name else "NORMAL"
        key = f"chest_xray/{truth}/{name}_{study}_{birth} scan %{index:02d}.jpeg"
        s3.put_object(Bucket=bucket, Key=key, Body=encoded.tobytes(), ContentType="image/jpeg")
        (input_dir / f"{index:02d}.jpeg").write_bytes(encoded.tobytes())
        uploads.append(DemoUpload(source, key, truth))
        if sys.stdout.isatty():
            print(f"uploaded {index + 1}/{len(sources)}", end="\r", flush=True)
    uploads.append(_upload_dicom(s3, bucket, uploads[-1], len(uploads), input_dir))
    print(f"uploaded {len(sources)} X-rays with fake patient text burned in, and the last one again as a DICOM CR; "
          "waiting for the outputs ...")
    return uploads


def _upload_dicom(s3: Any, bucket: str, like: DemoUpload, index: int, input_dir: Path) -> DemoUpload:
    """`like`'s X-ray again, as a modality would send it: a DICOM CR with a patient in its header and its pixels."""
    pixels = cv2.imread(str(like.source), cv2.IMREAD_GRAYSCALE)
    study = 3600 + index
    birth = f"{DICOM_BIRTH_DATE[:4]}-{DICOM_BIRTH_DATE[4:6]}-{DICOM_BIRTH_DATE[6:]}"
    name = DICOM_PATIENT.replace("^", " ")
    burned = burn_patient_text(pixels, [name, f"ID {DICOM_PATIENT_ID}  DOB {birth}"],
                               position=POSITIONS[index % len(POSITIONS)])
    data = demo_dicom(burned, accession=f"ACC{study}")
    key = f"chest_xray/{like.truth}/{name}_{study}_{birth} CR {index:02d}.dcm"
    s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/dicom")
    (input_dir / f"{index:02d}.dcm").write_bytes(data)
    return DemoUpload(like.source, key, like.truth, dicom=True)


def demo_dicom(pixels: np.ndarray, *, accession: str) -> bytes:
    """A DICOM chest X-ray as a CR plate reader writes it: `pixels` (8-bit grey, patient text burned in) as 12-bit
    MONOCHROME1 (white is low), RLE lossless, with the fake patient and a study in the header."""
    stored = (4095 - np.rint(pixels.astype(np.float32) * (4095 / 255))).astype(np.uint16)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = time.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time.strftime("%H%M%S")
    ds.AccessionNumber = accession
    ds.StudyID = accession[-6:]
    ds.StudyDescription = f"XR CHEST PA for {DICOM_PATIENT.replace('^', ' ')}"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Manufacturer = "xray-pipeline demo"
    ds.InstitutionName = "Demo General Hospital"
    ds.ReferringPhysicianName = "DEMO^DOCTOR"
    ds.PatientName = DICOM_PATIENT
    ds.PatientID = DICOM_PATIENT_ID
    ds.PatientBirthDate = DICOM_BIRTH_DATE
    ds.PatientSex = "O"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = stored.tobytes()
    ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _collect(s3: Any, bucket: str, uploads: list[DemoUpload], output_dir: Path) -> list[dict[str, str]]:
    (output_dir / "processed").mkdir()
    (output_dir / "anonymized").mkdir()
    rows = []
    deadline = time.monotonic() + 120
    for index, upload in enumerate(uploads):
        row = {"#": f"{index:02d}", "truth": upload.truth, "pseudonym": "-", "label": "-", "risk": "-",
               "anonymized": "-"}
        while time.monotonic() < deadline:
            try:
                response = s3.get_object(Bucket=bucket + PROCESSED_SUFFIX, Key=processed_key(upload.key))
            except s3.exceptions.NoSuchKey:
                time.sleep(0.3)
                continue
            metadata = response["Metadata"]
            name = f"{index:02d}{upload.extension}"
            (output_dir / "processed" / name).write_bytes(response["Body"].read())
            alias = metadata["pseudonym"]
            # A DICOM object outside the model's domain would have no risk (label `not-assessed`).
            risk = f"{float(metadata['risk']):.1%}" if "risk" in metadata else "-"
            row |= {"pseudonym": alias, "label": metadata["label"], "risk": risk}
            anonymized_name = anonymized_key(alias, upload.key, "dicom" if upload.dicom else "")
            anonymized = s3.get_object(Bucket=bucket + ANONYMIZED_SUFFIX, Key=anonymized_name)
            (output_dir / "anonymized" / name).write_bytes(anonymized["Body"].read())
            row["anonymized"] = f"{bucket + ANONYMIZED_SUFFIX}/{anonymized_name}"
            break
        rows.append(row)
    return rows


def _print_table(rows: list[dict[str, str]]) -> None:
    columns = list(rows[0])
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in columns}
    print("  ".join(column.ljust(widths[column]) for column in columns))
    for row in rows:
        print("  ".join(row[column].ljust(widths[column]) for column in columns))
    decided = [row for row in rows if row["label"] in ("Pneumonia", "Normal")]
    correct = sum((row["label"] == "Pneumonia") == (row["truth"] == "PNEUMONIA") for row in decided)
    print(f"\n{len(rows)} images; {len(decided)} labelled Pneumonia/Normal, {correct} of them correct; "
          f"{sum(row['label'] == 'Unsure' for row in rows)} Unsure")


def _print_dicom(uploads: list[DemoUpload], rows: list[dict[str, str]], output_dir: Path) -> None:
    """What became of the DICOM upload's patient: its anonymized copy names a keyed pseudonym instead."""
    for upload, row in zip(uploads, rows, strict=True):
        if not upload.dicom:
            continue
        original = next(other for other, twin in zip(rows, uploads, strict=True) if twin.source == upload.source)
        print(f"\n{row['#']} is {original['#']} again as DICOM: a CR (MONOCHROME1, RLE lossless, 12 bits) with a fake "
              "patient in its header and burned into its pixels.")
        anonymized = output_dir / "anonymized" / f"{row['#']}.dcm"
        if not anonymized.is_file():
            print("   It has no anonymized copy.")
            continue
        header = pydicom.dcmread(anonymized, stop_before_pixels=True)
        print(f"   Its anonymized copy names PatientName {header.get('PatientName', '')} (a keyed pseudonym); "
              f"PatientIdentityRemoved {header.get('PatientIdentityRemoved', '')}, "
              f"BurnedInAnnotation {header.get('BurnedInAnnotation', '')}.")
