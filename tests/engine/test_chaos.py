"""Chaos with real processes: workers SIGKILLed during a storm of KafkaSource deliveries lose nothing.

`serve` runs against the real RGW; concurrent senders deliver every event exactly as a KafkaSource does and retry
what it retries (5xx, no answer) with backoff; meanwhile the test kills workers in rounds: the busiest, then all of
them at once (the case that once wedged the engine), then the busiest again. Afterwards every event is processed,
every output is right (identical versions only: delivery is at least once), the pool is back to full strength and
healthy, and a new event is answered 2xx promptly. The scheduling behind it is tested exhaustively, without
processes, in tests/engine/test_batcher.py.
"""

from __future__ import annotations

import http.client
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import wait_until
from local_rgw import LocalRGW
from prometheus_client.parser import text_string_to_metric_families
from test_events import kafkasource_headers
from test_faults import (
    Answer,
    Service,
    assert_versions_identical,
    deliver,
    fresh_buckets,
    knative_retries,
    output_names,
    push_body,
    serving,
    upload_burst,
)

pytestmark = pytest.mark.rgw

#: How long one event may take to end processed, retries included: a generous bound for a busy 2-core machine.
EVENT_DEADLINE_S = 240
#: After a kill round, the longest the pool may take to be back at full strength (TensorFlow loads in each).
RECOVERY_S = 180


@dataclass(frozen=True)
class Storm:
    workers: int
    events: int
    senders: int
    #: Each round kills "busiest" (the worker that used the most CPU just now) or "all".
    rounds: tuple[str, ...]
    #: Seconds between kill rounds.
    gap_s: float


STORMS = {
    "one worker, one kill": Storm(workers=1, events=48, senders=16, rounds=("busiest",), gap_s=8),
    "two workers, three rounds": Storm(workers=2, events=160, senders=16, rounds=("busiest", "all", "busiest"),
                                       gap_s=8),
}


@dataclass
class Sender:
    """A KafkaSource's delivery loop for the events handed to it: redeliver with backoff until not retried."""

    port: int
    answers: dict[str, list[Answer]] = field(default_factory=dict)

    def deliver_until_done(self, key: str, body: bytes, offset: int) -> None:
        answers = self.answers.setdefault(key, [])
        deadline = time.monotonic() + EVENT_DEADLINE_S
        backoff = 0.2
        while True:
            answers.append(deliver(self.port, body, kafkasource_headers(offset)))
            if not knative_retries(answers[-1]) or time.monotonic() > deadline:
                return
            time.sleep(backoff)  # pacing, not waiting: the KafkaSource's exponential backoff between retries
            backoff = min(backoff * 2, 2.0)


def worker_pids(service: Service) -> list[int]:
    """The service's inference workers (spawned children), not multiprocessing's resource tracker."""
    pids = []
    for pid in service.children():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # it just ended
        if b"spawn_main" in command:
            pids.append(int(pid))
    return pids


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def busiest(pids: list[int]) -> int:
    """The worker that used the most CPU over the last moment: the one most likely to hold batches."""
    before = {pid: cpu_ticks(pid) for pid in pids}
    time.sleep(0.5)  # the measuring window, not a wait for a condition
    return max(pids, key=lambda pid: cpu_ticks(pid) - before[pid])


def scrape(port: int) -> dict[str, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    """Every sample by name (labels, when it has any, appended as text)."""
    return {sample.name + (str(sorted(sample.labels.items())) if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def probe(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def full_strength(service: Service, workers: int) -> bool:
    try:
        return scrape(service.port).get("xray_workers_warm") == workers and probe(service.port, "/readyz") == 200
    except OSError:
        return False


@pytest.mark.parametrize("storm", STORMS.values(), ids=STORMS.keys())
def test_worker_deaths_during_a_storm_lose_nothing(
    storm: Storm, rgw: LocalRGW, s3: Any, tiny_spec: Path, tmp_path: Path
) -> None:
    bucket = fresh_buckets(s3)
    etags = upload_burst(s3, bucket, storm.events, "storm")
    keys = list(etags)
    settings = {"WORKERS": str(storm.workers), "BATCH_MAX_SIZE": "4", "BATCH_MAX_WAIT_MS": "20",
                "LOG_LEVEL": "INFO", "INFERENCE_TIMEOUT_S": "60"}
    with serving(rgw, tiny_spec, tmp_path / "serve.log", **settings) as service:
        sender = Sender(service.port)
        released: queue.Queue[tuple[int, str] | None] = queue.Queue()

        def send_forever() -> None:
            while (item := released.get()) is not None:
                offset, key = item
                sender.deliver_until_done(key, push_body(bucket, key, etags[key]), offset)

        threads = [threading.Thread(target=send_forever, name=f"sender-{n}") for n in range(storm.senders)]
        for thread in threads:
            thread.start()
        killed: list[list[int]] = []
        try:
            # The events arrive in phases, one more phase than kill rounds, each released at a steady rate over
            # the gap; every round kills during a phase, while events are queued, in the model and being written.
            phases = np.array_split(np.arange(len(keys)), len(storm.rounds) + 1)
            for phase, indexes in enumerate(phases):
                phase_started = time.monotonic()
                for count, index in enumerate(indexes):
                    released.put((int(index), keys[index]))
                    # Pacing, not waiting: the upload rate of this phase.
                    time.sleep(max(0.0, phase_started + storm.gap_s * (count + 1) / len(indexes) - time.monotonic()))
                    if phase < len(storm.rounds) and count == len(indexes) // 3:
                        wait_until(lambda: full_strength(service, storm.workers), RECOVERY_S,
                                   lambda: f"the pool was not back to full strength:\n{service.log_tail()}")
                        pids = worker_pids(service)
                        victims = pids if storm.rounds[phase] == "all" else [busiest(pids)]
                        for pid in victims:
                            os.kill(pid, signal.SIGKILL)
                        killed.append(victims)
        finally:
            for _ in threads:
                released.put(None)
            for thread in threads:
                thread.join(timeout=EVENT_DEADLINE_S + 60)
        assert not any(thread.is_alive() for thread in threads), "a sender never got its events answered"

        # Every event ended processed (or, delivered again after it was, a duplicate): nothing was lost.
        finals = {key: answers[-1] for key, answers in sender.answers.items()}
        assert finals.keys() == set(keys)
        unfinished = {key: (answer.status, answer.body) for key, answer in finals.items() if answer.status != 200}
        assert not unfinished, f"{len(unfinished)} events never processed, e.g. {next(iter(unfinished.values()))}"
        outcomes = {(answer.record.get("outcome"), answer.record.get("reason")) for answer in finals.values()}
        assert outcomes <= {("processed", None), ("skipped", "duplicate")}, outcomes
        retried = sum(len(answers) > 1 for answers in sender.answers.values())
        assert retried, "no event was answered 503 by a killed worker: the kills missed the storm"

        # The pool healed: back to full strength with new workers, healthy, no task crashed.
        wait_until(lambda: full_strength(service, storm.workers), RECOVERY_S,
                   lambda: f"the pool did not come back:\n{service.log_tail()}")
        assert not set(worker_pids(service)) & {pid for victims in killed for pid in victims}
        metrics = scrape(service.port)
        assert metrics["xray_worker_restarts_total"] == sum(len(victims) for victims in killed)
        assert not any(name.startswith("xray_engine_task_crashes_total") and value
                       for name, value in metrics.items()), "an engine task crashed"
        assert probe(service.port, "/healthz") == 200
        log = service.log.read_text(errors="replace")
        assert "Task exception was never retrieved" not in log and "Traceback" not in log

        # The next event after the storm is answered 2xx promptly.
        [(after_key, after_etag)] = upload_burst(s3, bucket, 1, "after").items()
        after = deliver(service.port, push_body(bucket, after_key, after_etag), kafkasource_headers(10_000))
        assert after.status == 200 and after.record["outcome"] == "processed", after
        assert after.seconds < 15, f"the first event after the storm took {after.seconds:.1f} s"

    # Every processed copy is right: the stamped image of its own source, with its metadata; every version written
    # (at-least-once) is identical.
    for key in [*keys, after_key]:
        processed_bucket, processed_key = output_names(bucket, key)["processed"]
        assert_versions_identical(s3, processed_bucket, processed_key)
        output = s3.get_object(Bucket=processed_bucket, Key=processed_key)
        metadata = output["Metadata"]
        assert metadata["source-etag"] == (etags.get(key) or after_etag)
        assert metadata["label"] == "Pneumonia" and metadata["model-name"] == "tiny-brightness"
        image = cv2.imdecode(np.frombuffer(output["Body"].read(), np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape[:2] == (480, 400)
        assert_versions_identical(s3, *output_names(bucket, key)["anonymized"])
