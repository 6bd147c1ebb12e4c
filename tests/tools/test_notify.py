"""`xray-pipeline notify`: topics and bucket notification rules on the real RGW, idempotently."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import ROOT

from service.settings import S3Settings
from service.tools.notify import NotificationAdmin, TopicOptions

pytestmark = pytest.mark.rgw


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
