"""`xray-pipeline process`: the service's analysis on local files and folders or `s3://` prefixes, with no server.

Each image goes through the same inference engine as an event (spawned workers, batches), and its outputs go to a
folder or an S3 prefix: `processed/<path>-processed.<ext>` (stamped) and `anonymized/<pseudonym><ext>`, the
anonymized copy first and the processed copy last, each written whole (a temporary file renamed into place; an S3
put). A DICOM input (known by its content) gets `.dcm` outputs, as in the service (service.outputs). The report has
one row per image (pseudonym, status, reason, label, risk, ...): never a path or key, which hold patient names. A
rerun skips unchanged inputs: the report keeps each input's fingerprint (sha256 of a file, ETag of an object) for
folder outputs; for S3 outputs the processed copy's source eTag does (service.outputs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from service.dicom.sniff import is_dicom
from service.engine.messages import Analysis
from service.errors import ConfigurationError, PipelineError, TransientFailure, UnprocessableObject
from service.files import write_atomically
from service.models.source import resolve_model
from service.models.spec import ModelSpec
from service.outputs import (
    NOT_ASSESSED_REASON_CODE,
    Outcome,
    Output,
    anonymized_key,
    is_done,
    outputs_in_write_order,
    processed_key,
    pseudonym,
)
from service.settings import Settings, load_settings
from service.storage import ObjectStore, make_s3_client
from service.tools.listing import bucket_images, is_s3_uri, local_images, split_s3_prefix
from service.tools.report import Report, ReportRow
from service.tools.run import (
    CONTENT_FAILURES,
    Console,
    ToolEngine,
    configure_tool_logging,
    default_concurrency,
    describe_not_assessed,
    for_each,
    retrying,
    run_to_the_end,
)

logger = logging.getLogger(__name__)

#: The bucket name local files are given for their pseudonym (with their path below the folder named).
LOCAL_BUCKET = "local"
PROCESSED_FOLDER = "processed"
ANONYMIZED_FOLDER = "anonymized"
ALREADY_PROCESSED = "already-processed"
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
    #: Whether it is DICOM by its name (or, without a suffix, its first bytes): a guess until its content is read.
    dicom: bool = False
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

    def processed_path(self, relative: str, *, dicom: bool) -> Path:
        return self.root / PROCESSED_FOLDER / PurePosixPath(processed_key(relative, dicom=dicom))

    def find_done(self, source: Source, alias: str, fingerprint: str, previous: ReportRow | None,
                  anonymize_always: bool, *, dicom: bool) -> ReportRow | None:
        if previous is None or previous.fingerprint != fingerprint:
            return None
        if previous.status is Outcome.FAILED:
            return previous if previous.reason in CONTENT_FAILURES else None
        if not self.processed_path(source.relative, dicom=dicom).is_file():
            return None
        if previous.anonymized:
            if not (self.root / ANONYMIZED_FOLDER / previous.anonymized).is_file():
                return None
        elif anonymize_always:
            return None
        return dataclasses.replace(previous, status=Outcome.SKIPPED, reason=ALREADY_PROCESSED)

    def write(self, outputs: list[Output]) -> None:
        """Outputs named below the folder (see `ProcessRun._outcome`), in the contract's order, each whole (metadata
        has no place in a file)."""
        for output in outputs:
            folder = ANONYMIZED_FOLDER if output.kind == "anonymized" else PROCESSED_FOLDER
            write_atomically(self.root / folder / PurePosixPath(output.key), output.body)

    def publish_report(self, report: Report) -> None:
        pass  # a folder's report is a file in it already


class BucketOutput:
    """Outputs under an S3 prefix; the processed copy's source eTag says which inputs are done."""

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

    def processed_object(self, relative: str, *, dicom: bool) -> str:
        return self.prefix + posixpath.join(PROCESSED_FOLDER, processed_key(relative, dicom=dicom))

    def anonymized_object(self, name: str) -> str:
        return self.prefix + posixpath.join(ANONYMIZED_FOLDER, name)

    def find_done(self, source: Source, alias: str, fingerprint: str, previous: ReportRow | None,
                  anonymize_always: bool, *, dicom: bool) -> ReportRow | None:
        recorded = self.store.recorded_metadata(self.bucket, self.processed_object(source.relative, dicom=dicom))
        if not is_done(recorded, fingerprint):
            return None
        # The anonymized name keeps a known image suffix (`.dcm` for DICOM): it is known without decoding.
        anonymized_name = anonymized_key(alias, source.key, "dicom" if dicom else "")
        has_anonymized = self.store.recorded_metadata(self.bucket, self.anonymized_object(anonymized_name)) is not None
        if anonymize_always and not has_anonymized:
            return None
        risk = recorded.get("risk")
        return ReportRow(alias, Outcome.SKIPPED, ALREADY_PROCESSED, label=unquote(recorded.get("label", "")),
                         risk=float(risk) if risk else None, anonymized=anonymized_name if has_anonymized else "",
                         fingerprint=fingerprint)

    def write(self, outputs: list[Output]) -> None:
        """Outputs named below the prefix (see `ProcessRun._outcome`), in the contract's order."""
        for output in outputs:
            folder = ANONYMIZED_FOLDER if output.kind == "anonymized" else PROCESSED_FOLDER
            self.store.put_object(self.bucket, self.prefix + posixpath.join(folder, output.key), output.body,
                                  content_type=output.content_type, metadata=output.metadata)

    def publish_report(self, report: Report) -> None:
        """The report beside the outputs, when no local report file was asked for."""
        name = "report.json" if report.json_format else "report.csv"
        content_type = "application/json" if report.json_format else "text/csv"
        self.store.put_object(self.bucket, self.prefix + name, report.render(), content_type=content_type,
                              metadata={})


Destination = FolderOutput | BucketOutput


def plan_sources(paths: list[str], output: Destination, s3_client: Any) -> list[Source]:
    """Every input image, in argument order; inputs that would share an output path are marked duplicates.

    The output path is the processed copy's: `scan.dcm`, `scan.dicom` and a DICOM `scan` all make
    `scan-processed.dcm`. (Whether an input is DICOM is guessed from its name or first bytes here.)
    """
    sources: list[Source] = []
    claimed: set[str] = set()
    names: set[tuple[str, str]] = set()
    for source in _sources(paths, output, s3_client):
        relative = str(PurePosixPath(source.relative)) if source.relative else ""
        claim = processed_key(relative, dicom=source.dicom) if relative else ""
        duplicate = claim in claimed or (source.bucket, source.key) in names
        claimed.add(claim)
        names.add((source.bucket, source.key))
        sources.append(dataclasses.replace(source, duplicate=duplicate) if duplicate else source)
    return sources


def _sources(paths: list[str], output: Destination, s3_client: Any) -> Iterator[Source]:
    for number, argument in enumerate(paths, 1):
        if is_s3_uri(argument):
            bucket, prefix = split_s3_prefix(argument)
            # Outputs go below the last `/` of the prefix, as files go below the folder named.
            folder = prefix[: prefix.rfind("/") + 1]
            for listed in bucket_images(s3_client, bucket, prefix):
                if not output.owns_object(bucket, listed.key):
                    yield Source(bucket, listed.key, listed.key[len(folder):], etag=listed.etag, dicom=listed.dicom)
            continue
        root = Path(argument)
        if not root.exists():
            # The path itself is not repeated: operators name folders and files after patients too.
            raise ConfigurationError(f"PATH argument {number}: no such file or folder")
        for image in local_images(root, skip=output.owns_folder):
            yield Source(LOCAL_BUCKET, image.relative, image.relative, path=image.path, dicom=image.dicom)


def _read_image_file(path: Path, max_bytes: int) -> bytes:
    if path.stat().st_size > max_bytes:
        raise UnprocessableObject(f"file is above the limit of {max_bytes} bytes", reason="too-large")
    return path.read_bytes()


class ProcessRun:
    """One `process` run: analyzes each source (bounded concurrency) and reports it."""

    def __init__(self, settings: Settings, spec: ModelSpec, output: Destination, report: Report,
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
        return self.console.tally() if self.console else {}

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
        self.console.record(row.status, not_assessed=row.reason == NOT_ASSESSED_REASON_CODE)

    async def _outcome(self, source: Source) -> ReportRow:
        alias = pseudonym(self._secret, source.bucket, source.key)
        if source.duplicate:
            return ReportRow(alias, Outcome.FAILED, "duplicate-path")
        if not self.output.holds(source.relative):
            return ReportRow(alias, Outcome.FAILED, "unsafe-path")
        fingerprint = ""
        try:
            if source.path is not None:
                try:
                    data = await asyncio.to_thread(_read_image_file, source.path, self.settings.max_image_bytes)
                except OSError:
                    return ReportRow(alias, Outcome.FAILED, "unreadable")
                fingerprint = hashlib.sha256(data).hexdigest()
                done = await self._find_done(source, alias, fingerprint, dicom=is_dicom(data))
                if done is not None:
                    return done
            else:
                assert self.store is not None
                # Before the fetch only the name (or the listing's sniff) tells whether the input is DICOM, and so
                # where its processed copy is; the content decides, and a wrong guess costs one more lookup.
                done = await self._find_done(source, alias, source.etag, dicom=source.dicom)
                if done is not None:
                    return done
                fetched = await self._storage(self.store.fetch_object, source.bucket, source.key, None,
                                              max_bytes=self.settings.max_image_bytes)
                data, fingerprint = fetched.body, fetched.etag
                if is_dicom(data) != source.dicom:
                    done = await self._find_done(source, alias, fingerprint, dicom=not source.dicom)
                    if done is not None:
                        return done
            engine = await self._engine.get()
            analysis: Analysis = await retrying(
                lambda: engine.analyze(data, anonymize_always=self._always), retry_on=(TransientFailure,)
            )
            # Named by the path below the folder or prefix named (the extension, all the anonymized name may keep,
            # is the key's): the outputs' keys are their places below processed/ and anonymized/.
            outputs = outputs_in_write_order(analysis, self.spec, alias=alias, source_key=source.relative,
                                             source_etag=fingerprint)
            anonymized_name = next((output.key for output in outputs if output.kind == "anonymized"), "")
            try:
                await self._storage(self.output.write, outputs)
            except OSError:
                return ReportRow(alias, Outcome.FAILED, "unwritable", fingerprint=fingerprint)
            prediction = analysis.prediction
            return ReportRow(alias, Outcome.PROCESSED,
                             NOT_ASSESSED_REASON_CODE if prediction.not_assessed_reason is not None else "",
                             label=prediction.label, risk=prediction.risk, anonymized=anonymized_name,
                             fingerprint=fingerprint)
        except PipelineError as error:
            return ReportRow(alias, Outcome.FAILED, error.reason, fingerprint=fingerprint)
        except ConfigurationError:
            raise  # the model cannot be loaded: nothing can be processed
        except Exception as error:
            # Only the type: messages of arbitrary errors may carry a path.
            logger.error("image %s: unexpected %s", alias, type(error).__name__)
            return ReportRow(alias, Outcome.FAILED, "internal", fingerprint=fingerprint)

    async def _find_done(self, source: Source, alias: str, fingerprint: str, *, dicom: bool) -> ReportRow | None:
        done: ReportRow | None = await self._storage(self.output.find_done, source, alias, fingerprint,
                                                     self.report.previous.get(alias), self._always, dicom=dicom)
        return done

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
    output: Destination
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
    return run_to_the_end("process", run, items=f"{len(sources)} image(s)", describe=_describe,
                          failed=lambda counts: bool(counts.get(Outcome.FAILED)))


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(status, 0)} {status}" for status in Outcome) + describe_not_assessed(counts)
