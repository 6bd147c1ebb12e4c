"""The S3 calls of one record, as the real RGW served them: how many, in which order, and what a leftover of a crashed
run or a newer upload does to them (service/pipeline.py's docstring; docs/operations.md#s3-calls)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import HOSTILE_KEYS, Harness, encode, upload, xray_like
from local_rgw import LocalRGW
from test_faults import requests_served_until_now
from test_pipeline import objects, record_for
from test_races import HeldAnalysis

from service.outputs import Outcome, processed_key
from service.pipeline import Pipeline
from service.storage import ObjectStore, make_s3_client

pytestmark = pytest.mark.rgw


def calls_to(rgw: LocalRGW, s3: Any, input_bucket: str, since: int) -> list[tuple[str, str, int]]:
    """(method, bucket, status) of every request about `input_bucket` or its output buckets served after the
    first `since` requests of the gateway's log."""
    served = requests_served_until_now(rgw, s3, input_bucket)[since:]
    buckets = {input_bucket, f"{input_bucket}-processed", f"{input_bucket}-anonymized"}
    return [(method, bucket, status) for method, path, status in served
            if (bucket := path.split("/")[1].split("?")[0]) in buckets and "log-marker-" not in path]


def test_a_new_image_takes_five_calls_and_its_duplicate_one(harness: Harness, rgw: LocalRGW, s3: Any,
                                                            input_bucket: str) -> None:
    key = HOSTILE_KEYS[0]
    etag = upload(s3, input_bucket, key, encode(xray_like(220)))  # positive: both outputs
    pipeline = harness.pipeline()
    since = len(rgw.requests_served())

    first = harness.run(pipeline.process_record(record_for(input_bucket, key, etag)))
    again = harness.run(pipeline.process_record(record_for(input_bucket, key, etag)))

    assert (first.outcome, again.outcome, again.reason) == (Outcome.PROCESSED, Outcome.SKIPPED, "duplicate")
    processed, anonymized = f"{input_bucket}-processed", f"{input_bucket}-anonymized"
    assert calls_to(rgw, s3, input_bucket, since) == [
        ("HEAD", processed, 404),  # duplicate check: no processed copy yet
        ("GET", input_bucket, 200),
        ("HEAD", input_bucket, 200),  # superseded meanwhile? no
        ("PUT", anonymized, 200),
        ("PUT", processed, 200),  # last: it records the source eTag
        ("HEAD", processed, 200),  # the redelivery: the eTag is on record, nothing more
    ]


@pytest.mark.parametrize("leftover", ["anonymized", "both, of an older version"])
def test_a_crashed_runs_leftovers_are_overwritten(harness: Harness, s3: Any, input_bucket: str,
                                                  leftover: str) -> None:
    """A run that died between its writes (or wrote an older version's outputs) must not make the redelivery skip
    or lose a write: both outputs are written again, with the current eTag."""
    key = HOSTILE_KEYS[1]
    pipeline = harness.pipeline()
    older = upload(s3, input_bucket, key, encode(xray_like(230, seed=1)))
    crashed = harness.run(pipeline.process_record(record_for(input_bucket, key, older)))
    assert crashed.anonymized_key is not None
    if leftover == "anonymized":  # the processed copy, written last, never was
        s3.delete_object(Bucket=f"{input_bucket}-processed", Key=processed_key(key))
    etag = upload(s3, input_bucket, key, encode(xray_like(220)))

    result = harness.run(pipeline.process_record(record_for(input_bucket, key, etag)))

    assert (result.outcome, result.anonymized_key) == (Outcome.PROCESSED, crashed.anonymized_key)
    for bucket, name in [(f"{input_bucket}-processed", processed_key(key)),
                         (f"{input_bucket}-anonymized", result.anonymized_key)]:
        assert s3.head_object(Bucket=bucket, Key=name)["Metadata"]["source-etag"] == etag
    assert len(objects(s3, f"{input_bucket}-anonymized")) == 1


def test_a_version_superseded_during_its_analysis_writes_nothing(harness: Harness, rgw: LocalRGW, s3: Any,
                                                                 input_bucket: str) -> None:
    """v2 is uploaded while v1 is analyzed (and not yet processed anywhere): v1's run ends at the HEAD of the input,
    before any write, so v1's outputs can never land over v2's."""
    key = HOSTILE_KEYS[2]
    old, new = encode(xray_like(220), ".png"), encode(xray_like(25), ".png")
    held = HeldAnalysis(harness.engine, old)
    settings = harness.settings
    pipeline = Pipeline(settings, ObjectStore(make_s3_client(settings)), held, harness.spec)  # type: ignore[arg-type]

    async def race() -> Any:
        old_etag = await asyncio.to_thread(upload, s3, input_bucket, key, old)
        old_event = asyncio.ensure_future(pipeline.process_record(record_for(input_bucket, key, old_etag)))
        await asyncio.wait_for(held.holding.wait(), 30)
        await asyncio.to_thread(upload, s3, input_bucket, key, new)
        held.release.set()
        return await asyncio.wait_for(old_event, 60)

    since = len(rgw.requests_served())
    result = harness.run(race())

    assert (result.outcome, result.reason) == (Outcome.SKIPPED, "superseded")
    assert calls_to(rgw, s3, input_bucket, since) == [
        ("PUT", input_bucket, 200),  # v1's upload
        ("HEAD", f"{input_bucket}-processed", 404),
        ("GET", input_bucket, 200),
        ("PUT", input_bucket, 200),  # v2's upload, during v1's analysis
        ("HEAD", input_bucket, 200),  # v1's check finds v2: no write follows
    ]
    assert objects(s3, f"{input_bucket}-processed") == objects(s3, f"{input_bucket}-anonymized") == {}


def test_the_clients_calls_carry_hostile_keys_without_validation_or_parsed_timestamps(harness: Harness, s3: Any,
                                                                                     input_bucket: str) -> None:
    """make_s3_client leaves out botocore's parameter validation and its timestamp parsing (CPU this service does not
    need): every call the pipeline makes still carries keys full of spaces, `+`, `%` and non-ASCII, with their
    bodies and metadata, and a response's timestamp comes back as the gateway sent it."""
    client = make_s3_client(harness.settings)
    store = ObjectStore(client)
    for index, key in enumerate(HOSTILE_KEYS):
        body = encode(xray_like(200 + index))
        store.put_object(input_bucket, key, body, content_type="image/jpeg", metadata={"note": f"Ærø {index} 100%"})
        fetched = store.fetch_object(input_bucket, key, None, max_bytes=len(body))
        assert fetched.body == body and fetched.etag == store.current_etag(input_bucket, key)
        assert store.recorded_metadata(input_bucket, key) == {"note": "%C3%86r%C3%B8 " + f"{index} 100%25"}
        assert s3.get_object(Bucket=input_bucket, Key=key)["Body"].read() == body
    last_modified = client.head_object(Bucket=input_bucket, Key=HOSTILE_KEYS[0])["LastModified"]
    assert isinstance(last_modified, str) and last_modified.endswith("GMT")
