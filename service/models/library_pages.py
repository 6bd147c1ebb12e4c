"""Handing back the resident pages of a runtime's shared libraries that only its start-up read.

Importing TensorFlow makes ~280 MB of its libraries resident: the dynamic linker reads their symbol tables,
string tables and relocations (libtensorflow_cc alone has 79 MB of symbol names) and the op registrations run
code from all over them. OpenCV, ONNX Runtime, numpy and the DICOM codecs do the same on a smaller scale (~90 MB
together in a worker). Those are clean pages of read-only file mappings, needed again rarely or never: dropped
from the process (MADV_DONTNEED), they stay in the page cache, and the few the work uses fault back in from there.
Linux only; elsewhere, or when /proc cannot be read, nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sysconfig
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_READ_ONLY = ("r--p", "r-xp")


def release_clean_library_pages(directory: Path) -> int:
    """Drop from this process the resident pages of read-only mappings of files under `directory` whose resident
    pages are all clean file pages; returns how many KiB were dropped.

    Only such mappings: dropping a private page that was written (a relocated one, or a debugger's breakpoint)
    would lose the write, so a mapping holding any is left alone. A read-only mapping cannot gain written pages
    afterwards, so nothing changes between the check and the drop.
    """
    try:
        mappings = _read_only_mappings(Path("/proc/self/smaps").read_text(), f"{Path(directory).resolve()}/")
        madvise = _madvise()
    except (OSError, AttributeError, ValueError):
        return 0
    dropped = 0
    for start, end, resident_kib in mappings:
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += resident_kib
    logger.debug("dropped %d KiB of clean library pages under %s", dropped, directory)
    return dropped


def release_installed_library_pages() -> int:
    """release_clean_library_pages for every installed package (the environment's site-packages): what a worker
    calls once its libraries are loaded and warm, so that its peak is not their start-up's pages plus its work."""
    return sum(release_clean_library_pages(Path(directory))
               for directory in {sysconfig.get_path("platlib"), sysconfig.get_path("purelib")})


def _read_only_mappings(smaps: str, prefix: str) -> list[tuple[int, int, int]]:
    """(start, end, resident KiB) of each read-only private mapping of a file under `prefix` whose resident pages
    are all clean and file-backed, from the text of /proc/PID/smaps."""
    found: list[tuple[int, int, int]] = []
    mapping: dict[str, str | int] = {}

    def keep() -> None:
        if (mapping.get("perms") in _READ_ONLY and str(mapping.get("path", "")).startswith(prefix)
                and mapping.get("Rss", 0) and not any(mapping.get(field, 1) for field in
                                                      ("Private_Dirty", "Shared_Dirty", "Anonymous"))):
            found.append((int(mapping["start"]), int(mapping["end"]), int(mapping["Rss"])))

    for line in smaps.splitlines():
        head, _, rest = line.partition(" ")
        if head.endswith(":"):  # a field of the current mapping: `Rss:  1234 kB`
            if mapping and rest.split() and rest.split()[0].isdigit():
                mapping[head[:-1]] = int(rest.split()[0])
            continue
        # A mapping's header: `start-end perms offset dev inode [path]`
        keep()
        fields = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        mapping = {"start": start, "end": end, "perms": fields[1], "path": fields[5] if len(fields) > 5 else ""}
    keep()
    return found


def _madvise() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
