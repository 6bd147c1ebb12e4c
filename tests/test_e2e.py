"""End to end: real Ceph bucket notifications (HTTP push) to `xray-pipeline serve` with the default model.

Uploads real chest X-rays with fake patient text burned in, under keys full of spaces, `+`, `%` and non-ASCII;
checks both output buckets, that OCR reads no patient text on the anonymized copies, that the service's DEBUG log
holds no key fragment, that TensorFlow never loaded in the web process, and that the risks through the service
equal the model run directly with the spec's preprocessing.
"""

from __future__ import annotations

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
import pytest
from conftest import DEFAULT_SPEC, VALIDATION_IMAGES, free_port, key_fragments, leaks, serve_process
from ocr_oracle import attack_views, crop, ink_box, patient_tokens, sharpened, tokens_read

from service.imaging.codec import decode_image, encode_image
from service.imaging.patient_text import burn_patient_text
from service.imaging.stamp import stamp_label
from service.imaging.text import find_text_regions
from service.models.spec import ModelSpec, Prediction
from service.outputs import anonymized_key, processed_key, pseudonym

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
        pixels = stamp_label(pixels, text, avoid=find_text_regions(pixels))
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
