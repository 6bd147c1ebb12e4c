"""Records real Ceph bucket notifications into `tests/events/`: `python tests/record_events.py [OUT_DIR]`.

Boots a throwaway RGW, points an HTTP-push topic at a capture server, performs the uploads, copies and deletes
whose notifications the service must handle, and writes each request exactly as received (`ceph-*.http`). The
Ceph PUT body is also written wrapped as a Knative KafkaSource delivers it (`kafkasource-*.http`: binary
CloudEvent, no Content-Type, see the Knative dispatcher's header format), since Debian's radosgw has no Kafka
endpoint. Re-run it to refresh the replay set after a Ceph upgrade.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from local_rgw import LocalRGW

from service.tools.recordings import RecordingSink

OUT = Path(__file__).resolve().parent / "events"
BUCKET = "xray-data-in"
VERSIONED = "xray-versioned"
PUT_KEY = "data/chest_xray/demo/PNEUMONIA/demo_Anna Mcgehee_3677+1941-11-26 100%.jpeg"
MULTIPART_KEY = "data/chest_xray/demo/PNEUMONIA/big multipart_Ærø.jpg"
COPY_KEY = "data/chest_xray/demo/PNEUMONIA/copy of Anna.jpeg"
# A small valid JPEG body; replays upload their own image under the recorded key.
JPEG = bytes.fromhex(
    "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c140d0c0b0b0c1912130f141d1a1f1e1d"
    "1a1c1c20242e2720222c231c1c2837292c30313434341f27393d38323c2e333432ffc0000b080001000101011100ffc4001f000001050101"
    "0101010100000000000000000102030405060708090a0bffc400b5100002010303020403050504040000017d010203000411051221314106"
    "13516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a434445464748494a535455"
    "565758595a636465666768696a737475767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9ba"
    "c2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00fbd3ffd9"
)


def _next(sink: RecordingSink, captured: list[tuple[str, bytes]], description: str) -> bytes:
    """The delivery after those already captured, as raw bytes (a non-persistent push may arrive before we ask)."""
    recorded = sink.wait_for(len(captured) + 1, timeout_s=30)
    if len(recorded) <= len(captured):
        raise SystemExit(f"no notification arrived for: {description}")
    return recorded[len(captured)].read_bytes()


def kafkasource_wrap(ceph_request: bytes, offset: int) -> bytes:
    """The same body as a KafkaSource delivers a Ceph record from Kafka: binary CloudEvent, no Content-Type."""
    body = ceph_request.split(b"\n\n", 1)[1]
    record = json.loads(body)["Records"][0]
    timestamp = record["eventTime"][:23] + "Z"
    headers = [
        "POST / HTTP/1.1",
        "Host: xray.xray.svc.cluster.local",
        "ce-specversion: 1.0",
        f"ce-id: partition:0/offset:{offset}",
        "ce-source: /apis/v1/namespaces/xray/kafkasources/kafka-source#storage",
        "ce-type: dev.knative.kafka.event",
        f"ce-subject: partition:0#{offset}",
        f"ce-time: {timestamp}",
        "Prefer: reply",
        "Kn-Namespace: xray",
        f"Content-Length: {len(body)}",
    ]
    return ("\n".join(headers) + "\n\n").encode() + body


def record(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="record-rgw-") as workdir,
        RecordingSink(Path(workdir) / "raw") as sink,
        LocalRGW(Path(workdir) / "rgw") as rgw,
    ):
        endpoint = sink.url
        s3, sns = rgw.s3_client(), rgw.sns_client()
        topic = sns.create_topic(
            Name="record", Attributes={"push-endpoint": endpoint, "persistent": "false", "OpaqueData": "xray-opaque"}
        )["TopicArn"]
        for bucket in (BUCKET, VERSIONED):
            s3.create_bucket(Bucket=bucket)
            s3.put_bucket_notification_configuration(
                Bucket=bucket,
                NotificationConfiguration={"TopicConfigurations": [{
                    "Id": "all", "TopicArn": topic, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                }]},
            )
        s3.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})

        captured: list[tuple[str, bytes]] = []
        s3.put_object(Bucket=BUCKET, Key=PUT_KEY, Body=JPEG, Metadata={"patient": "demo", "study": "3677"})
        captured.append(("ceph-001-put-jpeg-hostile-key", _next(sink, captured, "put")))
        upload = s3.create_multipart_upload(Bucket=BUCKET, Key=MULTIPART_KEY)
        part_size = 5 * 1024 * 1024
        parts = []
        for number, chunk in enumerate([JPEG + b"\0" * part_size, b"\0" * 1024], start=1):
            etag = s3.upload_part(Bucket=BUCKET, Key=MULTIPART_KEY, UploadId=upload["UploadId"], PartNumber=number,
                                  Body=chunk)["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        s3.complete_multipart_upload(Bucket=BUCKET, Key=MULTIPART_KEY, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})
        captured.append(("ceph-002-multipart-complete", _next(sink, captured, "multipart")))
        s3.copy_object(Bucket=BUCKET, Key=COPY_KEY, CopySource={"Bucket": BUCKET, "Key": PUT_KEY})
        captured.append(("ceph-003-copy-object", _next(sink, captured, "copy")))
        s3.delete_object(Bucket=BUCKET, Key=COPY_KEY)
        captured.append(("ceph-004-delete-object", _next(sink, captured, "delete")))
        s3.put_object(Bucket=VERSIONED, Key="v/scan.jpeg", Body=JPEG)
        captured.append(("ceph-005-versioned-put", _next(sink, captured, "versioned put")))
        s3.delete_object(Bucket=VERSIONED, Key="v/scan.jpeg")
        captured.append(("ceph-006-versioned-delete-marker", _next(sink, captured, "delete marker")))
    for name, request in captured:
        (out / f"{name}.http").write_bytes(request)
    (out / "kafkasource-001-ceph-put.http").write_bytes(kafkasource_wrap(captured[0][1], offset=42))
    (out / "kafkasource-002-ceph-copy.http").write_bytes(kafkasource_wrap(captured[2][1], offset=43))
    print(f"wrote {len(captured) + 2} deliveries to {out}")


if __name__ == "__main__":
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
