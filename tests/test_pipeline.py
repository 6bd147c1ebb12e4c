"""The pipeline without a server: every outcome for one object, against the real RGW and a real worker."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import (
    HOSTILE_KEYS,
    TEST_PSEUDONYM_KEY,
    TEXT_OPTIONS,
    Harness,
    ceph_record,
    encode,
    key_fragments,
    leaks,
    png_header_only,
    upload,
    xray_like,
)
from test_events import minio_notification

from service.engine.pool import InferenceEngine
from service.errors import ForbiddenBucket, ModelNotReady, StorageUnavailable
from service.events import Delivery, Transport, parse_delivery
from service.outputs import Outcome, anonymized_key, failure_key, processed_key, pseudonym
from service.settings import Settings

pytestmark = pytest.mark.rgw


def record_for(bucket: str, key: str, etag: str = "", **fields: Any):
    body = json.dumps({"Records": [ceph_record(bucket, key, etag=etag, **fields)]}).encode()
    return parse_delivery({}, body).records[0]


def objects(s3: Any, bucket: str) -> dict[str, Any]:
    return {item["Key"]: item for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


@pytest.mark.parametrize(("key", "extension"), [(HOSTILE_KEYS[0], ".jpg"), (HOSTILE_KEYS[2], ".png")])
def test_positive_image_gets_both_outputs(harness: Harness, s3: Any, input_bucket: str, key: str,
                                          extension: str) -> None:
    etag = upload(s3, input_bucket, key, encode(xray_like(220), extension))
    result = harness.run(harness.pipeline().process_record(record_for(input_bucket, key, etag)))

    alias = pseudonym(TEST_PSEUDONYM_KEY.encode(), input_bucket, key)
    assert result.outcome is Outcome.PROCESSED
    assert (result.pseudonym, result.label) == (alias, "Pneumonia")
    assert result.risk is not None and result.risk > 0.99

    processed = s3.get_object(Bucket=f"{input_bucket}-processed", Key=processed_key(key))
    metadata = processed["Metadata"]
    assert metadata["source-etag"] == etag
    assert metadata["label"] == "Pneumonia" and float(metadata["risk"]) == pytest.approx(result.risk, abs=1e-6)
    assert (metadata["model-name"], metadata["model-version"]) == ("tiny-brightness", "1")
    assert processed["ContentType"] == ("image/jpeg" if extension == ".jpg" else "image/png")
    stamped = cv2.imdecode(np.frombuffer(processed["Body"].read(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert stamped.shape[:2][1] == 400 and stamped.shape[0] >= 480

    [anonymized_name] = objects(s3, f"{input_bucket}-anonymized")
    assert anonymized_name == anonymized_key(alias, key, "jpeg" if extension == ".jpg" else "png")
    assert result.anonymized_key == anonymized_name
    anonymized = s3.head_object(Bucket=f"{input_bucket}-anonymized", Key=anonymized_name)
    # Nothing of the source key or its metadata travels with the anonymized copy.
    assert set(anonymized["Metadata"]) == {"label", "risk", "model-name", "model-version", "source-etag"}
    assert key not in json.dumps(anonymized["Metadata"])


def test_negative_image_is_not_anonymized_unless_always(harness: Harness, make_settings: Any, s3: Any,
                                                        input_bucket: str) -> None:
    etag = upload(s3, input_bucket, "dark.jpg", encode(xray_like(25)))
    result = harness.run(harness.pipeline().process_record(record_for(input_bucket, "dark.jpg", etag)))
    assert (result.outcome, result.label, result.anonymized_key) == (Outcome.PROCESSED, "Normal", None)
    assert objects(s3, f"{input_bucket}-anonymized") == {}

    etag = upload(s3, input_bucket, "dark2.jpg", encode(xray_like(25, seed=2)))
    always = harness.pipeline(make_settings(anonymize_when="always"))
    result = harness.run(always.process_record(record_for(input_bucket, "dark2.jpg", etag)))
    assert result.anonymized_key is not None
    assert list(objects(s3, f"{input_bucket}-anonymized")) == [result.anonymized_key]


def test_duplicate_delivery_writes_nothing(harness: Harness, s3: Any, input_bucket: str) -> None:
    key = HOSTILE_KEYS[1]
    etag = upload(s3, input_bucket, key, encode(xray_like(220)))
    pipeline = harness.pipeline()
    assert harness.run(pipeline.process_record(record_for(input_bucket, key, etag))).outcome is Outcome.PROCESSED
    before = objects(s3, f"{input_bucket}-processed") | objects(s3, f"{input_bucket}-anonymized")
    time.sleep(1.1)  # S3 timestamps have one-second resolution: a rewrite would show
    again = harness.run(pipeline.process_record(record_for(input_bucket, key, etag)))
    assert (again.outcome, again.reason) == (Outcome.SKIPPED, "duplicate")
    # A record without an eTag is recognised once the object is fetched.
    again = harness.run(pipeline.process_record(record_for(input_bucket, key, "")))
    assert (again.outcome, again.reason) == (Outcome.SKIPPED, "duplicate")
    after = objects(s3, f"{input_bucket}-processed") | objects(s3, f"{input_bucket}-anonymized")
    assert {k: v["LastModified"] for k, v in after.items()} == {k: v["LastModified"] for k, v in before.items()}


def test_new_content_under_the_same_key_is_processed_again(harness: Harness, s3: Any, input_bucket: str) -> None:
    pipeline = harness.pipeline()
    first = upload(s3, input_bucket, "k.jpg", encode(xray_like(220)))
    assert harness.run(pipeline.process_record(record_for(input_bucket, "k.jpg", first))).label == "Pneumonia"
    second = upload(s3, input_bucket, "k.jpg", encode(xray_like(25)))
    latest = harness.run(pipeline.process_record(record_for(input_bucket, "k.jpg", second)))
    assert (latest.outcome, latest.label) == (Outcome.PROCESSED, "Normal")
    # A late, reordered event for the first version must not bring its outputs back.
    late = harness.run(pipeline.process_record(record_for(input_bucket, "k.jpg", first)))
    assert (late.outcome, late.reason) == (Outcome.SKIPPED, "duplicate")
    metadata = s3.head_object(Bucket=f"{input_bucket}-processed", Key="k-processed.jpg")["Metadata"]
    assert (metadata["source-etag"], metadata["label"]) == (second, "Normal")


def test_minio_record_with_a_go_escaped_key_is_fetched_and_processed(harness: Harness, s3: Any,
                                                                     input_bucket: str) -> None:
    key = "ward 3/Anna Mcgehee+1.jpeg"  # on the wire: ward+3%2FAnna+Mcgehee%2B1.jpeg
    etag = upload(s3, input_bucket, key, encode(xray_like(220)))
    body = json.dumps(minio_notification(input_bucket, key, etag)).encode()
    [record] = parse_delivery({}, body).records
    result = harness.run(harness.pipeline().process_record(record))
    assert (result.outcome, result.label) == (Outcome.PROCESSED, "Pneumonia"), result
    processed = s3.head_object(Bucket=f"{input_bucket}-processed", Key=processed_key(key))
    assert processed["Metadata"]["source-etag"] == etag
    assert processed["Metadata"]["pseudonym"] == pseudonym(TEST_PSEUDONYM_KEY.encode(), input_bucket, key)


@pytest.mark.parametrize(
    ("body", "reason", "limit"),
    [(None, "missing-object", None), (b"Anna Mcgehee, not an image", "not-an-image", None),
     (encode(xray_like(200))[:3000], "corrupt-image", None), (b"x" * 5000, "too-large", 1000),
     (png_header_only(30_000, 30_000), "too-many-pixels", None)],
)
def test_unprocessable_objects_leave_a_failure_record(harness: Harness, make_settings: Any, s3: Any,
                                                      input_bucket: str, body: bytes | None, reason: str,
                                                      limit: int | None) -> None:
    key = HOSTILE_KEYS[0]
    if body is not None:
        upload(s3, input_bucket, key, body)
    settings = make_settings(max_image_bytes=limit) if limit else harness.settings
    record = record_for(input_bucket, key, "etag-1")
    result = harness.run(harness.pipeline(settings).process_record(record))
    alias = pseudonym(TEST_PSEUDONYM_KEY.encode(), input_bucket, key)
    assert (result.outcome, result.reason, result.pseudonym) == (Outcome.FAILED, reason, alias)
    stored = s3.get_object(Bucket=f"{input_bucket}-processed", Key=failure_key(alias))["Body"].read().decode()
    failure = json.loads(stored)
    assert failure["reason"] == reason and failure["pseudonym"] == alias
    assert failure["event_id"] == record.event_id and failure["source_etag"] == "etag-1"
    assert failure["time"].endswith("+00:00")
    for fragment in key_fragments(key):
        assert not leaks(fragment, stored)
    assert list(objects(s3, f"{input_bucket}-processed")) == [failure_key(alias)]


def test_skipped_events(harness: Harness, s3: Any, input_bucket: str) -> None:
    pipeline = harness.pipeline()
    delete = harness.run(pipeline.process_record(record_for(input_bucket, "a.jpg", event_name="ObjectRemoved:Delete")))
    assert (delete.outcome, delete.reason) == (Outcome.SKIPPED, "not-object-created")
    loop = harness.run(pipeline.process_record(record_for(f"{input_bucket}-processed", "a-processed.jpg")))
    assert (loop.outcome, loop.reason) == (Outcome.SKIPPED, "output-bucket")
    assert objects(s3, f"{input_bucket}-processed") == {}


def test_bucket_outside_the_allow_list_is_refused_unread(harness: Harness, make_settings: Any,
                                                         input_bucket: str) -> None:
    pipeline = harness.pipeline(make_settings(input_buckets=["somewhere-else"]))
    with pytest.raises(ForbiddenBucket):
        harness.run(pipeline.process_record(record_for(input_bucket, "a.jpg")))


def test_unreachable_storage_is_transient(harness: Harness, make_settings: Any) -> None:
    pipeline = harness.pipeline(make_settings(s3_endpoint_url="http://127.0.0.1:9", s3_connect_timeout_s=0.5))
    with pytest.raises(StorageUnavailable):
        harness.run(pipeline.process_record(record_for("in", "a.jpg", "e")))


def test_missing_output_bucket_is_transient_and_nothing_is_half_written(harness: Harness, s3: Any,
                                                                         input_bucket: str) -> None:
    s3.delete_bucket(Bucket=f"{input_bucket}-anonymized")
    etag = upload(s3, input_bucket, "a.jpg", encode(xray_like(220)))
    with pytest.raises(StorageUnavailable):
        harness.run(harness.pipeline().process_record(record_for(input_bucket, "a.jpg", etag)))
    # The processed copy is the completion marker: without the anonymized copy it must not exist.
    assert objects(s3, f"{input_bucket}-processed") == {}


def test_engine_not_started_is_transient(make_settings: Any, tiny_spec: Any, s3: Any, input_bucket: str) -> None:
    from service.engine.messages import ImageLimits
    from service.models.spec import ModelSpec
    from service.pipeline import Pipeline
    from service.storage import ObjectStore, make_s3_client

    settings: Settings = make_settings()
    spec = ModelSpec.load(tiny_spec)
    engine = InferenceEngine(spec, workers=1, threads_per_worker=1, limits=ImageLimits(10**6, 10**6),
                             deid_key=TEST_PSEUDONYM_KEY.encode(), text=TEXT_OPTIONS)
    pipeline = Pipeline(settings, ObjectStore(make_s3_client(settings)), engine, spec)
    etag = upload(s3, input_bucket, "a.jpg", encode(xray_like(220)))
    with pytest.raises(ModelNotReady):
        asyncio.run(pipeline.process_record(record_for(input_bucket, "a.jpg", etag)))


def test_concurrent_identical_events_share_one_run(harness: Harness, s3: Any, input_bucket: str) -> None:
    etag = upload(s3, input_bucket, "storm.jpg", encode(xray_like(220)))
    pipeline = harness.pipeline()

    async def storm():
        return await asyncio.gather(
            *(pipeline.process_record(record_for(input_bucket, "storm.jpg", etag)) for _ in range(20))
        )

    results = harness.run(storm())
    assert {result.outcome for result in results} == {Outcome.PROCESSED}
    assert len({result.pseudonym for result in results}) == 1
    assert len(objects(s3, f"{input_bucket}-processed")) == 1


def test_every_record_of_a_delivery_is_handled(harness: Harness, s3: Any, input_bucket: str) -> None:
    records = []
    for index, key in enumerate(HOSTILE_KEYS):
        etag = upload(s3, input_bucket, key, encode(xray_like(220, seed=index)))
        records.append(record_for(input_bucket, key, etag))
    records.append(record_for(input_bucket, "gone.jpg", event_name="ObjectRemoved:Delete"))
    result = harness.run(harness.pipeline().process_delivery(Delivery(Transport.PLAIN_PUSH, records)))
    assert [r.outcome for r in result.records] == [Outcome.PROCESSED] * 3 + [Outcome.SKIPPED]
    assert not result.has_permanent_failure
    assert len(objects(s3, f"{input_bucket}-processed")) == 3
