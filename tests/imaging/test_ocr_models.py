"""The text models' ONNX Runtime sessions (set up for a worker's memory and cores), and the detector's regions."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
from conftest import TEXT_OPTIONS
from hypothesis import given, settings
from hypothesis import strategies as st

from service.imaging.ocr_models import Box, CtcTextRecognizer, DbTextDetector, TextRegion
from service.models.fetch import TEXT_DETECTOR_FILE, TEXT_RECOGNIZER_FILE


def test_text_sessions_run_on_one_thread_without_memory_patterns() -> None:
    """Every mosaic and line has a shape of its own: a memory pattern per shape would only be kept, never reused."""
    for model in (DbTextDetector(TEXT_OPTIONS.models / TEXT_DETECTOR_FILE),
                  CtcTextRecognizer(TEXT_OPTIONS.models / TEXT_RECOGNIZER_FILE)):
        options = model._session.get_session_options()
        assert options.enable_mem_pattern is False
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def _regions_of(probability: np.ndarray) -> list[TextRegion]:
    return DbTextDetector.regions(probability.astype(np.float32))


def _covered(boxes: tuple[Box, ...], shape: tuple[int, int]) -> np.ndarray:
    covered = np.zeros(shape, bool)
    for x, y, width, height in boxes:
        covered[max(0, y) : max(0, y + height), max(0, x) : max(0, x + width)] = True
    return covered


def _squat_blob() -> np.ndarray:
    probability = np.zeros((96, 320))
    probability[20:60, 100:110] = 0.9  # an L: as thick as its box in places, no length to follow
    probability[50:60, 100:140] = 0.9
    return probability


def _straight_band() -> np.ndarray:
    probability = np.zeros((96, 320))
    probability[40:58, 30:290] = 0.9
    return probability


@pytest.mark.parametrize("shape", [_straight_band, _squat_blob], ids=["straight-band", "squat-blob"])
def test_a_straight_band_or_a_squat_region_is_covered_by_its_box(shape: Callable[[], np.ndarray]) -> None:
    """A squat region has no length to follow (a blob over a 12 px name, cut in pieces, left more of it
    readable: bench/privacy.py's seed 7010)."""
    (region,) = _regions_of(shape())
    assert region.pieces == (region.box,)


@pytest.mark.parametrize("turned", [False, True], ids=["across", "down"])
def test_a_band_bulging_at_one_end_is_covered_piece_by_piece(turned: bool) -> None:
    """From bench/privacy.py's seed 5042: the detector's region of a date spreads onto a ventricle at one end. Its
    box stays the line's (as thick as the bulge), but the pieces follow the band: they cover all of the region, as
    far along as its box, at half the box's pixels or less."""
    probability = np.zeros((160, 420))
    probability[70:88, 40:380] = 0.95
    probability[50:110, 20:80] = 0.7
    if turned:
        probability = probability.T
    (region,) = _regions_of(probability)
    box = region.box
    assert len(region.pieces) > 1
    covered = _covered(region.pieces, probability.shape)
    assert covered[probability > 0.3].all(), "every pixel of the region is in a piece"
    assert covered.sum() <= 0.5 * box[2] * box[3]
    lengthwise = 1 if turned else 0
    assert min(piece[lengthwise] for piece in region.pieces) == box[lengthwise]
    assert max(piece[lengthwise] + piece[lengthwise + 2] for piece in region.pieces) == (
        box[lengthwise] + box[lengthwise + 2])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pieces_cover_the_region_within_its_box(data: st.DataObject) -> None:
    """Whatever the region's shape (a band, slanted, with blobs on it), its pieces cover every pixel of it and stay
    inside its box."""
    probability = np.zeros((200, 300))
    left = data.draw(st.integers(0, 200))
    right = left + data.draw(st.integers(10, 300 - left))
    start, slope, thickness = data.draw(st.integers(20, 180)), data.draw(st.floats(-0.5, 0.5)), data.draw(
        st.integers(3, 30))
    for column in range(left, right):
        top = int(np.clip(start + slope * (column - left), 0, 199))
        probability[top : top + thickness, column] = 0.9
    for _ in range(data.draw(st.integers(0, 3))):
        x, y, size = data.draw(st.integers(0, 280)), data.draw(st.integers(0, 180)), data.draw(st.integers(2, 40))
        probability[y : y + size, x : x + size] = 0.8
    mask = cv2.compare(probability.astype(np.float32), 0.3, cv2.CMP_GT)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = _regions_of(probability)
    assert regions, "the band is a region"
    for region in regions:
        box = region.box
        # Its component: the one whose box, grown as far on every side, is the region's.
        (label,) = [label for label in range(1, count) if stats[label][0] - region.x == stats[label][1] - region.y
                    == region.x + region.width - stats[label][0] - stats[label][2]
                    == region.y + region.height - stats[label][1] - stats[label][3]]
        covered = _covered(region.pieces, probability.shape)
        assert covered[labels == label].all(), (box, region.pieces)
        assert not (covered & ~_covered((box,), probability.shape)).any(), (box, region.pieces)


def test_the_recognizer_says_where_along_the_line_it_read_its_characters() -> None:
    """A word in the middle third of a wide line: the reading's span covers it and little of the blank around it."""
    recognizer = CtcTextRecognizer(TEXT_OPTIONS.models / TEXT_RECOGNIZER_FILE)
    canvas = np.full((60, 900), 255, np.uint8)
    cv2.putText(canvas, "PORTABLE 42", (300, 45), cv2.FONT_HERSHEY_SIMPLEX, 1.3, 0, 3, cv2.LINE_AA)
    columns = np.flatnonzero((canvas < 128).any(axis=0))
    reading = recognizer.read(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
    assert reading.text.replace(" ", "") == "PORTABLE42"
    # A step is a quarter of the line's height: the span is the ink's, give or take a step or two.
    step = 60 / 4
    assert abs(reading.start * 900 - columns[0]) <= 2 * step and abs(reading.end * 900 - columns[-1]) <= 2 * step
    assert recognizer.read(np.full((48, 300, 3), 255, np.uint8))[:2] == ("", 0.0)
