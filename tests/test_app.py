"""The HTTP layer: statuses per outcome and per transport, JSON errors, probes, and recovery of a dead worker."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from conftest import HOSTILE_KEYS, ceph_record, encode, key_fragments, leaks, upload, wait_until, xray_like
from fastapi.testclient import TestClient
from test_events import kafkasource_headers

from service.app import create_app
from service.events import BATCH_CONTENT_TYPE

pytestmark = pytest.mark.rgw


def notification(*records: dict[str, Any]) -> bytes:
    return json.dumps({"Records": list(records)}).encode()


def test_probes(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200


def test_kafkasource_delivery_is_processed(client: TestClient, s3: Any, input_bucket: str) -> None:
    key = HOSTILE_KEYS[0]
    etag = upload(s3, input_bucket, key, encode(xray_like(220)))
    response = client.post(
        "/", content=notification(ceph_record(input_bucket, key, etag=etag)), headers=kafkasource_headers()
    )
    assert response.status_code == 200
    [summary] = response.json()["records"]
    assert summary["outcome"] == "processed" and summary["label"] == "Pneumonia"
    assert summary["anonymized_bucket"] == f"{input_bucket}-anonymized"
    # The response carries the pseudonym, never the key.
    for fragment in key_fragments(key):
        assert not leaks(fragment, response.text)
    again = client.post(
        "/", content=notification(ceph_record(input_bucket, key, etag=etag)), headers=kafkasource_headers(43)
    )
    assert (again.status_code, again.json()["records"][0]["reason"]) == (200, "duplicate")


def test_structured_and_batch_cloudevents(client: TestClient, s3: Any, input_bucket: str) -> None:
    etags = [upload(s3, input_bucket, f"s{i}.png", encode(xray_like(25, seed=i), ".png")) for i in range(3)]
    data = json.loads(notification(ceph_record(input_bucket, "s0.png", etag=etags[0])))
    structured = to_structured_event(CloudEvent(attributes={"type": "t", "source": "/s"}, data=data))
    response = client.post("/", content=structured.body, headers=structured.headers)
    assert response.status_code == 200 and response.json()["records"][0]["label"] == "Normal"

    batch = [
        {
            "specversion": "1.0",
            "id": f"b{i}",
            "source": "/s",
            "type": "t",
            "data": json.loads(notification(ceph_record(input_bucket, f"s{i}.png", etag=etags[i]))),
        }
        for i in (1, 2)
    ]
    response = client.post("/", content=json.dumps(batch), headers={"content-type": BATCH_CONTENT_TYPE})
    assert [r["outcome"] for r in response.json()["records"]] == ["processed", "processed"]


def test_permanent_failure_status_depends_on_the_transport(
    client: TestClient, s3: Any, input_bucket: str
) -> None:
    upload(s3, input_bucket, "bad.jpg", b"this is not an image")
    body = notification(ceph_record(input_bucket, "bad.jpg", etag="e"))
    # Knative: 422 is not retried and goes to the dead-letter sink.
    as_cloudevent = client.post("/", content=body, headers=kafkasource_headers())
    assert as_cloudevent.status_code == 422
    assert as_cloudevent.json()["records"][0] | {"pseudonym": "p"} == {
        "outcome": "failed",
        "reason": "not-an-image",
        "pseudonym": "p",
    }
    # Ceph's push retries every non-2xx forever: the failure record is the answer.
    as_push = client.post("/", content=body, headers={"Content-Type": "application/json"})
    assert as_push.status_code == 200 and as_push.json()["records"][0]["outcome"] == "failed"
    missing = client.post(
        "/", content=notification(ceph_record(input_bucket, "never-there.jpg")), headers=kafkasource_headers()
    )
    assert missing.status_code == 422 and missing.json()["records"][0]["reason"] == "missing-object"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, b"{not json"),
        ({"content-type": "text/plain"}, b"hello"),
        ({}, b'{"Records": []}'),
        ({}, b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}}}]}'),
        (kafkasource_headers() | {"ce-specversion": "0.1"}, b"{}"),
    ],
)
def test_malformed_requests_get_400_json(client: TestClient, headers: dict[str, str], body: bytes) -> None:
    response = client.post("/", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"] == "malformed" and response.json()["detail"]


def test_oversized_request_gets_413(client: TestClient) -> None:
    response = client.post("/", content=b"{" + b" " * 70_000 + b"}")
    assert response.status_code == 413 and response.json()["error"] == "request-too-large"


def test_skipped_events_are_2xx(client: TestClient, input_bucket: str) -> None:
    body = notification(
        ceph_record(input_bucket, "a.jpg", event_name="ObjectRemoved:Delete"),
        ceph_record(f"{input_bucket}-processed", "a-processed.jpg"),
    )
    response = client.post("/", content=body, headers=kafkasource_headers())
    assert response.status_code == 200
    assert [r["reason"] for r in response.json()["records"]] == ["not-object-created", "output-bucket"]
    test_event = client.post("/", json={"Service": "Amazon S3", "Event": "s3:TestEvent"})
    assert test_event.status_code == 200 and test_event.json() == {"records": [], "note": "test-event"}


def test_storage_unreachable_is_503(rgw: Any, tiny_spec: Any) -> None:
    from service.settings import Settings

    settings = Settings(
        s3_endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="a",
        aws_secret_access_key="b",
        model_uri=str(tiny_spec),
        dev_mode=True,
        s3_max_attempts=1,
        s3_connect_timeout_s=0.5,
    )
    with TestClient(create_app(settings)) as unreachable:
        response = unreachable.post("/", content=notification(ceph_record("in", "a.jpg", etag="e")))
    assert response.status_code == 503 and response.json()["error"] == "storage-unavailable"


def test_dead_worker_answers_503_then_recovers(client: TestClient, s3: Any, input_bucket: str) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    [pid] = engine.worker_pids()
    os.kill(pid, signal.SIGKILL)
    etag = upload(s3, input_bucket, "after-kill.jpg", encode(xray_like(220)))
    body = notification(ceph_record(input_bucket, "after-kill.jpg", etag=etag))
    deadline = time.monotonic() + 5
    statuses = []
    while time.monotonic() < deadline and 503 not in statuses:
        statuses.append(client.post("/", content=body).status_code)
    assert 503 in statuses, "a request after the worker died must be answered 503 (redelivered)"
    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the pool did not come back"
        time.sleep(0.2)
    assert engine.worker_pids() != [pid]
    response = client.post("/", content=body)
    assert response.status_code == 200 and response.json()["records"][0]["outcome"] == "processed"


def test_healthz_fails_only_when_the_engine_cannot_heal(make_settings: Any, tiny_spec: Path, tmp_path: Path) -> None:
    """Liveness tells the truth: a worker being replaced is alive (200, /readyz 503); replacements that keep
    failing to load (WORKER_RESTART_LIMIT in a row) make /healthz 503, so Kubernetes restarts the pod; once one
    warms again it is 200."""
    for name in ("tiny.yaml", "tiny.keras"):
        shutil.copy(tiny_spec.parent / name, tmp_path / name)
    weights = tmp_path / "tiny.keras"
    good = weights.read_bytes()
    settings = make_settings(model_uri=str(tmp_path / "tiny.yaml"), worker_restart_limit=2)
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine  # type: ignore[attr-defined]
        assert client.get("/healthz").status_code == 200
        weights.write_bytes(b"not a keras archive")
        [pid] = engine.worker_pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: client.get("/readyz").status_code == 503, 30, "/readyz still 200 with no warm worker")
        wait_until(lambda: client.get("/healthz").status_code == 503, 120, "/healthz never said the engine is stuck")
        assert client.get("/healthz").json()["status"] == "unhealthy"
        weights.write_bytes(good)
        wait_until(lambda: client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200,
                   120, "the engine did not heal once a replacement could load")


def test_debug_logs_never_contain_keys(
    client: TestClient, s3: Any, input_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    from service.logs import configure_logging

    root = logging.getLogger()
    previous_level = root.level
    configure_logging("DEBUG")  # the service's own set-up, as `xray-pipeline serve` does it
    root.addHandler(caplog.handler)  # basicConfig(force=True) dropped pytest's capture handler
    try:
        records = []
        for index, key in enumerate(HOSTILE_KEYS):
            etag = upload(s3, input_bucket, key, encode(xray_like(220, seed=index)))
            records.append(ceph_record(input_bucket, key, etag=etag))
        upload(s3, input_bucket, HOSTILE_KEYS[0] + ".bad.jpg", b"garbage")
        records.append(ceph_record(input_bucket, HOSTILE_KEYS[0] + ".bad.jpg", etag="x"))
        assert client.post("/", content=notification(*records)).status_code == 200
    finally:
        root.removeHandler(caplog.handler)
        root.setLevel(previous_level)
    text = "\n".join(record.getMessage() + str(record.__dict__) for record in caplog.records)
    assert "record " in text  # the per-record lines were captured
    for key in HOSTILE_KEYS:
        for fragment in key_fragments(key):
            assert not leaks(fragment, text), f"a log line contains the key fragment {fragment!r}"


def test_binary_cloudevent_from_the_sdk(client: TestClient, s3: Any, input_bucket: str) -> None:
    etag = upload(s3, input_bucket, "sdk.jpg", encode(xray_like(220)))
    data = json.loads(notification(ceph_record(input_bucket, "sdk.jpg", etag=etag)))
    message = to_binary_event(
        CloudEvent(attributes={"type": "com.amazonaws.ObjectCreated:Put", "source": "/c"}, data=data)
    )
    response = client.post("/", content=message.body, headers=message.headers)
    assert response.status_code == 200 and response.json()["records"][0]["outcome"] == "processed"


def test_bucket_outside_input_buckets_gets_403_and_is_never_read(rgw: Any, tiny_spec: Any, s3: Any,
                                                                 input_bucket: str) -> None:
    from service.settings import Settings

    settings = Settings(
        s3_endpoint_url=rgw.endpoint_url, aws_access_key_id=rgw.access_key, aws_secret_access_key=rgw.secret_key,
        aws_default_region=rgw.region, model_uri=str(tiny_spec), dev_mode=True, s3_max_attempts=1,
        input_buckets=["only-this-one"],
    )
    etag = upload(s3, input_bucket, "elsewhere.jpg", encode(xray_like(220)))
    never_created = f"{input_bucket}-never-created"
    with TestClient(create_app(settings)) as guarded:
        for bucket in (input_bucket, never_created):
            body = notification(ceph_record(bucket, "elsewhere.jpg", etag=etag))
            for headers in (kafkasource_headers(), {"Content-Type": "application/json"}):
                response = guarded.post("/", content=body, headers=headers)
                assert response.status_code == 403, response.text
                assert response.json()["error"] == "bucket-not-allowed"
    # Refused before any S3 call: nothing written for the existing bucket, and the missing one was never asked for
    # (reading it would have been a `missing-bucket` failure, 422).
    assert not s3.list_objects_v2(Bucket=f"{input_bucket}-processed").get("KeyCount")
