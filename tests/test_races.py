"""Duplicates and races on one key, against the real RGW and a real inference worker.

"Exactly one set of outputs per version" means: no version's outputs are ever written twice, and the outputs
left in the buckets are the newest version's, written last. A version that a newer upload superseded before its
outputs were written may be skipped (`superseded`): readers of the output buckets need the newest content, and
the newer upload's own event writes it. Output buckets are versioned here, so every write shows.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import HOSTILE_KEYS, Harness, ceph_record, encode, upload, xray_like
from fastapi.testclient import TestClient
from test_events import kafkasource_headers
from test_pipeline import record_for

from service.engine.messages import Analysis
from service.engine.pool import InferenceEngine
from service.outputs import processed_key
from service.pipeline import Outcome, Pipeline
from service.storage import ObjectStore, make_s3_client

pytestmark = pytest.mark.rgw


def version_outputs(s3: Any, input_bucket: str) -> None:
    for bucket in (f"{input_bucket}-processed", f"{input_bucket}-anonymized"):
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})


def output_versions(s3: Any, input_bucket: str) -> dict[str, list[dict[str, Any]]]:
    """Every version of every output, newest first per key, with the source eTag it records."""
    found: dict[str, list[dict[str, Any]]] = {}
    for bucket in (f"{input_bucket}-processed", f"{input_bucket}-anonymized"):
        for version in s3.list_object_versions(Bucket=bucket).get("Versions", []):
            head = s3.head_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
            found.setdefault(f"{bucket}/{version['Key']}", []).append(
                {"id": version["VersionId"], "latest": version["IsLatest"],
                 "source-etag": head["Metadata"].get("source-etag"), "label": head["Metadata"].get("label")}
            )
    for versions in found.values():
        versions.sort(key=lambda version: not version["latest"])  # S3 lists newest first; keep it explicit
    return found


def notification(record: dict[str, Any]) -> bytes:
    return json.dumps({"Records": [record]}).encode()


class HeldAnalysis:
    """A real engine whose analysis of one image waits until the test lets it go: makes a race deterministic."""

    def __init__(self, engine: InferenceEngine, held_image: bytes) -> None:
        self._engine = engine
        self._held_image = held_image
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def analyze(self, data: bytes, *, anonymize_always: bool) -> Analysis:
        if data == self._held_image:
            self.holding.set()
            await self.release.wait()
        return await self._engine.analyze(data, anonymize_always=anonymize_always)


def test_one_event_delivered_twenty_times_at_once_writes_one_set_of_outputs(
    client: TestClient, s3: Any, input_bucket: str
) -> None:
    version_outputs(s3, input_bucket)
    key = HOSTILE_KEYS[0]
    etag = upload(s3, input_bucket, key, encode(xray_like(220)))  # positive: both outputs
    body = notification(ceph_record(input_bucket, key, etag=etag))
    start = threading.Barrier(20)

    def deliver(index: int) -> tuple[int, dict[str, Any]]:
        # Half as Ceph's push, half as a KafkaSource: the same record by both routes, all at once.
        headers = kafkasource_headers(index) if index % 2 else {"content-type": "application/json"}
        start.wait()
        response = client.post("/", content=body, headers=headers)
        return response.status_code, response.json()["records"][0]

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(deliver, range(20)))

    assert {status for status, _ in answers} == {200}
    outcomes = {(summary["outcome"], summary.get("reason")) for _, summary in answers}
    assert ("processed", None) in outcomes and outcomes <= {("processed", None), ("skipped", "duplicate")}
    [anonymized] = {summary["anonymized_key"] for _, summary in answers if summary["outcome"] == "processed"}
    written = output_versions(s3, input_bucket)
    assert sorted(written) == [f"{input_bucket}-anonymized/{anonymized}",
                               f"{input_bucket}-processed/{processed_key(key)}"]
    assert all(len(versions) == 1 and versions[0]["source-etag"] == etag for versions in written.values())

    # Replays of the processed event, by either route, with or without its eTag, write nothing.
    for headers, record in [({}, ceph_record(input_bucket, key, etag=etag)),
                            (kafkasource_headers(99), ceph_record(input_bucket, key, etag=etag)),
                            ({}, ceph_record(input_bucket, key))]:
        replay = client.post("/", content=notification(record), headers=headers)
        assert replay.status_code == 200 and replay.json()["records"][0]["reason"] == "duplicate"
    assert output_versions(s3, input_bucket) == written


@pytest.mark.parametrize("pods", [1, 2], ids=["one-pod", "two-pods"])
def test_an_older_version_still_in_analysis_never_overwrites_a_newer_one(
    harness: Harness, make_settings: Any, s3: Any, input_bucket: str, pods: int
) -> None:
    """v1's event fetches v1 and is held in analysis while v2 is uploaded and its event handled; then v1 goes on.

    In one pod the two records of the key take turns; across pods (two pipelines, as two replicas behind one
    Knative Service) v1 finds that the input changed since it fetched it. Either way v2's outputs are the last
    ones written, and v1's are never written over them.
    """
    version_outputs(s3, input_bucket)
    settings = make_settings(anonymize_when="always")
    key = HOSTILE_KEYS[2]
    old, new = encode(xray_like(220), ".png"), encode(xray_like(25), ".png")  # Pneumonia, then Normal
    held = HeldAnalysis(harness.engine, old)
    first = Pipeline(settings, ObjectStore(make_s3_client(settings)), held, harness.spec)  # type: ignore[arg-type]
    second = first if pods == 1 else harness.pipeline(settings)

    async def race() -> tuple[str, str, Any, Any]:
        old_etag = await asyncio.to_thread(upload, s3, input_bucket, key, old)
        old_event = asyncio.ensure_future(first.process_record(record_for(input_bucket, key, old_etag)))
        await asyncio.wait_for(held.holding.wait(), 30)  # v1 is fetched and in analysis
        new_etag = await asyncio.to_thread(upload, s3, input_bucket, key, new)
        new_event = asyncio.ensure_future(second.process_record(record_for(input_bucket, key, new_etag)))
        # Give v2 every chance to finish first (it cannot in one pod: it waits for v1's turn).
        await asyncio.wait({new_event}, timeout=None if pods == 2 else 1.5)
        held.release.set()
        old_result, new_result = await asyncio.wait_for(asyncio.gather(old_event, new_event), 60)
        return old_etag, new_etag, old_result, new_result

    old_etag, new_etag, old_result, new_result = harness.run(race())

    written = output_versions(s3, input_bucket)
    assert len(written) == 2, written  # the processed copy and the anonymized copy, one key each
    for versions in written.values():
        assert versions[0]["source-etag"] == new_etag, "the newest version's outputs must be the last written"
        assert [version["source-etag"] for version in versions] == [new_etag], "written once, never stale"
        assert versions[0]["label"] == "Normal"
    assert (new_result.outcome, new_result.label) == (Outcome.PROCESSED, "Normal")
    assert (old_result.outcome, old_result.reason) == (Outcome.SKIPPED, "superseded")

    # Late redeliveries of either version, in either pod, write nothing.
    for pipeline in {first, second}:
        for etag in (old_etag, new_etag):
            late = harness.run(pipeline.process_record(record_for(input_bucket, key, etag)))
            assert (late.outcome, late.reason) == (Outcome.SKIPPED, "duplicate")
    assert output_versions(s3, input_bucket) == written
