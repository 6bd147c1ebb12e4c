"""The line search (service.imaging.text) on its own: what it proposes in colour, on dark floors (faint text, flat
black ink on noise) and on slivers, what it leaves alone (grain, black borders), and how its row extension scales.
What it finds on real and synthetic images is tested through the cascade (test_detection.py, test_privacy.py,
test_imaging.py)."""

from __future__ import annotations

import tracemalloc

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from modalities import Burn, burn_in, chest_grain

from service.imaging import text
from service.imaging.text import _MAX_SAME_LINE_HEIGHT, _SAME_LINE_GAP, _extend_along_rows, propose_text


def _covered(
    boxes: list[tuple[int, int, int, int]], box: tuple[int, ...], shape: tuple[int, ...] = (1000, 1000)
) -> float:
    mask = np.zeros(shape[:2], bool)
    for x, y, w, h in boxes:
        mask[y : y + h, x : x + w] = True
    x, y, w, h = box
    return float(mask[y : y + h, x : x + w].mean())


def test_coloured_text_as_bright_as_its_background_in_grey_is_proposed() -> None:
    """Green letters on a grey body of the same brightness: nothing to see in grey, plain in the green channel."""
    grey = np.full((300, 500), 150, np.uint8)
    colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    ink = (51, 220, 51)  # BGR: the grey of this green is 150
    assert abs(int(cv2.cvtColor(np.uint8([[ink]]), cv2.COLOR_BGR2GRAY)[0, 0]) - 150) <= 1
    cv2.putText(colour, "NORDMANN 1962", (40, 160), cv2.FONT_HERSHEY_SIMPLEX, 1.0, ink, 2, cv2.LINE_AA)
    text_box = (40, 135, 260, 32)
    assert _covered(propose_text(cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY))[1], text_box) < 0.5
    assert _covered(propose_text(colour)[1], text_box) > 0.95


def _dim_text(floor: int, ink: int) -> np.ndarray:
    """A smooth grey floor with a line of text `ink` levels on it, and a bright band far from the text (anatomy)."""
    image = np.full((300, 600), floor, np.uint8)
    image[:, 520:] = 200
    cv2.putText(image, "NORDMANN 1962", (40, 160), cv2.FONT_HERSHEY_SIMPLEX, 1.0, ink, 2, cv2.LINE_AA)
    return image


def test_text_a_few_levels_off_a_dark_floor_is_proposed_and_off_a_bright_one_not() -> None:
    """An attacker stretches a dark floor's few levels to the full range: black text 9 levels under it becomes
    plain. The same 9 levels on a bright floor are noise to the search (it would join faint anatomy to text)."""
    text_box = (40, 135, 260, 32)
    assert _covered(propose_text(_dim_text(9, 0))[1], text_box) > 0.95
    assert _covered(propose_text(_dim_text(21, 30))[1], text_box) > 0.95
    assert _covered(propose_text(_dim_text(120, 111))[1], text_box) == 0


def _noisy_dark_floor(seed: int, scale: int = 1) -> np.ndarray:
    """An MR's background: noise around 10 grey levels, as far below the mean as black ink is."""
    return np.clip(np.random.default_rng(seed).normal(10, 6, (300 * scale, 600 * scale)), 0, 255).astype(np.uint8)


def test_black_text_on_a_noisy_dark_floor_is_proposed_and_the_noise_alone_is_not() -> None:
    """Pixel by pixel the noise dips as far as the ink; the ink is flat, the noise is not."""
    for seed in range(3):
        # At full resolution, and twice as large (searched on a max-pooled copy).
        for scale in (1, 2):
            floor = _noisy_dark_floor(seed, scale)
            assert propose_text(floor)[1] == []
            cv2.putText(floor, "NORDMANN 1962", (40 * scale, 160 * scale), cv2.FONT_HERSHEY_SIMPLEX, scale, 0,
                        2 * scale, cv2.LINE_AA)
            text_box = tuple(value * scale for value in (40, 135, 260, 32))
            assert _covered(propose_text(floor)[1], text_box, floor.shape) > 0.95
        # On a PET's dark red floor.
        red_floor = cv2.merge([np.zeros_like(floor), np.zeros_like(floor), floor])
        assert _covered(propose_text(red_floor)[1], text_box, floor.shape) > 0.95


def test_black_letters_on_a_floor_dense_with_black_specks_are_proposed() -> None:
    """A PET's red floor, black in about one pixel of 30: reduced for the search (min-pooled, black where any pixel
    is), its specks clump as large as letters, and the floor's black looks like grain; at full resolution the specks
    stand apart and the letters, upright or slanted, do not."""
    for seed in range(2):
        floor = np.clip(np.random.default_rng(seed).normal(12, 6, (600, 1200)), 0, 255).astype(np.uint8)
        red_floor = cv2.merge([np.zeros_like(floor), np.zeros_like(floor), floor])
        assert propose_text(red_floor)[1] == []
        for font in ("DejaVuSansCondensed", "DejaVuSerif-Italic"):
            image = red_floor.copy()
            text_box = burn_in(image, Burn(("Anna-Lena Berg", "ID 88386"), "top-left", "black", font, 22))
            assert _covered(propose_text(image)[1], text_box, image.shape) > 0.95


def test_the_black_ink_search_adds_nothing_to_grainy_films_or_a_black_border(monkeypatch: pytest.MonkeyPatch) -> None:
    """Coarse grain clumps into flat black specks in a film's dark corners; a black border is flat black all over.
    Neither is text: the search finds what it finds without looking for black ink."""
    images = [chest_grain(np.random.default_rng(seed), 2000, 1700) for seed in range(3)]
    border = np.zeros((300, 600), np.uint8)
    border[:, 400:] = np.random.default_rng(0).integers(0, 4, (300, 200), np.uint8)  # a film's edge: black, noisy
    cv2.putText(border, "NORDMANN 1962", (40, 160), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2, cv2.LINE_AA)
    images.append(border)
    found = [propose_text(image)[1] for image in images]
    monkeypatch.setattr(text, "_BLACK_INK_LEVEL", -1)
    assert found == [propose_text(image)[1] for image in images]


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 3), (2, 1), (1, 600), (600, 1), (7, 9), (9, 17, 4)])
@pytest.mark.parametrize("level", [0, 12, 255])
def test_slivers_and_single_pixels_propose_nothing(shape: tuple[int, ...], level: int) -> None:
    """Tiny or one-pixel-thin images, flat at any level (a black one is flat black ink on a dark floor)."""
    lines, proposals = propose_text(np.full(shape, level, np.uint8))
    assert proposals == [] and len(lines) == 0


def test_grey_stored_as_colour_is_proposed_as_grey() -> None:
    grey = np.full((200, 400), 40, np.uint8)
    cv2.putText(grey, "ID 48213", (30, 110), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 230, 2, cv2.LINE_AA)
    lines, proposals = propose_text(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    expected_lines, expected = propose_text(grey)
    assert proposals == expected and np.array_equal(lines, expected_lines) and proposals


def _extended_by_matrix(lines: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The row extension as first written: every line against every candidate, in lines x candidates matrices."""
    if not len(lines) or not len(candidates):
        return lines
    top, bottom = lines[:, 1:2], (lines[:, 1] + lines[:, 3])[:, None]
    height = bottom - top
    grown = np.stack([lines[:, 0], lines[:, 1], lines[:, 0] + lines[:, 2], lines[:, 1] + lines[:, 3]], 1)
    left, cand_top = candidates[None, :, 0], candidates[None, :, 1]
    cand_height = candidates[None, :, 3]
    right, cand_bottom = left + candidates[None, :, 2], cand_top + cand_height
    overlap = np.minimum(bottom, cand_bottom) - np.maximum(top, cand_top)
    in_row = (overlap >= 0.5 * np.minimum(height, cand_height)) & (cand_height <= _MAX_SAME_LINE_HEIGHT * height)
    taken = np.zeros(len(candidates), bool)
    while True:
        gap = np.maximum(left - grown[:, 2:3], grown[:, 0:1] - right)
        joins = in_row & (gap <= _SAME_LINE_GAP * np.minimum(height, cand_height)) & ~taken[None, :]
        if not joins.any():
            return np.stack([grown[:, 0], grown[:, 1], grown[:, 2] - grown[:, 0], grown[:, 3] - grown[:, 1]], 1)
        for line, candidate in zip(*np.nonzero(joins), strict=True):
            if not taken[candidate]:
                taken[candidate] = True
                x, y, w, h = candidates[candidate]
                grown[line] = [min(grown[line, 0], x), min(grown[line, 1], y), max(grown[line, 2], x + w),
                               max(grown[line, 3], y + h)]  # fmt: skip


_boxes = st.lists(st.tuples(st.integers(0, 300), st.integers(0, 200), st.integers(1, 60), st.integers(1, 30)),
                  max_size=40).map(lambda rows: np.array(rows, np.int64).reshape(-1, 4))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_boxes, _boxes, st.booleans())
def test_row_extension_is_the_matrix_one(lines: np.ndarray, candidates: np.ndarray, lines_are_candidates: bool) -> None:
    if lines_are_candidates:  # as in the search: every accepted line is a candidate too
        candidates = np.concatenate([candidates, lines])
    np.testing.assert_array_equal(_extend_along_rows(lines, candidates), _extended_by_matrix(lines, candidates))


def test_row_extension_of_a_texture_fits_in_memory() -> None:
    """Texture (noise, a photo, a 100-megapixel hostile image) makes thousands of lines and tens of thousands of
    candidates: their matrices would take gigabytes (3000 x 40000 x 8 bytes each), the pairs in a row do not."""
    rng = np.random.default_rng(0)

    def blobs(count: int) -> np.ndarray:
        return np.stack([rng.integers(0, 3000, count), rng.integers(0, 3000, count), rng.integers(4, 30, count),
                         rng.integers(4, 12, count)], 1)  # fmt: skip

    lines, candidates = blobs(3000), blobs(40000)
    tracemalloc.start()
    try:
        grown = _extend_along_rows(lines, candidates)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert grown.shape == lines.shape and peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB"


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_box_counts_are_the_integral_images_sums_whichever_way_they_are_counted(data: st.DataObject) -> None:
    """A scan counts the fill and the crossings of the blobs that need them box by box where there are few, through
    an integral image where there are many (text._box_counts): the same counts either way."""
    height, width = data.draw(st.integers(1, 120)), data.draw(st.integers(1, 120))
    seed, density = data.draw(st.integers(0, 2**32 - 1)), data.draw(st.floats(0, 1))
    mask = (np.random.default_rng(seed).random((height, width)) < density).astype(np.uint8)
    boxes = np.array(data.draw(st.lists(st.builds(
        lambda x, y, w, h: (x, y, min(w, width - x), min(h, height - y)),
        st.integers(0, width - 1), st.integers(0, height - 1), st.integers(1, width), st.integers(1, height),
    ), min_size=1, max_size=30)), np.int64)  # fmt: skip
    expected = text._box_sums(cv2.integral(mask), boxes)
    for slice_cost in (-(10**9), 10**9):  # every box counted alone, or all through the integral image
        original = text._SLICE_COST_PX
        text._SLICE_COST_PX = slice_cost
        try:
            counted = text._box_counts(mask, boxes)
        finally:
            text._SLICE_COST_PX = original
        np.testing.assert_array_equal(counted, expected)
