"""`GET /metrics` after real events against the real RGW: what moved, by how much, and that no key shows.

The metrics are process-wide (service.metrics) and the `client` app is shared by the session, so every count is
compared as a delta between two scrapes around the events a test sends.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import HOSTILE_KEYS, JsonLog, ceph_record, encode, key_fragments, upload, xray_like
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from test_events import kafkasource_headers

from service.metrics import STAGES

pytestmark = pytest.mark.rgw

SUMMARY_FIELDS = {"pseudonym", "bucket", "outcome", "status", "stages_ms", "total_ms"}


class Scrape:
    """One `/metrics` answer, parsed as Prometheus parses it."""

    def __init__(self, client: TestClient) -> None:
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        self.text = response.text
        self.samples: list[Sample] = [
            sample for family in text_string_to_metric_families(self.text) for sample in family.samples
        ]

    def value(self, sample_name: str, /, **labels: str) -> float:
        """The sum of the samples called `sample_name` whose labels include `labels` (0 when there is none)."""
        return sum(
            sample.value for sample in self.samples
            if sample.name == sample_name and labels.items() <= sample.labels.items()
        )

    def has(self, name: str) -> bool:
        return any(sample.name == name for sample in self.samples)


def notification(*records: dict[str, Any]) -> bytes:
    return json.dumps({"Records": list(records)}).encode()


def assert_no_key_fragment(scrape: Scrape, keys: list[str]) -> None:
    labels = " ".join(f"{sample.name} {sample.labels}" for sample in scrape.samples)
    for key in keys:
        for fragment in key_fragments(key):
            assert fragment not in labels, f"a metric label or name contains the key fragment {fragment!r}"
            # Digits alone can occur in sample values (memory, CPU seconds) by chance; letters cannot.
            if not fragment.isdigit():
                assert fragment not in scrape.text, f"/metrics contains the key fragment {fragment!r}"


def test_records_stages_batches_and_requests_after_real_events(
    client: TestClient, s3: Any, input_bucket: str
) -> None:
    good_key, bad_key = HOSTILE_KEYS[0], HOSTILE_KEYS[1]
    etag = upload(s3, input_bucket, good_key, encode(xray_like(220)))  # positive: anonymized, so every stage runs
    upload(s3, input_bucket, bad_key, b"not an image at all")
    before = Scrape(client)

    processed = client.post("/", content=notification(ceph_record(input_bucket, good_key, etag=etag)))
    duplicate = client.post("/", content=notification(ceph_record(input_bucket, good_key, etag=etag)))
    failed = client.post(
        "/", content=notification(ceph_record(input_bucket, bad_key, etag="e")), headers=kafkasource_headers()
    )
    assert [processed.json()["records"][0]["outcome"], duplicate.json()["records"][0]["reason"]] == [
        "processed", "duplicate"
    ]
    assert (failed.status_code, failed.json()["records"][0]["reason"]) == (422, "not-an-image")
    after = Scrape(client)

    def moved(sample_name: str, /, **labels: str) -> float:
        return after.value(sample_name, **labels) - before.value(sample_name, **labels)

    assert moved("xray_records_total", outcome="processed", reason="") == 1
    assert moved("xray_records_total", outcome="skipped", reason="duplicate") == 1
    assert moved("xray_records_total", outcome="failed", reason="not-an-image") == 1
    assert moved("xray_records_total") == 3
    assert moved("xray_record_duration_seconds_count", outcome="processed") == 1
    assert moved("xray_http_requests_total", status="200", transport="plain-push") == 2
    assert moved("xray_http_requests_total", status="422", transport="cloudevent") == 1
    for stage in STAGES:
        assert moved("xray_stage_duration_seconds_count", stage=stage) >= 1, f"no {stage} observed"
        assert after.value("xray_stage_duration_seconds_sum", stage=stage) > 0
    # The failed record was fetched and written (its failure record) but never decoded: one more of each.
    assert moved("xray_stage_duration_seconds_count", stage="fetch") == 2
    assert moved("xray_stage_duration_seconds_count", stage="infer") == 1
    assert moved("xray_batch_size_count") >= 1
    assert after.value("xray_batch_size_bucket", le="+Inf") == after.value("xray_batch_size_count")
    assert after.has("xray_worker_restarts_total")
    assert after.value("xray_records_in_flight") == 0
    assert after.value("xray_inference_queue_depth") == 0
    assert after.value("xray_ready") == 1
    assert after.value("xray_workers_warm") >= 1 and after.value("xray_workers_configured") >= 1
    spec = client.app.state.engine.spec  # type: ignore[attr-defined]
    assert after.value("xray_model_info", name=spec.name, version=spec.version, backend=spec.backend) == 1
    assert_no_key_fragment(after, [good_key, bad_key])


def test_malformed_and_skipped_deliveries_are_counted(client: TestClient, input_bucket: str) -> None:
    before = Scrape(client)
    assert client.post("/", content=b"{not json").status_code == 400
    skipped = notification(ceph_record(input_bucket, HOSTILE_KEYS[2], event_name="ObjectRemoved:Delete"))
    assert client.post("/", content=skipped, headers=kafkasource_headers()).status_code == 200
    after = Scrape(client)
    assert after.value("xray_http_requests_total", status="400", transport="unknown") - before.value(
        "xray_http_requests_total", status="400", transport="unknown"
    ) == 1
    assert after.value("xray_records_total", outcome="skipped", reason="not-object-created") - before.value(
        "xray_records_total", outcome="skipped", reason="not-object-created"
    ) == 1
    assert_no_key_fragment(after, [HOSTILE_KEYS[2]])


def test_every_metric_explains_itself(client: TestClient) -> None:
    families = list(text_string_to_metric_families(client.get("/metrics").text))
    ours = [family for family in families if family.name.startswith("xray_")]
    assert {family.name for family in ours} >= {
        "xray_http_requests", "xray_records", "xray_record_duration_seconds", "xray_stage_duration_seconds",
        "xray_batch_size", "xray_inference_queue_depth", "xray_records_in_flight", "xray_worker_restarts",
        "xray_workers_warm", "xray_workers_configured", "xray_ready", "xray_model_info",
    }
    for family in ours:
        assert len(family.documentation) > 30, f"{family.name} needs a help text a newcomer understands"
    stages = {sample.labels["stage"] for family in ours for sample in family.samples if "stage" in sample.labels}
    assert stages == set(STAGES), "every stage shows, even before it is first observed"


def test_summary_log_line_per_record_without_keys(
    client: TestClient, s3: Any, input_bucket: str, json_log: JsonLog
) -> None:
    keys = HOSTILE_KEYS
    records = []
    for index, key in enumerate(keys[:2]):
        etag = upload(s3, input_bucket, key, encode(xray_like(220 if index == 0 else 25, seed=index)))
        records.append(ceph_record(input_bucket, key, etag=etag))
    upload(s3, input_bucket, keys[2], b"garbage")
    records.append(ceph_record(input_bucket, keys[2], etag="x"))
    records.append(ceph_record(input_bucket, keys[0], event_name="ObjectRemoved:Delete"))
    assert client.post("/", content=notification(*records)).status_code == 200
    assert client.post("/", content=notification(records[0])).status_code == 200  # a redelivery: duplicate

    entries = json_log.entries()
    assert entries and all({"timestamp", "level", "logger", "message"} <= entry.keys() for entry in entries)
    summaries = [entry for entry in entries if entry["logger"] == "service.pipeline" and "outcome" in entry]
    # Exactly one line per record: four in the first delivery (in whatever order they finish), one redelivered.
    assert sorted((entry["outcome"], entry.get("reason", "")) for entry in summaries) == [
        ("failed", "not-an-image"), ("processed", ""), ("processed", ""), ("skipped", "duplicate"),
        ("skipped", "not-object-created"),
    ]
    for entry in summaries:
        assert entry.keys() >= SUMMARY_FIELDS, entry
        assert entry["bucket"] == input_bucket and len(entry["pseudonym"]) >= 16
        assert entry["total_ms"] >= sum(entry["stages_ms"].values()) - 1
    processed = [entry for entry in summaries if entry["outcome"] == "processed"]
    assert {entry["label"] for entry in processed} == {"Pneumonia", "Normal"}
    assert all(0 <= entry["risk"] <= 1 and entry["status"] == 200 for entry in processed)
    positive = next(entry for entry in processed if entry["label"] == "Pneumonia")
    assert set(positive["stages_ms"]) == set(STAGES)
    failed = next(entry for entry in summaries if entry["outcome"] == "failed")
    assert failed["status"] == 422 and set(failed["stages_ms"]) == {"fetch", "write"}
    # Parsed, so that escaped non-ASCII (\u00fc) is compared as the text it stands for.
    logged = json.dumps(entries, ensure_ascii=False)
    for key in keys:
        for fragment in key_fragments(key):
            if not fragment.isdigit():  # digits alone can occur in timestamps and timings by chance
                assert fragment not in logged, f"the log contains the key fragment {fragment!r}"
