"""Ceph bucket notifications: the SNS-style topic with a push endpoint, and the bucket's notification rules.

Replaces the separate tool and the Postman collection the original demos needed. Every call is idempotent:
creating what exists updates it in place; removing what is absent is not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_EVENTS = ("s3:ObjectCreated:*",)


@dataclass(frozen=True)
class TopicOptions:
    """Attributes of a Ceph topic (see the Ceph bucket-notification docs)."""

    push_endpoint: str
    persistent: bool = True
    kafka_ack_level: str | None = None
    opaque_data: str | None = None
    verify_ssl: bool = True

    def attributes(self) -> dict[str, str]:
        if not self.push_endpoint.startswith(("http://", "https://", "kafka://", "amqp://", "amqps://")):
            raise ValueError("push endpoint must be an http(s)://, kafka:// or amqp(s):// URL")
        attributes = {
            "push-endpoint": self.push_endpoint,
            "persistent": str(self.persistent).lower(),
            "verify-ssl": str(self.verify_ssl).lower(),
        }
        if self.kafka_ack_level:
            attributes["kafka-ack-level"] = self.kafka_ack_level
        if self.opaque_data:
            attributes["OpaqueData"] = self.opaque_data
        return attributes


def ensure_topic(sns: Any, name: str, options: TopicOptions) -> str:
    """Create or update the topic; returns its ARN (Ceph's CreateTopic overwrites an existing topic)."""
    return str(sns.create_topic(Name=name, Attributes=options.attributes())["TopicArn"])


def delete_topic(sns: Any, topic_arn: str) -> None:
    sns.delete_topic(TopicArn=topic_arn)


def list_topics(sns: Any) -> list[str]:
    return [topic["TopicArn"] for topic in sns.list_topics().get("Topics", [])]


def ensure_notification(
    s3: Any,
    bucket: str,
    topic_arn: str,
    *,
    notification_id: str,
    events: Sequence[str] = DEFAULT_EVENTS,
    prefix: str | None = None,
    suffix: str | None = None,
    regex: str | None = None,
) -> None:
    """Add or replace the rule `notification_id` on `bucket`, keeping the bucket's other rules."""
    rules = [
        {"Name": name, "Value": value}
        for name, value in (("prefix", prefix), ("suffix", suffix), ("regex", regex))
        if value
    ]
    rule: dict[str, Any] = {"Id": notification_id, "TopicArn": topic_arn, "Events": list(events)}
    if rules:
        rule["Filter"] = {"Key": {"FilterRules": rules}}
    others = [existing for existing in list_notifications(s3, bucket) if existing["Id"] != notification_id]
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"TopicConfigurations": [*others, rule]}
    )


def list_notifications(s3: Any, bucket: str) -> list[dict[str, Any]]:
    configuration = s3.get_bucket_notification_configuration(Bucket=bucket)
    return list(configuration.get("TopicConfigurations", []))


def remove_notification(s3: Any, bucket: str, notification_id: str) -> bool:
    """Remove one rule; returns whether it existed."""
    existing = list_notifications(s3, bucket)
    kept = [rule for rule in existing if rule["Id"] != notification_id]
    if len(kept) == len(existing):
        return False
    # Ceph drops all of a bucket's notifications on an empty configuration, then re-adds the kept ones.
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={})
    if kept:
        s3.put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration={"TopicConfigurations": kept}
        )
    return True


def make_sns_client(settings: Any) -> Any:
    """Ceph serves its topic API on the S3 endpoint, with the SNS protocol."""
    import boto3

    secret = settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
    return boto3.session.Session().client(
        "sns",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=secret,
        region_name=settings.aws_default_region,
    )
