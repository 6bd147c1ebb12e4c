"""Event intake: turns one HTTP delivery into the S3 object records it announces.

A delivery is a binary- or structured-mode CloudEvent (what a Knative KafkaSource, or Ceph with `cloudevents=true`,
sends), a CloudEvents JSON batch, or a plain S3 notification body as Ceph's HTTP push sends it. Inside are Ceph,
AWS or MinIO records, which differ in how they spell event names and encode keys. Knows no web framework: it
takes headers and a body and raises `MalformedDelivery` for anything unusable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import unquote_plus

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_binary_event, from_structured_event
from cloudevents.core.exceptions import BaseCloudEventException

from service.errors import MalformedDelivery
from service.outputs import MAX_KEY_BYTES

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
CREATED_PREFIX = "ObjectCreated:"
#: Bucket names an S3 client can address at all (botocore refuses any other before sending a request).
_BUCKET_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")


class Transport(Enum):
    """Who delivered the event; it decides how a permanent failure is answered."""

    #: Knative (KafkaSource, broker) or any CloudEvents sender: non-retryable errors go to a dead-letter sink.
    CLOUDEVENT = "cloudevent"
    #: Ceph's plain HTTP push: every non-2xx answer is retried at once, forever.
    PLAIN_PUSH = "plain-push"


@dataclass(frozen=True)
class ObjectRecord:
    """One S3 notification record, normalised across Ceph, AWS and MinIO."""

    #: Event name without the optional `s3:` prefix, e.g. "ObjectCreated:Put".
    event_name: str
    bucket: str
    #: The object key, decoded as its producer encoded it (may hold spaces, `+`, `%` and non-ASCII).
    key: str
    #: Entity tag without quotes; "" when the record carries none.
    etag: str
    version_id: str | None
    size: int | None
    #: An id for this record's event, for failure records: the record's eventId/sequencer, else the delivery's.
    event_id: str

    @property
    def is_object_created(self) -> bool:
        return self.event_name.startswith(CREATED_PREFIX)


@dataclass(frozen=True)
class Delivery:
    """Everything one HTTP request delivered."""

    transport: Transport
    records: list[ObjectRecord]
    #: Why a delivery without records is still valid (e.g. "test-event"), else None.
    note: str | None = None


def parse_delivery(headers: Mapping[str, str], body: bytes) -> Delivery:
    """Parse a request whatever its Content-Type says (a KafkaSource sends none)."""
    if not body.strip():
        raise MalformedDelivery("empty request body")
    lowered = {name.lower(): value for name, value in headers.items()}
    content_type = lowered.get("content-type", "").split(";")[0].strip().lower()
    if content_type == BATCH_CONTENT_TYPE:
        return _parse_batch(body)
    if content_type == STRUCTURED_CONTENT_TYPE:
        return _delivery_from_events([_structured_event(_load_json(body, "CloudEvent"), "CloudEvent", body)])
    if any(name.startswith("ce-") for name in lowered):
        # The SDK invents an id when none is sent; a received event without one cannot be deduplicated.
        if not lowered.get("ce-id"):
            raise MalformedDelivery("invalid CloudEvent: the ce-id header is missing")
        event = _read_cloudevent(lambda: from_binary_event(HTTPMessage(headers=lowered, body=body)))
        return _delivery_from_events([event])
    records, note = _records_from_notification(_load_json(body, "request body"), fallback_event_id="")
    return Delivery(transport=Transport.PLAIN_PUSH, records=records, note=note)


def _parse_batch(body: bytes) -> Delivery:
    items = _load_json(body, "CloudEvents batch")
    if not isinstance(items, list) or not items:
        raise MalformedDelivery("a CloudEvents batch must be a non-empty JSON array")
    return _delivery_from_events(
        [_structured_event(item, f"batch item {index}") for index, item in enumerate(items)]
    )


def _structured_event(item: Any, where: str, encoded: bytes | None = None) -> BaseCloudEvent:
    if not isinstance(item, dict):
        raise MalformedDelivery(f"{where} is not a JSON object")
    if not item.get("id"):
        raise MalformedDelivery(f"invalid {where}: the id attribute is missing")
    body = encoded if encoded is not None else json.dumps(item).encode()
    message = HTTPMessage(headers={"content-type": STRUCTURED_CONTENT_TYPE}, body=body)
    return _read_cloudevent(lambda: from_structured_event(message), where)


def _read_cloudevent(read: Any, where: str = "CloudEvent") -> BaseCloudEvent:
    try:
        return read()  # type: ignore[no-any-return]
    except RecursionError:
        raise MalformedDelivery(f"invalid {where}: JSON nested too deeply") from None
    except (BaseCloudEventException, ValueError, TypeError, KeyError, AttributeError) as error:
        # The SDK's messages name attributes, never payload values, so they are safe to return.
        raise MalformedDelivery(f"invalid {where}: {error}") from None


def _delivery_from_events(events: list[BaseCloudEvent]) -> Delivery:
    records: list[ObjectRecord] = []
    notes = []
    for event in events:
        data = event.get_data()
        if isinstance(data, bytes | str):
            data = _load_json(data.encode() if isinstance(data, str) else data, "CloudEvent data")
        if data is None:
            raise MalformedDelivery("CloudEvent has no data")
        event_records, note = _records_from_notification(data, fallback_event_id=event.get_id())
        records.extend(event_records)
        if note:
            notes.append(note)
    return Delivery(transport=Transport.CLOUDEVENT, records=records, note=notes[0] if notes and not records else None)


def _load_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise MalformedDelivery(f"{what} is not valid JSON ({type(error).__name__})") from None


def _records_from_notification(payload: Any, fallback_event_id: str) -> tuple[list[ObjectRecord], str | None]:
    if not isinstance(payload, dict):
        raise MalformedDelivery("notification must be a JSON object")
    _require_unicode(payload)
    if payload.get("Event") == "s3:TestEvent":
        # AWS sends this once when a notification is configured; it announces no object.
        return [], "test-event"
    if "Records" in payload:
        raw_records = payload["Records"]
    elif "s3" in payload:
        # One bare record, as some producers put in a CloudEvent's data.
        raw_records = [payload]
    else:
        raise MalformedDelivery("notification has no Records")
    if not isinstance(raw_records, list) or not raw_records:
        raise MalformedDelivery("Records must be a non-empty list")
    return [_parse_record(raw, index, fallback_event_id) for index, raw in enumerate(raw_records)], None


def _parse_record(raw: Any, index: int, fallback_event_id: str) -> ObjectRecord:
    where = f"Records[{index}]"
    if not isinstance(raw, dict):
        raise MalformedDelivery(f"{where} is not a JSON object")
    event_name = raw.get("eventName")
    if not isinstance(event_name, str) or not event_name:
        raise MalformedDelivery(f"{where}.eventName is missing")
    s3 = _mapping(raw.get("s3"), f"{where}.s3")
    bucket = _mapping(s3.get("bucket"), f"{where}.s3.bucket").get("name")
    if not isinstance(bucket, str) or not bucket:
        raise MalformedDelivery(f"{where}.s3.bucket.name is missing")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise MalformedDelivery(f"{where}.s3.bucket.name is not a valid bucket name")
    obj = _mapping(s3.get("object"), f"{where}.s3.object")
    key = obj.get("key")
    if not isinstance(key, str) or not key:
        raise MalformedDelivery(f"{where}.s3.object.key is missing")
    # Ceph sends raw keys. AWS form-encodes them and MinIO escapes them with Go's url.QueryEscape: both write a
    # space as '+' and a literal '+' as %2B, so `unquote_plus` is the inverse of either.
    if raw.get("eventSource") in ("aws:s3", "minio:s3"):
        key = unquote_plus(key)
    if not 0 < len(key.encode()) <= MAX_KEY_BYTES or "\0" in key:
        # No S3 object can have this key (Ceph also refuses NUL in keys): asking S3 for it would only be refused
        # (a 400, never healed).
        raise MalformedDelivery(f"{where}.s3.object.key is not a valid object key")
    etag = obj.get("eTag", obj.get("etag", obj.get("ETag", "")))
    size = obj.get("size")
    version_id = obj.get("versionId") or None
    event_id = raw.get("eventId") or obj.get("sequencer") or fallback_event_id
    return ObjectRecord(
        event_name=event_name.removeprefix("s3:"),
        bucket=bucket,
        key=key,
        etag=str(etag or "").strip('"'),
        version_id=str(version_id) if version_id is not None else None,
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        event_id=str(event_id),
    )


def _require_unicode(payload: Any) -> None:
    """JSON may escape half a surrogate pair (`\\ud800`): such a key or eTag cannot be sent to S3 or hashed."""
    try:
        json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise MalformedDelivery("notification holds a lone UTF-16 surrogate, which is not Unicode text") from None
    except RecursionError:
        raise MalformedDelivery("notification is nested too deeply") from None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedDelivery(f"{where} is missing")
    return value
