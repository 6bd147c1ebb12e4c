"""Hostile input: arbitrary requests on `POST /`, and bad objects through the real RGW and the real pipeline.

Whatever arrives, the answer is the documented one (docs/operations.md, Status codes): never a 5xx for something a
retry cannot change, a JSON error for every 4xx, and every object either processed or left as a failure record,
in bounded time and memory.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from conftest import (
    HOSTILE_KEYS,
    TEST_PSEUDONYM_KEY,
    ceph_record,
    encode,
    key_fragments,
    leaks,
    png_header_only,
    upload,
    xray_like,
)
from dicom_factory import Patient, make_dicom, make_no_pixels, new_study, phi_values
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import MPEG2MPML, JPEGBaseline8Bit
from test_events import kafkasource_headers

from service.events import BATCH_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE
from service.outputs import failure_key, processed_key, pseudonym
from service.pipeline import Pipeline
from service.storage import ObjectStore, make_s3_client

pytestmark = pytest.mark.rgw

#: The session `client` answers 413 above this (conftest).
REQUEST_LIMIT = 64 * 1024
#: A hang guard per delivery, not a performance target.
DELIVERY_SECONDS = 20
#: What a worker may grow by while refusing an image by its header; decoding the images that test it would
#: take from 105 MB (10500 x 10000) to 400 MB (20000 x 20000).
REFUSAL_GROWTH_BYTES = 64 * 1024 * 1024
SECRET = TEST_PSEUDONYM_KEY.encode()
PLAIN_PUSH = {"Content-Type": "application/json"}


def notification(*records: dict[str, Any]) -> bytes:
    return json.dumps({"Records": list(records)}).encode()


# ------------------------------------------------------------------------------ arbitrary requests on POST /


KNOWN = "hostile-known"


@pytest.fixture(scope="module")
def known_bucket(s3: Any) -> str:
    """KNOWN, an input bucket (with its output buckets) holding an image, a non-image and a hostile key."""
    for bucket in (KNOWN, f"{KNOWN}-processed", f"{KNOWN}-anonymized"):
        s3.create_bucket(Bucket=bucket)
    upload(s3, KNOWN, "ok.jpg", encode(xray_like(220)))
    upload(s3, KNOWN, "bad.jpg", b"not an image at all")
    upload(s3, KNOWN, HOSTILE_KEYS[0], encode(xray_like(40)))
    return KNOWN


_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
_HEADER_VALUES = st.one_of(
    st.sampled_from(
        ["1.0", "0.3", "", " ", "2026-11-23T15:34:54.342Z", "not-a-time", "99999-01-01T00:00:00Z", "0000-00-00",
         "%", "%zz", "%ff%fe", "%00", "%E2%82", "partition:0/offset:42", "com.amazonaws.ObjectCreated:Put"]
    ),
    _HEADER_TEXT,
)
_CE_HEADER_NAMES = [
    "ce-specversion", "ce-id", "ce-source", "ce-type", "ce-subject", "ce-time", "ce-datacontenttype",
    "ce-dataschema", "ce-partitionkey", "ce-key", "ce-kafkaheadercontenttype", "ce-",
]
_CONTENT_TYPES = st.one_of(
    st.sampled_from(
        ["application/json", STRUCTURED_CONTENT_TYPE, BATCH_CONTENT_TYPE, "APPLICATION/CloudEvents+JSON; charset=utf-8",
         f" {BATCH_CONTENT_TYPE} ;x=y", "text/plain", "application/octet-stream", "multipart/form-data; boundary=x",
         "", ";;;", "application/cloudevents", "application/json; charset=latin-1"]
    ),
    _HEADER_TEXT,
)
_OTHER_HEADER_NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True).filter(
    lambda name: name not in {"content-length", "transfer-encoding", "host", "content-type"}
)


@st.composite
def header_sets(draw: st.DrawFn) -> dict[str, str]:
    """Plain pushes, KafkaSource-like binary CloudEvents with attributes missing or wrong, and junk."""
    headers: dict[str, str] = {}
    style = draw(st.sampled_from(["none", "kafkasource", "ce-junk"]))
    if style == "kafkasource":
        headers |= kafkasource_headers(draw(st.integers(0, 2**63)))
        for name in draw(st.lists(st.sampled_from(sorted(headers)), max_size=3, unique=True)):
            del headers[name]
    if style != "none":
        headers |= draw(st.dictionaries(st.sampled_from(_CE_HEADER_NAMES), _HEADER_VALUES, max_size=6))
    if draw(st.booleans()):
        headers["content-type"] = draw(_CONTENT_TYPES)
    headers |= draw(st.dictionaries(_OTHER_HEADER_NAMES, _HEADER_VALUES, max_size=2))
    return headers


_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**64, -(2**63) - 1, 10**300, 10**4000]),
    st.floats(),
    st.text(max_size=20),
)


def _json_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function, not a lambda: Hypothesis checks that `extend` uses its argument by reading its source,
    # which for a lambda inside a call is fragile.
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)


_JSON_VALUES = st.recursive(_JSON_LEAVES, _json_containers, max_leaves=12)


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy[Any], *others: st.SearchStrategy[Any]) -> Any:
    """`usual` more often than all `others` together: most records get past intake and reach S3."""
    choice = draw(st.integers(0, 7 + len(others)))
    return draw(usual if choice < 8 else others[choice - 8])


_BUCKETS = (
    st.just(KNOWN),  # its objects, and missing keys in it
    st.just(f"{KNOWN}-processed"),  # an output bucket: skipped
    st.from_regex(r"[a-z0-9][a-z0-9.-]{1,40}[a-z0-9]", fullmatch=True),  # valid names of missing buckets
    st.sampled_from(["ab", "UPPER_case.bucket", "a" * 63, "..", "-", "x" * 256, "a/b", "a b", "ü-bucket", ""]),
    st.text(max_size=64),
)
_KEYS = (
    st.sampled_from(["ok.jpg", "bad.jpg", HOSTILE_KEYS[0]]),  # they exist in KNOWN
    st.text(min_size=1, max_size=60),
    st.sampled_from(
        [*HOSTILE_KEYS[1:], "%", "+", "%2B%20x", "a%zz", "%00", "a\x00b", "\ud800", "x\udfff.jpg", "x" * 1100,
         "é" * 600, "../../etc/passwd", "/", " ", "ok.jpg?versionId=1", ""]
    ),
    st.text(max_size=80),
)
_EVENT_NAMES = (
    st.just("ObjectCreated:Put"),
    st.sampled_from(
        ["s3:ObjectCreated:Put", "ObjectCreated:CompleteMultipartUpload", "ObjectCreated:Copy", "ObjectRemoved:Delete",
         "s3:TestEvent", ""]
    ),
    st.text(max_size=30),
)
_ETAGS = (st.just(""), st.text(max_size=40), st.sampled_from(['"quoted"', "\ud800"]))
#: Where a record's fields may be dropped or replaced by any JSON value.
_RECORD_PATHS = [
    ("eventName",), ("eventSource",), ("eventId",), ("s3",), ("s3", "bucket"), ("s3", "bucket", "name"),
    ("s3", "object"), ("s3", "object", "key"), ("s3", "object", "eTag"), ("s3", "object", "size"),
    ("s3", "object", "versionId"), ("s3", "object", "sequencer"),
]


def _damaged(draw: st.DrawFn, document: dict[str, Any], paths: list[tuple[str, ...]]) -> dict[str, Any]:
    """One time in six, one to three of `paths` dropped or replaced by any JSON value (in place)."""
    if draw(st.integers(0, 5)):
        return document
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True)):
        parent: Any = document
        for name in path[:-1]:
            parent = parent.get(name) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            if draw(st.booleans()):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(_JSON_VALUES)
    return document


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    """A Ceph/AWS/MinIO record naming any bucket and key, sometimes damaged: fields missing, wrong types, junk."""
    record = ceph_record(
        _mostly(draw, *_BUCKETS),
        _mostly(draw, *_KEYS),
        etag=_mostly(draw, *_ETAGS),
        event_name=_mostly(draw, *_EVENT_NAMES),
        size=draw(st.one_of(st.integers(), st.just(10**40))),
        source=draw(st.sampled_from(["ceph:s3", "ceph:s3", "aws:s3", "minio:s3", "", "gcs"])),
    )
    record["eventId"] = draw(st.text(max_size=20))  # not ceph_record's random one: examples must replay
    return _damaged(draw, record, _RECORD_PATHS)


_NOTIFICATIONS = st.one_of(
    st.lists(records(), min_size=1, max_size=3).map(lambda items: {"Records": items}),
    st.lists(records(), min_size=1, max_size=3).map(lambda items: {"Records": items}),
    records(),  # one bare record, as some producers put in a CloudEvent's data
    st.just({"Service": "Amazon S3", "Event": "s3:TestEvent"}),
    st.builds(lambda items, key: {"EventName": "s3:ObjectCreated:Put", "Key": key, "Records": items},
              st.lists(records(), min_size=1, max_size=2), st.text(max_size=20)),
    st.dictionaries(st.sampled_from(["Records", "Event", "s3", "EventName"]), _JSON_VALUES, max_size=3),
)
_ATTRIBUTE_VALUES = st.one_of(
    st.sampled_from(["1.0", "0.3", "2.0", "", "2026-11-23T15:34:54Z", "yesterday", "application/json", "text/plain",
                     "application/xml"]),
    _JSON_VALUES,
)


@st.composite
def structured_events(draw: st.DrawFn) -> dict[str, Any]:
    """A structured-mode CloudEvent carrying a notification, sometimes with attributes missing or wrong."""
    event = {
        "specversion": "1.0",
        "id": draw(st.text(min_size=1, max_size=12)),
        "source": "/apis/v1/namespaces/xray/kafkasources/kafka-source#storage",
        "type": "dev.knative.kafka.event",
        "data": draw(_NOTIFICATIONS),
    }
    if draw(st.integers(0, 7)) == 0:
        event["data_base64"] = _base64(json.dumps(event.pop("data")))
    names = ["specversion", "id", "source", "type", "time", "datacontenttype", "subject", "data", "data_base64"]
    return _damaged(draw, event, [(name,) for name in names])


def _base64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _json_bytes(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii=False writes a lone surrogate as the (invalid UTF-8) bytes of one.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


_JSON_BODIES = st.one_of(_JSON_VALUES, _NOTIFICATIONS, structured_events(), st.lists(structured_events(), max_size=3))
_BODIES = st.one_of(
    st.binary(max_size=300),
    st.builds(_json_bytes, _JSON_BODIES, st.booleans()),
    # Nested past any recursion limit, and numbers past Python's 4300-digit conversion limit.
    st.integers(1, 30_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 5_000).map(lambda depth: b'{"Records":' * depth + b"1" + b"}" * depth),
    st.just(b'{"Records": [{"s3": {"object": {"size": 1' + b"0" * 5000 + b"}}}]}"),
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[str, dict[str, str], bytes]:
    """(how it was built, headers, body): deliveries as each sender makes them, bodies mostly near-valid; and
    arbitrary headers with arbitrary bodies."""
    sender = draw(st.sampled_from(["plain-push", "kafkasource", "structured", "batch", "anything"]))
    ascii_only = draw(st.integers(0, 7)) > 0
    if sender == "plain-push":
        headers = draw(st.sampled_from([{}, {"content-type": "application/json"}, {"content-type": "text/plain"}]))
        body = _json_bytes(draw(_NOTIFICATIONS), ascii_only)
    elif sender == "kafkasource":
        headers = kafkasource_headers(draw(st.integers(0, 2**63)))
        if draw(st.integers(0, 3)) == 0:
            for name in draw(st.lists(st.sampled_from(sorted(headers)), max_size=3, unique=True)):
                del headers[name]
            headers |= draw(st.dictionaries(st.sampled_from(_CE_HEADER_NAMES), _HEADER_VALUES, max_size=4))
        body = _json_bytes(draw(_NOTIFICATIONS), ascii_only)
    elif sender == "structured":
        headers = {"content-type": draw(st.sampled_from([STRUCTURED_CONTENT_TYPE, f"{STRUCTURED_CONTENT_TYPE}; x=y"]))}
        body = _json_bytes(draw(structured_events()), ascii_only)
    elif sender == "batch":
        headers = {"content-type": BATCH_CONTENT_TYPE}
        body = _json_bytes(draw(st.lists(structured_events(), max_size=3)), ascii_only)
    else:
        headers, body = draw(header_sets()), draw(_BODIES)
    return sender, headers | draw(st.dictionaries(_OTHER_HEADER_NAMES, _HEADER_VALUES, max_size=2)), body


def _is_cloudevent(headers: dict[str, str]) -> bool:
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type in (STRUCTURED_CONTENT_TYPE, BATCH_CONTENT_TYPE) or any(
        name.startswith("ce-") for name in headers
    )


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(delivery=deliveries())
def test_any_request_gets_a_documented_answer(
    client: TestClient, known_bucket: str, delivery: tuple[str, dict[str, str], bytes]
) -> None:
    """Never a 5xx (no record names an object whose fetch could fail transiently), 4xx errors in JSON."""
    sender, headers, body = delivery
    raw_headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    response = client.post("/", content=body, headers=raw_headers)
    assert response.status_code in (200, 400, 413, 422), (response.status_code, response.text)
    answer = response.json()
    assert isinstance(answer, dict)
    # What the examples reached (pytest --hypothesis-show-statistics): every answer, every record outcome.
    event(f"{sender}: {response.status_code} {answer.get('error', '')}".strip())
    for record in answer.get("records", []):
        event(f"record {record.get('outcome')} {record.get('reason', '')}".strip())
    assert (response.status_code == 413) == (len(body) > REQUEST_LIMIT)
    if response.status_code == 413:
        assert answer["error"] == "request-too-large"
        return
    if response.status_code == 400:
        assert answer["error"] == "malformed" and isinstance(answer["detail"], str)
        return
    assert isinstance(answer["records"], list)
    outcomes = {record["outcome"] for record in answer["records"]}
    assert outcomes <= {"processed", "skipped", "failed"}
    if response.status_code == 422:
        # Only a CloudEvent sender gets 422; Ceph's plain push retries every non-2xx forever.
        assert _is_cloudevent(headers) and "failed" in outcomes and answer["error"] == "unprocessable"
    else:
        assert "failed" not in outcomes or not _is_cloudevent(headers)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 30_000 + b"]" * 30_000,
        notification(ceph_record(KNOWN, "a\ud800.jpg")),
        notification(ceph_record(KNOWN, "ok.jpg", etag="\udfff")),
        notification(ceph_record(KNOWN, "x" * 1025)),
        notification(ceph_record(KNOWN, "a%00b", source="minio:s3")),
        notification(ceph_record("a/b", "ok.jpg")),
        notification(ceph_record("x" * 256, "ok.jpg")),
    ],
    ids=["deep-nesting", "lone-surrogate-key", "lone-surrogate-etag", "key-over-1024-bytes", "nul-in-key",
         "slash-in-bucket", "bucket-over-255"],
)
@pytest.mark.parametrize("transport", ["plain-push", "kafkasource"])
def test_requests_no_s3_object_can_answer_are_malformed(
    client: TestClient, known_bucket: str, body: bytes, transport: str
) -> None:
    """Regressions: these were 500 (RecursionError, UnicodeEncodeError) or 503 (S3 refusing the name, forever)."""
    headers = PLAIN_PUSH if transport == "plain-push" else kafkasource_headers()
    response = client.post("/", content=body, headers=headers)
    assert (response.status_code, response.json()["error"]) == (400, "malformed"), response.text


@pytest.mark.parametrize("transport", ["plain-push", "kafkasource"])
def test_missing_input_bucket_is_a_permanent_failure(client: TestClient, transport: str) -> None:
    """Regression: an event about a bucket that does not exist (deleted with events still queued) was answered
    503 for ever, because its failure record had no processed bucket to go to."""
    headers = PLAIN_PUSH if transport == "plain-push" else kafkasource_headers()
    response = client.post("/", content=notification(ceph_record("no-such-bucket-here", "a.jpg", etag="e")),
                           headers=headers)
    assert response.status_code == (200 if transport == "plain-push" else 422), response.text
    [summary] = response.json()["records"]
    assert (summary["outcome"], summary["reason"]) == ("failed", "missing-bucket")


def test_key_whose_processed_key_is_too_long_for_s3(client: TestClient, known_bucket: str) -> None:
    # A valid key (1024 bytes) whose processed key (+10 bytes) no S3 accepts: permanent, never a 503 for ever.
    key = "k" * 1020 + ".jpg"
    response = client.post("/", content=notification(ceph_record(KNOWN, key, etag="e")), headers=PLAIN_PUSH)
    assert response.status_code == 200, response.text
    [summary] = response.json()["records"]
    assert (summary["outcome"], summary["reason"]) == ("failed", "key-too-long")
    as_cloudevent = client.post("/", content=notification(ceph_record(KNOWN, key, etag="e")),
                                headers=kafkasource_headers())
    assert as_cloudevent.status_code == 422


# ------------------------------------------------------------------------------------------- request size


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        # No Content-Length: httpx sends a generator chunked; the limit is counted while reading.
        (lambda: (b" " * 8192 for _ in range(10)), {}),
        # A Content-Length that lies about a longer body.
        (lambda: b" " * (REQUEST_LIMIT + 1), {"content-length": "10"}),
    ],
    ids=["chunked", "understated-content-length"],
)
def test_oversized_body_without_a_true_length_gets_413(
    client: TestClient, content: Callable[[], Any], headers: dict[str, str]
) -> None:
    # test_app covers a body whose Content-Length says it is too large.
    response = client.post("/", content=content(), headers=headers)
    assert response.status_code == 413 and response.json()["error"] == "request-too-large"
    if not headers:
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"


# ----------------------------------------------------------------------------------- bad objects via the RGW


def _pil_bytes(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _huge_bilevel_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of that size: a few tens of kB, built row block by row block."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    rows = bytes(1 + (width + 7) // 8) * 1000  # filter byte + packed bits, all black
    parts = [compressor.compress(rows) for _ in range(height // 1000)]
    parts += [compressor.compress(rows[: (height % 1000) * (1 + (width + 7) // 8)]), compressor.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


#: Stored rows x columns of the images to be processed; bright, so the tiny model calls them positive and both
#: outputs are written.
_SHAPE = (300, 480)


def _marked_gray() -> np.ndarray:
    """A bright X-ray-like image with a black block in its stored top-left corner, to tell orientations apart."""
    pixels = xray_like(220, size=_SHAPE)
    pixels[:90, :140] = 0
    return pixels


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _pil_bytes(Image.fromarray(_marked_gray()), "JPEG", exif=exif, quality=95)


def _frames() -> list[Image.Image]:
    return [Image.fromarray(xray_like(220, size=_SHAPE)), Image.fromarray(xray_like(60, size=_SHAPE))]


def _expect_upright(orientation: int) -> Callable[[np.ndarray], None]:
    rotation = {6: cv2.ROTATE_90_CLOCKWISE, 8: cv2.ROTATE_90_COUNTERCLOCKWISE}[orientation]

    def check(stamped: np.ndarray) -> None:
        stored = _marked_gray()
        assert stamped.shape[:2] == (_SHAPE[1], _SHAPE[0]), "not turned upright"
        candidates = {
            name: cv2.rotate(stored, code)
            for name, code in (("expected", rotation), ("other-way", cv2.ROTATE_90_COUNTERCLOCKWISE
                                                         if orientation == 6 else cv2.ROTATE_90_CLOCKWISE))
        } | {"transposed": stored.T, "anti-transposed": cv2.rotate(stored, cv2.ROTATE_180).T}
        distances = {name: float(np.abs(stamped.astype(float) - pixels).mean()) for name, pixels in candidates.items()}
        assert min(distances, key=distances.__getitem__) == "expected", distances

    return check


def _expect(shape: tuple[int, ...], dtype: np.dtype[Any]) -> Callable[[np.ndarray], None]:
    def check(output: np.ndarray) -> None:
        assert (output.shape, output.dtype) == (shape, dtype)

    return check


@dataclass(frozen=True)
class BadObject:
    id: str
    make: Callable[[], bytes]
    extension: str
    #: The failure reason, or None when the object must be processed.
    reason: str | None
    #: For processed objects: checks both decoded outputs.
    check: Callable[[np.ndarray], None] | None = None
    #: Whether the worker's peak memory is measured (images refused by their header).
    measure_memory: bool = False


def _truncated_jpeg() -> bytes:
    data = encode(xray_like(220, size=_SHAPE))
    return data[: len(data) // 2]


def _rewritten_dicom(change: Callable[[pydicom.Dataset], None], **options: Any) -> bytes:
    """A DICOM object from the factory with one thing made wrong (its header then lies about its pixels)."""
    dataset = pydicom.dcmread(io.BytesIO(make_dicom(rows=64, columns=64, patient=DICOM_PATIENT, study=DICOM_STUDY,
                                                    **options)))
    change(dataset)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that the pixel data no longer matches: that is the point
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _mpeg2(dataset: pydicom.Dataset) -> None:
    dataset.file_meta.TransferSyntaxUID = MPEG2MPML


def _declared_40000_square(dataset: pydicom.Dataset) -> None:
    dataset.Rows = dataset.Columns = 40_000


DICOM_PATIENT, DICOM_STUDY = Patient(), new_study()
BAD_OBJECTS = [
    BadObject("zero-bytes", lambda: b"", ".jpg", "not-an-image"),
    BadObject("truncated-jpeg", _truncated_jpeg, ".jpg", "corrupt-image"),
    BadObject("text-named-jpg", lambda: b"Patient: Anna Mcgehee\nDOB 1941-11-26\n" * 20, ".jpg", "not-an-image"),
    BadObject("png-bomb-header", lambda: png_header_only(100_000, 100_000), ".png", "too-many-pixels",
              measure_memory=True),
    BadObject("png-20000x20000", lambda: _huge_bilevel_png(20_000, 20_000), ".png", "too-many-pixels",
              measure_memory=True),
    # Over MAX_IMAGE_PIXELS (100 MP) but under Pillow's own bomb limit: refused by the service's check alone.
    BadObject("png-10500x10000", lambda: _huge_bilevel_png(10_500, 10_000), ".png", "too-many-pixels",
              measure_memory=True),
    BadObject("animated-gif-named-jpg", lambda: _pil_bytes(_frames()[0], "GIF", save_all=True,
                                                           append_images=_frames()[1:]), ".jpg",
              "unsupported-format"),
    BadObject("animated-png", lambda: _pil_bytes(_frames()[0], "PNG", save_all=True, append_images=_frames()[1:]),
              ".png", "animated-image"),
    BadObject("png-16-bit", lambda: encode(xray_like(220, size=_SHAPE).astype(np.uint16) * 257, ".png"), ".png",
              None, _expect(_SHAPE, np.dtype(np.uint16))),
    BadObject("jpeg-cmyk", lambda: _pil_bytes(Image.fromarray(xray_like(220, size=_SHAPE)).convert("CMYK"), "JPEG"),
              ".jpg", None, _expect((*_SHAPE, 3), np.dtype(np.uint8))),
    BadObject("jpeg-progressive", lambda: _pil_bytes(Image.fromarray(xray_like(220, size=_SHAPE)), "JPEG",
                                                     progressive=True), ".jpeg", None,
              _expect(_SHAPE, np.dtype(np.uint8))),
    BadObject("jpeg-exif-orientation-6", lambda: _exif_jpeg(6), ".jpg", None, _expect_upright(6)),
    BadObject("jpeg-exif-orientation-8", lambda: _exif_jpeg(8), ".jpg", None, _expect_upright(8)),
    # DICOM: every header below is full of the factory's patient data, which no answer or record may hold.
    BadObject("dicom-report-without-pixels", lambda: make_no_pixels("SR", patient=DICOM_PATIENT, study=DICOM_STUDY),
              ".dcm", "no-pixel-data"),
    BadObject("dicom-truncated", lambda: make_dicom(patient=DICOM_PATIENT, study=DICOM_STUDY)[:-4000], ".dcm",
              "corrupt-dicom"),
    BadObject("dicom-truncated-in-header", lambda: make_dicom(patient=DICOM_PATIENT, study=DICOM_STUDY)[:700], "",
              "corrupt-dicom"),
    BadObject("dicom-mpeg2", lambda: _rewritten_dicom(_mpeg2, bits_stored=8, transfer_syntax=JPEGBaseline8Bit), "",
              "unsupported-dicom"),
    BadObject("dicom-declared-40000x40000", lambda: _rewritten_dicom(_declared_40000_square), ".dcm",
              "too-many-pixels", measure_memory=True),
]
#: Patient-like keys, one per case and transport: none of their pieces may appear in an answer or a record.
_PATIENTS = iter(
    f"ward {ward}/{first} {last}_{1930 + ward}-0{1 + ward % 9}-1{ward % 10}"
    for ward, (first, last) in enumerate(
        [(first, last) for first in ("Ingrid", "Tomasz", "Océane", "Björn", "Xiomara", "Kwabena", "Radhika")
         for last in ("Mølnar", "Quispe", "Vukovic", "Zappacosta", "Okonkwo", "Haddad")]
    )
)
_KEYS_BY_CASE = {
    (case.id, transport): next(_PATIENTS) + case.extension
    for case in BAD_OBJECTS
    for transport in ("plain-push", "kafkasource")
}


class WorkerMemory:
    """Peak resident memory of the inference workers over a block, from /proc (VmHWM, reset first)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.growth = 0

    @staticmethod
    def _status(pid: int, field: str) -> int:
        with open(f"/proc/{pid}/status") as status:
            line = next(line for line in status if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def __enter__(self) -> WorkerMemory:
        for pid in self.pids:
            # Writing 5 resets the peak to the current size (Linux >= 4.0): the peak of this block alone.
            with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        self.before = {pid: self._status(pid, "VmRSS") for pid in self.pids}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.growth = max(self._status(pid, "VmHWM") - self.before[pid] for pid in self.pids)


def bounded_time(call: Callable[[], Any]) -> Any:
    started = time.monotonic()
    result = call()
    assert time.monotonic() - started < DELIVERY_SECONDS, "the delivery took too long"
    return result


@pytest.mark.parametrize("transport", ["plain-push", "kafkasource"])
@pytest.mark.parametrize("case", BAD_OBJECTS, ids=[case.id for case in BAD_OBJECTS])
def test_bad_object_ends_processed_or_as_a_failure_record(
    client: TestClient, s3: Any, input_bucket: str, case: BadObject, transport: str
) -> None:
    key = _KEYS_BY_CASE[case.id, transport]
    data = case.make()
    etag = upload(s3, input_bucket, key, data)
    body = notification(ceph_record(input_bucket, key, etag=etag, size=len(data)))
    headers = PLAIN_PUSH if transport == "plain-push" else kafkasource_headers()
    alias = pseudonym(SECRET, input_bucket, key)
    processed_bucket = f"{input_bucket}-processed"

    if case.measure_memory:
        with WorkerMemory(client.app.state.engine.worker_pids()) as memory:  # type: ignore[attr-defined]
            response = bounded_time(lambda: client.post("/", content=body, headers=headers))
        assert memory.growth < REFUSAL_GROWTH_BYTES, f"a worker grew by {memory.growth / 2**20:.0f} MiB"
    else:
        response = bounded_time(lambda: client.post("/", content=body, headers=headers))

    fragments = key_fragments(key)
    for fragment in fragments:
        assert not leaks(fragment, response.text)
    [summary] = response.json()["records"]
    if case.reason is not None:
        assert response.status_code == (200 if transport == "plain-push" else 422), response.text
        assert summary == {"outcome": "failed", "reason": case.reason, "pseudonym": alias}
        stored = s3.get_object(Bucket=processed_bucket, Key=failure_key(alias))["Body"].read().decode()
        record = json.loads(stored)
        assert (record["reason"], record["pseudonym"], record["source_etag"]) == (case.reason, alias, etag)
        for fragment in fragments:
            assert fragment not in stored
        assert not [value for value in phi_values(DICOM_PATIENT, study=DICOM_STUDY)
                    if value in stored or value in response.text]
        assert "Contents" not in s3.list_objects_v2(Bucket=f"{input_bucket}-anonymized")
        return

    assert response.status_code == 200, response.text
    assert (summary["outcome"], summary["label"]) == ("processed", "Pneumonia")
    stamped = s3.get_object(Bucket=processed_bucket, Key=processed_key(key))["Body"].read()
    anonymized = s3.get_object(Bucket=summary["anonymized_bucket"], Key=summary["anonymized_key"])["Body"].read()
    assert case.check is not None
    for output in (stamped, anonymized):
        case.check(cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_UNCHANGED))


def test_object_over_max_image_bytes_is_refused_unread(
    client: TestClient, s3: Any, input_bucket: str, make_settings: Callable[..., Any]
) -> None:
    """MAX_IMAGE_BYTES is checked on S3's Content-Length, before the body is read. The session app is given a
    pipeline with a 1 MiB limit for this test (same RGW, same worker), so no 64 MiB object is needed."""
    key = "ward 40/Hyacinth Oyelaran_1961-02-03.png"
    data = encode(np.random.default_rng(0).integers(0, 256, (1200, 1200), np.uint8), ".png")  # incompressible
    assert len(data) > 1024 * 1024
    etag = upload(s3, input_bucket, key, data)
    app_state = client.app.state  # type: ignore[attr-defined]
    settings = make_settings(max_image_bytes=1024 * 1024)
    limited = Pipeline(settings, ObjectStore(make_s3_client(settings)), app_state.engine, app_state.engine.spec)
    usual, app_state.pipeline = app_state.pipeline, limited
    try:
        responses = [
            bounded_time(lambda headers=headers: client.post(
                "/", content=notification(ceph_record(input_bucket, key, etag=etag)), headers=headers))
            for headers in (PLAIN_PUSH, kafkasource_headers())
        ]
    finally:
        app_state.pipeline = usual
    assert [response.status_code for response in responses] == [200, 422]
    alias = pseudonym(SECRET, input_bucket, key)
    for response in responses:
        assert response.json()["records"] == [{"outcome": "failed", "reason": "too-large", "pseudonym": alias}]
    record = json.loads(s3.get_object(Bucket=f"{input_bucket}-processed", Key=failure_key(alias))["Body"].read())
    # The message of the check made on S3's Content-Length, before reading (not of the one after a read).
    assert record["reason"] == "too-large" and record["message"].startswith(f"object is {len(data)} bytes")
