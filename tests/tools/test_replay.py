"""Replays of recorded deliveries (tests/events/, captured from a real Ceph by tests/record_events.py).

Each file is posted to the app exactly as recorded: Ceph's plain pushes and the KafkaSource binary CloudEvents.
Objects named by created-events are uploaded first, so the pipeline runs for real against the RGW.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import encode, xray_like
from fastapi.testclient import TestClient

from service.tools.recordings import parse_recording

pytestmark = pytest.mark.rgw

EVENTS = sorted((Path(__file__).resolve().parents[1] / "events").glob("*.http"))


def read_delivery(path: Path) -> tuple[dict[str, str], bytes]:
    recording = parse_recording(path.read_bytes(), str(path))
    return recording.replay_headers(), recording.body


def test_the_replay_set_covers_both_transports() -> None:
    names = [path.name for path in EVENTS]
    assert any(name.startswith("ceph-") for name in names) and any(name.startswith("kafkasource-") for name in names)


@pytest.mark.parametrize("path", EVENTS, ids=[path.stem for path in EVENTS])
def test_replay(client: TestClient, s3: Any, path: Path) -> None:
    headers, body = read_delivery(path)
    records = json.loads(body)["Records"]
    created = [r for r in records if r["eventName"].removeprefix("s3:").startswith("ObjectCreated:")]
    for record in created:
        bucket, key = record["s3"]["bucket"]["name"], record["s3"]["object"]["key"]
        for name in (bucket, f"{bucket}-processed", f"{bucket}-anonymized"):
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=name)
        s3.put_object(Bucket=bucket, Key=key, Body=encode(xray_like(220, seed=zlib.crc32(path.name.encode()))))

    response = client.post("/", content=body, headers=headers)

    assert response.status_code == 200, response.text
    outcomes = [summary["outcome"] for summary in response.json()["records"]]
    if created:
        # A fresh upload under a key replayed before is new content: processed again, never failed.
        assert outcomes == ["processed"] * len(records)
        for record in created:
            bucket, key = record["s3"]["bucket"]["name"], record["s3"]["object"]["key"]
            stem, dot, extension = key.rpartition(".")
            head = s3.head_object(Bucket=f"{bucket}-processed", Key=f"{stem}-processed{dot}{extension}")
            assert head["Metadata"]["label"] == "Pneumonia"
    else:
        assert outcomes == ["skipped"] * len(records)
