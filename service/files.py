"""Whole-file writes: a file is written completely or not at all, whatever crashes or writes beside it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: The temporary files' prefix: what a crash can leave behind is recognisable.
_TEMP_PREFIX = ".xray-partial-"


def write_atomically(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file of its own beside it (so concurrent writers never share
    one), renamed into place once complete, with the permissions a new file gets under the umask."""
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
