"""`xray-pipeline notify`: topics and bucket notification rules on the real RGW, idempotently."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import ROOT

from service import notify

pytestmark = pytest.mark.rgw


def test_create_is_idempotent_and_keeps_other_rules(rgw: Any, s3: Any, input_bucket: str) -> None:
    sns = rgw.sns_client()
    options = notify.TopicOptions(push_endpoint="http://127.0.0.1:9/", persistent=False, opaque_data="o")
    arn = notify.ensure_topic(sns, "t-idem", options)
    assert notify.ensure_topic(sns, "t-idem", options) == arn
    notify.ensure_notification(s3, input_bucket, arn, notification_id="jpeg", suffix=".jpeg")
    notify.ensure_notification(s3, input_bucket, arn, notification_id="png", suffix=".png")
    notify.ensure_notification(s3, input_bucket, arn, notification_id="jpeg", suffix=".jpeg")
    rules = {rule["Id"]: rule for rule in notify.list_notifications(s3, input_bucket)}
    assert set(rules) == {"jpeg", "png"}
    assert rules["png"]["Filter"]["Key"]["FilterRules"] == [{"Name": "suffix", "Value": ".png"}]
    assert rules["jpeg"]["Events"] == ["s3:ObjectCreated:*"]
    assert arn in notify.list_topics(sns)

    assert notify.remove_notification(s3, input_bucket, "jpeg") is True
    assert [rule["Id"] for rule in notify.list_notifications(s3, input_bucket)] == ["png"]
    assert notify.remove_notification(s3, input_bucket, "jpeg") is False
    notify.delete_topic(sns, arn)
    assert arn not in notify.list_topics(sns)


def test_bad_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="push endpoint"):
        notify.TopicOptions(push_endpoint="ftp://x").attributes()


def test_cli_round_trip(rgw: Any, input_bucket: str) -> None:
    def cli(*args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "service.cli", "notify", *args], env=rgw.env() | {"PATH": ""},
                              capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    created = cli("create", "--bucket", input_bucket, "--topic", "cli-topic", "--endpoint", "http://127.0.0.1:9/",
                  "--regex", r".*\.(jpe?g|png)$", "--opaque-data", "x", "--kafka-ack-level", "broker")
    assert created["topic_arn"].endswith(":cli-topic") and created["id"] == "cli-topic"
    listed = cli("list", "--bucket", input_bucket)
    [rule] = listed["notifications"]
    assert rule["Filter"]["Key"]["FilterRules"] == [{"Name": "regex", "Value": r".*\.(jpe?g|png)$"}]
    assert cli("remove", "--bucket", input_bucket, "--id", "cli-topic", "--topic", "cli-topic") == {"removed": True}
    assert cli("list", "--bucket", input_bucket)["notifications"] == []
