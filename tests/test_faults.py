"""Faults, with real processes: `xray-pipeline serve` as a subprocess, against a Ceph RGW of this module's own
(its gateway is stopped and frozen here, which the session's RGW shared by other tests must never see).

The gateway stopped or stalled under a burst, an object deleted between its notification and its fetch, and
SIGTERM during a burst. Redeliveries are made the way the senders make them: Knative's KafkaSource retries 5xx,
404, 408, 409, 429 and answers that never came; Ceph's persistent push retries every non-2xx.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
import pytest
import yaml
from botocore.exceptions import ClientError
from conftest import (
    ROOT,
    TEST_PSEUDONYM_KEY,
    ceph_record,
    encode,
    free_port,
    serve_process,
    upload,
    wait_until,
    xray_like,
)
from local_rgw import LocalRGW
from test_events import kafkasource_headers
from test_knative import (
    BOTOCORE_MAX_BACKOFF_S,
    BOTOCORE_RETRY_AFTER_EXTRA_S,
    INFERENCE_ALLOWANCE_S,
    S3_CALLS_PER_EVENT,
    setting_names,
)

from service.outputs import anonymized_key, failure_key, processed_key, pseudonym

pytestmark = pytest.mark.rgw

# The service's S3 budget here: small, so a stalled gateway is answered within seconds.
S3_CONNECT_TIMEOUT_S = 0.5
S3_READ_TIMEOUT_S = 1.5
S3_MAX_ATTEMPTS = 2
# Long enough that a few concurrent requests are all fetched and still waiting for their batch a moment later;
# with the fixed wait, as the adaptive one sends the first of them at once after the quiet between tests.
BATCH_MAX_WAIT_MS = 400
BATCH_WAIT_POLICY = "fixed"
BATCH_MAX_SIZE = 4
# Scheduling slack on a loaded 2-core machine (threads, one batch's analysis, HTTP).
MARGIN_S = 3.0
# What `serve` gives uvicorn to finish in-flight requests after SIGTERM (service/cli.py).
GRACEFUL_SHUTDOWN_S = 60
KNATIVE_SERVICE = ROOT / "knative" / "base" / "service.yaml"
JSON_PUSH = {"Content-Type": "application/json"}


# -- the service as a process ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def children(self) -> list[str]:
        pid = self.process.pid
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def deliveries_read(self) -> int:
        """How many requests the service has read and parsed so far (at LOG_LEVEL=DEBUG it logs each one)."""
        messages = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, AttributeError):  # a line still being written
                messages.append(str(json.loads(line).get("message", "")))
        return sum(message.startswith("delivery:") for message in messages)

    def refuses_connections(self) -> bool:
        """Whether the service has stopped listening: a connection attempt is refused."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass  # a timeout: still listening, just slow to accept
        return False




@contextlib.contextmanager
def serving(rgw: LocalRGW, spec: Path, log: Path, **settings: str) -> Iterator[Service]:
    """`xray-pipeline serve` on a free loopback port, ready; stopped (SIGTERM, then SIGKILL) on leaving."""
    port = free_port()
    # Only the settings given here: none of the machine's own service variables may leak in.
    inherited = {name: value for name, value in os.environ.items() if name.upper() not in setting_names()}
    env = inherited | rgw.env() | {
        "PORT": str(port), "HOST": "127.0.0.1", "PSEUDONYM_KEY": TEST_PSEUDONYM_KEY, "MODEL_URI": str(spec),
        "LOG_LEVEL": "DEBUG", "ANONYMIZE_WHEN": "always", "WORKER_THREADS": "1",
    } | settings
    with serve_process(env, log) as process:
        yield Service(process, port, log)


# -- deliveries --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    #: None: no HTTP answer at all (refused, reset); the sender counts it as a failure and redelivers.
    status: int | None
    body: dict[str, Any]
    sent_at: float
    answered_at: float

    @property
    def seconds(self) -> float:
        return self.answered_at - self.sent_at

    @property
    def record(self) -> dict[str, Any]:
        return self.body.get("records", [{}])[0]  # type: ignore[no-any-return]


def push_body(bucket: str, key: str, etag: str) -> bytes:
    return json.dumps({"Records": [ceph_record(bucket, key, etag=etag)]}).encode()


def send(port: int, body: bytes, headers: dict[str, str]) -> tuple[http.client.HTTPConnection, float]:
    """The request written to the socket; its answer is read by `answer`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    sent_at = time.monotonic()
    connection.request("POST", "/", body=body, headers=headers)
    return connection, sent_at


def answer(connection: http.client.HTTPConnection, sent_at: float) -> Answer:
    try:
        response = connection.getresponse()
        data = response.read()
        status: int | None = response.status
    except (OSError, http.client.HTTPException):
        status, data = None, b""
    finally:
        connection.close()
    return Answer(status, json.loads(data) if data else {}, sent_at, time.monotonic())


def deliver(port: int, body: bytes, headers: dict[str, str] = JSON_PUSH) -> Answer:
    sent_at = time.monotonic()
    try:
        return answer(*send(port, body, headers))
    except (OSError, http.client.HTTPException):
        return Answer(None, {}, sent_at, time.monotonic())


def knative_retries(answer: Answer) -> bool:
    return answer.status is None or answer.status >= 500 or answer.status in {404, 408, 409, 429}


def ceph_retries(answer: Answer) -> bool:
    return answer.status is None or not 200 <= answer.status < 300


def deliver_as_sender(port: int, body: bytes, headers: dict[str, str], retried: Callable[[Answer], bool],
                      limit: int = 10) -> list[Answer]:
    """Deliver, and again while the sender would retry (at most `limit` times: a storm shows as `limit`)."""
    answers = [deliver(port, body, headers)]
    while retried(answers[-1]) and len(answers) < limit:
        answers.append(deliver(port, body, headers))
    return answers


def redeliver_until_processed(port: int, bodies: dict[str, bytes], rounds: int = 20) -> dict[str, Answer]:
    """Knative's retries, compressed: every event not answered 200 again, concurrently, until all are."""
    done: dict[str, Answer] = {}
    with ThreadPoolExecutor(len(bodies)) as pool:
        for _ in range(rounds):
            pending = [key for key in bodies if key not in done]
            if not pending:
                break
            for key, result in zip(pending, pool.map(lambda key: deliver(port, bodies[key]), pending), strict=True):
                if result.status == 200:
                    done[key] = result
                else:
                    assert result.status in (None, 503), f"answered {result.status}: {result.body}"
            time.sleep(0.5)  # pacing, not waiting: Knative backs off between retries instead of hammering a 503
    assert done.keys() == bodies.keys(), f"never processed: {sorted(bodies.keys() - done.keys())}"
    return done


# -- outputs -----------------------------------------------------------------------------------------------


def fresh_buckets(s3: Any) -> str:
    """An input bucket and its two output buckets, versioned: every write of an output shows."""
    name = f"fault-{uuid.uuid4().hex[:10]}"
    for bucket in (name, f"{name}-processed", f"{name}-anonymized"):
        s3.create_bucket(Bucket=bucket)
    for bucket in (f"{name}-processed", f"{name}-anonymized"):
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return name


def output_names(bucket: str, key: str) -> dict[str, tuple[str, str]]:
    alias = pseudonym(TEST_PSEUDONYM_KEY.encode(), bucket, key)
    return {"processed": (f"{bucket}-processed", processed_key(key)),
            "anonymized": (f"{bucket}-anonymized", anonymized_key(alias, key, "jpeg"))}


def head_or_none(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return s3.head_object(Bucket=bucket, Key=key)  # type: ignore[no-any-return]
    except ClientError as error:
        if error.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return None
        raise


def assert_not_half_written(s3: Any, bucket: str, etags: dict[str, str]) -> set[str]:
    """The processed copy is written last and marks an object done: it never exists without the anonymized copy
    (ANONYMIZE_WHEN=always), and both record the same source. An anonymized copy alone is an unfinished object
    its redelivery completes. Returns the keys that are done."""
    done = set()
    for key, etag in etags.items():
        names = output_names(bucket, key)
        processed = head_or_none(s3, *names["processed"])
        if processed is None:
            continue
        anonymized = head_or_none(s3, *names["anonymized"])
        assert anonymized is not None, "a processed copy without its anonymized copy is half-written"
        assert processed["Metadata"]["source-etag"] == anonymized["Metadata"]["source-etag"] == etag
        done.add(key)
    return done


def assert_complete(s3: Any, bucket: str, key: str, etag: str) -> None:
    for output_bucket, output_key in output_names(bucket, key).values():
        output = s3.get_object(Bucket=output_bucket, Key=output_key)
        assert output["Metadata"]["source-etag"] == etag
        image = cv2.imdecode(np.frombuffer(output["Body"].read(), np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape[1] == 400, "a whole image"


def versions_of(s3: Any, bucket: str, key: str) -> list[str]:
    listed = s3.list_object_versions(Bucket=bucket, Prefix=key).get("Versions", [])
    return [version["VersionId"] for version in listed if version["Key"] == key]


def assert_versions_identical(s3: Any, bucket: str, key: str) -> None:
    """Delivery is at least once: an output may be written again (a PUT whose answer was lost, an object whose
    redelivery redoes it), but every version written must be the same image with the same metadata."""
    written = {}
    for version_id in versions_of(s3, bucket, key):
        output = s3.get_object(Bucket=bucket, Key=key, VersionId=version_id)
        written[version_id] = (output["Body"].read(), output["ContentType"], sorted(output["Metadata"].items()))
    assert written, f"nothing written to {bucket}"
    first, *others = written.values()
    assert all(other == first for other in others), f"{len(written)} versions in {bucket} differ"


def requests_served_until_now(rgw: LocalRGW, s3: Any, bucket: str) -> list[tuple[str, str, int]]:
    """What the gateway has served up to this moment. Its log is written asynchronously but in order: a request
    made now (for a key that does not exist) is logged after every request answered before it."""
    marker = f"log-marker-{uuid.uuid4().hex}"
    assert head_or_none(s3, bucket, marker) is None

    def served_through_marker() -> list[tuple[str, str, int]] | None:
        served = rgw.requests_served()
        return served if ("HEAD", f"/{bucket}/{marker}", 404) in served else None

    return wait_until(served_through_marker, 10, "the gateway did not log a request made to it")  # type: ignore[no-any-return]


def upload_burst(s3: Any, bucket: str, count: int, folder: str) -> dict[str, str]:
    keys = [f"{folder}/Patient {index:02d} 1950-01-01.jpg" for index in range(count)]
    return {key: upload(s3, bucket, key, encode(xray_like(200, seed=index))) for index, key in enumerate(keys)}


def s3_call_worst_case_s() -> float:
    """One S3 call's longest life: every attempt times out, with botocore's longest backoffs between them (the
    reasoning of knative/base/service.yaml's comments, with this module's settings)."""
    backoff = sum(min(2**i, BOTOCORE_MAX_BACKOFF_S) + BOTOCORE_RETRY_AFTER_EXTRA_S for i in range(1, S3_MAX_ATTEMPTS))
    return S3_MAX_ATTEMPTS * (S3_CONNECT_TIMEOUT_S + S3_READ_TIMEOUT_S) + backoff


# -- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRGW]:
    cluster = LocalRGW(tmp_path_factory.mktemp("faulty-rgw"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def faulty_s3(faulty_rgw: LocalRGW) -> Any:
    return faulty_rgw.s3_client()


@pytest.fixture(scope="module")
def service(faulty_rgw: LocalRGW, tiny_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("faults-service") / "service.log"
    with serving(faulty_rgw, tiny_spec, log, S3_CONNECT_TIMEOUT_S=str(S3_CONNECT_TIMEOUT_S),
                 S3_READ_TIMEOUT_S=str(S3_READ_TIMEOUT_S), S3_MAX_ATTEMPTS=str(S3_MAX_ATTEMPTS),
                 BATCH_MAX_WAIT_MS=str(BATCH_MAX_WAIT_MS), BATCH_WAIT_POLICY=BATCH_WAIT_POLICY,
                 BATCH_MAX_SIZE=str(BATCH_MAX_SIZE)) as started:
        yield started


# -- the scenarios -----------------------------------------------------------------------------------------


def test_object_deleted_before_its_fetch_is_one_failure_record_and_no_retry_storm(
    faulty_rgw: LocalRGW, faulty_s3: Any, service: Service
) -> None:
    bucket = fresh_buckets(faulty_s3)
    key = "ward 2/Rosa Diaz 1977-03-05.jpg"
    etag = upload(faulty_s3, bucket, key, encode(xray_like(200)))
    faulty_s3.delete_object(Bucket=bucket, Key=key)
    body = push_body(bucket, key, etag)
    alias = pseudonym(TEST_PSEUDONYM_KEY.encode(), bucket, key)
    failure = (f"{bucket}-processed", failure_key(alias))

    # Knative: 422 is final (the dead-letter sink keeps the event), so it is delivered once.
    as_knative = deliver_as_sender(service.port, body, kafkasource_headers(7), knative_retries)
    assert [delivery.status for delivery in as_knative] == [422], service.log_tail()
    summary = as_knative[0].record
    assert (summary["outcome"], summary["reason"], summary["pseudonym"]) == ("failed", "missing-object", alias)
    record = json.loads(faulty_s3.get_object(Bucket=failure[0], Key=failure[1])["Body"].read())
    assert (record["reason"], record["source_etag"]) == ("missing-object", etag)
    written = versions_of(faulty_s3, *failure)
    assert len(written) == 1

    # A replay (a consumer restarted before committing its offset) gets the same answer, quickly, and writes
    # nothing: the failure on record already says it.
    replay = deliver(service.port, body, kafkasource_headers(7))
    assert (replay.status, replay.record.get("reason")) == (422, "missing-object")
    assert replay.seconds < MARGIN_S
    # Ceph's push retries every non-2xx at once, forever: 200 is what ends it, so it too is delivered once.
    as_ceph = deliver_as_sender(service.port, body, JSON_PUSH, ceph_retries)
    assert [(delivery.status, delivery.record.get("reason")) for delivery in as_ceph] == [(200, "missing-object")]
    assert versions_of(faulty_s3, *failure) == written
    assert [item["Key"] for item in faulty_s3.list_objects_v2(Bucket=failure[0]).get("Contents", [])] == [failure[1]]
    assert "Contents" not in faulty_s3.list_objects_v2(Bucket=f"{bucket}-anonymized")

    # One read of the input per delivery, three deliveries: no storm behind the answers either.
    input_path = f"/{bucket}/{quote(key)}"
    served = requests_served_until_now(faulty_rgw, faulty_s3, bucket)
    assert [status for method, path, status in served if (method, path) == ("GET", input_path)] == [404, 404, 404]


def test_stalled_gateway_is_answered_503_before_knatives_deadline_then_redelivered(
    faulty_rgw: LocalRGW, faulty_s3: Any, service: Service
) -> None:
    per_call = s3_call_worst_case_s()
    # The manifests' reasoning with these settings: the app's worst case per event is inside Knative's timeout.
    knative_timeout = yaml.safe_load(KNATIVE_SERVICE.read_text())["spec"]["template"]["spec"]["timeoutSeconds"]
    assert S3_CALLS_PER_EVENT * per_call + INFERENCE_ALLOWANCE_S < knative_timeout
    # The record fails at the first call that hangs; everything before it was quick.
    bound = BATCH_MAX_WAIT_MS / 1000 + per_call + MARGIN_S
    bucket = fresh_buckets(faulty_s3)
    etags = upload_burst(faulty_s3, bucket, 6, "ward 3")
    bodies = {key: push_body(bucket, key, etag) for key, etag in etags.items()}
    keys = list(bodies)

    def fetched(key: str) -> bool:
        return ("GET", f"/{bucket}/{quote(key)}", 200) in faulty_rgw.requests_served()

    with ThreadPoolExecutor(len(keys)) as pool:
        # Fetched, and gathering into a batch (for BATCH_MAX_WAIT_MS) when the gateway stalls: their next call hangs.
        fetching = [pool.submit(deliver, service.port, bodies[key]) for key in keys[:3]]
        wait_until(lambda: all(map(fetched, keys[:3])), 30, service.log_tail, interval_s=0.01)
        with faulty_rgw.gateway_paused():
            # Arriving during the stall: their first read hangs.
            arriving = [pool.submit(deliver, service.port, bodies[key]) for key in keys[3:]]
            answers = [future.result() for future in fetching + arriving]

    for delivery in answers:
        assert (delivery.status, delivery.body.get("error")) == (503, "storage-unavailable"), delivery
        assert delivery.seconds <= bound, f"answered after {delivery.seconds:.1f} s, bound {bound:.1f} s"
    for delivery in answers[3:]:
        assert delivery.seconds >= S3_READ_TIMEOUT_S, "it waited for the stalled gateway, as a slow one needs"

    redeliver_until_processed(service.port, bodies)
    for key, etag in etags.items():
        assert_complete(faulty_s3, bucket, key, etag)


def test_sigterm_during_a_burst_finishes_what_is_in_flight_and_exits_cleanly(
    faulty_rgw: LocalRGW, faulty_s3: Any, tiny_spec: Path, tmp_path: Path
) -> None:
    bucket = fresh_buckets(faulty_s3)
    etags = upload_burst(faulty_s3, bucket, 10, "ward 4")
    bodies = {key: push_body(bucket, key, etag) for key, etag in etags.items()}
    in_flight_keys, late_keys = list(bodies)[:8], list(bodies)[8:]

    # A generous read timeout: the gateway is frozen below only to keep the burst in flight, not to fail it.
    with serving(faulty_rgw, tiny_spec, tmp_path / "service.log", S3_READ_TIMEOUT_S="30") as stopping:
        workers = stopping.children()
        with faulty_rgw.gateway_paused():
            requests = {key: send(stopping.port, bodies[key], JSON_PUSH) for key in in_flight_keys}
            # Each is read, so in flight when SIGTERM comes; then it waits on its first S3 call.
            wait_until(lambda: stopping.deliveries_read() >= len(in_flight_keys), 30, stopping.log_tail)
            stopping.process.send_signal(signal.SIGTERM)
            terminated_at = time.monotonic()
            wait_until(stopping.refuses_connections, 30, "the service still listens after SIGTERM")
            late = {key: deliver(stopping.port, bodies[key]) for key in late_keys}
        answers = {key: answer(*requests[key]) for key in in_flight_keys}
        exit_code = stopping.process.wait(timeout=GRACEFUL_SHUTDOWN_S + 10)
        exited_after = time.monotonic() - terminated_at
        log = stopping.log.read_text(errors="replace")

    for key, delivery in answers.items():
        assert (delivery.status, delivery.record.get("outcome")) == (200, "processed"), (delivery, log[-3000:])
        assert delivery.answered_at > terminated_at
        assert_complete(faulty_s3, bucket, key, etags[key])
    # Arriving after SIGTERM: refused (or 503); either way not processed, and the sender redelivers.
    for key, delivery in late.items():
        assert delivery.status in (None, 503), delivery
        assert all(head_or_none(faulty_s3, *name) is None for name in output_names(bucket, key).values())
    # uvicorn re-raises SIGTERM once its graceful shutdown is complete: -SIGTERM is the clean exit.
    assert exit_code in (0, -signal.SIGTERM), log[-3000:]
    assert exited_after < GRACEFUL_SHUTDOWN_S
    assert "Application shutdown complete" in log
    assert "Traceback" not in log, log[-3000:]
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10, "a worker outlived the service")


def test_gateway_stopped_during_a_burst_then_everything_processed_after_it_returns(
    faulty_rgw: LocalRGW, faulty_s3: Any, service: Service
) -> None:
    bucket = fresh_buckets(faulty_s3)
    etags = upload_burst(faulty_s3, bucket, 16, "ward 5")
    bodies = {key: push_body(bucket, key, etag) for key, etag in etags.items()}
    keys = list(bodies)

    with ThreadPoolExecutor(len(keys)) as pool:
        burst: dict[str, Future[Answer]] = {key: pool.submit(deliver, service.port, bodies[key]) for key in keys[:12]}
        # Stopped as soon as the first event is done: the others are being fetched, analyzed or written.
        wait(list(burst.values()), return_when=FIRST_COMPLETED)
        faulty_rgw.stop_gateway()
        try:
            while_down = {key: pool.submit(deliver, service.port, bodies[key]) for key in keys[12:]}
            answers = {key: future.result() for key, future in (burst | while_down).items()}
        finally:
            faulty_rgw.start_gateway()

    statuses = {key: delivery.status for key, delivery in answers.items()}
    assert set(statuses.values()) <= {200, 503}, statuses
    assert 200 in statuses.values()
    for key in keys[12:]:
        assert answers[key].body.get("error") == "storage-unavailable"
        assert answers[key].seconds < s3_call_worst_case_s() + MARGIN_S
    done = assert_not_half_written(faulty_s3, bucket, etags)
    assert {key for key, status in statuses.items() if status == 200} <= done

    redeliver_until_processed(service.port, {key: bodies[key] for key, status in statuses.items() if status != 200})
    for key, etag in etags.items():
        assert_complete(faulty_s3, bucket, key, etag)  # the newest versions: whole and of this upload
        # Either copy may have been written twice: a PUT that landed as the gateway stopped, its answer lost, is
        # redone by the redelivery. What a reader may see never differs.
        for output_bucket, output_key in output_names(bucket, key).values():
            assert_versions_identical(faulty_s3, output_bucket, output_key)
