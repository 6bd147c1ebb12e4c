"""Finding the images an operator tool works on: image files under local folders, image objects under an S3 prefix.

Names are filtered by suffix (the workers decide what is really an image), except names without one: DICOM files
often have none (PACS exports, `IM0001`, or a SOP Instance UID whose last part looks like a numeric suffix), so
such a file or object is listed when its first 132 bytes are a DICOM Part 10 preamble and marker. Errors name
buckets and folders the operator gave, never a file name or key found below them: those hold patient names.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from service.dicom.sniff import DICOM_MARKER, DICOM_MARKER_OFFSET, is_dicom
from service.errors import ConfigurationError
from service.outputs import FAILURE_PREFIX
from service.settings import S3_URI_SCHEME

#: Suffixes of DICOM files (service.outputs gives their outputs `.dcm`).
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}) | DICOM_SUFFIXES
#: What a DICOM sniff reads: the preamble and the marker.
SNIFF_BYTES = DICOM_MARKER_OFFSET + len(DICOM_MARKER)
#: The directory of a DICOM medium (PS3.10): a Part 10 file without pixels, never an image.
DICOMDIR = "DICOMDIR"
#: Ranged GETs in flight while a bucket is listed (only for keys without a suffix).
_SNIFF_THREADS = 8


def is_image_name(name: str) -> bool:
    """Whether a file name or key ends in an image suffix (any case)."""
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def is_dicom_name(name: str) -> bool:
    """Whether a file name or key ends in a DICOM suffix (any case)."""
    return PurePosixPath(name).suffix.lower() in DICOM_SUFFIXES


def needs_sniff(name: str) -> bool:
    """Whether only the content can tell: no suffix, or a numeric one (`1.2.840.113619.2.55.3.4471`: files named
    by their SOP Instance UID), except the medium's DICOMDIR. A key ending in `/` (a folder marker) is no file."""
    if name.endswith("/"):
        return False
    path = PurePosixPath(name)
    if path.name.upper() == DICOMDIR:
        return False
    return not path.suffix or path.suffix[1:].isdigit()


def is_s3_uri(value: str) -> bool:
    return value.startswith(S3_URI_SCHEME)


def split_s3_prefix(uri: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix); the prefix may be empty."""
    bucket, _, prefix = uri.removeprefix(S3_URI_SCHEME).partition("/")
    if not bucket:
        raise ConfigurationError(f"{uri}: expected s3://bucket[/prefix]")
    return bucket, prefix


@dataclass(frozen=True)
class LocalImage:
    path: Path
    #: The path below the folder the operator named (POSIX separators); a file named directly: its name.
    relative: str
    #: DICOM by its suffix, or by its content when it has none (a guess until the file is read).
    dicom: bool = False


def local_images(root: Path, *, skip: Callable[[Path], bool] = lambda path: False) -> Iterator[LocalImage]:
    """Image files under `root` (recursively, in name order), or `root` itself when it is a file.

    `skip` prunes folders (an output folder inside an input folder must not become input on a rerun).
    """
    if root.is_file():
        yield LocalImage(root, root.name, dicom=is_dicom_name(root.name) or _sniff_file(root) is True)
        return
    if not root.is_dir():
        raise ConfigurationError("an input is neither a file nor a folder")
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(name for name in subfolders if not skip(here / name))
        for name in sorted(files):
            path = here / name
            if is_image_name(name):
                yield LocalImage(path, path.relative_to(root).as_posix(), dicom=is_dicom_name(name))
            elif needs_sniff(name) and (sniffed := _sniff_file(path)) is not False:
                # Unreadable (None): listed, so that its row says `unreadable` instead of it vanishing.
                yield LocalImage(path, path.relative_to(root).as_posix(), dicom=bool(sniffed))


def _sniff_file(path: Path) -> bool | None:
    """Whether a regular file starts as a DICOM Part 10 file; None when it cannot be read."""
    if not path.is_file():  # a FIFO or a device would block or never end
        return False
    try:
        with path.open("rb") as file:
            return is_dicom(file.read(SNIFF_BYTES))
    except OSError:
        return None


@dataclass(frozen=True)
class ListedObject:
    bucket: str
    key: str
    etag: str
    size: int
    #: DICOM by its key's suffix, or by its first bytes when the key has none (a guess until it is fetched).
    dicom: bool = False


def bucket_images(client: Any, bucket: str, prefix: str) -> Iterator[ListedObject]:
    """Image objects under `prefix` (paginated ListObjectsV2), without the service's failure records.

    A key without a suffix costs one ranged GET of its first 132 bytes (a few in parallel), so that a PACS export
    is listed and a README or a folder marker is not: listing such objects unseen would make each non-image a
    `failed` row (and, in backfill, a failure record in the processed bucket) and fail the run.
    """
    paginator = client.get_paginator("list_objects_v2")
    try:
        with ThreadPoolExecutor(_SNIFF_THREADS, thread_name_prefix="sniff") as sniffs:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                listed: list[tuple[ListedObject, Future[bool | None] | None]] = []
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.startswith(FAILURE_PREFIX):
                        continue
                    found = ListedObject(bucket, key, str(item.get("ETag", "")).strip('"'), int(item.get("Size", 0)),
                                         dicom=is_dicom_name(key))
                    if is_image_name(key):
                        listed.append((found, None))
                    elif needs_sniff(key) and found.size >= SNIFF_BYTES:
                        listed.append((found, sniffs.submit(_sniff_object, client, bucket, key)))
                for found, sniff in listed:  # in listing order
                    if sniff is None:
                        yield found
                    elif (sniffed := sniff.result()) is not False:
                        # Undecided (the GET failed): listed, and its processing says why it cannot be read.
                        yield dataclasses.replace(found, dicom=bool(sniffed))
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        raise ConfigurationError(f"listing bucket {bucket}: S3 error {code or 'unknown'}") from None
    except BotoCoreError as error:
        raise ConfigurationError(f"listing bucket {bucket}: S3 unreachable ({type(error).__name__})") from None


def _sniff_object(client: Any, bucket: str, key: str) -> bool | None:
    """Whether an object starts as a DICOM Part 10 file (one ranged GET); None when S3 would not say, False for an
    object deleted since it was listed."""
    try:
        response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{SNIFF_BYTES - 1}")
        with response["Body"] as body:
            return is_dicom(body.read(SNIFF_BYTES))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code", "") in ("NoSuchKey", "404"):
            return False
        return None
    except BotoCoreError:
        return None
