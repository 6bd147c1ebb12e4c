"""service.files: whole-file writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from service.files import write_atomically


def test_a_file_is_written_whole_with_the_permissions_of_a_new_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.bin"
    write_atomically(target, b"first")
    write_atomically(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not the temporary file's 0600
    assert [path.name for path in target.parent.iterdir()] == ["b.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "b.bin"
    write_atomically(target, b"old")

    def disk_full(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, b"new")
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["b.bin"]
