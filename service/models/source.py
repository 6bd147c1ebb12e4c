"""Where the model comes from: a local spec file, or a spec and its weights in an S3 bucket (`MODEL_URI`).

`resolve_model` runs once at start-up, before the service can report ready, and returns a spec whose weights are a
local file, checked against `MODEL_SHA256` when it is set. Weights fetched from S3 are cached under
`MODEL_CACHE_DIR` by bucket, key and ETag; a download goes to a uniquely named temporary file that is renamed into
place only when complete and verified, so the cache never holds a partial or wrong file, also when several
processes start at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError, S3ValidationError

from service.errors import ConfigurationError
from service.models.backends import check_backend_installed
from service.models.spec import BACKEND_SUFFIXES, ModelSpec
from service.settings import split_s3_uri

if TYPE_CHECKING:
    from service.settings import S3Settings, Settings

logger = logging.getLogger(__name__)

# A spec is a few hundred bytes: anything this large is not one, and is not read into memory.
MAX_SPEC_BYTES = 1024 * 1024
PARTIAL_SUFFIX = ".partial"
# Only a process killed mid-download leaves a partial file; one this old belongs to no running download.
_STALE_PARTIAL_S = 3600.0
_HASH_CHUNK_BYTES = 1024 * 1024
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# s3transfer's ranged GETs carry If-Match with the ETag of the first part.
_CHANGED_CODES = {"PreconditionFailed", "412"}
_TRANSFER_ERRORS = (ClientError, BotoCoreError, RetriesExceededError, S3DownloadFailedError, S3ValidationError)
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,16}$")


@dataclass(frozen=True)
class S3Location:
    """One object in a bucket."""

    bucket: str
    key: str

    @classmethod
    def from_uri(cls, uri: str) -> S3Location | None:
        """`s3://bucket/key` -> its location; None for a local path."""
        try:
            parts = split_s3_uri(uri)
        except ValueError as error:
            raise ConfigurationError(f"MODEL_URI: {error}") from None
        return None if parts is None else cls(*parts)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class CachedFile:
    """A verified local copy of an S3 object."""

    path: Path
    size: int
    cache_hit: bool


def weights_location(spec_location: S3Location, weights: Path | PurePosixPath) -> S3Location:
    """The object an S3 spec's `weights` names: relative to the spec's key, like a local spec's file.

    Only paths below the spec's prefix are accepted: a spec must not reach into other parts of the bucket.
    """
    relative = PurePosixPath(weights.as_posix())
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ConfigurationError(
            f"MODEL_URI: {spec_location}: weights {str(weights)!r} must be a path relative to the spec, without '..'"
        )
    prefix = spec_location.key.rpartition("/")[0]
    return S3Location(spec_location.bucket, f"{prefix}/{relative}" if prefix else str(relative))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_model(settings: Settings, s3_client_factory: Callable[[S3Settings], Any]) -> ModelSpec:
    """The spec to serve, with its weights as a verified local file; fetched from S3 when MODEL_URI says so.

    Blocking (network and disk). The backend's runtime is checked before any weights are downloaded.
    """
    started = time.monotonic()
    spec_location = S3Location.from_uri(settings.model_uri)
    if spec_location is None:
        spec = ModelSpec.load(settings.model_uri).for_backend(settings.model_backend)
        check_backend_installed(spec)
        _check_digest(spec.weights, settings.model_sha256)
        logger.info(
            "model %s %s (%s) from local file %s: %d bytes, %.2f s",
            spec.name, spec.version, spec.backend, spec.weights, spec.weights.stat().st_size,
            time.monotonic() - started,
        )
        return spec

    client = s3_client_factory(settings)
    endpoint = settings.s3_endpoint_url or "AWS S3"
    spec = ModelSpec.parse(
        _read_spec(client, spec_location, endpoint),
        source=str(spec_location),
        is_json=spec_location.key.endswith(".json"),
    )
    backend = settings.model_backend or spec.backend
    weights = PurePosixPath(spec.weights.as_posix())
    if backend != spec.backend:
        # As ModelSpec.for_backend does locally: the other backend's file sits beside the spec's own weights.
        weights = weights.with_suffix(BACKEND_SUFFIXES[backend])
    spec = spec.model_copy(update={"backend": backend})
    check_backend_installed(spec)
    source = weights_location(spec_location, weights)
    cached = ModelCache(settings.model_cache_dir).fetch(client, source, settings.model_sha256, endpoint=endpoint)
    logger.info(
        "model %s %s (%s) from %s: %d bytes, %s, %.2f s",
        spec.name, spec.version, backend, source, cached.size,
        "cache hit" if cached.cache_hit else "downloaded", time.monotonic() - started,
        extra={"model_source": str(source), "model_bytes": cached.size, "cache_hit": cached.cache_hit},
    )
    return spec.model_copy(update={"weights": cached.path})


class ModelCache:
    """Local copies of S3 objects in one directory, one file per bucket, key and ETag."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def entry_path(self, location: S3Location, etag: str) -> Path:
        # Hashed, so no key can name a path outside the directory; the suffix stays because loaders
        # (keras.saving.load_model) go by it.
        identity = hashlib.sha256(f"{location.bucket}\0{location.key}\0{etag}".encode()).hexdigest()[:40]
        suffix = PurePosixPath(location.key).suffix
        return self.directory / (identity + (suffix if _SAFE_SUFFIX.match(suffix) else ""))

    def fetch(
        self, client: Any, location: S3Location, expected_sha256: str | None, *, endpoint: str = "S3"
    ) -> CachedFile:
        """The object as a local file: the cached copy when its ETag is unchanged, else a fresh download."""
        etag, size = _head(client, location, endpoint)
        entry = self.entry_path(location, etag)
        if entry.is_file() and entry.stat().st_size == size:
            if expected_sha256 is None or file_sha256(entry) == expected_sha256:
                return CachedFile(entry, size, cache_hit=True)
            # The copy differs from MODEL_SHA256: a damaged copy must not hide a correct object, so the
            # download below decides (and fails with both digests if the object itself differs).
            entry.unlink(missing_ok=True)
        self._download(client, location, etag, size, entry, expected_sha256, endpoint)
        return CachedFile(entry, size, cache_hit=False)

    def _download(
        self,
        client: Any,
        location: S3Location,
        etag: str,
        size: int,
        entry: Path,
        expected_sha256: str | None,
        endpoint: str,
    ) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_partials()
            # A unique name per download: concurrent starts never write to the same file.
            descriptor, partial_name = tempfile.mkstemp(
                dir=self.directory, prefix=f".{entry.name}.", suffix=PARTIAL_SUFFIX
            )
        except OSError as error:
            raise ConfigurationError(f"MODEL_CACHE_DIR: cannot write to {self.directory}: {error.strerror}") from None
        partial = Path(partial_name)
        try:
            try:
                with os.fdopen(descriptor, "wb") as partial_file:
                    # boto3's managed transfer: parallel ranged GETs for large objects, retried reads.
                    client.download_fileobj(location.bucket, location.key, partial_file)
                    partial_file.flush()
                    # A renamed entry must survive a crash complete, or the size check would not catch it.
                    os.fsync(partial_file.fileno())
            except _TRANSFER_ERRORS as error:
                raise _fetch_failed(error, location, "downloading", endpoint) from None
            except OSError as error:
                raise ConfigurationError(
                    f"MODEL_CACHE_DIR: cannot write to {self.directory}: {error.strerror or error}"
                ) from None
            received = partial.stat().st_size
            if received != size:
                raise ConfigurationError(f"MODEL_URI: {location}: received {received} bytes of {size}")
            if expected_sha256 is not None:
                actual = file_sha256(partial)
                if actual != expected_sha256:
                    raise ConfigurationError(
                        f"MODEL_SHA256: weights {location} have sha256 {actual}, expected {expected_sha256}"
                    )
            # The cache is keyed by the ETag seen before the download: a replacement uploaded meanwhile
            # must not be stored under the old one.
            if _head(client, location, endpoint)[0] != etag:
                raise ConfigurationError(f"MODEL_URI: {location} changed while it was downloaded; start again")
            # Atomic: a concurrent start renames an identical file over it, and readers see one or the other.
            os.replace(partial, entry)
        finally:
            partial.unlink(missing_ok=True)

    def _remove_stale_partials(self) -> None:
        cutoff = time.time() - _STALE_PARTIAL_S
        for leftover in self.directory.glob(f".*{PARTIAL_SUFFIX}"):
            try:
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
            except FileNotFoundError:
                pass  # another process cleaned it up first


def _check_digest(weights: Path, expected_sha256: str | None) -> None:
    if expected_sha256 is None:
        return
    actual = file_sha256(weights)
    if actual != expected_sha256:
        raise ConfigurationError(f"MODEL_SHA256: weights {weights} have sha256 {actual}, expected {expected_sha256}")


def _read_spec(client: Any, location: S3Location, endpoint: str) -> str:
    try:
        response = client.get_object(Bucket=location.bucket, Key=location.key)
        body = response["Body"]
        try:
            if response.get("ContentLength", 0) > MAX_SPEC_BYTES:
                raise ConfigurationError(f"MODEL_URI: {location} is larger than {MAX_SPEC_BYTES} bytes: not a spec")
            data = body.read()
        finally:
            body.close()
    except (ClientError, BotoCoreError) as error:
        raise _fetch_failed(error, location, "reading", endpoint) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(f"MODEL_URI: {location} is not UTF-8 text: not a spec") from None


def _head(client: Any, location: S3Location, endpoint: str) -> tuple[str, int]:
    try:
        response = client.head_object(Bucket=location.bucket, Key=location.key)
    except (ClientError, BotoCoreError) as error:
        raise _fetch_failed(error, location, "checking", endpoint) from None
    return str(response.get("ETag", "")).strip('"'), int(response["ContentLength"])


def _fetch_failed(error: Exception, location: S3Location, action: str, endpoint: str) -> ConfigurationError:
    """What went wrong, in words an operator can act on; never the credentials."""
    if isinstance(error, (RetriesExceededError, S3DownloadFailedError)) and isinstance(
        getattr(error, "last_exception", None), (ClientError, BotoCoreError)
    ):
        error = error.last_exception  # type: ignore[attr-defined]
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return ConfigurationError(f"MODEL_URI: {location}: bucket {location.bucket} does not exist")
        if code in _MISSING_CODES:
            return ConfigurationError(f"MODEL_URI: {location} does not exist")
        if code in _CHANGED_CODES:
            return ConfigurationError(f"MODEL_URI: {location} changed while it was downloaded; start again")
        if code in _DENIED_CODES:
            return ConfigurationError(
                f"MODEL_URI: {location}: access denied ({code}); check the S3 credentials and the bucket's policy"
            )
        return ConfigurationError(f"MODEL_URI: {location}: S3 error {code or status} while {action}")
    return ConfigurationError(
        f"MODEL_URI: {location}: S3 at {endpoint} unreachable while {action} ({type(error).__name__}: {error})"
    )
