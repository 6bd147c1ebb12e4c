"""The local demo: real uploads, real Ceph notifications, the real service, the default model.

Given an S3 endpoint in the environment (`make demo` boots a throwaway Ceph RGW for it), it creates the buckets,
starts `xray-pipeline serve`, points a bucket notification at it, uploads the model's 16 validation X-rays with
fake patient text burned in and patient-like keys, waits for both outputs of each, prints a table and saves the
images for viewing.
"""

from __future__ import annotations

import contextlib
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

from service.errors import ConfigurationError
from service.imaging.patient_text import burn_patient_text
from service.models.fetch import validation_images
from service.outputs import processed_key
from service.settings import ANONYMIZED_SUFFIX, PROCESSED_SUFFIX, ModelCacheSettings, S3Settings, load_settings
from service.tools.notify import NotificationAdmin, TopicOptions

# Invented people: the demo shows that names like these never leave the processed bucket.
FAKE_PATIENTS = [
    ("Anna Mcgehee", "1941-11-26"), ("José Núñez", "1958-03-02"), ("Mary+Ann O'Neil", "1970-07-19"),
    ("Jürgen Groß", "1949-12-31"), ("Li Wei", "1985-05-05"), ("Fatima Zahra", "1962-08-14"),
    ("Ola Nordmann", "1979-01-23"), ("Chloé Dubois", "1990-10-10"),
]
POSITIONS = ["top-left", "top-right", "bottom-left", "bottom-right"]


class DemoSettings(S3Settings, ModelCacheSettings):
    """The demo's S3 and, for its default images (the default model's X-rays), MODEL_CACHE_DIR."""


@dataclass
class DemoUpload:
    source: Path
    key: str
    truth: str


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
        admin.ensure_notification(bucket, arn, notification_id="xray-demo", regex=r".*\.(jpe?g|png)$")
        uploads = _upload(s3, bucket, sources, output_dir / "input")
        rows = _collect(s3, bucket, uploads, output_dir)
    finally:
        service.terminate()
        service.wait(timeout=60)
    _print_table(rows)
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
    print(f"uploaded {len(sources)} X-rays with fake patient text burned in; waiting for the outputs ...")
    return uploads


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
            (output_dir / "processed" / f"{index:02d}.jpeg").write_bytes(response["Body"].read())
            alias = metadata["pseudonym"]
            row |= {"pseudonym": alias, "label": metadata["label"], "risk": f"{float(metadata['risk']):.1%}"}
            anonymized_key = alias + ".jpeg"
            anonymized = s3.get_object(Bucket=bucket + ANONYMIZED_SUFFIX, Key=anonymized_key)
            (output_dir / "anonymized" / f"{index:02d}.jpeg").write_bytes(anonymized["Body"].read())
            row["anonymized"] = f"{bucket + ANONYMIZED_SUFFIX}/{anonymized_key}"
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
