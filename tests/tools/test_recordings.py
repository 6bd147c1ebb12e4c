"""Recorded deliveries: the `.http` format, the recording sink fed by real Ceph notifications, and replay to a
running service (`xray-pipeline replay`, `xray-pipeline events record`)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, encode, free_port, serving, xray_like

from service.app import create_app
from service.cli import main
from service.settings import Settings
from service.tools.recordings import (
    Recording,
    RecordingError,
    RecordingSink,
    load_recordings,
    notification_recording,
    parse_recording,
)

EVENTS = sorted((Path(__file__).resolve().parents[1] / "events").glob("*.http"))


# ------------------------------------------------------------------------------------------------ the format


@pytest.mark.parametrize("path", EVENTS, ids=[path.stem for path in EVENTS])
def test_every_recording_parses_and_writes_back_byte_for_byte(path: Path) -> None:
    data = path.read_bytes()
    recording = parse_recording(data, str(path))
    assert recording.method == "POST" and recording.path == "/"
    assert recording.to_bytes() == data
    assert "host" not in {name.lower() for name in recording.replay_headers()}
    assert "content-length" not in {name.lower() for name in recording.replay_headers()}


def test_crlf_recordings_keep_their_body_exactly() -> None:
    body = b'{"Records": []}\r\n\r\ntrailing'
    recording = parse_recording(b"POST /sink HTTP/1.1\r\nContent-Type: application/json\r\n\r\n" + body)
    assert recording.path == "/sink" and recording.body == body
    assert recording.replay_headers() == {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "data",
    [b"", b"POST / HTTP/1.1\nno blank line", b"garbage\n\nbody", b"POST / HTTP/1.1\nnot a header\n\nbody"],
    ids=["empty", "no-blank-line", "no-request-line", "bad-header"],
)
def test_malformed_recordings_are_refused_with_the_file_named(data: bytes) -> None:
    with pytest.raises(RecordingError, match=r"scan\.http"):
        parse_recording(data, "scan.http")


def test_notification_json_replays_as_a_plain_push(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"Records": [{"eventName": "ObjectCreated:Put"}]}))
    (tmp_path / "notes.txt").write_text("ignored")
    [recording] = load_recordings([tmp_path])
    assert recording.replay_headers() == {"Content-Type": "application/json"}
    with pytest.raises(RecordingError, match="no Records"):
        notification_recording(b'{"Records": {}}', "x.json")
    with pytest.raises(RecordingError, match="no such file"):
        load_recordings([tmp_path / "missing"])


def test_the_sink_records_chunked_bodies_and_continues_numbering(tmp_path: Path) -> None:
    (tmp_path / "delivery-0007.http").write_bytes(b"POST / HTTP/1.1\n\n{}")
    with RecordingSink(tmp_path) as sink:
        httpx.post(sink.url, content=iter([b'{"Rec', b'ords": []}']), headers={"Content-Type": "application/json"})
        [path] = sink.wait_for(1, timeout_s=10)
    assert path.name == "delivery-0008.http"
    recording = parse_recording(path.read_bytes())
    assert recording.body == b'{"Records": []}'
    assert "transfer-encoding" not in {name.lower() for name, _ in recording.headers}


# ------------------------------------------------------------------------------------------- a live service


@pytest.fixture(scope="module")
def service_url(rgw: Any, tiny_spec: Path) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port (replay needs a URL, not a TestClient)."""
    settings = Settings(
        s3_endpoint_url=rgw.endpoint_url, aws_access_key_id=rgw.access_key, aws_secret_access_key=rgw.secret_key,
        aws_default_region=rgw.region, model_uri=str(tiny_spec), dev_mode=True, s3_max_attempts=1,
    )
    with serving(create_app(settings)) as url:
        yield url


def _prepare_objects(s3: Any, recording: Recording) -> list[tuple[str, str]]:
    """Upload an image under every key a created-event of `recording` names; returns (bucket, key) pairs."""
    records = json.loads(recording.body)["Records"]
    created = []
    for record in records:
        if not record["eventName"].removeprefix("s3:").startswith("ObjectCreated:"):
            continue
        bucket, key = record["s3"]["bucket"]["name"], record["s3"]["object"]["key"]
        for name in (bucket, f"{bucket}-processed", f"{bucket}-anonymized"):
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=name)
        image = encode(xray_like(220, seed=zlib.crc32(f"{recording.source}{key}".encode())))
        s3.put_object(Bucket=bucket, Key=key, Body=image)
        created.append((bucket, key))
    return created


@pytest.mark.rgw
def test_replay_posts_every_recorded_delivery_and_reports_each_status(
    service_url: str, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    for recording in load_recordings(EVENTS):
        _prepare_objects(s3, recording)

    assert main(["replay", str(EVENTS[0].parent), "--to", service_url]) == 0

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == [str(path) for path in EVENTS]
    assert {line["status"] for line in lines} == {200}
    outcomes = {Path(line["file"]).stem: [r["outcome"] for r in line["response"]["records"]] for line in lines}
    assert outcomes["ceph-001-put-jpeg-hostile-key"] == ["processed"]
    assert outcomes["ceph-004-delete-object"] == ["skipped"]
    assert outcomes["kafkasource-001-ceph-put"] in (["processed"], ["skipped"])  # same key and content as ceph-001
    for line in lines:
        assert "Mcgehee" not in json.dumps(line["response"])  # answers carry pseudonyms, never keys


def test_replay_exits_non_zero_when_a_delivery_is_not_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "one.json").write_text(json.dumps({"Records": []}))
    assert main(["replay", str(tmp_path), "--to", f"http://127.0.0.1:{free_port()}/", "--timeout", "5"]) == 1
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert line["status"] is None and "ConnectError" in line["response"]


def test_replay_of_a_missing_path_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", "/no/such/recordings", "--to", "http://127.0.0.1:9/"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@pytest.mark.rgw
def test_real_ceph_notifications_recorded_by_the_cli_sink_replay_into_outputs(
    rgw: Any, s3: Any, service_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ceph pushes to `xray-pipeline events record`; the files it writes replay into processed outputs."""
    recorder = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "events", "record", "--dir", str(tmp_path), "--port", "0",
         "--count", "1"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert recorder.stderr is not None
        url = re.search(r"point a topic at (\S+)", recorder.stderr.readline())
        assert url, "the recorder did not say where it listens"
        bucket, key = f"rec-{time.monotonic_ns()}", "ward 7/Jane Roe+1950 %.jpeg"
        for name in (bucket, f"{bucket}-processed", f"{bucket}-anonymized"):
            s3.create_bucket(Bucket=name)
        topic = rgw.sns_client().create_topic(
            Name=f"{bucket}-topic", Attributes={"push-endpoint": url.group(1), "persistent": "false"}
        )["TopicArn"]
        s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
            "TopicConfigurations": [{"Id": "rec", "TopicArn": topic, "Events": ["s3:ObjectCreated:*"]}]
        })
        s3.put_object(Bucket=bucket, Key=key, Body=encode(xray_like(220)))
        assert recorder.wait(timeout=60) == 0
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
        if recorder.stderr is not None:
            recorder.stderr.close()

    [recorded] = sorted(tmp_path.glob("*.http"))
    assert json.loads(parse_recording(recorded.read_bytes()).body)["Records"][0]["s3"]["object"]["key"] == key
    assert main(["replay", str(recorded), "--to", service_url]) == 0
    [line] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["outcome"] for record in line["response"]["records"]] == ["processed"]
    stem, _, extension = key.rpartition(".")
    assert s3.head_object(Bucket=f"{bucket}-processed", Key=f"{stem}-processed.{extension}")["ContentLength"] > 0
