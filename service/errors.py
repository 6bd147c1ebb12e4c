"""Errors of the core, each knowing what it means for delivery.

The core raises these; only the HTTP layer (`service.app`) turns them into status codes, in one place.
Messages never contain an object key or any other patient text: they are logged and returned to callers.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base of every error the core raises on purpose."""

    #: HTTP status the HTTP layer answers with (see `service.app`).
    status_code: int = 500
    #: Short machine-readable reason, stable across releases (goes into responses and failure records).
    reason: str = "internal"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason

    def __reduce__(self):  # keep errors picklable across the process-pool boundary
        return (_rebuild_error, (type(self), self.message, self.reason))


def _rebuild_error(cls: type[PipelineError], message: str, reason: str) -> PipelineError:
    return cls(message, reason=reason)


class MalformedDelivery(PipelineError):
    """The request itself is unusable (not JSON, no records, no bucket or key): retrying cannot help."""

    status_code = 400
    reason = "malformed"


class ForbiddenBucket(PipelineError):
    """The event names a bucket this service is not allowed to read."""

    status_code = 403
    reason = "bucket-not-allowed"


class UnprocessableObject(PipelineError):
    """The object can never be processed (missing, not an image, too large): a permanent failure.

    Who delivered the event decides the answer: a CloudEvent gets 422 (Knative does not retry it and hands
    it to the dead-letter sink); a plain Ceph push gets 2xx, because Ceph retries every non-2xx forever.
    """

    status_code = 422
    reason = "unprocessable"


class TransientFailure(PipelineError):
    """Something that may work on redelivery: storage unreachable, timeouts, model not ready, broken pool."""

    status_code = 503
    reason = "unavailable"


class ModelNotReady(TransientFailure):
    """No inference worker has loaded and warmed the model yet."""

    reason = "model-not-ready"


class InferenceTimedOut(TransientFailure):
    """The image was not analyzed within INFERENCE_TIMEOUT_S (a hung or overloaded worker): redelivered."""

    reason = "inference-timeout"


class StorageUnavailable(TransientFailure):
    """S3 answered 5xx, timed out or could not be reached."""

    reason = "storage-unavailable"


class ConfigurationError(Exception):
    """Bad configuration, found at start-up. The message names the variable to fix."""
