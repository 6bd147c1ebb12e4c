"""Dropping the clean resident pages of read-only library mappings: only those, and their contents stay readable."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from service.models.library_pages import _read_only_mappings, release_clean_library_pages

SMAPS = """\
7f0000000000-7f0000400000 r--p 00000000 08:01 11 /venv/tensorflow/libtensorflow_cc.so.2
Rss:                1024 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f0000400000-7f0000800000 r-xp 00400000 08:01 11 /venv/tensorflow/libtensorflow_cc.so.2
Rss:                2048 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
7f0000800000-7f0000900000 r--p 00800000 08:01 11 /venv/tensorflow/libtensorflow_cc.so.2
Rss:                 512 kB
Shared_Dirty:          0 kB
Private_Dirty:       512 kB
Anonymous:           512 kB
VmFlags: rd mr mw me ac sd
7f0000900000-7f0000a00000 rw-p 00900000 08:01 11 /venv/tensorflow/libtensorflow_cc.so.2
Rss:                  64 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd wr mr mw me ac sd
7f0000a00000-7f0000b00000 r-xp 00000000 08:01 12 /venv/numpy/core.so
Rss:                 256 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
7f0000b00000-7f0000c00000 r-xp 00000000 08:01 13 /venv/tensorflow/not-resident.so
Rss:                   0 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
"""


def test_only_clean_resident_read_only_mappings_under_the_directory_are_chosen() -> None:
    chosen = _read_only_mappings(SMAPS, "/venv/tensorflow/")
    # Not the relocated (written) read-only pages, not the writable data, not another package, nothing not resident.
    assert chosen == [(0x7F0000000000, 0x7F0000400000, 1024), (0x7F0000400000, 0x7F0000800000, 2048)]


def test_dropped_pages_leave_the_process_and_read_back_unchanged(tmp_path: Path) -> None:
    library = tmp_path / "libexample.so"
    contents = bytes(range(256)) * (4 * 4096)  # 4 MiB
    written = tmp_path / "written.so"
    for path in (library, written):
        with path.open("wb") as file:
            file.write(contents)
            os.fsync(file.fileno())  # clean in the page cache, as an installed library is
    with library.open("rb") as file, written.open("rb") as other:
        read_only = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        # A private mapping whose pages were written: what a dropped page would lose.
        copied = mmap.mmap(other.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            assert read_only[:] == contents  # every page resident
            copied[:4] = b"KEPT"
            dropped = release_clean_library_pages(tmp_path)
            assert dropped >= len(contents) // 1024 - 4  # KiB
            assert read_only[:] == contents  # faulted back in from the file
            assert copied[:4] == b"KEPT"
        finally:
            read_only.close()
            copied.close()


def test_a_directory_nothing_is_mapped_from_drops_nothing(tmp_path: Path) -> None:
    assert release_clean_library_pages(tmp_path) == 0
