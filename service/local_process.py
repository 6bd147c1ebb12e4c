"""`xray-pipeline process`: the service's analysis on local files and folders or `s3://` prefixes, with no server.

Each image goes through the same inference engine as an event (spawned workers, batches), and its outputs go to a
folder or an S3 prefix: `processed/<path>-processed.<ext>` (stamped) and `anonymized/<pseudonym><ext>`, the
anonymized copy first and the processed copy last, each written whole (a temporary file renamed into place; an S3
put). The report has one row per image (pseudonym, status, reason, label, risk, ...): never a path or key, which
hold patient names. A rerun skips unchanged inputs: the report keeps each input's fingerprint (sha256 of a file,
ETag of an object) for folder outputs; for S3 outputs the processed copy's `source-etag` metadata does.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from service.analysis import Analysis
from service.errors import ConfigurationError, PipelineError, TransientFailure, UnprocessableObject
from service.listing import bucket_images, is_s3_uri, local_images, split_s3_prefix
from service.model_source import resolve_model
from service.model_spec import ModelSpec
from service.object_keys import anonymized_key, processed_key, pseudonym
from service.settings import Settings, load_settings
from service.storage import SOURCE_ETAG, ObjectStore, make_s3_client
from service.tool_run import (
    CONTENT_FAILURES,
    INTERRUPTED_EXIT,
    Console,
    ToolEngine,
    configure_tool_logging,
    default_concurrency,
    for_each,
    retrying,
)

logger = logging.getLogger(__name__)

#: The bucket name local files are given for their pseudonym (with their path below the folder named).
LOCAL_BUCKET = "local"
PROCESSED_FOLDER = "processed"
ANONYMIZED_FOLDER = "anonymized"
ALREADY_PROCESSED = "already-processed"
REPORT_COLUMNS = ("pseudonym", "status", "reason", "label", "risk", "anonymized", "fingerprint")
_TEMP_PREFIX = ".xray-partial-"
#: How often a JSON report (rewritten whole, unlike a CSV one, which is appended to) is saved during a run.
_JSON_REPORT_EVERY_S = 1.0


class Status(StrEnum):
    PROCESSED = "processed"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class ReportRow:
    """One image's line in the report: its pseudonym and what happened, nothing of its path."""

    pseudonym: str
    status: Status
    reason: str = ""
    label: str = ""
    risk: float | None = None
    #: The anonymized copy's name (`<pseudonym><ext>`) when there is one.
    anonymized: str = ""
    #: sha256 of the input file, or the input object's ETag: a rerun skips an input whose fingerprint is unchanged.
    fingerprint: str = ""

    def to_text(self) -> dict[str, str]:
        values = dataclasses.asdict(self) | {"risk": "" if self.risk is None else f"{self.risk:.6f}"}
        return {column: str(values[column]) for column in REPORT_COLUMNS}

    def to_json(self) -> dict[str, Any]:
        return {column: getattr(self, column) for column in REPORT_COLUMNS}

    @classmethod
    def parse(cls, values: dict[str, Any]) -> ReportRow | None:
        """A row read back from a report; None for one that is not whole (a run killed while writing it)."""
        try:
            risk = values.get("risk")
            return cls(
                pseudonym=str(values["pseudonym"]),
                status=Status(values["status"]),
                reason=str(values.get("reason") or ""),
                label=str(values.get("label") or ""),
                risk=None if risk in (None, "") else float(risk),
                anonymized=str(values.get("anonymized") or ""),
                fingerprint=str(values.get("fingerprint") or ""),
            )
        except (KeyError, TypeError, ValueError):
            return None


class Report:
    """The rows of a report file, the last row per pseudonym winning.

    It is the resume state of folder outputs, so rows are saved as they come: a CSV report is appended to and
    flushed per row; a JSON one is rewritten whole (atomically) every second. At the end the file is rewritten
    with one row per pseudonym. Rows of earlier runs for inputs not in this run are kept.
    """

    def __init__(self, path: Path | None, *, json_format: bool = False) -> None:
        self.path = path
        self.json_format = json_format if path is None else path.suffix.lower() == ".json"
        self.previous: dict[str, ReportRow] = {}
        self.rows: dict[str, ReportRow] = {}
        self._appender: io.TextIOWrapper | None = None
        self._saved_at = 0.0

    @staticmethod
    def check_suffix(path: Path) -> None:
        if path.suffix.lower() not in (".csv", ".json"):
            raise ConfigurationError("--report: the report file must end in .csv or .json")

    def open(self) -> Report:
        if self.path is None:
            return self
        if self.path.exists():
            self.previous = self._read(self.path)
            self.rows = dict(self.previous)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()  # also drops a half-written last line of a killed run before appending after it
        if not self.json_format:
            self._appender = self.path.open("a", newline="", encoding="utf-8")
        return self

    def add(self, row: ReportRow) -> None:
        self.rows[row.pseudonym] = row
        if self._appender is not None:
            csv.DictWriter(self._appender, REPORT_COLUMNS).writerow(row.to_text())
            self._appender.flush()
        elif self.path is not None and time.monotonic() - self._saved_at >= _JSON_REPORT_EVERY_S:
            self.save()

    def save(self) -> None:
        if self.path is not None:
            write_atomically(self.path, self.render())
            self._saved_at = time.monotonic()

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        self.save()

    def render(self) -> bytes:
        if self.json_format:
            return (json.dumps([row.to_json() for row in self.rows.values()], indent=1) + "\n").encode()
        text = io.StringIO()
        writer = csv.DictWriter(text, REPORT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(row.to_text() for row in self.rows.values())
        return text.getvalue().encode()

    def _read(self, path: Path) -> dict[str, ReportRow]:
        foreign = ConfigurationError("--report: the file exists and is not a report of `xray-pipeline process`")
        try:
            text = path.read_text(encoding="utf-8")
            if self.json_format:
                items = json.loads(text) if text.strip() else []
                if not isinstance(items, list):
                    raise foreign
            else:
                reader = csv.DictReader(io.StringIO(text))
                if text.strip() and tuple(reader.fieldnames or ()) != REPORT_COLUMNS:
                    raise foreign
                items = list(reader)
        except (OSError, UnicodeDecodeError, ValueError, csv.Error):
            raise foreign from None
        rows = [ReportRow.parse(item) if isinstance(item, dict) else None for item in items]
        return {row.pseudonym: row for row in rows if row is not None}


def write_atomically(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file beside it, renamed into place once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, _FILE_MODE)  # mkstemp's 0600, made what the umask gives a new file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


@dataclass(frozen=True)
class Source:
    """One input image."""

    #: With `key`, what the pseudonym is made of: the object's bucket and key, or LOCAL_BUCKET and the file's path
    #: below the folder named on the command line.
    bucket: str
    key: str
    #: Where its outputs go below `processed/` (before `-processed` is added).
    relative: str
    path: Path | None = None
    #: The listed ETag of an S3 input.
    etag: str = ""
    #: Another input already claimed the same output path (or the same pseudonym).
    duplicate: bool = False


class FolderOutput:
    """Outputs under a local folder; the report (the resume state) says which inputs are done."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._resolved = root.resolve()

    def default_report(self) -> Path:
        return self.root / "report.csv"

    def owns_folder(self, folder: Path) -> bool:
        return folder.resolve() == self._resolved

    def owns_object(self, bucket: str, key: str) -> bool:
        return False

    def holds(self, relative: str) -> bool:
        """Whether a path can be placed below the folder: no `..`, not absolute (S3 keys may be anything)."""
        parts = PurePosixPath(relative).parts
        return bool(parts) and not relative.startswith("/") and ".." not in parts

    def processed_path(self, relative: str) -> Path:
        return self.root / PROCESSED_FOLDER / PurePosixPath(processed_key(relative))

    def find_done(self, source: Source, alias: str, fingerprint: str, previous: ReportRow | None,
                  anonymize_always: bool) -> ReportRow | None:
        if previous is None or previous.fingerprint != fingerprint:
            return None
        if previous.status is Status.FAILED:
            return previous if previous.reason in CONTENT_FAILURES else None
        if not self.processed_path(source.relative).is_file():
            return None
        if previous.anonymized:
            if not (self.root / ANONYMIZED_FOLDER / previous.anonymized).is_file():
                return None
        elif anonymize_always:
            return None
        return dataclasses.replace(previous, status=Status.SKIPPED, reason=ALREADY_PROCESSED)

    def write(self, source: Source, alias: str, anonymized_name: str, analysis: Analysis,
              metadata: dict[str, str]) -> None:
        if analysis.anonymized is not None:
            write_atomically(self.root / ANONYMIZED_FOLDER / anonymized_name, analysis.anonymized)
        write_atomically(self.processed_path(source.relative), analysis.stamped)

    def publish_report(self, report: Report) -> None:
        pass  # a folder's report is a file in it already


class BucketOutput:
    """Outputs under an S3 prefix; the processed copy's `source-etag` says which inputs are done."""

    def __init__(self, store: ObjectStore, bucket: str, prefix: str) -> None:
        self.store = store
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"

    def owns_folder(self, folder: Path) -> bool:
        return False

    def owns_object(self, bucket: str, key: str) -> bool:
        return bucket == self.bucket and key.startswith(
            (self.prefix + PROCESSED_FOLDER + "/", self.prefix + ANONYMIZED_FOLDER + "/")
        )

    def holds(self, relative: str) -> bool:
        return bool(relative)

    def processed_object(self, relative: str) -> str:
        return self.prefix + posixpath.join(PROCESSED_FOLDER, processed_key(relative))

    def anonymized_object(self, name: str) -> str:
        return self.prefix + posixpath.join(ANONYMIZED_FOLDER, name)

    def find_done(self, source: Source, alias: str, fingerprint: str, previous: ReportRow | None,
                  anonymize_always: bool) -> ReportRow | None:
        recorded = self.store.recorded_metadata(self.bucket, self.processed_object(source.relative))
        if not fingerprint or recorded is None or unquote(recorded.get(SOURCE_ETAG, "")) != fingerprint:
            return None
        # Inputs are listed by image suffix, which the anonymized name keeps: it is known without decoding.
        anonymized_name = anonymized_key(alias, source.key, "")
        has_anonymized = self.store.recorded_metadata(self.bucket, self.anonymized_object(anonymized_name)) is not None
        if anonymize_always and not has_anonymized:
            return None
        risk = recorded.get("risk")
        return ReportRow(alias, Status.SKIPPED, ALREADY_PROCESSED, label=unquote(recorded.get("label", "")),
                         risk=float(risk) if risk else None, anonymized=anonymized_name if has_anonymized else "",
                         fingerprint=fingerprint)

    def write(self, source: Source, alias: str, anonymized_name: str, analysis: Analysis,
              metadata: dict[str, str]) -> None:
        if analysis.anonymized is not None:
            self.store.put_object(self.bucket, self.anonymized_object(anonymized_name), analysis.anonymized,
                                  content_type=analysis.content_type, metadata=metadata)
        # Last: its source-etag marks the input as done.
        self.store.put_object(self.bucket, self.processed_object(source.relative), analysis.stamped,
                              content_type=analysis.content_type, metadata=metadata | {"pseudonym": alias})

    def publish_report(self, report: Report) -> None:
        """The report beside the outputs, when no local report file was asked for."""
        name = "report.json" if report.json_format else "report.csv"
        content_type = "application/json" if report.json_format else "text/csv"
        self.store.put_object(self.bucket, self.prefix + name, report.render(), content_type=content_type,
                              metadata={})


Output = FolderOutput | BucketOutput


def output_metadata(analysis: Analysis, spec: ModelSpec, fingerprint: str) -> dict[str, str]:
    """The metadata the service writes on its outputs, for outputs in S3."""
    prediction = analysis.prediction
    metadata = {"label": prediction.label, "model-name": spec.name, "model-version": spec.version,
                SOURCE_ETAG: fingerprint}
    if prediction.risk is not None:
        metadata["risk"] = f"{prediction.risk:.6f}"
    else:
        metadata["top"] = ",".join(f"{name}:{probability:.4f}" for name, probability in prediction.top)
    return metadata


def plan_sources(paths: list[str], output: Output, s3_client: Any) -> list[Source]:
    """Every input image, in argument order; inputs that would share an output path are marked duplicates."""
    sources: list[Source] = []
    claimed: set[str] = set()
    names: set[tuple[str, str]] = set()
    for source in _sources(paths, output, s3_client):
        relative = str(PurePosixPath(source.relative)) if source.relative else ""
        duplicate = relative in claimed or (source.bucket, source.key) in names
        claimed.add(relative)
        names.add((source.bucket, source.key))
        sources.append(dataclasses.replace(source, duplicate=duplicate) if duplicate else source)
    return sources


def _sources(paths: list[str], output: Output, s3_client: Any) -> Iterator[Source]:
    for number, argument in enumerate(paths, 1):
        if is_s3_uri(argument):
            bucket, prefix = split_s3_prefix(argument)
            # Outputs go below the last `/` of the prefix, as files go below the folder named.
            folder = prefix[: prefix.rfind("/") + 1]
            for listed in bucket_images(s3_client, bucket, prefix):
                if not output.owns_object(bucket, listed.key):
                    yield Source(bucket, listed.key, listed.key[len(folder):], etag=listed.etag)
            continue
        root = Path(argument)
        if not root.exists():
            # The path itself is not repeated: operators name folders and files after patients too.
            raise ConfigurationError(f"PATH argument {number}: no such file or folder")
        for image in local_images(root, skip=output.owns_folder):
            yield Source(LOCAL_BUCKET, image.relative, image.relative, path=image.path)


def _read_image_file(path: Path, max_bytes: int) -> bytes:
    if path.stat().st_size > max_bytes:
        raise UnprocessableObject(f"file is above the limit of {max_bytes} bytes", reason="too-large")
    return path.read_bytes()


class ProcessRun:
    """One `process` run: analyzes each source (bounded concurrency) and reports it."""

    def __init__(self, settings: Settings, spec: ModelSpec, output: Output, report: Report,
                 store: ObjectStore | None, sources: list[Source], *, progress: bool) -> None:
        self.settings = settings
        self.spec = spec
        self.output = output
        self.report = report
        self.store = store
        self.sources = sources
        self.progress = progress
        self.console: Console | None = None
        self._engine = ToolEngine(settings, spec)
        self._secret = settings.effective_pseudonym_key
        self._always = settings.anonymize_when == "always"

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.console.counts) if self.console else {}

    async def execute(self) -> None:
        limit = default_concurrency(self.settings)
        # File reads, S3 calls and writes run in threads; enough of them for every image in flight.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(limit + 4, thread_name_prefix="io"))
        with Console(len(self.sources), progress=self.progress) as console:
            self.console = console
            try:
                await for_each(self.sources, self._handle, limit=limit)
            finally:
                await self._engine.stop()
                self.report.close()
                if self.report.path is None:
                    try:
                        self.output.publish_report(self.report)
                    except PipelineError as error:
                        logger.warning("the report could not be written beside the outputs (%s)", error.reason)

    async def _handle(self, source: Source) -> None:
        row = await self._outcome(source)
        self.report.add(row)
        assert self.console is not None
        self.console.record(row.status)

    async def _outcome(self, source: Source) -> ReportRow:
        alias = pseudonym(self._secret, source.bucket, source.key)
        if source.duplicate:
            return ReportRow(alias, Status.FAILED, "duplicate-path")
        if not self.output.holds(source.relative):
            return ReportRow(alias, Status.FAILED, "unsafe-path")
        fingerprint = ""
        try:
            if source.path is not None:
                try:
                    data = await asyncio.to_thread(_read_image_file, source.path, self.settings.max_image_bytes)
                except OSError:
                    return ReportRow(alias, Status.FAILED, "unreadable")
                fingerprint = hashlib.sha256(data).hexdigest()
                done = await self._storage(self.output.find_done, source, alias, fingerprint,
                                           self.report.previous.get(alias), self._always)
                if done is not None:
                    return done
            else:
                assert self.store is not None
                done = await self._storage(self.output.find_done, source, alias, source.etag,
                                           self.report.previous.get(alias), self._always)
                if done is not None:
                    return done
                fetched = await self._storage(self.store.fetch_object, source.bucket, source.key, None,
                                              max_bytes=self.settings.max_image_bytes)
                data, fingerprint = fetched.body, fetched.etag
            engine = await self._engine.get()
            analysis: Analysis = await retrying(
                lambda: engine.analyze(data, anonymize_always=self._always), retry_on=(TransientFailure,)
            )
            anonymized_name = (
                anonymized_key(alias, source.key, analysis.image_format) if analysis.anonymized is not None else ""
            )
            metadata = output_metadata(analysis, self.spec, fingerprint)
            try:
                await self._storage(self.output.write, source, alias, anonymized_name, analysis, metadata)
            except OSError:
                return ReportRow(alias, Status.FAILED, "unwritable", fingerprint=fingerprint)
            prediction = analysis.prediction
            return ReportRow(alias, Status.PROCESSED, label=prediction.label, risk=prediction.risk,
                             anonymized=anonymized_name, fingerprint=fingerprint)
        except PipelineError as error:
            return ReportRow(alias, Status.FAILED, error.reason, fingerprint=fingerprint)
        except ConfigurationError:
            raise  # the model cannot be loaded: nothing can be processed
        except Exception as error:
            # Only the type: messages of arbitrary errors may carry a path.
            logger.error("image %s: unexpected %s", alias, type(error).__name__)
            return ReportRow(alias, Status.FAILED, "internal", fingerprint=fingerprint)

    @staticmethod
    async def _storage(call: Any, *args: Any, **kwargs: Any) -> Any:
        """A blocking S3 or file call in a thread, retried while S3 is unavailable."""
        return await retrying(lambda: asyncio.to_thread(call, *args, **kwargs), retry_on=(TransientFailure,))


def run_process(paths: list[str], *, out: str, report: str | None, anonymize: str | None, progress: bool) -> int:
    """The `process` command; returns its exit status (0 all processed or skipped, 1 any failed, 130 Ctrl-C)."""
    settings = load_settings()
    if anonymize is not None:
        settings = settings.model_copy(update={"anonymize_when": anonymize})
    configure_tool_logging(settings)
    if report is not None:
        Report.check_suffix(Path(report))
    needs_s3 = is_s3_uri(out) or any(is_s3_uri(path) for path in paths)
    s3_client = make_s3_client(settings) if needs_s3 else None
    store = ObjectStore(s3_client) if needs_s3 else None
    output: Output
    if is_s3_uri(out):
        assert store is not None
        output = BucketOutput(store, *split_s3_prefix(out))
        run_report = Report(Path(report) if report else None)
    else:
        output = FolderOutput(Path(out))
        run_report = Report(Path(report) if report else output.default_report())
    spec = resolve_model(settings, make_s3_client)
    sources = plan_sources(paths, output, s3_client)
    try:
        run_report.open()
    except OSError as error:
        raise ConfigurationError(f"--report: the report file cannot be written ({type(error).__name__})") from None
    run = ProcessRun(settings, spec, output, run_report, store, sources, progress=progress)
    try:
        asyncio.run(run.execute())
    except KeyboardInterrupt:
        print(f"process: interrupted after {_describe(run.counts)}; run the same command again to finish",
              file=sys.stderr)
        return INTERRUPTED_EXIT
    print(f"process: {len(sources)} image(s): {_describe(run.counts)}", file=sys.stderr)
    return 1 if run.counts.get(Status.FAILED) else 0


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(status, 0)} {status}" for status in Status)
