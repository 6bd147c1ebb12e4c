"""The pipeline for one object: fetch -> infer -> stamp -> anonymize -> write both outputs.

Callable without any server (tests, CLI tools). Delivery is at-least-once, so every step is idempotent: output
keys are deterministic, the processed copy is written last and records the source eTag, and a redelivered event
whose eTag is already recorded writes nothing. Permanent failures leave a durable failure record (once per eTag
and reason); transient ones raise `TransientFailure` before anything is half-written.

Versions of one key: each version's outputs are written at most once, and the newest version's are the last ones
written. An older version overtaken by a newer upload before its outputs were written is skipped (`superseded`):
the newer upload's own event writes the newest content, which is what readers of the output buckets need.

S3 calls, in two thread hops: before the analysis a HEAD of the processed copy (a duplicate stops here) and the GET
of the input; after it a HEAD of the input (`superseded`?), then the anonymized copy's PUT and the processed copy's.
See docs/operations.md#s3-calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service import __version__, metrics
from service.dicom.sniff import is_dicom
from service.engine.pool import InferenceEngine
from service.errors import ForbiddenBucket, PipelineError, StorageUnavailable, UnprocessableObject
from service.events import Delivery, ObjectRecord
from service.models.spec import ModelSpec
from service.outputs import (
    MAX_KEY_BYTES,
    NOT_ASSESSED_REASON_CODE,
    FailureRecord,
    Outcome,
    Output,
    failure_key,
    failure_on_record,
    outputs_in_write_order,
    processed_key,
    pseudonym,
    recorded_source_etag,
)
from service.settings import Settings
from service.storage import MISSING_BUCKET, FetchedObject, ObjectStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordResult:
    """What happened to one record; safe to log and return (pseudonyms only, never keys)."""

    outcome: Outcome
    pseudonym: str | None = None
    #: Why it was skipped, failed or not assessed (stable short codes such as "duplicate", "missing-object",
    #: "outside-model-domain").
    reason: str | None = None
    label: str | None = None
    risk: float | None = None
    anonymized_bucket: str | None = None
    anonymized_key: str | None = None

    def summary(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if value is not None} | {
            "outcome": self.outcome.value
        }


@dataclass(frozen=True)
class DeliveryResult:
    records: list[RecordResult]
    note: str | None = None

    @property
    def has_permanent_failure(self) -> bool:
        return any(result.outcome is Outcome.FAILED for result in self.records)


@dataclass
class _KeyTurn:
    """The records of one key in this process: the one holding `lock` and those waiting for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    records: int = 0


class Pipeline:
    """Processes the records of deliveries against one object store and one inference engine."""

    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        engine: InferenceEngine,
        spec: ModelSpec,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._settings = settings
        self._store = store
        self._engine = engine
        self._spec = spec
        self._clock = clock
        self._secret = settings.effective_pseudonym_key
        # Identical records in flight at once (a retry storm) share one run instead of racing to write.
        self._in_flight: dict[tuple[str, str, str], asyncio.Future[RecordResult]] = {}
        # Records of one key with different eTags take turns: an older version still being analyzed must not
        # write after a newer one.
        self._key_turns: dict[tuple[str, str], _KeyTurn] = {}

    async def process_delivery(self, delivery: Delivery) -> DeliveryResult:
        """Every record is handled; a transient failure of any record fails the whole delivery (redelivered)."""
        outcomes = await asyncio.gather(
            *(self.process_record(record) for record in delivery.records), return_exceptions=True
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            # A refusal of the bucket outranks a transient error: redelivery cannot change it.
            raise next((error for error in errors if isinstance(error, ForbiddenBucket)), errors[0])
        return DeliveryResult(records=[o for o in outcomes if isinstance(o, RecordResult)], note=delivery.note)

    async def process_record(self, record: ObjectRecord) -> RecordResult:
        """Process one record; whatever happens, it ends in one summary log line and one count by outcome."""
        started = time.perf_counter()
        with metrics.record_stages() as stages:
            try:
                result = await self._process_record(record)
            except Exception as error:
                self._summarize(record, started, stages, _error_summary(error))
                raise
        self._summarize(record, started, stages, _result_summary(result))
        return result

    def _summarize(
        self, record: ObjectRecord, started: float, stages: dict[str, float], outcome_fields: dict[str, Any]
    ) -> None:
        """The record's one summary line (pseudonym, outcome, timings: never the key) and its count by outcome."""
        total = time.perf_counter() - started
        metrics.observe_record(outcome_fields["outcome"], outcome_fields.get("reason"), total)
        summary = {
            "pseudonym": pseudonym(self._secret, record.bucket, record.key),
            "bucket": record.bucket,
            **outcome_fields,
            "stages_ms": {stage: round(seconds * 1000, 1) for stage, seconds in stages.items()},
            "total_ms": round(total * 1000, 1),
        }
        quiet = summary["outcome"] in (Outcome.PROCESSED, Outcome.SKIPPED)
        logger.log(
            logging.INFO if quiet else logging.WARNING,
            "record %s: %s%s%s (%.0f ms)",
            summary["pseudonym"],
            summary["outcome"],
            f" [{summary['reason']}]" if "reason" in summary else "",
            f" {summary['label']} risk={summary['risk']:.4f}" if "risk" in summary else "",
            summary["total_ms"],
            extra=summary,
        )

    async def _process_record(self, record: ObjectRecord) -> RecordResult:
        if not record.is_object_created:
            return RecordResult(Outcome.SKIPPED, reason="not-object-created")
        if self._settings.is_output_bucket(record.bucket):
            return RecordResult(Outcome.SKIPPED, reason="output-bucket")
        if self._settings.input_buckets and record.bucket not in self._settings.input_buckets:
            raise ForbiddenBucket(f"bucket {record.bucket} is not in INPUT_BUCKETS")
        flight_key = (record.bucket, record.key, record.etag)
        running = self._in_flight.get(flight_key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[RecordResult] = asyncio.get_running_loop().create_future()
        self._in_flight[flight_key] = future
        try:
            result = await self._process_in_turn(record)
        except Exception as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters re-raise it; none waiting is fine too
            raise
        except BaseException:
            future.cancel()  # shutdown: waiters are cancelled with it
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._in_flight[flight_key]

    async def _process_in_turn(self, record: ObjectRecord) -> RecordResult:
        name = (record.bucket, record.key)
        turn = self._key_turns.setdefault(name, _KeyTurn())
        turn.records += 1
        try:
            async with turn.lock:
                return await self._process_created(record)
        finally:
            turn.records -= 1
            if not turn.records:
                del self._key_turns[name]

    async def _process_created(self, record: ObjectRecord) -> RecordResult:
        started = time.perf_counter()
        alias = pseudonym(self._secret, record.bucket, record.key)
        processed_bucket = self._settings.processed_bucket_for(record.bucket)
        try:
            # One thread hop for the S3 calls before the analysis and one for those after it: each hop costs the
            # web process CPU, and the calls of one hop need no event-loop turn between them.
            fetched = await asyncio.to_thread(self._fetch_unless_duplicate, record, alias, processed_bucket)
            if fetched is None:
                return self._finish(RecordResult(Outcome.SKIPPED, alias, reason="duplicate"), started)
            analysis = await self._engine.analyze(
                fetched.body, anonymize_always=self._settings.anonymize_when == "always"
            )
        except UnprocessableObject as error:
            await self._write_failure_record(record, alias, processed_bucket, error)
            return self._finish(RecordResult(Outcome.FAILED, alias, reason=error.reason), started, error.message)

        logger.debug("record %s: %s image, %d text region(s) found", alias, analysis.image_format,
                     analysis.text_regions)
        buckets = {"anonymized": self._settings.anonymized_bucket_for(record.bucket), "processed": processed_bucket}
        outputs = outputs_in_write_order(analysis, self._spec, alias=alias, source_key=record.key,
                                         source_etag=fetched.etag, source_version_id=fetched.version_id)
        placed = [(buckets[output.kind], output) for output in outputs]
        if not await asyncio.to_thread(self._write_unless_superseded, record, fetched.etag, placed):
            return self._finish(RecordResult(Outcome.SKIPPED, alias, reason="superseded"), started)
        anonymized_name = next((output.key for output in outputs if output.kind == "anonymized"), None)
        result = RecordResult(
            Outcome.PROCESSED,
            alias,
            reason=NOT_ASSESSED_REASON_CODE if analysis.prediction.not_assessed_reason else None,
            label=analysis.prediction.label,
            risk=analysis.prediction.risk,
            anonymized_bucket=buckets["anonymized"] if anonymized_name else None,
            anonymized_key=anonymized_name,
        )
        return self._finish(result, started)

    def _fetch_unless_duplicate(self, record: ObjectRecord, alias: str, processed_bucket: str) -> FetchedObject | None:
        """The input as it is now, or None when its processed copy already records its eTag (a duplicate).

        Blocking (run in a thread): a HEAD of the processed copy, the GET of the input, and a second HEAD when its
        content says the processed copy has another key than the input's key suggested.
        """
        # Before the fetch only the key tells whether the input is DICOM (its processed copy ends in .dcm); the
        # content decides, and a wrong guess costs one more lookup below.
        output_key = _checked_length(processed_key(record.key))
        recorded_etag = recorded_source_etag(self._store.recorded_metadata(processed_bucket, output_key))
        logger.debug("record %s: %s in %s, processed eTag on record: %s", alias, record.event_name, record.bucket,
                     recorded_etag or "none")
        if record.etag and recorded_etag == record.etag:
            return None
        # The current object, not the event's version: a stale or reordered event then converges on the newest
        # content, and is recognised as a duplicate once that content is processed.
        with metrics.timed_stage("fetch"):
            fetched = self._store.fetch_object(record.bucket, record.key, None,
                                               max_bytes=self._settings.max_image_bytes)
        logger.debug("record %s: fetched %d bytes, eTag %s", alias, len(fetched.body), fetched.etag)
        content_key = _checked_length(processed_key(record.key, dicom=is_dicom(fetched.body)))
        if content_key != output_key:
            recorded_etag = recorded_source_etag(self._store.recorded_metadata(processed_bucket, content_key))
        if recorded_etag and recorded_etag == fetched.etag:
            return None
        return fetched

    def _write_unless_superseded(self, record: ObjectRecord, fetched_etag: str,
                                 outputs: list[tuple[str, Output]]) -> bool:
        """Write the outputs (bucket, output) in order, unless a newer version of the input was uploaded since it was
        fetched (its own event writes it): False then, and nothing is written.

        Blocking (run in a thread): the HEAD of the input, then the writes, with no event-loop turn between them.
        Within a process records of one key take turns, so the newer one waits and this sees its upload. Across
        replicas it is what keeps one that analyzed v1 for seconds from writing over v2's outputs, written
        meanwhile by another. The window left: v2's whole run fitting between this check and the writes that
        follow (milliseconds, unless S3 retries hold those writes up). A deleted input is not a newer version.
        Conditional writes (If-Match) cannot close it on Ceph RGW 16: see docs/operations.md#s3-calls.
        """
        current = self._store.current_etag(record.bucket, record.key)
        if current is not None and current != fetched_etag:
            return False
        for bucket, output in outputs:
            with metrics.timed_stage("write"):
                self._store.put_object(bucket, output.key, output.body, content_type=output.content_type,
                                       metadata=output.metadata)
        return True

    async def _write(self, bucket: str, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> None:
        """One S3 write, off the event loop, timed as the record's `write` stage."""
        with metrics.timed_stage("write"):
            await asyncio.to_thread(
                self._store.put_object, bucket, key, body, content_type=content_type, metadata=metadata
            )

    async def _write_failure_record(
        self, record: ObjectRecord, alias: str, processed_bucket: str, error: PipelineError
    ) -> None:
        recorded = await asyncio.to_thread(self._store.recorded_metadata, processed_bucket, failure_key(alias))
        # A redelivery (a Kafka replay, a sender's retry) of a failure already on record keeps the first record.
        if failure_on_record(recorded, record.etag) == error.reason:
            return
        failure = FailureRecord(
            pseudonym=alias, bucket=record.bucket, reason=error.reason, message=error.message,
            event_id=record.event_id, event_name=record.event_name, source_etag=record.etag, time=self._clock(),
            service_version=__version__,
        )
        try:
            await self._write(processed_bucket, failure.key, failure.document(), "application/json", failure.metadata)
        except StorageUnavailable:
            if error.reason != MISSING_BUCKET:
                raise
            # The input bucket does not exist, nor (default naming) its processed bucket: no redelivery can change
            # the verdict, and a 503 would be retried forever (a Ceph queue holding events of a deleted bucket).
            logger.warning("record %s: bucket %s does not exist, nor %s: no failure record kept", alias,
                           record.bucket, processed_bucket)

    @staticmethod
    def _finish(result: RecordResult, started: float, detail: str | None = None) -> RecordResult:
        # The record's summary line is `process_record`'s; a failure's explanation (never a key) is extra detail.
        if detail:
            logger.debug("record %s: %s after %.0f ms: %s", result.pseudonym, result.outcome.value,
                         (time.perf_counter() - started) * 1000, detail)
        return result


def _checked_length(output_key: str) -> str:
    """The processed copy's key, refused when too long: an input key of 1015-1024 bytes is valid, its processed key
    is not, and S3 would refuse every request for it, so this is permanent, not a 503 redelivered for ever."""
    if len(output_key.encode()) > MAX_KEY_BYTES:
        raise UnprocessableObject("the processed copy's key would exceed S3's limit", reason="key-too-long")
    return output_key


def _result_summary(result: RecordResult) -> dict[str, Any]:
    """Outcome fields of a record's summary line; `status` is what the outcome calls for on its own (a plain
    Ceph push is answered 200 even for a permanent failure: service.app decides the answer)."""
    status = UnprocessableObject.status_code if result.outcome is Outcome.FAILED else 200
    fields = {"outcome": result.outcome.value, "reason": result.reason, "status": status, "label": result.label,
              "risk": result.risk}
    return {name: value for name, value in fields.items() if value is not None}


def _error_summary(error: Exception) -> dict[str, Any]:
    """Outcome fields for a record that raised: transient (5xx, redelivered), refused (4xx) or error (a bug)."""
    if not isinstance(error, PipelineError):
        return {"outcome": "error", "reason": "internal", "status": 500}
    outcome = "transient" if error.status_code >= 500 else "refused"
    return {"outcome": outcome, "reason": error.reason, "status": error.status_code}
