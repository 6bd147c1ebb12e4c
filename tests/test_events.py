"""Event intake: every delivery shape and record dialect, and a clear error for everything unusable."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from conftest import ceph_record
from hypothesis import given
from hypothesis import strategies as st

from service.errors import MalformedDelivery
from service.events import BATCH_CONTENT_TYPE, Transport, parse_delivery
from service.outputs import MAX_KEY_BYTES

KEY = "data/demo/PNEUMONIA/demo_Anna Mcgehee_3677+x 100%.jpeg"


def notification(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def kafkasource_headers(offset: int = 42) -> dict[str, str]:
    """Exactly what a Knative KafkaSource sends for a Ceph record: binary mode, no Content-Type."""
    return {
        "ce-specversion": "1.0",
        "ce-id": f"partition:0/offset:{offset}",
        "ce-source": "/apis/v1/namespaces/xray/kafkasources/kafka-source#storage",
        "ce-type": "dev.knative.kafka.event",
        "ce-subject": f"partition:0#{offset}",
        "ce-time": "2026-11-23T15:34:54.342Z",
        "Prefer": "reply",
        "Kn-Namespace": "xray",
    }


#: What Go's url.QueryEscape leaves as it is (net/url: shouldEscape with encodeQueryComponent).
_GO_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-_.~")


def go_query_escape(text: str) -> str:
    """Go's `url.QueryEscape`, with which MinIO escapes the key in its notifications: unreserved characters stay,
    a space becomes '+', every other UTF-8 byte (`/`, `+` and `%` included) becomes %XX in upper case."""
    escaped = []
    for character in text:
        if character in _GO_UNRESERVED:
            escaped.append(character)
        elif character == " ":
            escaped.append("+")
        else:
            escaped.extend(f"%{byte:02X}" for byte in character.encode())
    return "".join(escaped)


def minio_notification(bucket: str, key: str, etag: str = "", size: int = 1) -> dict[str, Any]:
    """A webhook/Kafka body in MinIO's shape: top-level EventName and Key (`bucket/key`, unescaped) and one record
    whose key is escaped with Go's url.QueryEscape, as minio/minio's event package writes it."""
    record = {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": "2026-11-23T15:34:54.341Z",
        "eventName": "s3:ObjectCreated:Put",
        "userIdentity": {"principalId": "minioadmin"},
        "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-id-2": "dd9025bab4ad464b", "x-amz-request-id": "1803A3E5F6B2C4D1",
                             "x-minio-deployment-id": "0170a4cc-dca6-4e72-86f1-c0cc760dff7f",
                             "x-minio-origin-endpoint": "http://127.0.0.1:9000"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": go_query_escape(key), "size": size, "eTag": etag, "contentType": "image/jpeg",
                       "userMetadata": {"content-type": "image/jpeg"}, "sequencer": "1803A3E5F6C8D2E7"},
        },
        "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"},
    }
    return {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}", "Records": [record]}


def test_plain_ceph_push() -> None:
    body = json.dumps(notification(ceph_record("in", KEY, etag="abc"))).encode()
    delivery = parse_delivery({"Content-Type": "application/json"}, body)
    assert delivery.transport is Transport.PLAIN_PUSH
    [record] = delivery.records
    assert (record.bucket, record.key, record.etag, record.event_name) == ("in", KEY, "abc", "ObjectCreated:Put")
    assert record.is_object_created


def test_plain_push_without_content_type() -> None:
    delivery = parse_delivery({}, json.dumps(notification(ceph_record("in", KEY))).encode())
    assert delivery.transport is Transport.PLAIN_PUSH
    assert delivery.records[0].key == KEY


def test_kafkasource_binary_cloudevent_without_content_type() -> None:
    body = json.dumps(notification(ceph_record("in", KEY))).encode()
    delivery = parse_delivery(kafkasource_headers(), body)
    assert delivery.transport is Transport.CLOUDEVENT
    assert delivery.records[0].key == KEY
    # Ceph records carry their own eventId; the CloudEvent id is the fallback.
    assert delivery.records[0].event_id.startswith("test.")


def test_binary_cloudevent_built_with_the_sdk() -> None:
    data = notification(ceph_record("in", KEY, event_name="s3:ObjectCreated:Copy"))
    event = CloudEvent(attributes={"type": "com.amazonaws.ObjectCreated:Copy", "source": "ceph"}, data=data)
    message = to_binary_event(event)
    delivery = parse_delivery(message.headers, message.body)
    assert delivery.transport is Transport.CLOUDEVENT
    assert delivery.records[0].event_name == "ObjectCreated:Copy"


def test_structured_cloudevent_built_with_the_sdk() -> None:
    data = notification(ceph_record("in", KEY), ceph_record("in", KEY + "2", event_name="ObjectRemoved:Delete"))
    event = CloudEvent(attributes={"type": "dev.knative.kafka.event", "source": "/k", "id": "e1"}, data=data)
    message = to_structured_event(event)
    delivery = parse_delivery(message.headers, message.body)
    assert delivery.transport is Transport.CLOUDEVENT
    assert [r.is_object_created for r in delivery.records] == [True, False]


def test_structured_cloudevent_with_base64_data() -> None:
    data = json.dumps(notification(ceph_record("in", KEY))).encode()
    event = CloudEvent(
        attributes={"type": "t", "source": "/s", "id": "1", "datacontenttype": "application/octet-stream"},
        data=data,
    )
    message = to_structured_event(event)
    assert b"data_base64" in message.body
    assert parse_delivery(message.headers, message.body).records[0].key == KEY


def test_cloudevents_batch() -> None:
    events = [
        {"specversion": "1.0", "id": str(i), "source": "/s", "type": "t",
         "data": notification(ceph_record("in", f"k{i}"))}
        for i in range(3)
    ]
    delivery = parse_delivery({"content-type": BATCH_CONTENT_TYPE}, json.dumps(events).encode())
    assert [record.key for record in delivery.records] == ["k0", "k1", "k2"]
    assert delivery.transport is Transport.CLOUDEVENT


def test_every_record_of_a_multi_record_event() -> None:
    body = json.dumps(notification(*(ceph_record("in", f"key {i}") for i in range(5)))).encode()
    assert len(parse_delivery({}, body).records) == 5


@pytest.mark.parametrize(
    ("source", "wire_key", "expected"),
    [
        ("ceph:s3", "a b+c%20d/Ærø.jpg", "a b+c%20d/Ærø.jpg"),  # Ceph: raw, never decoded
        ("aws:s3", "a+b%2Bc%2520d/%C3%86r%C3%B8.jpg", "a b+c%20d/Ærø.jpg"),  # AWS: form-encoded
        ("minio:s3", "a+b%2Bc%2520d%2F%C3%86r%C3%B8.jpg", "a b+c%20d/Ærø.jpg"),  # MinIO: Go's url.QueryEscape
    ],
)
def test_key_encoding_per_producer(source: str, wire_key: str, expected: str) -> None:
    body = json.dumps(notification(ceph_record("in", wire_key, source=source))).encode()
    assert parse_delivery({}, body).records[0].key == expected


def test_minio_shape_and_prefixed_event_names() -> None:
    body = minio_notification("in", "x y.jpg", etag='"quoted"')
    [parsed] = parse_delivery({}, json.dumps(body).encode()).records
    assert (parsed.key, parsed.event_name, parsed.etag) == ("x y.jpg", "ObjectCreated:Put", "quoted")


def test_go_query_escape_matches_gos_own_test_cases() -> None:
    # queryEscapeTests in Go's net/url/url_test.go: the escaped forms below are what Go itself writes.
    assert go_query_escape("") == ""
    assert go_query_escape("abc") == "abc"
    assert go_query_escape("one two") == "one+two"
    assert go_query_escape("10%") == "10%25"
    assert go_query_escape(" ?&=#+%!<>#\"{}|\\^[]`☺\t:/@$'()*,;") == (
        "+%3F%26%3D%23%2B%25%21%3C%3E%23%22%7B%7D%7C%5C%5E%5B%5D%60%E2%98%BA%09%3A%2F%40%24%27%28%29%2A%2C%3B"
    )


@pytest.mark.parametrize(
    ("key", "wire_key"),
    [
        ("ward 3/Anna Mcgehee.jpeg", "ward+3%2FAnna+Mcgehee.jpeg"),  # spaces and a folder
        ("ward 3/Anna Mcgehee+1.jpeg", "ward+3%2FAnna+Mcgehee%2B1.jpeg"),  # a literal '+' is not a space
        ("scans/100% done %20.jpg", "scans%2F100%25+done+%2520.jpg"),  # '%' and a literal "%20" stay as written
        ("Jürgen Groß/Ærø 1949-12-31.png", "J%C3%BCrgen+Gro%C3%9F%2F%C3%86r%C3%B8+1949-12-31.png"),  # UTF-8
        ("a~b_c-d.e", "a~b_c-d.e"),  # unreserved: unescaped
    ],
)
def test_minio_keys_are_decoded_as_minio_escapes_them(key: str, wire_key: str) -> None:
    body = minio_notification("in", key)
    assert body["Records"][0]["s3"]["object"]["key"] == wire_key
    for headers in ({}, kafkasource_headers()):  # pushed by a webhook, or through Kafka and a KafkaSource
        [record] = parse_delivery(headers, json.dumps(body).encode()).records
        assert record.key == key


def _valid_object_key(key: str) -> bool:
    # What any S3 store accepts as a key (and the service too): 1 to 1024 UTF-8 bytes, no NUL.
    return 0 < len(key.encode()) <= MAX_KEY_BYTES and "\0" not in key


@given(key=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=300).filter(_valid_object_key))
def test_any_minio_key_round_trips(key: str) -> None:
    [record] = parse_delivery({}, json.dumps(minio_notification("in", key)).encode()).records
    assert record.key == key


def test_aws_test_event_is_a_valid_delivery_without_records() -> None:
    body = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-01-01T00:00:00Z", "Bucket": "in"}
    delivery = parse_delivery({}, json.dumps(body).encode())
    assert (delivery.records, delivery.note) == ([], "test-event")


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({}, b"", "empty request body"),
        ({}, b"not json {", "not valid JSON"),
        ({}, b"\xff\xfe", "not valid JSON"),
        ({}, b"[1, 2]", "must be a JSON object"),
        ({}, b'{"hello": "world"}', "no Records"),
        ({}, b'{"Records": []}', "non-empty list"),
        ({}, b'{"Records": [{"s3": {}}]}', "Records[0].eventName is missing"),
        ({}, b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "k"}}}]}',
         "Records[0].s3.bucket is missing"),
        ({}, b'{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {}}}]}',
         "Records[0].s3.object.key is missing"),
        ({"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s"}, b'{"Records": []}', "ce-id header is missing"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s"}, b'{"Records": []}', "invalid CloudEvent"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "/s"}, b"\x00binary", "not valid JSON"),
        ({"content-type": "application/cloudevents+json"}, b'{"id": "1"}', "invalid CloudEvent"),
        ({"content-type": "application/cloudevents+json"}, b'{"type": "t", "source": "/s"}', "id attribute is missing"),
        ({"content-type": "application/cloudevents+json"}, b"nope", "not valid JSON"),
        ({"content-type": BATCH_CONTENT_TYPE}, b"{}", "non-empty JSON array"),
        ({"content-type": BATCH_CONTENT_TYPE}, b"[1]", "batch item 0 is not a JSON object"),
    ],
)
def test_malformed_deliveries_name_the_problem(headers: dict[str, str], body: bytes, message: str) -> None:
    with pytest.raises(MalformedDelivery) as raised:
        parse_delivery(headers, body)
    assert message in raised.value.message
    assert raised.value.status_code == 400
