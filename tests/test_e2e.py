"""End to end: real Ceph bucket notifications (HTTP push) to `xray-pipeline serve` with the default model.

A DICOM study (CR, DX, CT, PET, a report without pixels) goes the same way, and one more DICOM object through the
KafkaSource path (its record replayed in a KafkaSource's wire format): derived and de-identified outputs, new UIDs
that match the keyed mapping computed here (another process), no header value left, no readable burned-in name.

Uploads real chest X-rays with fake patient text burned in, under keys full of spaces, `+`, `%` and non-ASCII;
checks both output buckets, that OCR reads no patient text on the anonymized copies, that the service's DEBUG log
holds no key fragment, that TensorFlow never loaded in the web process, and that the risks through the service
equal the model run directly with the spec's preprocessing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from conftest import (
    DEFAULT_SPEC,
    VALIDATION_IMAGES,
    ceph_record,
    free_port,
    key_fragments,
    leaks,
    serve_process,
    shared_text_detector,
)
from dicom_factory import Patient, leaked_phi, make_dicom, make_no_pixels, new_study, phi_values
from ocr_oracle import attack_views, changed_box, crop, ink_box, patient_tokens, sharpened, tokens_read
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from service.dicom.deidentify import map_uid
from service.dicom.read import read_dicom
from service.imaging.codec import decode_image, encode_image
from service.imaging.patient_text import burn_patient_text
from service.imaging.stamp import stamp_label
from service.models.spec import ModelSpec, Prediction
from service.outputs import anonymized_key, failure_key, processed_key, pseudonym

pytestmark = [pytest.mark.rgw, pytest.mark.model]

E2E_KEY = "e2e-pseudonym-key-0123456789abcdef"
PATIENTS = [
    # Positions where these X-rays have no markers of their own under the text, so the oracle reads the input.
    ("Anna Mcgehee", "ID 3677 DOB 1941-11-26", "ward 3/Anna Mcgehee_3677_1941-11-26 100%.jpeg", "top-right"),
    ("Jurgen Gross", "ID 4821 DOB 1949-12-31", "Jürgen Groß+Ærø/scan 4821 1949-12-31.png", "bottom-left"),
    ("Maria Lopez", "ID 5120 DOB 1962-08-14", "x/Maria+Lopez %41 5120.jpg", "top-left"),
]
ORACLE = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
from PIL import Image
model = keras.saving.load_model(sys.argv[1], compile=False)
risks = {}
for path in sys.argv[2:]:
    image = Image.open(path).convert("RGB").resize((150, 150), Image.Resampling.NEAREST)
    logits = model.predict_on_batch(np.asarray(image, np.float32)[None] / 127.5 - 1.0)[0]
    e = np.exp(logits - logits.max())
    risks[os.path.basename(path)] = float(e[1] / e.sum())
print(json.dumps(risks))
"""




@pytest.fixture(scope="module")
def service(rgw: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not (VALIDATION_IMAGES.is_dir() and len(list(VALIDATION_IMAGES.glob("*.jpeg"))) == 16):
        pytest.fail("the default model is not fetched: run `make model` (make test does)")
    port = free_port()
    log_path = tmp_path_factory.mktemp("service") / "service.log"
    env = os.environ | rgw.env() | {
        "PORT": str(port), "HOST": "127.0.0.1", "PSEUDONYM_KEY": E2E_KEY, "LOG_LEVEL": "DEBUG",
        "ANONYMIZE_WHEN": "always", "WORKER_THREADS": "2",
    }
    for model_variable in ("MODEL_URI", "MODEL_SPEC", "MODEL_SHA256"):
        env.pop(model_variable, None)
    with serve_process(env, log_path, ready_timeout_s=240) as process:
        yield {"port": port, "pid": process.pid, "log": log_path, "env": env, "process": process}


@pytest.fixture(scope="module")
def notified_bucket(service: dict[str, Any], s3: Any) -> str:
    bucket = "e2e-scans"
    for name in (bucket, f"{bucket}-processed", f"{bucket}-anonymized"):
        s3.create_bucket(Bucket=name)
    # Set up exactly as a user would, with the CLI. Non-persistent: Ceph pushes inside each upload.
    subprocess.run(
        [sys.executable, "-m", "service.cli", "notify", "create", "--bucket", bucket, "--topic", "e2e",
         "--endpoint", f"http://127.0.0.1:{service['port']}/", "--no-persistent", "--regex", r".*\.(jpe?g|png)$"],
        env=service["env"], check=True, capture_output=True,
    )
    return bucket


def wait_for(s3: Any, bucket: str, key: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return s3.get_object(Bucket=bucket, Key=key)  # type: ignore[no-any-return]
        except s3.exceptions.NoSuchKey:
            assert time.monotonic() < deadline, f"no output in {bucket}"
            time.sleep(0.2)


#: A grey-level difference no re-encoding of the same pixels makes, and every stroke of a different glyph does.
STROKE_DIFFERENCE = 60


def stamp_candidates(label: str, risk: float) -> tuple[set[str], set[str]]:
    """The stamps the metadata's label and risk allow, and near misses: the other labels, the risk 0.1 point off.
    The stamp shows the risk unrounded, the metadata rounded to six places: both roundings of it are allowed."""
    labels = ModelSpec.load(DEFAULT_SPEC).labels
    expected = {Prediction(label, risk + error, is_positive=False).stamp_text for error in (-5e-7, 0.0, 5e-7)}
    wrong = {Prediction(other, risk, is_positive=False).stamp_text
             for other in {labels.positive, labels.negative, labels.uncertain} - {label}}
    wrong |= {Prediction(label, risk + step, is_positive=False).stamp_text for step in (-1e-3, 1e-3)} - expected
    return expected, wrong


def stamp_mismatch(uploaded: bytes, output: np.ndarray, text: str | None) -> float:
    """How many pixels of `output` differ by a stroke from `text` stamped the way the service stamps (found text
    avoided, then encoded in the upload's format); None: the upload with no stamp. Infinite for another size."""
    decoded = decode_image(uploaded, max_bytes=len(uploaded), max_pixels=10**9)
    pixels = decoded.pixels
    if text is not None:
        pixels = stamp_label(pixels, text, avoid=shared_text_detector().find(pixels).all_text)
    rendered = gray(decode(encode_image(pixels, decoded.format)))
    if rendered.shape != output.shape:
        return float("inf")
    return float(np.count_nonzero(cv2.absdiff(rendered, output) > STROKE_DIFFERENCE))


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def decode(body: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)


def test_tensorflow_only_in_workers(service: dict[str, Any]) -> None:
    web_maps = Path(f"/proc/{service['pid']}/maps").read_text()
    assert "tensorflow" not in web_maps, "TensorFlow was loaded into the web process"
    children = Path(f"/proc/{service['pid']}/task/{service['pid']}/children").read_text().split()
    worker_maps = [Path(f"/proc/{child}/maps").read_text() for child in children]
    assert any("tensorflow" in maps for maps in worker_maps), "no worker process holds TensorFlow"


def test_uploads_end_as_stamped_and_anonymized_copies(service: dict[str, Any], notified_bucket: str,
                                                      s3: Any) -> None:
    sources = sorted(VALIDATION_IMAGES.glob("person*.jpeg"))
    burned_images = {}
    for (name, line, key, position), source in zip(PATIENTS, sources, strict=False):
        pixels = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
        size = max(20, pixels.shape[0] // 40)
        burned = burn_patient_text(pixels, [name, line], position=position, size_px=size)
        text_box = ink_box(burn_patient_text(np.zeros_like(pixels), [name, line], position=position, size_px=size))
        ok, encoded = cv2.imencode(Path(key).suffix, burned)
        assert ok
        burned_images[key] = (burned, text_box, size, encoded.tobytes())
        s3.put_object(Bucket=notified_bucket, Key=key, Body=encoded.tobytes())

    for name, line, key, _ in PATIENTS:
        processed = wait_for(s3, f"{notified_bucket}-processed", processed_key(key))
        metadata = processed["Metadata"]
        assert metadata["label"] in {"Pneumonia", "Normal", "Unsure"} and 0 <= float(metadata["risk"]) <= 1
        alias = pseudonym(E2E_KEY.encode(), notified_bucket, key)
        assert metadata["pseudonym"] == alias
        stamped = gray(decode(processed["Body"].read()))
        burned, text_box, size, uploaded = burned_images[key]
        # The stamp is compared with the project's own rendering of it (whose legibility test_imaging checks with
        # OCR), not read by OCR here: Tesseract may drop a letter of a legible stamp.
        expected, wrong = stamp_candidates(metadata["label"], float(metadata["risk"]))
        mismatch = {text: stamp_mismatch(uploaded, stamped, text) for text in [*expected, *wrong, None]}
        closest = min(mismatch, key=mismatch.__getitem__)
        assert closest in expected, f"stamped {closest!r}, not {expected}: {mismatch}"
        assert mismatch[closest] <= 0.1 * min(mismatch[text] for text in [*wrong, None]), mismatch

        name_of_copy = anonymized_key(alias, key, "jpeg")
        assert name_of_copy.endswith(Path(key).suffix) and name_of_copy.startswith(alias)
        anonymized = wait_for(s3, f"{notified_bucket}-anonymized", name_of_copy)
        assert not any(leaks(fragment, json.dumps(anonymized["Metadata"])) for fragment in key_fragments(key))
        output = gray(decode(anonymized["Body"].read()))
        tokens = patient_tokens([name, line])
        output_views = [(output, 11), (sharpened(output), 11)]
        output_views += [(view, 6) for view in attack_views(crop(output, text_box, size))]
        input_views = [(view, 6) for view in attack_views(crop(burned, text_box, size))]
        leaked, read_before = tokens_read([output_views, input_views], [name, line])
        assert len(read_before) >= (len(tokens) + 1) // 2, f"the OCR oracle must read the input: {read_before}"
        assert not leaked, f"readable on the anonymized copy: {sorted(leaked)}"


def test_service_log_holds_no_key_fragment(service: dict[str, Any],
                                           notified_bucket: str) -> None:
    log = service["log"].read_text()
    # One JSON object per line, TensorFlow's start-up notices in the workers included (they are held back).
    lines = [line for line in log.splitlines() if line.strip()]
    not_json = [line[:200] for line in lines if not line.startswith("{")]
    assert not not_json, f"the service log has lines that are not JSON: {not_json}"
    entries = [json.loads(line) for line in lines]
    assert any(entry["level"] == "DEBUG" for entry in entries)
    assert any(entry.get("outcome") == "processed" for entry in entries)
    # The readiness polls above are not in the access log; the Ceph pushes are.
    access = [entry["path"] for entry in entries if entry["logger"] == "uvicorn.access"]
    assert "/" in access and "/readyz" not in access
    # Parsed too, so that escaped non-ASCII (\u00fc) is compared as the text it stands for.
    text = log + json.dumps(entries, ensure_ascii=False)
    for _, _, key, _ in PATIENTS:
        # Five characters and up: shorter digit runs (a study id) also occur in timings and pids.
        for fragment in key_fragments(key, min_length=5):
            assert not leaks(fragment, text), f"the service log contains {fragment!r}"


def test_risks_equal_the_model_run_directly(service: dict[str, Any], s3: Any) -> None:
    bucket = "e2e-parity"
    for name in (bucket, f"{bucket}-processed", f"{bucket}-anonymized"):
        s3.create_bucket(Bucket=name)
    images = sorted(VALIDATION_IMAGES.glob("*.jpeg"))
    records = []
    for path in images:
        etag = s3.put_object(Bucket=bucket, Key=path.name, Body=path.read_bytes())["ETag"].strip('"')
        records.append({"eventName": "ObjectCreated:Put", "eventSource": "ceph:s3",
                        "s3": {"bucket": {"name": bucket}, "object": {"key": path.name, "eTag": etag}}})
    request = urllib.request.Request(
        f"http://127.0.0.1:{service['port']}/", data=json.dumps({"Records": records}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200
    through_service = {
        path.name: float(s3.head_object(Bucket=f"{bucket}-processed", Key=processed_key(path.name))["Metadata"]["risk"])
        for path in images
    }
    oracle = subprocess.run(
        [sys.executable, "-c", ORACLE, str(VALIDATION_IMAGES.parent / "pneumonia_xception.keras"),
         *map(str, images)], capture_output=True, text=True, check=True, timeout=600,
    )
    direct = json.loads(oracle.stdout.strip().splitlines()[-1])
    assert through_service.keys() == direct.keys()
    for name, risk in direct.items():
        assert through_service[name] == pytest.approx(risk, abs=1e-4), name


#: One patient's study as a hospital would send it: a CR chest X-ray (RLE, MONOCHROME1, the name burned in), a
#: 12-bit DX of the chest, a CT and an RGB PET (outside the model's domain), and a report without pixels.
DICOM_STUDY = {
    "Doe Jane+Marie %41/CR chest 0001.dcm": {"modality": "CR", "photometric": "MONOCHROME1", "rows": 1024,
                                              "columns": 896, "transfer_syntax": RLELossless},
    "Doe Jane+Marie %41/DX 0002.dcm": {"modality": "DX", "bits_stored": 12, "rows": 768, "columns": 640},
    "Doe Jane+Marie %41/CT 0003.dcm": {"modality": "CT", "signed": True, "bits_stored": 16, "body_part": "CHEST"},
    "Doe Jane+Marie %41/PET 0004.dcm": {"modality": "PT", "photometric": "RGB", "bits_stored": 8,
                                         "transfer_syntax": JPEG2000Lossless},
}
DICOM_REPORT_KEY = "Doe Jane+Marie %41/SR 0005.dcm"
#: Pushed through the KafkaSource path instead (binary CloudEvent, no Content-Type); no extension: content decides.
DICOM_KAFKA_KEY = "Doe Jane+Marie %41/IM 0006"
BURNED_IN = ["DOE JANE MARIE", "PID 4471 0815"]


def shown(data: bytes) -> np.ndarray:
    """The first frame of a DICOM object as a viewer (and the service's text search) shows it."""
    return read_dicom(data, max_bytes=len(data), max_pixels=10**8).display(0)


def kafkasource_delivery(bucket: str, key: str, etag: str, offset: int) -> tuple[dict[str, str], bytes]:
    """A Ceph record as a Knative KafkaSource delivers it from Kafka (tests/events/kafkasource-*.http)."""
    headers = {
        "ce-specversion": "1.0", "ce-id": f"partition:0/offset:{offset}",
        "ce-source": "/apis/v1/namespaces/xray/kafkasources/kafka-source#storage",
        "ce-type": "dev.knative.kafka.event", "ce-subject": f"partition:0#{offset}",
        "ce-time": "2026-12-04T10:00:00.000Z", "Prefer": "reply", "Kn-Namespace": "xray",
    }
    return headers, json.dumps({"Records": [ceph_record(bucket, key, etag=etag)]}).encode()


def test_a_dicom_study_is_classified_where_it_may_be_and_de_identified_everywhere(
    service: dict[str, Any], s3: Any, tmp_path: Path
) -> None:
    bucket, quiet_bucket = "e2e-dicom", "e2e-dicom-kafka"
    for name in (bucket, quiet_bucket):
        for suffix in ("", "-processed", "-anonymized"):
            s3.create_bucket(Bucket=name + suffix)
    subprocess.run(
        [sys.executable, "-m", "service.cli", "notify", "create", "--bucket", bucket, "--topic", "e2e-dicom",
         "--endpoint", f"http://127.0.0.1:{service['port']}/", "--no-persistent", "--regex", r".*\.dcm$"],
        env=service["env"], check=True, capture_output=True,
    )
    patient, study = Patient(), new_study()
    uploads = {key: make_dicom(patient=patient, study=study, burned_in=BURNED_IN, **options)
               for key, options in DICOM_STUDY.items()}
    uploads[DICOM_REPORT_KEY] = make_no_pixels("SR", patient=patient, study=study)
    for key, body in uploads.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    # The same study through the KafkaSource path: the object lands in a bucket without notifications and its
    # record is replayed in the exact wire format of a KafkaSource.
    kafka_body = make_dicom(patient=patient, study=study, burned_in=BURNED_IN, modality="DX", rows=512, columns=512,
                            transfer_syntax=JPEGLSLossless)
    etag = s3.put_object(Bucket=quiet_bucket, Key=DICOM_KAFKA_KEY, Body=kafka_body)["ETag"].strip('"')
    headers, body = kafkasource_delivery(quiet_bucket, DICOM_KAFKA_KEY, etag, offset=7)
    request = urllib.request.Request(f"http://127.0.0.1:{service['port']}/", data=body, headers=headers,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200

    anonymized_studies = set()
    outputs = [(bucket, key, uploads[key]) for key in DICOM_STUDY] + [(quiet_bucket, DICOM_KAFKA_KEY, kafka_body)]
    for source_bucket, key, uploaded in outputs:
        source = pydicom.dcmread(io.BytesIO(uploaded))
        processed = wait_for(s3, f"{source_bucket}-processed", processed_key(key, dicom=True))
        metadata = processed["Metadata"]
        derived = pydicom.dcmread(io.BytesIO(processed["Body"].read()))
        assert processed["ContentType"] == "application/dicom"
        assert derived.StudyInstanceUID == source.StudyInstanceUID and derived.PatientID == source.PatientID
        assert derived.SOPInstanceUID != source.SOPInstanceUID and list(derived.ImageType) == ["DERIVED", "SECONDARY"]
        assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        if source.Modality in ("CR", "DX"):
            assert metadata["label"] in {"Pneumonia", "Normal", "Unsure"} and 0 <= float(metadata["risk"]) <= 1
        else:
            assert metadata["label"] == "not-assessed" and source.Modality in metadata["not-assessed-reason"]
        alias = pseudonym(E2E_KEY.encode(), source_bucket, key)
        anonymized = wait_for(s3, f"{source_bucket}-anonymized", anonymized_key(alias, key, "dicom"))
        assert anonymized_key(alias, key, "dicom") == f"{alias}.dcm"
        data = anonymized["Body"].read()
        assert leaked_phi(data, patient, study=study) == []
        assert not any(leaks(fragment, json.dumps(anonymized["Metadata"])) for fragment in key_fragments(key))
        clean = pydicom.dcmread(io.BytesIO(data))
        assert clean.PatientIdentityRemoved == "YES" and clean.BurnedInAnnotation == "NO"
        assert clean.StudyInstanceUID == map_uid(E2E_KEY.encode(), source.StudyInstanceUID)
        anonymized_studies.add(clean.StudyInstanceUID)
        path = tmp_path / f"{alias}.dcm"
        path.write_bytes(data)
        assert subprocess.run(["dcmdump", "-q", str(path)], capture_output=True).returncode == 0
        if source.Modality == "CR":
            before, after = shown(uploaded), shown(data)
            box = changed_box(shown(make_dicom(patient=patient, study=study, **DICOM_STUDY[key])), before)
            size = max(12, box[3] // 3)
            leaked, read_before = tokens_read(
                [[(after, 11)] + [(view, 6) for view in attack_views(crop(after, box, size))],
                 [(view, 6) for view in attack_views(crop(before, box, size))]], BURNED_IN)
            assert read_before, "the OCR oracle must read the burned-in name on the upload"
            assert not leaked, f"readable on the anonymized DICOM: {sorted(leaked)}"
    assert len(anonymized_studies) == 1, "one study, one new Study Instance UID"

    alias = pseudonym(E2E_KEY.encode(), bucket, DICOM_REPORT_KEY)
    failure = wait_for(s3, f"{bucket}-processed", failure_key(alias))
    record = json.loads(failure["Body"].read())
    assert record["reason"] == "no-pixel-data"
    assert not [value for value in phi_values(patient, study=study) if value in json.dumps(record)]


def test_service_log_holds_no_dicom_header_value(service: dict[str, Any]) -> None:
    text = service["log"].read_text()
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    text += json.dumps(entries, ensure_ascii=False)
    assert not [value for value in phi_values(Patient(), study=new_study()) if value in text]


def test_sigterm_stops_cleanly(service: dict[str, Any]) -> None:
    process = service["process"]
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    process.send_signal(signal.SIGTERM)
    # uvicorn re-raises SIGTERM once its graceful shutdown is complete, so the status reports that signal.
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in service["log"].read_text()

    def alive(pid: str) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 10  # the resource tracker leaves once its pipe to the parent closes
    while any(alive(child) for child in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [child for child in children if alive(child)], "a worker outlived the service"
