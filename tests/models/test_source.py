"""Model delivery: MODEL_URI as a local path or s3://bucket/key, fetched into a verified cache before ready.

The S3 tests run against the session's real Ceph RGW, with the tiny Keras model uploaded to a model bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import ROOT, TEXT_OPTIONS, ceph_record, encode, upload, xray_like
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import ConfigurationError
from service.models.source import (
    PARTIAL_SUFFIX,
    ModelCache,
    S3Location,
    resolve_model,
    weights_location,
)
from service.outputs import processed_key
from service.settings import Settings
from service.storage import make_s3_client

SPEC_KEY = "pneumonia/v3/tiny.yaml"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_bucket(s3: Any, bucket: str) -> None:
    # One delete per key: Ceph 16 aborts on some multi-object deletes.
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=bucket)


@pytest.fixture
def make_bucket(s3: Any) -> Iterator[Callable[..., str]]:
    """make(prefix, *suffixes): a fresh bucket (and one per suffix), removed with its objects afterwards."""
    made: list[str] = []

    def make(prefix: str, *suffixes: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        for bucket in (name, *(name + suffix for suffix in suffixes)):
            s3.create_bucket(Bucket=bucket)
            made.append(bucket)
        return name

    yield make
    for name in reversed(made):
        remove_bucket(s3, name)


@pytest.fixture
def model_bucket(s3: Any, tiny_spec: Path, make_bucket: Callable[..., str]) -> str:
    """A model bucket holding the tiny model's spec and weights under pneumonia/v3/."""
    bucket = make_bucket("models")
    s3.put_object(Bucket=bucket, Key=SPEC_KEY, Body=tiny_spec.read_bytes())
    s3.put_object(Bucket=bucket, Key="pneumonia/v3/tiny.keras", Body=(tiny_spec.parent / "tiny.keras").read_bytes())
    return bucket


@pytest.fixture
def settings_for(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    def build(model_uri: str, **overrides: Any) -> Settings:
        # A cache of its own for the model; the text models (which workers load too) stay where `make model` put them.
        return make_settings(**({"model_uri": model_uri, "model_cache_dir": tmp_path / "cache",
                                 "text_models_dir": TEXT_OPTIONS.models} | overrides))

    return build


def cache_files(settings: Settings) -> list[str]:
    directory = settings.model_cache_dir
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


def fetch_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if hasattr(record, "cache_hit")]


# --- pure functions: no S3 ---------------------------------------------------------------------------------------


def test_model_uri_parsing() -> None:
    assert S3Location.from_uri("/models/tiny.yaml") is None
    assert S3Location.from_uri("model/pneumonia.yaml") is None
    location = S3Location.from_uri("s3://models/pneumonia/v3/pneumonia.yaml")
    assert location == S3Location("models", "pneumonia/v3/pneumonia.yaml")
    assert str(location) == "s3://models/pneumonia/v3/pneumonia.yaml"
    with pytest.raises(ConfigurationError, match="MODEL_URI: s3://models must name an object"):
        S3Location.from_uri("s3://models")


@pytest.mark.parametrize(
    ("spec_key", "weights", "expected"),
    [
        ("pneumonia/v3/pneumonia.yaml", "pneumonia_xception.keras", "pneumonia/v3/pneumonia_xception.keras"),
        ("pneumonia/v3/pneumonia.yaml", "weights/x.onnx", "pneumonia/v3/weights/x.onnx"),
        ("pneumonia/v3/pneumonia.yaml", "./x.keras", "pneumonia/v3/x.keras"),
        ("pneumonia.yaml", "x.keras", "x.keras"),
    ],
)
def test_weights_are_found_beside_the_spec(spec_key: str, weights: str, expected: str) -> None:
    assert weights_location(S3Location("models", spec_key), Path(weights)) == S3Location("models", expected)


@pytest.mark.parametrize("weights", ["../v2/x.keras", "a/../../x.keras", "/etc/x.keras", ""])
def test_weights_outside_the_spec_prefix_are_refused(weights: str) -> None:
    with pytest.raises(ConfigurationError, match=r"MODEL_URI: s3://models/v3/s\.yaml: weights .* relative to the spec"):
        weights_location(S3Location("models", "v3/s.yaml"), PurePosixPath(weights))


def test_cache_entries_stay_in_the_directory_and_follow_the_etag(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    hostile = cache.entry_path(S3Location("models", "../../etc/passwd.keras"), "e1")
    assert hostile.parent == tmp_path and hostile.suffix == ".keras"
    plain = S3Location("models", "v3/x.keras")
    assert cache.entry_path(plain, "e1") != cache.entry_path(plain, "e2")
    assert cache.entry_path(plain, "e1") != cache.entry_path(S3Location("other", "v3/x.keras"), "e1")
    assert cache.entry_path(S3Location("models", "v3/x.weird suffix"), "e1").suffix == ""


def test_local_path_checks_the_weights_digest(tiny_spec: Path, settings_for: Callable[..., Settings]) -> None:
    weights = (tiny_spec.parent / "tiny.keras").read_bytes()
    spec = resolve_model(settings_for(str(tiny_spec), model_sha256=sha256_hex(weights)), make_s3_client)
    assert spec.weights == (tiny_spec.parent / "tiny.keras").resolve()
    with pytest.raises(ConfigurationError) as raised:
        resolve_model(settings_for(str(tiny_spec), model_sha256="0" * 64), make_s3_client)
    message = str(raised.value)
    assert message.startswith("MODEL_SHA256:") and sha256_hex(weights) in message and "0" * 64 in message


# --- against the local RGW ---------------------------------------------------------------------------------------

@pytest.mark.rgw
def test_s3_model_is_downloaded_once_then_served_from_the_cache(
    model_bucket: str, tiny_spec: Path, settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    weights = (tiny_spec.parent / "tiny.keras").read_bytes()
    settings = settings_for(f"s3://{model_bucket}/{SPEC_KEY}", model_sha256=sha256_hex(weights))
    caplog.set_level(logging.INFO, logger="service.models.source")

    first = resolve_model(settings, make_s3_client)
    assert (first.name, first.backend) == ("tiny-brightness", "keras")
    assert first.weights.parent == settings.model_cache_dir and first.weights.suffix == ".keras"
    assert first.weights.read_bytes() == weights
    before = first.weights.stat()

    second = resolve_model(settings, make_s3_client)
    assert second == first
    after = second.weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "a cache hit must not rewrite"
    assert [record.cache_hit for record in fetch_records(caplog)] == [False, True]  # type: ignore[attr-defined]
    downloaded = fetch_records(caplog)[0].getMessage()
    assert f"s3://{model_bucket}/pneumonia/v3/tiny.keras" in downloaded and f"{len(weights)} bytes" in downloaded
    assert cache_files(settings) == [first.weights.name]


@pytest.mark.rgw
def test_changed_weights_are_downloaded_again(
    s3: Any, model_bucket: str, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(f"s3://{model_bucket}/{SPEC_KEY}")
    old = resolve_model(settings, make_s3_client)
    replacement = b"retrained weights: resolution does not load them"
    s3.put_object(Bucket=model_bucket, Key="pneumonia/v3/tiny.keras", Body=replacement)
    new = resolve_model(settings, make_s3_client)
    assert new.weights != old.weights and new.weights.read_bytes() == replacement
    # The previous version stays intact for a process that is still loading it.
    assert old.weights.is_file() and old.weights.read_bytes() != replacement


@pytest.mark.rgw
def test_wrong_sha256_fails_and_leaves_nothing_in_the_cache(
    model_bucket: str, tiny_spec: Path, settings_for: Callable[..., Settings]
) -> None:
    actual = sha256_hex((tiny_spec.parent / "tiny.keras").read_bytes())
    wrong = "ab" * 32
    settings = settings_for(f"s3://{model_bucket}/{SPEC_KEY}", model_sha256=wrong)
    with pytest.raises(ConfigurationError) as raised:
        resolve_model(settings, make_s3_client)
    message = str(raised.value)
    assert message.startswith("MODEL_SHA256:") and actual in message and wrong in message
    assert cache_files(settings) == []

    # A copy cached without a digest is not trusted over MODEL_SHA256 either, and is not kept.
    resolve_model(settings_for(f"s3://{model_bucket}/{SPEC_KEY}"), make_s3_client)
    assert len(cache_files(settings)) == 1
    with pytest.raises(ConfigurationError, match="MODEL_SHA256:"):
        resolve_model(settings, make_s3_client)
    assert cache_files(settings) == []


@pytest.mark.rgw
def test_missing_objects_name_model_uri(
    s3: Any, model_bucket: str, settings_for: Callable[..., Settings]
) -> None:
    missing_spec = f"s3://{model_bucket}/pneumonia/v9/tiny.yaml"
    with pytest.raises(ConfigurationError, match=f"^{re.escape(f'MODEL_URI: {missing_spec} does not exist')}$"):
        resolve_model(settings_for(missing_spec), make_s3_client)
    no_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/tiny.yaml"
    with pytest.raises(ConfigurationError, match=r"^MODEL_URI: .*: bucket no-such-bucket-\w+ does not exist$"):
        resolve_model(settings_for(no_bucket), make_s3_client)
    s3.delete_object(Bucket=model_bucket, Key="pneumonia/v3/tiny.keras")
    settings = settings_for(f"s3://{model_bucket}/{SPEC_KEY}")
    missing_weights = f"MODEL_URI: s3://{model_bucket}/pneumonia/v3/tiny.keras does not exist"
    with pytest.raises(ConfigurationError, match=re.escape(missing_weights)):
        resolve_model(settings, make_s3_client)
    assert cache_files(settings) == []


@pytest.mark.rgw
def test_weights_outside_the_spec_prefix_are_never_fetched(
    s3: Any, model_bucket: str, tiny_spec: Path, settings_for: Callable[..., Settings]
) -> None:
    s3.put_object(Bucket=model_bucket, Key="escape/tiny.yaml",
                  Body=tiny_spec.read_text().replace("weights: tiny.keras", "weights: ../pneumonia/v3/tiny.keras"))
    settings = settings_for(f"s3://{model_bucket}/escape/tiny.yaml")
    with pytest.raises(ConfigurationError, match=re.escape("must be a path relative to the spec, without '..'")):
        resolve_model(settings, make_s3_client)
    assert cache_files(settings) == []


@pytest.mark.rgw
def test_invalid_s3_spec_names_the_uri(s3: Any, model_bucket: str, settings_for: Callable[..., Settings]) -> None:
    s3.put_object(Bucket=model_bucket, Key="bad/spec.json", Body=json.dumps({"name": "x", "weights": "w.keras"}))
    problem = f"MODEL_URI: s3://{model_bucket}/bad/spec.json: input: Field required"
    with pytest.raises(ConfigurationError, match=re.escape(problem)):
        resolve_model(settings_for(f"s3://{model_bucket}/bad/spec.json"), make_s3_client)


@pytest.mark.rgw
def test_onnx_backend_fetches_the_onnx_object_beside_the_keras_one(
    s3: Any, model_bucket: str, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(f"s3://{model_bucket}/{SPEC_KEY}", model_backend="onnx")
    missing_onnx = f"MODEL_URI: s3://{model_bucket}/pneumonia/v3/tiny.onnx does not exist"
    with pytest.raises(ConfigurationError, match=re.escape(missing_onnx)):
        resolve_model(settings, make_s3_client)
    onnx_bytes = b"stand-in for an exported model: resolution does not load it"
    s3.put_object(Bucket=model_bucket, Key="pneumonia/v3/tiny.onnx", Body=onnx_bytes)
    spec = resolve_model(settings, make_s3_client)
    assert spec.backend == "onnx" and spec.weights.suffix == ".onnx"
    assert spec.weights.read_bytes() == onnx_bytes
    assert cache_files(settings) == [spec.weights.name]  # the .keras was not downloaded


@pytest.mark.rgw
def test_concurrent_starts_share_one_complete_entry(
    model_bucket: str, tiny_spec: Path, settings_for: Callable[..., Settings]
) -> None:
    weights = (tiny_spec.parent / "tiny.keras").read_bytes()
    settings = settings_for(f"s3://{model_bucket}/{SPEC_KEY}", model_sha256=sha256_hex(weights))
    stale = settings.model_cache_dir / f".killed-download{PARTIAL_SUFFIX}"
    settings.model_cache_dir.mkdir(parents=True)
    stale.write_bytes(b"left by a process killed mid-download")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with ThreadPoolExecutor(max_workers=4) as pool:
        specs = list(pool.map(lambda _: resolve_model(settings, make_s3_client), range(4)))
    assert len({spec.weights for spec in specs}) == 1
    assert specs[0].weights.read_bytes() == weights
    assert cache_files(settings) == [specs[0].weights.name]  # no partial file, and the stale one is gone


@pytest.mark.rgw
def test_unusable_cache_dir_names_model_cache_dir(
    model_bucket: str, settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    not_a_directory = tmp_path / "occupied"
    not_a_directory.write_text("a file where the cache directory should be")
    settings = settings_for(f"s3://{model_bucket}/{SPEC_KEY}", model_cache_dir=not_a_directory)
    with pytest.raises(ConfigurationError, match=f"^MODEL_CACHE_DIR: cannot write to {not_a_directory}"):
        resolve_model(settings, make_s3_client)


@pytest.mark.rgw
def test_unreachable_or_refused_s3_is_a_clear_error_without_secrets(
    model_bucket: str, settings_for: Callable[..., Settings]
) -> None:
    uri = f"s3://{model_bucket}/{SPEC_KEY}"
    unreachable = settings_for(uri, s3_endpoint_url="http://127.0.0.1:9", s3_connect_timeout_s=0.5)
    with pytest.raises(ConfigurationError) as raised:
        resolve_model(unreachable, make_s3_client)
    assert str(raised.value).startswith(f"MODEL_URI: {uri}: S3 at http://127.0.0.1:9 unreachable while reading")
    secret = "wrong-secret-never-to-be-shown"
    denied = settings_for(uri, aws_secret_access_key=secret)
    with pytest.raises(ConfigurationError) as raised:
        resolve_model(denied, make_s3_client)
    assert str(raised.value).startswith(f"MODEL_URI: {uri}: access denied")
    assert secret not in str(raised.value)


# --- start-up --------------------------------------------------------------------------------------------------


@pytest.mark.rgw
def test_app_serves_a_model_from_s3(
    s3: Any, model_bucket: str, make_bucket: Callable[..., str], settings_for: Callable[..., Settings]
) -> None:
    scans = make_bucket("scans", "-processed", "-anonymized")
    settings = settings_for(f"s3://{model_bucket}/{SPEC_KEY}")
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        etag = upload(s3, scans, "ward 1/scan.jpg", encode(xray_like(220)))
        body = json.dumps({"Records": [ceph_record(scans, "ward 1/scan.jpg", etag=etag)]})
        response = client.post("/", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    [summary] = response.json()["records"]
    assert (summary["outcome"], summary["label"]) == ("processed", "Pneumonia")
    processed = s3.head_object(Bucket=f"{scans}-processed", Key=processed_key("ward 1/scan.jpg"))
    assert processed["Metadata"]["model-name"] == "tiny-brightness"
    [weights] = cache_files(settings)
    assert weights.endswith(".keras")


@pytest.mark.rgw
def test_serve_exits_with_a_clear_error_when_the_model_cannot_be_fetched(
    rgw: Any, model_bucket: str, tmp_path: Path
) -> None:
    uri = f"s3://{model_bucket}/pneumonia/v9/tiny.yaml"
    env = {name: value for name, value in os.environ.items() if not name.startswith("MODEL_")}
    env |= rgw.env() | {"PSEUDONYM_KEY": "k" * 20, "MODEL_URI": uri, "MODEL_CACHE_DIR": str(tmp_path / "cache"),
                        "TEXT_MODELS_DIR": str(TEXT_OPTIONS.models)}
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert f"MODEL_URI: {uri} does not exist" in done.stderr
    assert "Traceback" not in done.stderr and rgw.secret_key not in done.stderr
