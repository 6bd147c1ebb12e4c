"""Where outputs go: processed keys, keyed pseudonyms and anonymized keys.

Object keys of medical images often carry the patient's name and birth date. Everything that leaves the
processed bucket (anonymized keys, logs, responses, failure records) uses the pseudonym instead: an HMAC of
bucket and key with PSEUDONYM_KEY, so it is stable across redeliveries but reveals nothing without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import posixpath

PROCESSED_MARK = "-processed"
#: S3 keys are 1 to 1024 bytes of UTF-8.
MAX_KEY_BYTES = 1024
FAILURE_PREFIX = "_failed/"
# Extensions kept on anonymized keys; anything else (which could itself be patient text) is replaced by the
# canonical extension of the decoded format.
_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".jp2"}
_CANONICAL_EXTENSIONS = {"jpeg": ".jpg", "png": ".png", "tiff": ".tiff", "bmp": ".bmp", "webp": ".webp"}


def pseudonym(secret: bytes, bucket: str, key: str) -> str:
    """A 128-bit keyed pseudonym of one object (same object, same pseudonym)."""
    digest = hmac.new(secret, f"{bucket}\x00{key}".encode(), hashlib.sha256).hexdigest()
    return digest[:32]


def processed_key(key: str) -> str:
    """The original path with `-processed` before the extension: `a/b/scan.jpeg` -> `a/b/scan-processed.jpeg`."""
    directory, name = posixpath.split(key)
    stem, extension = posixpath.splitext(name)
    if not stem:  # a dot-file such as ".jpeg": splitext puts everything in the stem
        stem, extension = name, ""
    return posixpath.join(directory, f"{stem}{PROCESSED_MARK}{extension}")


def anonymized_key(pseudonym_value: str, source_key: str, image_format: str) -> str:
    """`<pseudonym><ext>`: no part of the original path or name survives, only a known image extension."""
    extension = posixpath.splitext(source_key)[1].lower()
    if extension not in _IMAGE_EXTENSIONS:
        extension = _CANONICAL_EXTENSIONS.get(image_format, "")
    return pseudonym_value + extension


def failure_key(pseudonym_value: str) -> str:
    """Where the durable record of a permanent failure goes, in the processed bucket."""
    return f"{FAILURE_PREFIX}{pseudonym_value}.json"
