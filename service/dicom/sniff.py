"""Recognising a DICOM Part 10 object by its content: the web process does this on every fetched body, so it
imports nothing (no pydicom)."""

from __future__ import annotations

#: A Part 10 file: a 128-byte preamble, then these four bytes. The `.dcm` extension is a convention only.
DICOM_MARKER = b"DICM"
DICOM_MARKER_OFFSET = 128


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MARKER_OFFSET : DICOM_MARKER_OFFSET + len(DICOM_MARKER)] == DICOM_MARKER
