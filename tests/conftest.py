"""Shared fixtures: one real Ceph RGW per test session, a tiny Keras model, buckets and settings.

Everything a fixture starts it stops, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import io
import itertools
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from local_rgw import LocalRGW

from service.app import create_app
from service.engine.messages import ImageLimits, TextOptions
from service.engine.pool import InferenceEngine
from service.logs import configure_logging
from service.models.fetch import default_model_dir, text_models_dir
from service.models.spec import ModelSpec
from service.pipeline import Pipeline
from service.settings import ModelCacheSettings, Settings
from service.storage import ObjectStore, make_s3_client

ROOT = Path(__file__).resolve().parent.parent
#: Where `make model` (`xray-pipeline model fetch`) puts the default model: MODEL_CACHE_DIR, as the service reads it.
MODEL_DIR = default_model_dir(ModelCacheSettings().model_cache_dir)
DEFAULT_SPEC = MODEL_DIR / "pneumonia.yaml"
VALIDATION_IMAGES = MODEL_DIR / "val"
#: The default model's spec as the package ships it (its template, whether or not the model is fetched).
SPEC_TEMPLATE = ROOT / "service" / "models" / "default" / "pneumonia.yaml"
#: The text models (`make model` fetches them with the default model), as every test engine's workers use them.
TEXT_OPTIONS = TextOptions(text_models_dir(ModelCacheSettings().model_cache_dir))
TEST_PSEUDONYM_KEY = "test-pseudonym-key-0123456789abcdef"
# Keys as uploaders write them: spaces, '+', '%', non-ASCII, patient-like names and dates.
HOSTILE_KEYS = [
    "ward 7/Anna Mcgehee_3677_1941-11-26_2015-02-10.jpeg",
    "scans/Mary+Ann O'Neil 100%25 done.jpg",
    "Jürgen Groß/Ærø øre ünïcødé 1949-12-31.png",
]
_bucket_counter = itertools.count()


def key_fragments(key: str, min_length: int = 4) -> list[str]:
    """The pieces of a key that identify a patient; none may appear in a log line, response or record."""
    pieces = key.replace("/", " ").replace("_", " ").replace(".", " ").split()
    return [piece for piece in pieces if len(piece) >= min_length and piece.lower() not in {"jpeg", "scan"}]


def leaks(fragment: str, text: str) -> bool:
    """Whether a key fragment appears in `text`. A number counts only standing alone (not inside a longer run of
    letters and digits): a patient ID leaks as itself, while timestamps, timings and hex pseudonyms hold any
    4-digit number now and then by chance (a loaded run once failed on '3677' in a log record's timestamp)."""
    if fragment.isdigit():
        return re.search(rf"(?<![0-9A-Za-z]){fragment}(?![0-9A-Za-z])", text) is not None
    return fragment in text


@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRGW]:
    cluster = LocalRGW(tmp_path_factory.mktemp("rgw"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def s3(rgw: LocalRGW) -> Any:
    return rgw.s3_client()


@functools.cache
def shared_text_detector() -> Any:
    """The text detector a worker loads (service.imaging.detection), orientation markers kept; loaded once."""
    from service.imaging.detection import TextDetector

    return TextDetector.load(TEXT_OPTIONS.models)


@pytest.fixture(scope="session")
def text_detector() -> Any:
    return shared_text_detector()


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, str(ROOT / "tests" / "tiny_model.py"), str(out)], check=True, timeout=120)
    return out / "tiny.yaml"


@pytest.fixture
def input_bucket(s3: Any) -> str:
    """A fresh input bucket with its default-named output buckets."""
    name = f"in-{next(_bucket_counter)}-{uuid.uuid4().hex[:8]}"
    for bucket in (name, f"{name}-processed", f"{name}-anonymized"):
        s3.create_bucket(Bucket=bucket)
    return name


@pytest.fixture
def make_settings(rgw: LocalRGW, tiny_spec: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "s3_endpoint_url": rgw.endpoint_url,
            "aws_access_key_id": rgw.access_key,
            "aws_secret_access_key": rgw.secret_key,
            "aws_default_region": rgw.region,
            "model_uri": str(tiny_spec),
            "pseudonym_key": TEST_PSEUDONYM_KEY,
            "s3_max_attempts": 1,
            "s3_connect_timeout_s": 2,
        }
        return Settings(**(values | overrides))

    return build


@pytest.fixture(scope="session")
def client(rgw: LocalRGW, tiny_spec: Path) -> Iterator[TestClient]:
    """The app with a started worker (tiny model), shared by the HTTP-level tests."""
    settings = Settings(
        s3_endpoint_url=rgw.endpoint_url, aws_access_key_id=rgw.access_key, aws_secret_access_key=rgw.secret_key,
        aws_default_region=rgw.region, model_uri=str(tiny_spec), pseudonym_key=TEST_PSEUDONYM_KEY,
        max_request_bytes=64 * 1024, s3_max_attempts=1, log_level="DEBUG",
    )
    with TestClient(create_app(settings)) as started:
        yield started


class Harness:
    """A started inference engine and a pipeline over the real RGW, driven from synchronous tests."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = settings
        self.spec = ModelSpec.load(settings.model_uri)
        self.engine = InferenceEngine(
            self.spec,
            workers=settings.workers,
            threads_per_worker=1,
            limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels),
            deid_key=settings.effective_pseudonym_key,
            text=TEXT_OPTIONS,
        )
        self.loop.run_until_complete(self.engine.start())

    def pipeline(self, settings: Settings | None = None) -> Pipeline:
        settings = settings or self.settings
        return Pipeline(settings, ObjectStore(make_s3_client(settings)), self.engine, self.spec)

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(rgw: LocalRGW, tiny_spec: Path) -> Iterator[Harness]:
    settings = Settings(
        s3_endpoint_url=rgw.endpoint_url,
        aws_access_key_id=rgw.access_key,
        aws_secret_access_key=rgw.secret_key,
        aws_default_region=rgw.region,
        model_uri=str(tiny_spec),
        pseudonym_key=TEST_PSEUDONYM_KEY,
        s3_max_attempts=1,
    )
    started = Harness(settings)
    try:
        yield started
    finally:
        started.close()


def xray_like(brightness: int, size: tuple[int, int] = (480, 400), seed: int = 0) -> np.ndarray:
    """A grey image with smooth structure and noise; the tiny model calls bright ones positive."""
    height, width = size
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = brightness + 25 * np.sin(xs / 37.0) * np.cos(ys / 53.0) + rng.normal(0, 4, size)
    return np.clip(base, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, extension: str = ".jpg") -> bytes:
    ok, encoded = cv2.imencode(extension, pixels)
    assert ok
    return encoded.tobytes()


def ceph_record(
    bucket: str,
    key: str,
    *,
    etag: str = "",
    event_name: str = "ObjectCreated:Put",
    size: int = 1,
    source: str = "ceph:s3",
) -> dict[str, Any]:
    """One notification record in Ceph 16's shape (see tests/events/ for real captures)."""
    return {
        "eventVersion": "2.2",
        "eventSource": source,
        "awsRegion": "",
        "eventTime": "2026-11-23T15:34:54.341830Z",
        "eventName": event_name,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "test",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": key, "size": size, "eTag": etag, "versionId": "", "sequencer": "1"},
        },
        "eventId": f"test.{uuid.uuid4().hex}",
        "opaqueData": "",
    }


def png_header_only(width: int, height: int) -> bytes:
    """A few dozen bytes declaring a huge grey PNG: a decompression bomb must be refused from its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def upload(s3: Any, bucket: str, key: str, body: bytes) -> str:
    """Upload and return the eTag, as the notification would carry it."""
    return str(s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]).strip('"')


@pytest.fixture
def tool_env(monkeypatch: pytest.MonkeyPatch, rgw: LocalRGW, tiny_spec: Path) -> dict[str, str]:
    """The CLI's settings as an operator sets them: the local RGW, the tiny model, a pseudonym key."""
    for name in ("DEV_MODE", "MODEL_SPEC", "ANONYMIZE_WHEN", "PROCESSED_BUCKET", "ANONYMIZED_BUCKET", "INPUT_BUCKETS",
                 "WORKERS", "BATCH_MAX_SIZE", "LOG_LEVEL", "LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    env = rgw.env() | {"MODEL_URI": str(tiny_spec), "PSEUDONYM_KEY": TEST_PSEUDONYM_KEY, "WORKER_THREADS": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def wait_until(condition: Callable[[], Any], timeout_s: float, message: str | Callable[[], str],
               interval_s: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy, and return that; fail with `message` (a callable is asked
    only then, e.g. for a log tail) once `timeout_s` has passed. A wait for a real condition instead of a sleep
    long enough on an idle machine: a loaded one is slower, never differently ordered."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() >= deadline:
            pytest.fail(message() if callable(message) else message)
        time.sleep(interval_s)
    return result


def write_spec(tmp_path: Path, body: str, weights: bool = True) -> Path:
    """A model spec file with `body` in `tmp_path`, its weights a placeholder (a spec only checks they exist)."""
    if weights:
        (tmp_path / "w.keras").write_bytes(b"placeholder weights file: the spec only checks it exists")
    path = tmp_path / "spec.yaml"
    path.write_text(body)
    return path


#: A valid spec of a two-class model (for `write_spec`).
BINARY = """
name: binary
weights: w.keras
input: {width: 150, height: 150, color_mode: rgb, resize: nearest_exact, scale: x/127.5-1}
output: {kind: logits, class_names: [NORMAL, PNEUMONIA], positive_class: PNEUMONIA}
labels: {positive: Pneumonia, negative: Normal, uncertain: Unsure, positive_threshold: 0.8, negative_threshold: 0.6}
"""


def free_port() -> int:
    """A loopback port free right now (for a server a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under real uvicorn in a thread on a free loopback port, as `serve` runs it (log_config=None, so the
    service's logging set-up applies); yields its base URL (`http://127.0.0.1:<port>/`) and stops it on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the service did not stop"


def interrupted(command: list[str], *, once: Callable[[], bool], env: dict[str, str],
                what: str = "nothing was processed") -> tuple[int, str, str]:
    """Run `python -m service.cli <command>` and press Ctrl-C (SIGINT) as soon as `once()` is true; returns its exit
    status, stdout and stderr. The process is killed if it outlives the test."""
    run = subprocess.Popen([sys.executable, "-m", "service.cli", *command], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not once():
            assert run.poll() is None and time.monotonic() < deadline, what
            time.sleep(0.01)
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    return run.returncode, stdout, stderr


def service_ready(port: int) -> bool:
    """Whether the service on this loopback port answers `/readyz` with 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/readyz")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


#: What `serve` gives uvicorn to finish in-flight requests after SIGTERM (service/cli.py), plus a margin.
SERVE_STOP_TIMEOUT_S = 70


@contextlib.contextmanager
def serve_process(env: dict[str, str], log_path: Path, *, ready_timeout_s: float = 180) -> Iterator[
        subprocess.Popen[bytes]]:
    """`xray-pipeline serve` as a process with exactly `env` (its PORT and HOST included), all output in `log_path`;
    yielded once `/readyz` says 200. On leaving: SIGTERM (in-flight requests finish), SIGKILL if it lingers."""
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not service_ready(int(env["PORT"])):
            tail = log_path.read_text(errors="replace")[-3000:]
            assert process.poll() is None, f"serve exited with {process.returncode}:\n{tail}"
            assert time.monotonic() < deadline, f"serve did not become ready:\n{tail}"
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=SERVE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class JsonLog:
    """What the service's own logging set-up (`configure_logging`, JSON lines) wrote during a test."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def entries(self) -> list[dict[str, Any]]:
        """Every line parsed: a line that is not one JSON object fails the test here."""
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def json_log() -> Iterator[JsonLog]:
    """Logging as `serve` sets it up (JSON, INFO) into a buffer; the previous set-up is back afterwards."""
    root, access = logging.getLogger(), logging.getLogger("uvicorn.access")
    handlers, level, access_filters = root.handlers[:], root.level, access.filters[:]
    log = JsonLog()
    configure_logging("INFO", "json", log.stream)
    try:
        yield log
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        access.filters[:] = access_filters


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
