"""Finding the images an operator tool works on: image files under local folders, image objects under an S3 prefix.

Names are filtered by suffix only (the workers decide what is really an image). Errors name buckets and folders
the operator gave, never a file name or key found below them: those hold patient names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from service.errors import ConfigurationError
from service.outputs import FAILURE_PREFIX
from service.settings import S3_URI_SCHEME

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})


def is_image_name(name: str) -> bool:
    """Whether a file name or key ends in an image suffix (any case)."""
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


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


def local_images(root: Path, *, skip: Callable[[Path], bool] = lambda path: False) -> Iterator[LocalImage]:
    """Image files under `root` (recursively, in name order), or `root` itself when it is a file.

    `skip` prunes folders (an output folder inside an input folder must not become input on a rerun).
    """
    if root.is_file():
        yield LocalImage(root, root.name)
        return
    if not root.is_dir():
        raise ConfigurationError("an input is neither a file nor a folder")
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        subfolders[:] = sorted(name for name in subfolders if not skip(here / name))
        for name in sorted(files):
            if is_image_name(name):
                path = here / name
                yield LocalImage(path, path.relative_to(root).as_posix())


@dataclass(frozen=True)
class ListedObject:
    bucket: str
    key: str
    etag: str
    size: int


def bucket_images(client: Any, bucket: str, prefix: str) -> Iterator[ListedObject]:
    """Image objects under `prefix` (paginated ListObjectsV2), without the service's failure records."""
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.startswith(FAILURE_PREFIX) or not is_image_name(key):
                    continue
                yield ListedObject(bucket, key, str(item.get("ETag", "")).strip('"'), int(item.get("Size", 0)))
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        raise ConfigurationError(f"listing bucket {bucket}: S3 error {code or 'unknown'}") from None
    except BotoCoreError as error:
        raise ConfigurationError(f"listing bucket {bucket}: S3 unreachable ({type(error).__name__})") from None
