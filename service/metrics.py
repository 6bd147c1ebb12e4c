"""Every Prometheus metric the service exposes, defined here and nowhere else, and the small calls that feed them.

The pipeline and the inference engine observe through the functions below; `GET /metrics` (service.app) only
renders `REGISTRY`. Label values are short codes (stage, outcome, reason, transport, status, model name), never an
object key (keys carry patient names) and never a pseudonym either (one series per image would grow without end).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from service.models.spec import ModelSpec

# One module-level set of metrics on a registry of our own, created once per process: the service runs one app
# per process, so there is nothing to keep apart, and the pipeline and engine can observe without a metrics object
# threaded through every constructor. Tests build several apps in one process; module-level metrics are never
# registered twice, and the tests compare deltas. Not prometheus_client's default registry: libraries may register
# there, and /metrics should show exactly what this module defines. Never multiprocess mode: the worker processes
# measure their stages and hand the timings back with each result; only this process observes.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_*: CPU seconds and resident memory of the web process (not workers)
PlatformCollector(registry=REGISTRY)  # python_info

# A `<name>_created` series beside every counter and histogram doubles the output and tells a reader nothing here.
disable_created_metrics()

#: The stages of one record, in order; fetch and write run in the web process, the others in a worker.
STAGES = ("fetch", "decode", "infer", "detect", "stamp", "anonymize", "write")

# From a decode of a small image (~5 ms) to a slow S3 write or a cold model (30 s, past Knative's usual patience).
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Every size up to the default BATCH_MAX_SIZE (8) apart, then coarser up to the largest allowed (256).
_BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)

HTTP_REQUESTS = Counter(
    "xray_http_requests",
    "Deliveries received on POST / (one per HTTP request, each holding one or more records), by the HTTP status "
    "answered and the transport: cloudevent (Knative), plain-push (Ceph), unknown (the request could not be parsed).",
    ["status", "transport"],
    registry=REGISTRY,
)
RECORDS = Counter(
    "xray_records",
    "Records (one uploaded object each) by outcome: processed (outputs written), skipped (reason: duplicate, "
    "superseded, not-object-created, output-bucket), failed (permanent: failure record written; reason such as "
    "not-an-image, missing-object), transient (answered 5xx and redelivered; reason such as storage-unavailable, "
    "model-not-ready), refused (bucket-not-allowed), error (a bug; answered 500).",
    ["outcome", "reason"],
    registry=REGISTRY,
)
RECORD_SECONDS = Histogram(
    "xray_record_duration_seconds",
    "Seconds from a record's arrival to its outcome, all stages and waits included, by outcome.",
    ["outcome"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "xray_stage_duration_seconds",
    "Seconds one record spent in each stage: fetch (S3 read), decode (decode and preprocess, in a worker), infer "
    "(the model call of the record's whole batch: every record of a batch observes the batch's time), stamp (find "
    "burned-in text, stamp label and risk, encode), anonymize (blur the text, encode; only records anonymized), "
    "write (all of the record's S3 writes). Waiting for a batch or a worker is in none of them.",
    ["stage"],
    buckets=_STAGE_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "xray_batch_size",
    "Images per model call: concurrent records are gathered into one batch, up to BATCH_MAX_SIZE.",
    buckets=_BATCH_BUCKETS,
    registry=REGISTRY,
)
RECORDS_IN_FLIGHT = Gauge(
    "xray_records_in_flight",
    "Records being processed right now (fetching, queued or in the model, writing).",
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    "xray_worker_restarts",
    "Inference worker processes that died (OOM, SIGKILL, crash) and were replaced; their batches were answered 503.",
    registry=REGISTRY,
)
ENGINE_TASK_CRASHES = Counter(
    "xray_engine_task_crashes",
    "Unexpected errors in the inference engine's own tasks (task: dispatcher, pool-keeper, worker-reader, "
    "message-handler, background), each logged with its traceback; supervised tasks are started again. Any "
    "increase is a bug worth reporting.",
    ["task"],
    registry=REGISTRY,
)
WORKER_START_FAILURES = Counter(
    "xray_worker_start_failures",
    "Replacement inference workers that failed to load or warm the model within WORKER_START_TIMEOUT_S; "
    "WORKER_RESTART_LIMIT of them in a row make /healthz answer 503.",
    registry=REGISTRY,
)
for _stage in STAGES:
    STAGE_SECONDS.labels(stage=_stage)  # every stage shows from the first scrape, with a count of 0

# The stage timings of the record the current task is processing (see `record_stages`); None outside of one.
_record_stages: ContextVar[dict[str, float] | None] = ContextVar("record_stages", default=None)


class EngineState(Protocol):
    """What the scrape-time gauges read from an inference engine (service.engine.pool.InferenceEngine)."""

    @property
    def ready(self) -> bool: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def spec(self) -> ModelSpec: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def warm_workers(self) -> int: ...
    @property
    def worker_count(self) -> int: ...


class _EngineStateCollector:
    """Gauges read from the running engines at scrape time, so no code path has to remember to update them.

    The service runs one engine per process; tests may run several at once, whose values then add up (ready: all).
    """

    def __init__(self) -> None:
        self._engines: weakref.WeakSet[EngineState] = weakref.WeakSet()

    def watch(self, engine: EngineState) -> None:
        self._engines.add(engine)

    def forget(self, engine: EngineState) -> None:
        self._engines.discard(engine)

    def describe(self) -> Iterable[Metric]:
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        return self._families(list(self._engines))

    @staticmethod
    def _families(engines: list[EngineState]) -> list[Metric]:
        ready = GaugeMetricFamily(
            "xray_ready", "1 when the service takes events (a worker has the model loaded and warm), else 0: /readyz.",
            value=float(bool(engines) and all(engine.ready for engine in engines)),
        )
        healthy = GaugeMetricFamily(
            "xray_healthy", "1 while the inference engine can heal itself, else 0: /healthz (Kubernetes restarts "
            "the pod).",
            value=float(all(engine.healthy for engine in engines)),
        )
        queue_depth = GaugeMetricFamily(
            "xray_inference_queue_depth",
            "Images waiting for a worker (not yet in a batch); growing means the model cannot keep up.",
            value=sum(engine.queue_depth for engine in engines),
        )
        warm = GaugeMetricFamily(
            "xray_workers_warm", "Inference worker processes with the model loaded and warm (taking batches).",
            value=sum(engine.warm_workers for engine in engines),
        )
        configured = GaugeMetricFamily(
            "xray_workers_configured", "Inference worker processes the service keeps running (WORKERS).",
            value=sum(engine.worker_count for engine in engines),
        )
        model = GaugeMetricFamily(
            "xray_model_info", "The model the workers run (always 1; the labels say which).",
            labels=["name", "version", "backend"],
        )
        for labels in sorted({(engine.spec.name, engine.spec.version, engine.spec.backend) for engine in engines}):
            model.add_metric(list(labels), 1)
        return [ready, healthy, queue_depth, warm, configured, model]


_ENGINES = _EngineStateCollector()
REGISTRY.register(_ENGINES)


def watch_engine(engine: EngineState) -> None:
    """Report this engine's state (ready, queue depth, workers, model) from now on; `forget_engine` stops it."""
    _ENGINES.watch(engine)


def forget_engine(engine: EngineState) -> None:
    _ENGINES.forget(engine)


def observe_request(status: int, transport: str) -> None:
    HTTP_REQUESTS.labels(status=str(status), transport=transport).inc()


def observe_batch_size(size: int) -> None:
    BATCH_SIZE.observe(size)


def observe_worker_restart() -> None:
    WORKER_RESTARTS.inc()


def observe_engine_task_crash(task: str) -> None:
    ENGINE_TASK_CRASHES.labels(task=task).inc()


def observe_worker_start_failure() -> None:
    WORKER_START_FAILURES.inc()


def observe_record(outcome: str, reason: str | None, seconds: float) -> None:
    RECORDS.labels(outcome=outcome, reason=reason or "").inc()
    RECORD_SECONDS.labels(outcome=outcome).observe(seconds)


@contextlib.contextmanager
def record_stages() -> Iterator[dict[str, float]]:
    """Around one record's processing: counts it in flight and collects its stage timings (seconds by stage).

    Stages timed meanwhile in the same task (`timed_stage`, `add_stage_timings`) land in the yielded dict, which
    the pipeline logs; on exit each stage the record went through is observed once.
    """
    stages: dict[str, float] = {}
    token = _record_stages.set(stages)
    RECORDS_IN_FLIGHT.inc()
    try:
        yield stages
    finally:
        RECORDS_IN_FLIGHT.dec()
        _record_stages.reset(token)
        for stage, seconds in stages.items():
            STAGE_SECONDS.labels(stage=stage).observe(seconds)


@contextlib.contextmanager
def timed_stage(stage: str) -> Iterator[None]:
    """Time a stage of the current record (also when it fails: a timing-out S3 call is latency worth seeing)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        add_stage_timings({stage: time.perf_counter() - started})


def add_stage_timings(timings: Mapping[str, float]) -> None:
    """Add stage timings measured elsewhere (in a worker) to the current record's; a stage seen twice adds up."""
    stages = _record_stages.get()
    if stages is None:
        return  # not within a record (a test driving the engine alone): nothing to attribute them to
    for stage, seconds in timings.items():
        stages[stage] = stages.get(stage, 0.0) + seconds


def render() -> tuple[bytes, str]:
    """The exposition text of every metric above, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
