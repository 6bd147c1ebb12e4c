"""Ceph bucket notifications: the SNS-style topic with a push endpoint, and the bucket's notification rules.

Replaces the separate tool and the Postman collection the original demos needed. Every call is idempotent:
creating what exists updates it in place; removing what is absent is not an error. Ceph (Pacific) differs from
AWS here: a PUT of a notification configuration merges rules by Id instead of replacing the set, and a single rule
is removed with `DELETE /<bucket>?notification=<id>`, which boto3 has no call for.

A rule's key filter holds at most one prefix, one suffix and one regex (Ceph refuses a second rule of a name), all of
which must match, case-sensitively; Ceph's regex is a C++ std::regex (ECMAScript) matched against the whole key.
Several suffixes (`.dcm` and `.jpeg`) therefore become one regex.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.httpsession import URLLib3Session

from service.errors import ConfigurationError
from service.settings import S3Settings
from service.storage import make_s3_client

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


class NotificationAdmin:
    """Topics and bucket notification rules on one S3 endpoint."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        self.s3 = make_s3_client(settings)
        # Ceph serves its topic API on the S3 endpoint, with the SNS protocol.
        self.sns = boto3.session.Session().client(
            "sns",
            endpoint_url=settings.s3_endpoint_url,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            region_name=settings.aws_default_region,
        )

    def ensure_topic(self, name: str, options: TopicOptions) -> str:
        """Create or update the topic; returns its ARN (Ceph's CreateTopic overwrites an existing topic)."""
        return str(self.sns.create_topic(Name=name, Attributes=options.attributes())["TopicArn"])

    def list_topics(self) -> list[str]:
        return [topic["TopicArn"] for topic in self.sns.list_topics().get("Topics", [])]

    def delete_topic(self, name_or_arn: str) -> None:
        arn = next((arn for arn in self.list_topics() if arn.split(":")[-1] == name_or_arn), name_or_arn)
        self.sns.delete_topic(TopicArn=arn)

    def ensure_notification(
        self,
        bucket: str,
        topic_arn: str,
        *,
        notification_id: str,
        events: Sequence[str] = DEFAULT_EVENTS,
        prefix: str | None = None,
        suffix: str | Sequence[str] | None = None,
        regex: str | None = None,
    ) -> None:
        """Add or replace the rule `notification_id` on `bucket`, keeping the bucket's other rules.

        `suffix` may be several (`[".dcm", ".jpeg"]`): one is a suffix rule (AWS has no regex), more are one regex
        rule matching any of them (Ceph), which leaves no room for a `regex` of the caller's.
        """
        suffix, regex = key_filter_rules(suffix, regex)
        rules = [
            {"Name": name, "Value": value}
            for name, value in (("prefix", prefix), ("suffix", suffix), ("regex", regex))
            if value
        ]
        rule: dict[str, Any] = {"Id": notification_id, "TopicArn": topic_arn, "Events": list(events)}
        if rules:
            rule["Filter"] = {"Key": {"FilterRules": rules}}
        # Sending the other rules too keeps them on AWS (which replaces the set) and is a no-op on Ceph (merges).
        others = [existing for existing in self.list_notifications(bucket) if existing["Id"] != notification_id]
        self.s3.put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration={"TopicConfigurations": [*others, rule]}
        )

    def list_notifications(self, bucket: str) -> list[dict[str, Any]]:
        configuration = self.s3.get_bucket_notification_configuration(Bucket=bucket)
        return list(configuration.get("TopicConfigurations", []))

    def remove_notification(self, bucket: str, notification_id: str) -> bool:
        """Remove one rule; returns whether it existed."""
        existing = self.list_notifications(bucket)
        kept = [rule for rule in existing if rule["Id"] != notification_id]
        if len(kept) == len(existing):
            return False
        if not self._ceph_delete_notification(bucket, notification_id):
            self.s3.put_bucket_notification_configuration(
                Bucket=bucket, NotificationConfiguration={"TopicConfigurations": kept}
            )
        return True

    def _ceph_delete_notification(self, bucket: str, notification_id: str) -> bool:
        """Ceph's extension; returns False where it is not understood (AWS), so the caller falls back."""
        settings = self._settings
        endpoint = (settings.s3_endpoint_url or "https://s3.amazonaws.com").rstrip("/")
        request = AWSRequest(
            method="DELETE", url=f"{endpoint}/{quote(bucket)}?notification={quote(notification_id, safe='')}"
        )
        credentials = Credentials(settings.aws_access_key_id or "", settings.secret_access_key or "")
        S3SigV4Auth(credentials, "s3", settings.aws_default_region).add_auth(request)
        response = URLLib3Session(timeout=int(settings.s3_read_timeout_s)).send(request.prepare())
        return 200 <= response.status_code < 300


def key_filter_rules(suffix: str | Sequence[str] | None, regex: str | None) -> tuple[str | None, str | None]:
    """The suffix rule and regex rule of a key filter for one or several suffixes (see the module docstring)."""
    suffixes = [suffix] if isinstance(suffix, str) else [value for value in suffix or () if value]
    suffixes = list(dict.fromkeys(suffixes))
    if len(suffixes) <= 1:
        return (suffixes[0] if suffixes else None), regex
    if regex:
        raise ConfigurationError("--suffix: several suffixes become Ceph's one regex rule; put them in --regex instead")
    return None, ".*(" + "|".join(_ecmascript_escape(value) for value in suffixes) + ")"


def _ecmascript_escape(text: str) -> str:
    """`text` as a literal in an ECMAScript regex (std::regex's default grammar)."""
    return "".join("\\" + character if character in _REGEX_SPECIAL else character for character in text)


_REGEX_SPECIAL = frozenset("\\^$.|?*+()[]{}/")
