"""`xray-pipeline backfill`: objects already in a bucket get processed by the service's rules, here (a real
pipeline and workers, tiny model) or by a running service (`--emit`), against the real RGW; a real Ctrl-C and a
rerun that does only the rest; `--dry-run` writes nothing; lines carry pseudonyms, never keys."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_PSEUDONYM_KEY, encode, interrupted, key_fragments, serving, upload, xray_like
from dicom_factory import Patient, new_study
from dicom_inputs import FOLDER, NOT_ASSESSED, assert_deidentified, chest_model, study_files

from service.app import create_app
from service.cli import main
from service.events import parse_delivery
from service.outputs import failure_key, processed_key, pseudonym
from service.settings import Settings

pytestmark = pytest.mark.rgw

SECRET = TEST_PSEUDONYM_KEY.encode()
BRIGHT, DARK = 220, 30
CORRUPT = "ward 7/Zoë Ünal 100%25+1960-01-01.jpeg"


def fill_bucket(s3: Any, bucket: str, count: int, *, corrupt: bool = False) -> dict[str, int]:
    """`count` images under patient-like keys (key -> brightness), plus objects backfill must leave alone."""
    keys = {f"ward 7/Anna Mcgehee+{index:02d} 1941-11-26 100%.jpeg": BRIGHT if index % 2 else DARK
            for index in range(count)}
    for index, (key, brightness) in enumerate(keys.items()):
        upload(s3, bucket, key, encode(xray_like(brightness, size=(200, 160), seed=index)))
    upload(s3, bucket, "ward 7/Anna Mcgehee notes.txt", b"not an image")
    upload(s3, bucket, "_failed/0123456789abcdef.jpeg", b"a failure record's name, never input")
    if corrupt:
        upload(s3, bucket, CORRUPT, b"\xff\xd8\xff\xe0 these bytes are no JPEG")
    return keys


def processed_keys(s3: Any, bucket: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=f"{bucket}-processed")
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def anonymized_keys(s3: Any, bucket: str) -> set[str]:
    return {item["Key"] for item in s3.list_objects_v2(Bucket=f"{bucket}-anonymized").get("Contents", [])}


def lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def assert_private(texts: list[str], keys: list[str]) -> None:
    pieces = {piece for key in keys for piece in key_fragments(key) if not piece.isdigit()}
    for text in texts:
        for piece in pieces:
            assert piece not in text


def test_backfill_in_process_after_a_dry_run_and_a_rerun_that_skips(
    tool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, s3: Any, input_bucket: str,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="service")
    monkeypatch.setenv("ANONYMIZE_WHEN", "always")
    keys = fill_bucket(s3, input_bucket, 24, corrupt=True)
    aliases = {pseudonym(SECRET, input_bucket, key): key for key in [*keys, CORRUPT]}

    assert main(["backfill", f"s3://{input_bucket}", "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert {line["pseudonym"] for line in lines(dry.out)} == set(aliases)
    assert {line["outcome"] for line in lines(dry.out)} == {"would-process"}
    assert processed_keys(s3, input_bucket) == set() and anonymized_keys(s3, input_bucket) == set()

    assert main(["backfill", f"s3://{input_bucket}"]) == 1  # the corrupt object fails, the rest is processed
    run = capsys.readouterr()
    outcomes = {line["pseudonym"]: line for line in lines(run.out)}
    assert set(outcomes) == set(aliases)
    for alias, key in aliases.items():
        if key == CORRUPT:
            assert (outcomes[alias]["outcome"], outcomes[alias]["reason"]) == ("failed", "not-an-image")
            continue
        assert outcomes[alias]["outcome"] == "processed"
        assert outcomes[alias]["label"] == ("Pneumonia" if keys[key] == BRIGHT else "Normal")
    assert processed_keys(s3, input_bucket) == {processed_key(key) for key in keys} | {
        failure_key(pseudonym(SECRET, input_bucket, CORRUPT))}
    assert anonymized_keys(s3, input_bucket) == {f"{alias}.jpeg" for alias, key in aliases.items() if key != CORRUPT}
    assert "24 processed" in run.err and "1 failed" in run.err
    assert_private([dry.out, dry.err, run.out, run.err, caplog.text], [*keys, CORRUPT])

    # Everything is on record: nothing is processed again (the failure neither: its record names this content).
    assert main(["backfill", f"s3://{input_bucket}/ward 7/"]) == 1
    outcomes = {line["pseudonym"]: line for line in lines(capsys.readouterr().out)}
    assert {line["outcome"] for alias, line in outcomes.items() if aliases[alias] != CORRUPT} == {"skipped"}
    assert outcomes[pseudonym(SECRET, input_bucket, CORRUPT)]["outcome"] == "failed"


def test_ctrl_c_then_a_rerun_processes_only_the_rest(
    tool_env: dict[str, str], s3: Any, input_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = fill_bucket(s3, input_bucket, 14)
    # 1 object a second: when the third is processed, about ten seconds of starts are still ahead, even on a busy
    # machine where the model finishes objects in bursts seconds behind their starts (at 2/s, a loaded run had all
    # 14 done before it saw the third).
    returncode, stdout, stderr = interrupted(
        ["backfill", f"s3://{input_bucket}", "--rate", "1/s"], env=os.environ.copy(),
        once=lambda: len(processed_keys(s3, input_bucket)) >= 3,
    )
    assert returncode == 130, stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr
    assert_private([stdout, stderr], list(keys))
    done = processed_keys(s3, input_bucket)
    assert 3 <= len(done) < len(keys)
    # What was printed was finished: each line's object has its processed copy.
    printed = {line["pseudonym"] for line in lines(stdout) if line["outcome"] == "processed"}
    assert printed <= {pseudonym(SECRET, input_bucket, key) for key in keys if processed_key(key) in done}

    assert main(["backfill", f"s3://{input_bucket}"]) == 0
    outcomes = [line["outcome"] for line in lines(capsys.readouterr().out)]
    assert outcomes.count("skipped") == len(done) and outcomes.count("processed") == len(keys) - len(done)
    assert processed_keys(s3, input_bucket) == {processed_key(key) for key in keys}


@pytest.fixture(scope="module")
def service_url(rgw: Any, tiny_spec: Path) -> Iterator[str]:
    """The real app under uvicorn on a free loopback port, with the pseudonym key the CLI uses."""
    settings = Settings(
        s3_endpoint_url=rgw.endpoint_url, aws_access_key_id=rgw.access_key, aws_secret_access_key=rgw.secret_key,
        aws_default_region=rgw.region, model_uri=str(tiny_spec), pseudonym_key=TEST_PSEUDONYM_KEY,
        s3_max_attempts=1, worker_threads=1,
    )
    with serving(create_app(settings)) as url:
        yield url


def test_emit_has_a_running_service_do_the_work(
    tool_env: dict[str, str], service_url: str, s3: Any, input_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = fill_bucket(s3, input_bucket, 8, corrupt=True)
    aliases = {pseudonym(SECRET, input_bucket, key): key for key in [*keys, CORRUPT]}

    assert main(["backfill", f"s3://{input_bucket}", "--emit", service_url]) == 1
    run = capsys.readouterr()
    outcomes = {line["pseudonym"]: line for line in lines(run.out)}
    assert set(outcomes) == set(aliases)
    for alias, key in aliases.items():
        expected = ("failed", None) if key == CORRUPT else (
            "processed", "Pneumonia" if keys[key] == BRIGHT else "Normal")
        assert (outcomes[alias]["outcome"], outcomes[alias].get("label")) == expected
    assert processed_keys(s3, input_bucket) == {processed_key(key) for key in keys} | {
        failure_key(pseudonym(SECRET, input_bucket, CORRUPT))}
    assert anonymized_keys(s3, input_bucket) == {
        f"{pseudonym(SECRET, input_bucket, key)}.jpeg" for key, brightness in keys.items() if brightness == BRIGHT}
    assert_private([run.out, run.err], [*keys, CORRUPT])

    assert main(["backfill", f"s3://{input_bucket}", "--emit", service_url]) == 1
    outcomes = {line["pseudonym"]: line["outcome"] for line in lines(capsys.readouterr().out)}
    assert sorted(outcomes.values()) == ["failed"] + ["skipped"] * len(keys)


class _Sink(http.server.ThreadingHTTPServer):
    """Answers each POST with the next status of `statuses` (then 200) and keeps the bodies."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[bytes] = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                sink.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                status = sink.statuses.pop(0) if sink.statuses else 200
                body = json.dumps({"error": "bucket-not-allowed"} if status == 403 else {"records": [
                    {"outcome": "processed", "pseudonym": "p"}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_emitted_notifications_are_ceph_shaped_503_is_retried_and_4xx_reported(
    tool_env: dict[str, str], s3: Any, input_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "ward 7/Mary+Ann O'Neil 100%25 ünï.jpeg"
    etag = upload(s3, input_bucket, key, encode(xray_like(BRIGHT, size=(64, 64))))
    sink = _Sink([503, 503])
    thread = threading.Thread(target=sink.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{sink.server_address[1]}/"
        assert main(["backfill", f"s3://{input_bucket}", "--emit", url]) == 0
        assert [line["outcome"] for line in lines(capsys.readouterr().out)] == ["processed"]
        assert len(sink.bodies) == 3 and len(set(sink.bodies)) == 1  # the same notification, retried
        [record] = parse_delivery({"Content-Type": "application/json"}, sink.bodies[0]).records
        assert (record.bucket, record.key, record.etag, record.event_name) == (
            input_bucket, key, etag, "ObjectCreated:Put")
        assert json.loads(sink.bodies[0])["Records"][0]["s3"]["object"]["key"] == key  # raw, as Ceph sends it

        sink.statuses = [403]
        assert main(["backfill", f"s3://{input_bucket}", "--emit", url]) == 1
        [line] = lines(capsys.readouterr().out)
        assert (line["outcome"], line["reason"]) == ("refused", "bucket-not-allowed")
    finally:
        sink.shutdown()
        sink.server_close()
        thread.join()


def test_output_buckets_are_refused(tool_env: dict[str, str], input_bucket: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backfill", f"s3://{input_bucket}-processed", "--dry-run"]) == 2
    assert "is an output bucket" in capsys.readouterr().err


def test_backfill_of_a_dicom_study_in_process_then_a_rerun_that_skips_it(
    tool_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tiny_spec: Path, tmp_path: Path, s3: Any,
    input_bucket: str, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MODEL_URI", str(chest_model(tiny_spec, tmp_path / "model")))
    patient, study = Patient(), new_study()
    objects = {f"{FOLDER}/{name}": data for name, data in study_files(patient, study).items()}
    jpeg = f"{FOLDER}/chest.jpeg"
    for key, data in objects.items():
        upload(s3, input_bucket, key, data)
    upload(s3, input_bucket, jpeg, encode(xray_like(BRIGHT, size=(200, 160))))
    upload(s3, input_bucket, f"{FOLDER}/notes", b"Doe Jane Marie, follow-up in 6 weeks" * 10)  # not listed
    aliases = {pseudonym(SECRET, input_bucket, key): key for key in [*objects, jpeg]}

    assert main(["backfill", f"s3://{input_bucket}", "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert {line["pseudonym"]: line["outcome"] for line in lines(dry.out)} == dict.fromkeys(aliases, "would-process")

    assert main(["backfill", f"s3://{input_bucket}"]) == 0
    run = capsys.readouterr()
    outcomes = {line["pseudonym"]: line for line in lines(run.out)}
    assert set(outcomes) == set(aliases)
    for alias, key in aliases.items():
        line = outcomes[alias]
        assert line["outcome"] == "processed"
        if key.removeprefix(f"{FOLDER}/") in NOT_ASSESSED:
            assert (line["label"], line["reason"]) == ("not-assessed", "outside-model-domain") and "risk" not in line
        else:
            assert line["label"] in {"Pneumonia", "Normal", "Unsure"} and "reason" not in line
    assert processed_keys(s3, input_bucket) == {processed_key(key, dicom=True) for key in objects} | {
        processed_key(jpeg)}
    # Every DICOM object is anonymized (ANONYMIZE_WHEN is `positive`), as `<pseudonym>.dcm`; the bright JPEG too.
    assert anonymized_keys(s3, input_bucket) == {f"{alias}.dcm" for alias, key in aliases.items() if key != jpeg} | {
        f"{pseudonym(SECRET, input_bucket, jpeg)}.jpeg"}
    for alias, key in aliases.items():
        if key != jpeg:
            data = s3.get_object(Bucket=f"{input_bucket}-anonymized", Key=f"{alias}.dcm")["Body"].read()
            assert_deidentified(data, patient, study)
    assert "5 processed; 1 not assessed (outside-model-domain)" in run.err
    assert_private([dry.out, dry.err, run.out, run.err], [*aliases.values()])

    # Done, the extensionless ones too: their first bytes said DICOM, so their processed copies were looked up as .dcm.
    assert main(["backfill", f"s3://{input_bucket}"]) == 0
    outcomes = {line["pseudonym"]: line for line in lines(capsys.readouterr().out)}
    assert {(line["outcome"], line["reason"]) for line in outcomes.values()} == {("skipped", "already-processed")}
    assert set(outcomes) == set(aliases)
