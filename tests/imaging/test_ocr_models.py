"""The text models' ONNX Runtime sessions: set up for a worker's memory and cores."""

from __future__ import annotations

from conftest import TEXT_OPTIONS

from service.imaging.ocr_models import CtcTextRecognizer, DbTextDetector
from service.models.fetch import TEXT_DETECTOR_FILE, TEXT_RECOGNIZER_FILE


def test_text_sessions_run_on_one_thread_without_memory_patterns() -> None:
    """Every mosaic and line has a shape of its own: a memory pattern per shape would only be kept, never reused."""
    for model in (DbTextDetector(TEXT_OPTIONS.models / TEXT_DETECTOR_FILE),
                  CtcTextRecognizer(TEXT_OPTIONS.models / TEXT_RECOGNIZER_FILE)):
        options = model._session.get_session_options()
        assert options.enable_mem_pattern is False
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
