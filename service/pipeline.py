"""The pipeline for one object: fetch -> infer -> stamp -> anonymize -> write both outputs.

Callable without any server (tests, CLI tools). Delivery is at-least-once, so every step is idempotent: output
keys are deterministic, the processed copy is written last and records the source eTag, and a redelivered event
whose eTag is already recorded writes nothing. Permanent failures leave a durable failure record; transient ones
raise `TransientFailure` before anything is half-written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from service import __version__
from service.analysis import Analysis
from service.errors import ForbiddenBucket, PipelineError, UnprocessableObject
from service.events import Delivery, ObjectRecord
from service.inference import InferenceEngine
from service.model_spec import ModelSpec
from service.object_keys import anonymized_key, failure_key, processed_key, pseudonym
from service.settings import Settings
from service.storage import SOURCE_ETAG, SOURCE_VERSION_ID, ObjectStore

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    PROCESSED = "processed"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class RecordResult:
    """What happened to one record; safe to log and return (pseudonyms only, never keys)."""

    outcome: Outcome
    pseudonym: str | None = None
    #: Why it was skipped or failed (stable short codes such as "duplicate", "missing-object").
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
            result = await self._process_created(record)
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

    async def _process_created(self, record: ObjectRecord) -> RecordResult:
        started = time.perf_counter()
        alias = pseudonym(self._secret, record.bucket, record.key)
        processed_bucket = self._settings.processed_bucket_for(record.bucket)
        output_key = processed_key(record.key)
        recorded = await asyncio.to_thread(self._store.recorded_metadata, processed_bucket, output_key)
        recorded_etag = (recorded or {}).get(SOURCE_ETAG)
        logger.debug("record %s: %s in %s, processed eTag on record: %s", alias, record.event_name, record.bucket,
                     recorded_etag or "none")
        if record.etag and recorded_etag == record.etag:
            return self._finish(RecordResult(Outcome.SKIPPED, alias, reason="duplicate"), started)
        try:
            # The current object, not the event's version: a stale or reordered event then converges on the
            # newest content, and is recognised as a duplicate once that content is processed.
            fetched = await asyncio.to_thread(
                self._store.fetch_object, record.bucket, record.key, None, max_bytes=self._settings.max_image_bytes
            )
            logger.debug("record %s: fetched %d bytes, eTag %s", alias, len(fetched.body), fetched.etag)
            if recorded_etag and recorded_etag == fetched.etag:
                return self._finish(RecordResult(Outcome.SKIPPED, alias, reason="duplicate"), started)
            analysis = await self._engine.analyze(
                fetched.body, anonymize_always=self._settings.anonymize_when == "always"
            )
        except UnprocessableObject as error:
            await self._write_failure_record(record, alias, processed_bucket, error)
            return self._finish(RecordResult(Outcome.FAILED, alias, reason=error.reason), started, error.message)

        logger.debug("record %s: %s image, %d text region(s) found", alias, analysis.image_format,
                     analysis.text_regions)
        metadata = self._output_metadata(analysis, fetched.etag)
        anonymized_bucket = anonymized_name = None
        if analysis.anonymized is not None:
            anonymized_bucket = self._settings.anonymized_bucket_for(record.bucket)
            anonymized_name = anonymized_key(alias, record.key, analysis.image_format)
            await asyncio.to_thread(
                self._store.put_object,
                anonymized_bucket,
                anonymized_name,
                analysis.anonymized,
                content_type=analysis.content_type,
                metadata=metadata,
            )
        # Written last: its source eTag marks the object as done, so a crash before this point means a redelivery
        # redoes everything (overwriting the same anonymized key) instead of skipping a half-done object.
        processed_metadata = metadata | {"pseudonym": alias}
        if fetched.version_id:
            processed_metadata[SOURCE_VERSION_ID] = fetched.version_id
        await asyncio.to_thread(
            self._store.put_object,
            processed_bucket,
            output_key,
            analysis.stamped,
            content_type=analysis.content_type,
            metadata=processed_metadata,
        )
        result = RecordResult(
            Outcome.PROCESSED,
            alias,
            label=analysis.prediction.label,
            risk=analysis.prediction.risk,
            anonymized_bucket=anonymized_bucket,
            anonymized_key=anonymized_name,
        )
        return self._finish(result, started)

    def _output_metadata(self, analysis: Analysis, source_etag: str) -> dict[str, str]:
        prediction = analysis.prediction
        metadata = {
            "label": prediction.label,
            "model-name": self._spec.name,
            "model-version": self._spec.version,
            SOURCE_ETAG: source_etag,
        }
        if prediction.risk is not None:
            metadata["risk"] = f"{prediction.risk:.6f}"
        else:
            metadata["top"] = ",".join(f"{name}:{probability:.4f}" for name, probability in prediction.top)
        return metadata

    async def _write_failure_record(
        self, record: ObjectRecord, alias: str, processed_bucket: str, error: PipelineError
    ) -> None:
        document = {
            "pseudonym": alias,
            "bucket": record.bucket,
            "reason": error.reason,
            "message": error.message,
            "event_id": record.event_id,
            "event_name": record.event_name,
            "source_etag": record.etag,
            "time": self._clock().isoformat(),
            "service_version": __version__,
        }
        await asyncio.to_thread(
            self._store.put_object,
            processed_bucket,
            failure_key(alias),
            json.dumps(document, indent=2).encode(),
            content_type="application/json",
            metadata={"pseudonym": alias, "reason": error.reason},
        )

    @staticmethod
    def _finish(result: RecordResult, started: float, detail: str | None = None) -> RecordResult:
        logger.info(
            "record %s: %s%s%s (%.0f ms)",
            result.pseudonym,
            result.outcome.value,
            f" [{result.reason}]" if result.reason else "",
            f" {result.label} risk={result.risk:.4f}" if result.risk is not None else "",
            (time.perf_counter() - started) * 1000,
            extra={"detail": detail},
        )
        return result
