"""What a worker sends back for an item that failed: our errors as they are, anything else without its text."""

from __future__ import annotations

from service.engine.worker import _picklable
from service.errors import UnprocessableObject


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:
        return caught


def test_an_unexpected_error_crosses_the_pipe_without_its_text() -> None:
    # A library's message can quote what it parsed: a DICOM header's patient name, say.
    sent = _picklable(_raised(ValueError("invalid value 'DOE^JANE^MARIE' for VR PN")))
    assert isinstance(sent, RuntimeError)
    assert "DOE" not in str(sent) and "JANE" not in str(sent)
    assert str(sent).startswith("ValueError at test_worker.py:")


def test_our_own_errors_cross_the_pipe_as_they_are() -> None:
    error = UnprocessableObject("the DICOM object has no pixel data", reason="no-pixel-data")
    assert _picklable(error) is error
