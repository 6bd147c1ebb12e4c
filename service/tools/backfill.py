"""`xray-pipeline backfill`: gets the objects already in a bucket processed by the service's own rules.

Objects are listed (image suffixes, DICOM ones included, and keys without a suffix whose first bytes are DICOM;
never the service's failure records), and each one whose processed copy does not yet record its ETag is either
processed here by a real `Pipeline` (the service's code, its workers, its outputs) or announced to a running service
as a plain Ceph notification (`--emit URL`), so a Knative fleet does the work. Rerunning after an interruption skips
what is done through the same ETag check the service makes. Lines name pseudonyms and outcomes, never keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from service.errors import ConfigurationError, PipelineError, TransientFailure
from service.events import ObjectRecord
from service.models.source import resolve_model
from service.outputs import (
    NOT_ASSESSED_REASON_CODE,
    failure_key,
    failure_on_record,
    is_done,
    processed_key,
    pseudonym,
)
from service.pipeline import Pipeline
from service.settings import Settings, load_settings
from service.storage import ObjectStore, make_s3_client
from service.tools.listing import ListedObject, bucket_images, is_s3_uri, split_s3_prefix
from service.tools.run import (
    CONTENT_FAILURES,
    Console,
    ToolEngine,
    configure_tool_logging,
    default_concurrency,
    describe_outcomes,
    for_each,
    retrying,
    run_to_the_end,
)

logger = logging.getLogger(__name__)

ALREADY_PROCESSED = "already-processed"
WOULD_PROCESS = "would-process"
#: Delivered to a URL that answered 2xx without the service's summary: the outcome is not known here.
EMITTED = "emitted"
#: Outcomes that make the run exit 1.
FAILING_OUTCOMES = frozenset({"failed", "refused", "transient", "error"})
#: Answers of a service that is scaling, restarting or loading its model: the same request is tried again.
_RETRIED_STATUSES = frozenset({502, 503, 504})
_EMIT_ATTEMPTS = 7
_EMIT_TIMEOUT_S = 330.0


@dataclass(frozen=True)
class ObjectOutcome:
    """What became of one object: printed as one JSON line (pseudonym, never the key)."""

    pseudonym: str
    outcome: str
    reason: str | None = None
    label: str | None = None
    risk: float | None = None

    def line(self) -> str:
        return json.dumps({name: value for name, value in self.__dict__.items() if value is not None})


class Pacer:
    """Spaces starts evenly at `rate` per second (no bursts: a fleet then sees a steady load to scale to)."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._clock = clock
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        now = self._clock()
        start = max(now, self._next)
        self._next = start + self._interval  # claimed before sleeping: concurrent callers queue behind it
        await asyncio.sleep(start - now)


def ceph_notification(listed: ListedObject, *, event_time: datetime | None = None) -> dict[str, Any]:
    """A plain Ceph notification announcing `listed` as just uploaded (the shape of tests/events/ceph-*.http)."""
    when = (event_time or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "Records": [{
            "eventVersion": "2.2",
            "eventSource": "ceph:s3",
            "awsRegion": "",
            "eventTime": when,
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "xray-backfill"},
            "requestParameters": {"sourceIPAddress": ""},
            "responseElements": {"x-amz-request-id": "", "x-amz-id-2": ""},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "xray-backfill",
                "bucket": {"name": listed.bucket, "ownerIdentity": {"principalId": ""},
                           "arn": f"arn:aws:s3:::{listed.bucket}", "id": ""},
                # Raw, as Ceph sends keys (no URL encoding).
                "object": {"key": listed.key, "size": listed.size, "eTag": listed.etag, "versionId": "",
                           "sequencer": "", "metadata": [], "tags": []},
            },
            "eventId": f"backfill.{listed.etag}",
            "opaqueData": "",
        }]
    }


class InProcess:
    """Processes objects here, with the service's pipeline and its workers (as `serve` does, without HTTP)."""

    def __init__(self, settings: Settings, store: ObjectStore) -> None:
        self._settings = settings
        self._store = store
        self._spec = resolve_model(settings, make_s3_client)
        self._engine = ToolEngine(settings, self._spec)
        self._pipeline: Pipeline | None = None

    async def ready(self) -> None:
        """Start the workers (on first use: a run with nothing to do loads no model)."""
        if self._pipeline is None:
            engine = await self._engine.get()
            self._pipeline = self._pipeline or Pipeline(self._settings, self._store, engine, self._spec)

    async def submit(self, listed: ListedObject, alias: str) -> ObjectOutcome:
        await self.ready()
        record = ObjectRecord(event_name="ObjectCreated:Put", bucket=listed.bucket, key=listed.key,
                              etag=listed.etag, version_id=None, size=listed.size, event_id=f"backfill.{listed.etag}")
        pipeline = self._pipeline
        try:
            result = await retrying(lambda: pipeline.process_record(record), retry_on=(TransientFailure,))
        except TransientFailure as error:
            return ObjectOutcome(alias, "transient", error.reason)
        except PipelineError as error:  # a bucket outside INPUT_BUCKETS
            return ObjectOutcome(alias, "refused", error.reason)
        # The pipeline's `duplicate`: the processed copy records this ETag after all (the listing's guess of where
        # the copy is was wrong, e.g. a DICOM object named .jpeg): what this tool calls already processed.
        reason = ALREADY_PROCESSED if result.reason == "duplicate" else result.reason
        return ObjectOutcome(alias, result.outcome.value, reason, result.label, result.risk)

    async def close(self) -> None:
        await self._engine.stop()


class Emitter:
    """Posts one plain Ceph notification per object to a running service; its answer is the outcome."""

    def __init__(self, url: str) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError("--emit: the URL must start with http:// or https://")
        self._url = url
        self._client: httpx.AsyncClient | None = None

    async def ready(self) -> None:
        pass

    async def submit(self, listed: ListedObject, alias: str) -> ObjectOutcome:
        if self._client is None:  # made in the run's event loop, which closes it
            self._client = httpx.AsyncClient(timeout=_EMIT_TIMEOUT_S)
        client = self._client
        body = json.dumps(ceph_notification(listed)).encode()
        delay = 0.5
        for attempt in range(_EMIT_ATTEMPTS):
            try:
                response = await client.post(self._url, content=body,
                                                   headers={"Content-Type": "application/json"})
            except httpx.TransportError as error:
                status, failure = None, type(error).__name__
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return _answer_outcome(response, alias)
                if status not in _RETRIED_STATUSES:
                    return ObjectOutcome(alias, "refused" if status < 500 else "error", _error_code(response))
                failure = _error_code(response)
            if attempt + 1 < _EMIT_ATTEMPTS:
                logger.info("object %s: the service answered %s; retrying in %.1f s", alias, status or failure, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        return ObjectOutcome(alias, "transient", failure)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _answer_outcome(response: httpx.Response, alias: str) -> ObjectOutcome:
    try:
        [record] = response.json()["records"]
        return ObjectOutcome(record.get("pseudonym") or alias, record["outcome"], record.get("reason"),
                             record.get("label"), record.get("risk"))
    except (ValueError, KeyError, TypeError):
        # Accepted by something other than the service itself (a Knative broker, a recording sink).
        return ObjectOutcome(alias, EMITTED)


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"http-{response.status_code}"


class BackfillRun:
    """One backfill: checks each listed object's processed copy, and submits those not done (paced, bounded)."""

    def __init__(self, settings: Settings, store: ObjectStore, objects: list[ListedObject], *,
                 processor: InProcess | Emitter | None, rate: float | None, concurrency: int, progress: bool) -> None:
        self.settings = settings
        self.store = store
        self.objects = objects
        self.processor = processor
        self.concurrency = concurrency
        self.progress = progress
        self.console: Console | None = None
        self._pacer = Pacer(rate)
        self._secret = settings.effective_pseudonym_key

    @property
    def counts(self) -> dict[str, int]:
        return self.console.tally() if self.console else {}

    async def execute(self) -> None:
        # S3 calls run in threads, as in the service: enough of them for every object in flight.
        threads = ThreadPoolExecutor(self.concurrency + 4, thread_name_prefix="s3")
        asyncio.get_running_loop().set_default_executor(threads)
        with Console(len(self.objects), progress=self.progress, unit="object") as console:
            self.console = console
            try:
                await for_each(self.objects, self._handle, limit=self.concurrency)
            finally:
                if self.processor is not None:
                    await self.processor.close()

    async def _handle(self, listed: ListedObject) -> None:
        outcome = await self._outcome(listed)
        assert self.console is not None
        self.console.record(outcome.outcome, outcome.line(), not_assessed=outcome.reason == NOT_ASSESSED_REASON_CODE)

    async def _outcome(self, listed: ListedObject) -> ObjectOutcome:
        alias = pseudonym(self._secret, listed.bucket, listed.key)
        processed_bucket = self.settings.processed_bucket_for(listed.bucket)
        try:
            # Where the service puts it: `.dcm` for a DICOM object, known here from its key or, for a key without a
            # suffix, its first bytes (the pipeline checks the content again after the fetch).
            recorded = await self._recorded(processed_bucket, processed_key(listed.key, dicom=listed.dicom))
            if is_done(recorded, listed.etag):
                return ObjectOutcome(alias, "skipped", ALREADY_PROCESSED)
            # A permanent failure of this very content is on record: analyzing it again would fail the same way.
            failure = await self._recorded(processed_bucket, failure_key(alias))
            reason = failure_on_record(failure, listed.etag)
            if reason in CONTENT_FAILURES:
                return ObjectOutcome(alias, "failed", reason)
        except TransientFailure as error:
            return ObjectOutcome(alias, "transient", error.reason)
        if self.processor is None:
            return ObjectOutcome(alias, WOULD_PROCESS)
        try:
            await self.processor.ready()  # before pacing: a model loading for seconds must not bank a burst
            await self._pacer.wait()
            return await self.processor.submit(listed, alias)
        except ConfigurationError:
            raise  # the model cannot be loaded: nothing can be processed
        except Exception as error:
            logger.error("object %s: unexpected %s", alias, type(error).__name__)
            return ObjectOutcome(alias, "error", "internal")

    async def _recorded(self, bucket: str, key: str) -> dict[str, str]:
        """An output's metadata ({} when there is none), retried while S3 is unavailable."""
        recorded = await retrying(lambda: asyncio.to_thread(self.store.recorded_metadata, bucket, key),
                                  retry_on=(TransientFailure,))
        return recorded or {}


def run_backfill(source: str, *, rate: float | None, emit: str | None, dry_run: bool, concurrency: int | None,
                 progress: bool) -> int:
    """The `backfill` command; returns its exit status (0 all processed or skipped, 1 otherwise, 130 Ctrl-C)."""
    if not is_s3_uri(source):
        raise ConfigurationError("backfill: the source must be s3://bucket[/prefix]")
    if concurrency is not None and concurrency < 1:
        raise ConfigurationError("--concurrency must be at least 1")
    settings = load_settings()
    configure_tool_logging(settings)
    bucket, prefix = split_s3_prefix(source)
    if settings.is_output_bucket(bucket):
        raise ConfigurationError(f"backfill: {bucket} is an output bucket of the service; name its input bucket")
    if settings.input_buckets and bucket not in settings.input_buckets:
        raise ConfigurationError(f"INPUT_BUCKETS: {bucket} is not one of them, so the service would refuse it")
    s3_client = make_s3_client(settings)
    store = ObjectStore(s3_client)
    processor: InProcess | Emitter | None = None
    if not dry_run:
        processor = Emitter(emit) if emit else InProcess(settings, store)
    objects = list(bucket_images(s3_client, bucket, prefix))
    run = BackfillRun(settings, store, objects, processor=processor, rate=rate,
                      concurrency=concurrency or default_concurrency(settings), progress=progress)
    return run_to_the_end("backfill", run, items=f"{len(objects)} object(s){' (dry run)' if dry_run else ''}",
                          describe=describe_outcomes, failed=lambda counts: bool(FAILING_OUTCOMES & set(counts)))
