"""`xray-pipeline notify`: topics and bucket notification rules on the real RGW, idempotently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from service.errors import ConfigurationError
from service.settings import S3Settings
from service.tools.notify import NotificationAdmin, TopicOptions
from service.tools.recordings import RecordingSink, parse_recording

pytestmark = pytest.mark.rgw

#: docs/operator-tools.md's key regex for images and DICOM objects without a suffix.
PACS_REGEX = r".*\.(jpe?g|png|dcm)|(.*/)?[^/.]+"


@pytest.fixture
def admin(rgw: Any) -> NotificationAdmin:
    return NotificationAdmin(S3Settings(s3_endpoint_url=rgw.endpoint_url, aws_access_key_id=rgw.access_key,
                                        aws_secret_access_key=rgw.secret_key, aws_default_region=rgw.region))


def test_create_is_idempotent_and_keeps_other_rules(admin: NotificationAdmin, input_bucket: str) -> None:
    options = TopicOptions(push_endpoint="http://127.0.0.1:9/", persistent=False, opaque_data="o")
    arn = admin.ensure_topic("t-idem", options)
    assert admin.ensure_topic("t-idem", options) == arn
    admin.ensure_notification(input_bucket, arn, notification_id="jpeg", suffix=".jpeg")
    admin.ensure_notification(input_bucket, arn, notification_id="png", suffix=".png")
    admin.ensure_notification(input_bucket, arn, notification_id="jpeg", suffix=".jpg")
    rules = {rule["Id"]: rule for rule in admin.list_notifications(input_bucket)}
    assert set(rules) == {"jpeg", "png"}
    assert rules["jpeg"]["Filter"]["Key"]["FilterRules"] == [{"Name": "suffix", "Value": ".jpg"}]
    assert rules["png"]["Events"] == ["s3:ObjectCreated:*"]
    assert arn in admin.list_topics()

    assert admin.remove_notification(input_bucket, "jpeg") is True
    assert [rule["Id"] for rule in admin.list_notifications(input_bucket)] == ["png"]
    assert admin.remove_notification(input_bucket, "jpeg") is False
    assert admin.remove_notification(input_bucket, "png") is True
    assert admin.list_notifications(input_bucket) == []
    admin.delete_topic("t-idem")
    assert arn not in admin.list_topics()


def test_bad_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="push endpoint"):
        TopicOptions(push_endpoint="ftp://x").attributes()


def test_cli_round_trip(rgw: Any, input_bucket: str) -> None:
    def cli(*args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "service.cli", "notify", *args], env=rgw.env(),
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    created = cli("create", "--bucket", input_bucket, "--topic", "cli-topic", "--endpoint", "http://127.0.0.1:9/",
                  "--regex", r".*\.(jpe?g|png)$", "--opaque-data", "x", "--kafka-ack-level", "broker")
    assert created["topic_arn"].endswith(":cli-topic") and created["id"] == "cli-topic"
    [rule] = cli("list", "--bucket", input_bucket)["notifications"]
    assert rule["Filter"]["Key"]["FilterRules"] == [{"Name": "regex", "Value": r".*\.(jpe?g|png)$"}]
    assert cli("remove", "--bucket", input_bucket, "--id", "cli-topic", "--topic", "cli-topic") == {"removed": True}
    listed = cli("list", "--bucket", input_bucket)
    assert listed["notifications"] == [] and not any(arn.endswith(":cli-topic") for arn in listed["topics"])


def test_suffix_filters_for_dicom_reach_ceph_and_filter_its_events(
    admin: NotificationAdmin, s3: Any, input_bucket: str, tmp_path: Path
) -> None:
    """One suffix is Ceph's suffix rule; several are one regex rule (Ceph takes one rule of each name), and Ceph
    pushes only what they match; so does docs/operator-tools.md's regex for DICOM keys without a suffix."""
    with RecordingSink(tmp_path / "deliveries") as sink:
        arn = admin.ensure_topic("t-dicom", TopicOptions(push_endpoint=sink.url, persistent=False))
        admin.ensure_notification(input_bucket, arn, notification_id="dicom", suffix=".dcm")
        admin.ensure_notification(input_bucket, arn, notification_id="images", suffix=[".dcm", ".DCM", ".jpeg"],
                                  prefix="ward 7/")
        admin.ensure_notification(input_bucket, arn, notification_id="pacs", regex=PACS_REGEX)
        rules = {rule["Id"]: rule["Filter"]["Key"]["FilterRules"] for rule in admin.list_notifications(input_bucket)}
        assert rules["dicom"] == [{"Name": "suffix", "Value": ".dcm"}]
        assert rules["images"] == [{"Name": "prefix", "Value": "ward 7/"},
                                   {"Name": "regex", "Value": r".*(\.dcm|\.DCM|\.jpeg)"}]

        keys = ["ward 7/a.dcm", "ward 7/b.DCM", "ward 7/c.jpeg", "ward 7/d.dcm.txt", "ward 7/xdcm", "ward 7/IM0001",
                "ward 8/e.dcm", "ward 8/f.jpeg", "ward.8/IM0002", "1.2.840.4471"]
        for key in keys:
            s3.put_object(Bucket=input_bucket, Key=key, Body=b"x")
        # Non-persistent: Ceph pushes inside each upload, so every delivery is in when the last upload returns.
        pushed: dict[str, set[str]] = {}
        for path in sink.wait_for(12, timeout_s=10):
            for record in json.loads(parse_recording(path.read_bytes()).body)["Records"]:
                pushed.setdefault(record["s3"]["configurationId"], set()).add(record["s3"]["object"]["key"])
    assert pushed == {"dicom": {"ward 7/a.dcm", "ward 8/e.dcm"},
                      "images": {"ward 7/a.dcm", "ward 7/b.DCM", "ward 7/c.jpeg"},
                      "pacs": {"ward 7/a.dcm", "ward 7/c.jpeg", "ward 7/xdcm", "ward 7/IM0001", "ward 8/e.dcm",
                               "ward 8/f.jpeg", "ward.8/IM0002"}}
    admin.delete_topic("t-dicom")
    assert PACS_REGEX in (ROOT / "docs" / "operator-tools.md").read_text()


def test_several_suffixes_leave_no_room_for_a_regex(admin: NotificationAdmin, input_bucket: str) -> None:
    arn = admin.ensure_topic("t-both", TopicOptions(push_endpoint="http://127.0.0.1:9/", persistent=False))
    with pytest.raises(ConfigurationError, match="--regex"):
        admin.ensure_notification(input_bucket, arn, notification_id="both", suffix=[".dcm", ".jpeg"], regex=".*")
    admin.ensure_notification(input_bucket, arn, notification_id="one", suffix=[".dcm"], regex=r".*/IM[0-9]+\.dcm")
    [rule] = admin.list_notifications(input_bucket)
    assert rule["Filter"]["Key"]["FilterRules"] == [{"Name": "suffix", "Value": ".dcm"},
                                                    {"Name": "regex", "Value": r".*/IM[0-9]+\.dcm"}]
    admin.delete_topic("t-both")


def test_cli_dicom_suffix(rgw: Any, admin: NotificationAdmin, input_bucket: str) -> None:
    done = subprocess.run([sys.executable, "-m", "service.cli", "notify", "create", "--bucket", input_bucket,
                           "--topic", "cli-dicom", "--endpoint", "http://127.0.0.1:9/", "--suffix", ".dcm"],
                          env=rgw.env(), capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    [rule] = admin.list_notifications(input_bucket)
    assert rule["Filter"]["Key"]["FilterRules"] == [{"Name": "suffix", "Value": ".dcm"}]
    admin.delete_topic("cli-dicom")
