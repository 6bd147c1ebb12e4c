"""What the tools take for an image in a folder: image suffixes (DICOM's among them), and files without a suffix
whose first bytes say DICOM; never a FIFO, a medium's DICOMDIR or a text file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dicom_factory import make_dicom, make_no_pixels

from service.outputs import looks_like_dicom
from service.tools.listing import DICOM_SUFFIXES, IMAGE_SUFFIXES, local_images, needs_sniff


def test_dicom_suffixes_are_the_outputs_dicom_suffixes() -> None:
    assert DICOM_SUFFIXES <= IMAGE_SUFFIXES
    assert all(looks_like_dicom(f"scan{suffix.upper()}") for suffix in DICOM_SUFFIXES)


@pytest.mark.parametrize(("name", "sniffed"), [
    ("IM0001", True), ("ward 7/IM0001", True), ("1.2.840.113619.2.55.3.4471", True), ("scan.jpeg", False),
    ("notes.txt", False), ("DICOMDIR", False), ("export/dicomdir", False), ("ward 7/", False), ("1.2.x", False),
])
def test_which_names_only_the_content_can_tell(name: str, sniffed: bool) -> None:
    assert needs_sniff(name) is sniffed


def test_a_folder_lists_dicom_by_suffix_or_content(tmp_path: Path) -> None:
    scan = make_dicom(rows=64, columns=64)
    files = {
        "a.dcm": scan, "b.DICOM": b"named DICOM, so listed: the worker says what it is", "IM0003": scan,
        "1.2.840.4471.4": scan, "c.jpeg": b"listed by its suffix", "notes": b"Doe Jane: follow-up" * 20,
        "short": b"DICM", "DICOMDIR": make_no_pixels("SR"), "report.txt": scan,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "pipe")  # reading it would block: never opened

    listed = {image.relative: image.dicom for image in local_images(tmp_path)}

    assert listed == {"1.2.840.4471.4": True, "IM0003": True, "a.dcm": True, "b.DICOM": True, "c.jpeg": False}
    assert [image.relative for image in local_images(tmp_path / "IM0003")] == ["IM0003"]
    assert [image.dicom for image in local_images(tmp_path / "IM0003")] == [True]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_without_a_suffix_is_listed_to_be_reported(tmp_path: Path) -> None:
    locked = tmp_path / "IM0001"
    locked.write_bytes(make_dicom(rows=64, columns=64))
    locked.chmod(0)
    try:
        assert [(image.relative, image.dicom) for image in local_images(tmp_path)] == [("IM0001", False)]
    finally:
        locked.chmod(0o644)
