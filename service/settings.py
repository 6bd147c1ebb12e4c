"""The service's one settings class, read from the environment and validated at start-up.

Variable names are the public interface used by the Knative manifests and documented in docs/configuration.md.
`S3Settings` is the part the S3-only tools (`xray-pipeline notify`) need; `Settings` is the whole service.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.errors import ConfigurationError

S3_URI_SCHEME = "s3://"
#: Below MODEL_CACHE_DIR, the default model as `xray-pipeline model fetch` puts it (service.models.fetch): the
#: spec of this name beside its weights. Models fetched from S3 are files named by hash, so the two never meet.
DEFAULT_MODEL_FOLDER = Path("default") / "pneumonia-xception-0.3.0"
DEFAULT_SPEC_NAME = "pneumonia.yaml"
#: Below MODEL_CACHE_DIR, the text models as `xray-pipeline model fetch` puts them (service.models.fetch).
TEXT_MODELS_FOLDER = Path("text") / "pp-ocrv4"
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
PROCESSED_SUFFIX = "-processed"
ANONYMIZED_SUFFIX = "-anonymized"
# Used only when DEV_MODE is set explicitly: pseudonyms made with it are not secret.
DEVELOPMENT_PSEUDONYM_KEY = "xray-pipeline-development-key-not-secret"


class ModelCacheSettings(BaseSettings):
    """Where models are kept (for the commands that need only that: `model fetch`, `model export`, `demo`)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", populate_by_name=True)

    model_cache_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / "xray-pipeline-models")
    """Where models fetched from S3 are kept, keyed by bucket, key and ETag, and the default model
    (`xray-pipeline model fetch`); created on demand."""


class S3Settings(BaseSettings):
    """How to reach the object store."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", populate_by_name=True)

    s3_endpoint_url: str | None = Field(
        default=None, validation_alias=AliasChoices("S3_ENDPOINT_URL", "service_point", "SERVICE_POINT")
    )
    """S3 endpoint, e.g. http://rook-ceph-rgw-my-store.rook-ceph.svc (`service_point` is accepted too)."""
    aws_access_key_id: str | None = None
    """S3 access key; unset means boto3's usual credential chain."""
    aws_secret_access_key: SecretStr | None = None
    """S3 secret key."""
    aws_default_region: str = "us-east-1"
    """Region name sent to S3 (Ceph ignores it but signs with it)."""
    s3_connect_timeout_s: float = Field(default=3.0, gt=0)
    """Seconds to wait for a TCP connection to S3."""
    s3_read_timeout_s: float = Field(default=20.0, gt=0)
    """Seconds to wait for S3 to answer a request."""
    s3_max_attempts: int = Field(default=3, ge=1, le=10)
    """Attempts per S3 call (botocore's standard retry mode, with backoff) before answering 503."""

    @property
    def secret_access_key(self) -> str | None:
        return self.aws_secret_access_key.get_secret_value() if self.aws_secret_access_key else None

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value or None


class Settings(S3Settings, ModelCacheSettings):
    """Everything the service reads from its environment."""

    model_uri: str = Field(default="", validation_alias=AliasChoices("MODEL_URI", "MODEL_SPEC"))
    """Model spec (YAML or JSON; see model/README.md): a local path or s3://bucket/key (`MODEL_SPEC` too); default:
    the default model, fetched into MODEL_CACHE_DIR by `xray-pipeline model fetch`."""
    model_sha256: str | None = None
    """Expected sha256 (hex) of the weights file the service loads; a mismatch stops start-up."""
    model_backend: Literal["keras", "onnx"] | None = None
    """Overrides the spec's backend; the weights are then the spec's file with `.keras`/`.onnx` as suffix."""
    port: int = Field(default=8080, ge=1, le=65535)
    """HTTP port (Knative sets it)."""
    host: str = "0.0.0.0"
    """Interface to listen on."""
    processed_bucket: str | None = None
    """Bucket for stamped copies; default `<input bucket>-processed`."""
    anonymized_bucket: str | None = None
    """Bucket for anonymized copies; default `<input bucket>-anonymized`."""
    input_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Comma-separated allow-list of input buckets; events for others get 403. Empty: any bucket."""
    anonymize_when: Literal["positive", "always"] = "positive"
    """`positive`: anonymize only images whose risk reaches the positive threshold; `always`: every image."""
    text_models_dir: Path | None = None
    """Folder of the text detector and recognizer (service.imaging.detection); default: where
    `xray-pipeline model fetch` puts them below MODEL_CACHE_DIR. The service image carries them here."""
    dicom_output_syntax: Literal["source", "explicit", "rle", "jpeg-ls", "jpeg-2000"] = "source"
    """Transfer syntax of both DICOM outputs. `source`: the source's, where it is lossless and can be encoded here
    (lossy and unencodable sources are written as explicit VR little endian); `explicit` (uncompressed), `rle`,
    `jpeg-ls` or `jpeg-2000` (lossless): that one for every object. Writing JPEG 2000 sources as `rle` or `jpeg-ls`
    spends a fraction of the CPU (docs/dicom.md#cost) for larger outputs."""
    redact_orientation_markers: bool = False
    """Orientation markers burned into an image (an isolated `R` or `L`, `AP`, `PA`, `PORTABLE`, `SUPINE`, `ERECT`)
    are anatomy-side information and are kept in the anonymized copy; set this to redact them with all other text."""
    pseudonym_key: SecretStr | None = None
    """Secret for the keyed pseudonyms (HMAC) that replace object keys; required unless DEV_MODE is set."""
    dev_mode: bool = False
    """Development mode: allows running without PSEUDONYM_KEY (a fixed, non-secret key is used)."""
    workers: int = Field(default=1, ge=1, le=64)
    """Inference worker processes; each loads the model once."""
    worker_threads: int | None = Field(default=None, ge=1)
    """Threads per worker for TensorFlow; default: CPU cores / WORKERS (at least 1)."""
    batch_max_size: int = Field(default=8, ge=1, le=256)
    """Most images analyzed in one model call; concurrent events are gathered up to this."""
    batch_max_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    """Longest a request waits for others to join its batch while a worker is free."""
    batch_wait_policy: Literal["adaptive", "fixed"] = "adaptive"
    """`adaptive`: a request waits for others only while the arrival rate says they will come within the wait;
    `fixed`: always up to BATCH_MAX_WAIT_MS."""
    worker_start_timeout_s: float = Field(default=300.0, gt=0)
    """Seconds a worker may take to load and warm the model, at start-up and when it replaces a dead one."""
    inference_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """Longest an image waits for its analysis (queue and worker); then 503, and a worker that held it so long
    is taken for hung and replaced."""
    worker_restart_limit: int = Field(default=3, ge=1, le=100)
    """Replacement workers failing to warm in a row before /healthz answers 503 (Kubernetes restarts the pod)."""
    max_image_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Objects larger than this are refused (failure record) without being read."""
    max_image_pixels: int = Field(default=100_000_000, gt=0)
    """Images with more pixels than this are refused before decoding (decompression bombs)."""
    max_request_bytes: int = Field(default=1024 * 1024, gt=0)
    """Larger request bodies are refused with 413."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the service's own loggers."""
    log_format: Literal["json", "text"] = "json"
    """`json`: one JSON object per log line (for log collectors); `text`: plain lines for people reading them."""

    @field_validator("input_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", "batch_wait_policy", "dicom_output_syntax", mode="before")
    @classmethod
    def _lower_choice(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_uri")
    @classmethod
    def _model_uri_usable(cls, value: str) -> str:
        if not value:
            return value  # unset: the default model, checked once MODEL_CACHE_DIR is known (`_consistent`)
        if split_s3_uri(value) is not None:
            return value
        if "://" in value:
            raise ValueError(f"{value}: only a local path or s3://bucket/key is supported")
        if not Path(value).is_file():
            raise ValueError(f"{value} does not exist")
        return value

    @field_validator("model_sha256")
    @classmethod
    def _sha256_hex(cls, value: str | None) -> str | None:
        if not value:
            return None
        digest = value.strip().lower()
        if not _SHA256_PATTERN.match(digest):
            raise ValueError("must be a sha256 digest: 64 hexadecimal characters")
        return digest

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.pseudonym_key is None and not self.dev_mode:
            raise ValueError(
                "PSEUDONYM_KEY is required (a long random secret); set DEV_MODE=true to run without one locally"
            )
        if self.pseudonym_key is not None and len(self.pseudonym_key.get_secret_value()) < 16:
            raise ValueError("PSEUDONYM_KEY must be at least 16 characters")
        outputs = [name for name in (self.processed_bucket, self.anonymized_bucket) if name]
        if len(outputs) == 2 and outputs[0] == outputs[1]:
            raise ValueError("PROCESSED_BUCKET and ANONYMIZED_BUCKET must differ")
        clash = sorted(set(outputs) & set(self.input_buckets))
        if clash:
            raise ValueError(f"INPUT_BUCKETS must not contain an output bucket ({', '.join(clash)})")
        if not self.model_uri:
            default = self.model_cache_dir / DEFAULT_MODEL_FOLDER / DEFAULT_SPEC_NAME
            if not default.is_file():
                raise ValueError(f"MODEL_URI: not set, and the default model is not in MODEL_CACHE_DIR ({default}): "
                                 "run `xray-pipeline model fetch` (`make model` in a checkout), or set MODEL_URI")
            self.model_uri = str(default)
        return self

    @property
    def effective_text_models_dir(self) -> Path:
        return self.text_models_dir or self.model_cache_dir / TEXT_MODELS_FOLDER

    @property
    def effective_pseudonym_key(self) -> bytes:
        if self.pseudonym_key is not None:
            return self.pseudonym_key.get_secret_value().encode()
        return DEVELOPMENT_PSEUDONYM_KEY.encode()

    @property
    def effective_worker_threads(self) -> int:
        if self.worker_threads is not None:
            return self.worker_threads
        return max(1, available_cpus() // self.workers)

    def processed_bucket_for(self, input_bucket: str) -> str:
        return self.processed_bucket or input_bucket + PROCESSED_SUFFIX

    def anonymized_bucket_for(self, input_bucket: str) -> str:
        return self.anonymized_bucket or input_bucket + ANONYMIZED_SUFFIX

    def is_output_bucket(self, bucket: str) -> bool:
        """Loop guard: events about our own outputs are never processed."""
        if bucket in (self.processed_bucket, self.anonymized_bucket):
            return True
        # With the default naming any `<x>-processed` / `<x>-anonymized` bucket may be one of ours.
        if self.processed_bucket is None and bucket.endswith(PROCESSED_SUFFIX):
            return True
        return self.anonymized_bucket is None and bucket.endswith(ANONYMIZED_SUFFIX)


SettingsT = TypeVar("SettingsT", bound=S3Settings)


def split_s3_uri(uri: str) -> tuple[str, str] | None:
    """`s3://bucket/key` -> (bucket, key); None for anything else (a local path). ValueError when incomplete."""
    if not uri.startswith(S3_URI_SCHEME):
        return None
    bucket, _, key = uri.removeprefix(S3_URI_SCHEME).partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"{uri} must name an object: s3://bucket/key")
    return bucket, key


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the affinity mask, capped by a container's CPU limit (cgroup v2 or v1).

    A pod limited to 2 CPUs on a 64-core node sees 64 cores; sizing threads by that oversubscribes it badly.
    """
    cpus = len(os.sched_getaffinity(0))
    quota = period = None
    try:
        quota_text, period_text = (cgroup_root / "cpu.max").read_text().split()
        if quota_text != "max":
            quota, period = int(quota_text), int(period_text)
    except (OSError, ValueError):
        try:
            quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota is not None and period and quota > 0:
        cpus = min(cpus, max(1, quota // period))
    return cpus


def _describe(error: ValidationError) -> str:
    problems = []
    for issue in error.errors():
        # loc is the field or the alias that was read (e.g. service_point); model-level checks have none
        # and name their variables in the message.
        variable = str(issue["loc"][0]).upper() if issue["loc"] else ""
        message = issue["msg"].removeprefix("Value error, ")
        problems.append(f"{variable}: {message}" if variable else message)
    return "invalid configuration: " + "; ".join(problems)


def load_settings(settings_class: type[SettingsT] = Settings, **overrides: object) -> SettingsT:  # type: ignore[assignment]
    """Read settings from the environment; any problem is a ConfigurationError naming the variable."""
    try:
        return settings_class(**overrides)
    except ValidationError as error:
        raise ConfigurationError(_describe(error)) from None
