"""Proposing burned-in text (names, IDs, dates, markers) in an image: boxes around every text line, padded for
redaction, and on textured anatomy some that are not text (service.imaging.detection decides). A search over
contrast, stroke and line shape; no model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from service.imaging.codec import to_8bit

Box = tuple[int, int, int, int]  # x, y, w, h in pixel coordinates

# The search runs on a copy reduced 2x (3x above 6 MP, none below 0.4 MP): about 8 ms of CPU per chest X-ray
# of the validation set (0.6 to 2.5 MP), one tenth of it for the large-letter search.
# The copy is max-pooled for bright text and min-pooled for dark text: averaging would halve the contrast of
# the one-pixel strokes of small text, pooling keeps it whole.
_FULL_RESOLUTION_MAX_PIXELS = 400_000
_HALF_RESOLUTION_MAX_PIXELS = 6_000_000
#: Top-hat kernel, wider than the thickest stroke of 60 px bold text, so every stroke stands out whole.
_STROKE_KERNEL_PX = 19
#: Horizontal closing that joins the characters of a word into one blob, even in a large, widely spaced font.
_CHARACTER_GAP_PX = 22
#: Heights of a text line's blob: from 10 px text up to 60 px text with descenders and merged accents.
_MIN_LINE_HEIGHT_PX = 10
_MAX_LINE_HEIGHT_PX = 110
#: The first search thresholds the contrast at a few times the local texture (the strongest contrast in each
#: cell of this many reduced pixels, then the quietest cell around), clamped between the faintest contrast
#: and the first level: faint grey text on a smooth background is found, while lung texture, with a vessel
#: or rib edge in nearly every cell, keeps the first level. 2.5 times the texture still clears film grain and
#: JPEG noise, and finds text of 25 grey levels on them (4 times needed about 35).
_TEXTURE_CELL_PX = 8
_TEXTURE_NEIGHBOURHOOD_CELLS = 5
_TEXTURE_MULTIPLE = 2.5
_FAINTEST_CONTRAST = 18
#: On a dark floor (a PET's or an MR's background: no pixel of a cell, in any channel, nor of the cells around it
#: as far as the texture's neighbourhood, brighter than this), the clamp is lower: an attacker stretches such a
#: region's few levels to the full range, and black text 8 levels under a dark red PET floor becomes plain. Only
#: there: on bright anatomy, or on a narrow dark strip beside it, a clamp this low finds faint edges of the anatomy
#: and joins them to the text's line, whose crop is then scaled for a taller line than it is.
_DARK_FLOOR_LEVEL = 48
_FAINTEST_CONTRAST_ON_DARK_FLOOR = 6
#: Black ink on a noisy dark floor (an MR's or a PET's background) stands no further from the floor than the
#: noise's own dips do, pixel by pixel, so no contrast threshold finds it; but burned-in ink is flat and noise is
#: not: on a dark floor, a pixel whose 2 x 2 neighbourhood is black in every channel (at most this level) is a
#: stroke too, where the floor is not black itself: in a cell whose brightest pixel reaches the first level (the
#: floor's noise around the ink: a PET's red floor reaches 15, an MR's 20-40), among cells whose mean reaches the
#: second (a PET's floor about 8, an MR's 11-14). A film's black edge or border is flat black with speckle
#: (cells 0-6 at their brightest, means 0-4) from which the search would make lines.
_BLACK_INK_LEVEL = 1
_INK_FLOOR_PEAK = 12
_INK_FLOOR_MEAN = 6
#: Ink counts only in runs of three pixels (across, down or diagonal), as strokes are: the dark corner of a grainy
#: film has flat black specks too, which the line search would join into lines.
_STROKE_RUNS = (np.ones((1, 3), np.uint8), np.ones((3, 1), np.uint8), np.eye(3, dtype=np.uint8),
                np.fliplr(np.eye(3, dtype=np.uint8)).copy())
#: Slanted ink (oblique and italic letters) makes no straight run. On a floor whose own black is noise (an MR's
#: background), black pixels are specks: of the reduced pixels holding one (min-pooled: any pixel of its
#: neighbourhood, in every channel) on the MR floors of nine images of bench/privacy.py, 77-89 % lie in components
#: of one or two pixels and at most 2 % in components of _MIN_SPECK_PX to _MIN_INK_COMPONENT_PX, while a grainy
#: film's dark border (13-30 %) and a PET's red floor clump. Where at most _MAX_CLUMPED_SHARE of the floor's black
#: is clumped so, its components of _MIN_INK_COMPONENT_PX or more are ink, whatever their slant: black letters.
#: Min-pooling joins the specks of a dense floor into small clumps (a PET's red floor: 26-27 % of its black in
#: clumps, but only 8-10 % in components of letter size, the letters included), grain into clumps of every size
#: (66-76 % letter-sized). Where the reduced floor clumps yet at most _MAX_LETTER_SIZED_SHARE of it is letter-sized,
#: the floor is tested again at full resolution, where a dense floor's specks stand apart (the PET's: at most 7 px,
#: 0.6 % clumped) and grain still clumps (13-16 %). Most grainy borders are not tested again, which would cost
#: them 14 % more line search; a floor black in more than about one pixel in 20 is not either.
_MIN_SPECK_PX = 5
_MIN_INK_COMPONENT_PX = 12
_MAX_CLUMPED_SHARE = 0.05
_MAX_LETTER_SIZED_SHARE = 1 / 3
#: A blob taller than a text line, or one shaped like no line yet crossed by as many strokes per row as one,
#: is searched again, inside its bounding box, at the next of these levels: text touching anatomy (above,
#: below or beside it) separates from it once the threshold passes the anatomy's contrast.
_CONTRAST_LEVELS = (32, 50, 80, 128, 200)
#: Blobs with pixels this far from their background are accepted at almost any shape: X-ray anatomy is soft
#: and rarely that sharp, while text, lead markers, rulers and wires are (and they may all be blurred). The
#: cortex of a rib on a high-contrast film can be that sharp too, but it is a thin curve: a sharp blob must
#: fill a good part of its box or be crossed by several strokes per row.
_SHARP_CONTRAST = 90
_MIN_SHARP_FILL = 0.3
_MIN_SHARP_CROSSINGS_PER_ROW = 4
#: Fainter blobs must look like a text line: wide, mostly filled once closed, and crossed by many strokes.
_MIN_LINE_ASPECT = 1.5
_MIN_LINE_FILL = 0.45
_MIN_STROKE_CROSSINGS_PER_ROW = 6
#: A faint blob next to an accepted line, in its row, no taller than this many line heights and at most
#: this many times the lower of the two heights away, belongs to the line: a name often mixes high- and
#: low-contrast glyphs over a varying background. Measuring the gap by the lower height keeps a line from
#: hopping along small anatomy blobs (vertebrae, vessels) in its row.
_SAME_LINE_GAP = 2.0
_MAX_SAME_LINE_HEIGHT = 1.6
#: Padding around each line, as a fraction of its height, and at least this many pixels: enough that no
#: antialiased stroke edge survives outside the box.
_PAD_FRACTION = 0.45
_MIN_PAD_PX = 4
#: Letters too large for the search (strokes wider than its kernel, lines taller than its blobs: capitals above
#: about 80 px) are searched again on a copy reduced this many times more, where they are ordinary text. Only
#: line-shaped blobs of lines at least this tall, at least the second contrast level from their background,
#: count there: reduced that far, a chest's ribs, clavicles and bone edges are sharp blobs of that height too,
#: but they are fainter or not crossed by as many strokes as a word.
_LARGE_TEXT_REDUCTION = 4
_MIN_LARGE_LINE_HEIGHT_PX = 80
_LARGE_TEXT_LEVEL = 1
#: Counting the pixels of one box of a mask costs about as much as this many pixels of an integral image of it, and
#: each pixel counted about as much as one integrated (see _box_counts).
_SLICE_COST_PX = 5000


def propose_text(pixels: np.ndarray) -> tuple[np.ndarray, list[Box]]:
    """Every burned-in text line (names, ids, dates, markers) and, on textured anatomy, more: the lines found, as
    (x, y, w, h) rows in full-resolution coordinates, and the boxes around them padded for blurring (overlapping
    boxes merged). The proposals of service.imaging.detection, which keeps only what is text.

    Classical morphology, no model: white top-hat (bright strokes) and black-hat (dark strokes) with a kernel
    wider than any stroke, in grey or in each channel of a colour image (see _planes); thresholded at a few times
    the local texture, and at rising levels wherever a blob is too tall for a line or touches something;
    characters joined by a horizontal closing (and the same on the columns, for vertical text); blobs kept if they
    are sharp or shaped like a text line, then extended along their row over fainter words. The same search on a
    copy reduced four times more finds letters too large for the first. Overlapping boxes are merged.
    """
    planes = _planes(pixels)
    height, width = planes[0].shape
    factor = _search_reduction(height * width)
    pooled = [_pooled(plane, factor) for plane in planes]
    bright, dark = [plane for plane, _ in pooled], [plane for _, plane in pooled]
    lines = _LineSearch(factor).lines(bright, dark, planes)
    ratio = _LARGE_TEXT_REDUCTION
    reduced_shape = bright[0].shape
    if min(reduced_shape) >= 8 * ratio:
        large = _LineSearch(factor, large_text=True).lines(
            [_max_pooled(plane, ratio) for plane in bright], [_min_pooled(plane, ratio) for plane in dark], planes
        )
        lines = np.concatenate([lines, large * ratio])
    # A blob as wide as tall is found by the horizontal and the vertical search alike: once is enough.
    lines = np.unique(lines, axis=0) if len(lines) else lines
    return lines * factor, _padded_union(lines, factor, reduced_shape, (height, width))


def _planes(pixels: np.ndarray) -> list[np.ndarray]:
    """The 8-bit planes text is searched in: the grey of a grey image, each channel of a colour one.

    In colour, text can be as bright as its background in grey and still plain to see (green letters on a grey
    body, white ones on a yellow colour map), but never in every channel: a stroke stands out in grey by at most
    what it does in its strongest channel, so the search, taking each pixel's strongest channel, finds all that a
    search in grey finds, and coloured text too."""
    eight_bit = to_8bit(pixels)
    if eight_bit.ndim == 2:
        return [eight_bit]
    planes = cv2.split(eight_bit[:, :, :3])
    # Grey stored as colour (a film scanned in RGB, a grey DICOM made colour) is searched once.
    if all(np.array_equal(planes[0], plane) for plane in planes[1:]):
        return planes[:1]
    return list(planes)


def _search_reduction(pixel_count: int) -> int:
    if pixel_count <= _FULL_RESOLUTION_MAX_PIXELS:
        return 1
    return 2 if pixel_count <= _HALF_RESOLUTION_MAX_PIXELS else 3


def _pooled(gray: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Max- and min-pooled copies of `gray`, reduced `factor` times."""
    if factor == 1:
        return gray, gray
    return _max_pooled(gray, factor), _min_pooled(gray, factor)


def _max_pooled(image: np.ndarray, factor: int) -> np.ndarray:
    return _block_pooled(image, factor, cv2.max)


def _min_pooled(image: np.ndarray, factor: int) -> np.ndarray:
    return _block_pooled(image, factor, cv2.min)


def _block_pooled(image: np.ndarray, factor: int, combine: Callable[..., np.ndarray]) -> np.ndarray:
    """`image` reduced `factor` times, each pixel `combine`d (max or min) over its factor x factor block."""
    height, width = image.shape[0] // factor, image.shape[1] // factor
    # Every factor-th row (a strided view OpenCV reads in place), combined; then each row's runs of `factor`
    # pixels as the channels of a narrower image, combined: 3x cheaper than a dilation and a resize.
    rows = image[0 : height * factor : factor, : width * factor]
    for offset in range(1, factor):
        rows = combine(rows, image[offset : height * factor : factor, : width * factor])
    columns = cv2.split(np.ascontiguousarray(rows).reshape(height, width, factor))
    pooled = columns[0]
    for column in columns[1:]:
        pooled = combine(pooled, column)
    return pooled


def _box_sums(integral: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x, y, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return integral[y + h, x + w] - integral[y, x + w] - integral[y + h, x] + integral[y, x]


def _box_counts(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The set pixels of 0/1 `mask` inside each of `boxes` (x, y, w, h rows): counted box by box where that is
    cheaper than an integral image of all of `mask` (a chest X-ray's few dozen blobs that need counting, in a
    reduced map of 300,000-600,000 pixels), else through one."""
    if len(boxes) * _SLICE_COST_PX + int((boxes[:, 2] * boxes[:, 3]).sum()) < mask.size:
        return np.array([np.count_nonzero(mask[y : y + h, x : x + w]) for x, y, w, h in boxes.tolist()], np.int64)
    return _box_sums(cv2.integral(mask), boxes).astype(np.int64)


class _LineSearch:
    """Text-line blobs of one contrast map, in reduced coordinates (x, y, w, h rows)."""

    def __init__(self, factor: int, *, large_text: bool = False) -> None:
        """`factor`: full-resolution pixels per reduced pixel. `large_text`: the search on a copy reduced
        _LARGE_TEXT_REDUCTION times more, for lines of at least _MIN_LARGE_LINE_HEIGHT_PX."""
        gap = max(3, int(_CHARACTER_GAP_PX / factor) | 1)
        self.stroke_kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (int(_STROKE_KERNEL_PX / factor) | 1,) * 2)
        self.closing_kernels = {
            False: cv2.getStructuringElement(cv2.MORPH_RECT, (gap, 1)),
            True: cv2.getStructuringElement(cv2.MORPH_RECT, (1, gap)),
        }
        self.factor = factor
        self.large_text = large_text
        min_height = _MIN_LARGE_LINE_HEIGHT_PX / _LARGE_TEXT_REDUCTION if large_text else _MIN_LINE_HEIGHT_PX
        self.min_height = min_height / factor
        self.max_height = _MAX_LINE_HEIGHT_PX / factor

    def lines(self, bright: list[np.ndarray], dark: list[np.ndarray], planes: list[np.ndarray]) -> np.ndarray:
        """Text lines of bright strokes (white top-hat of the `bright` planes) and of dark ones (black-hat of the
        `dark` planes), each pixel's contrast that of its strongest plane. `planes`: the full-resolution planes both
        were pooled from (see _black_ink)."""
        found = []
        if self.large_text:
            for contrast in (self._contrast(bright, cv2.MORPH_TOPHAT), self._contrast(dark, cv2.MORPH_BLACKHAT)):
                strokes = cv2.threshold(contrast, _CONTRAST_LEVELS[_LARGE_TEXT_LEVEL] - 1, 1, cv2.THRESH_BINARY)[1]
                # Large letters are searched only where they stand out clearly: there is no fainter word to add.
                found.append(self.run(contrast, strokes, _LARGE_TEXT_LEVEL + 1, _sharp_integral(contrast))[0])
            return np.concatenate(found)
        brightest = bright[0]
        for plane in bright[1:]:
            brightest = cv2.max(brightest, plane)
        darkest = dark[0]
        for plane in dark[1:]:
            darkest = cv2.max(darkest, plane)
        cell_maxima = _cell_maxima(brightest)
        dark_floor = _dark_floor_cells(cell_maxima)
        black_ink = _black_ink(brightest, darkest, cell_maxima, dark_floor, self.factor, planes)
        for contrast, ink in ((self._contrast(bright, cv2.MORPH_TOPHAT), None),
                              (self._contrast(dark, cv2.MORPH_BLACKHAT), black_ink)):
            sharp = _sharp_integral(contrast)
            # cv2.compare gives 0/255; the masks are counted through integral images, so they hold 0/1.
            thresholds = _first_thresholds(contrast, dark_floor)
            strokes = np.bitwise_and(cv2.compare(contrast, thresholds, cv2.CMP_GE), 1)
            if ink is not None:
                strokes |= ink
            found.append(_extend_along_rows(*self.run(contrast, strokes, 0, sharp)))
            # Text running vertically (burned along a side edge, or in an image shown turned by 90 degrees) is the
            # same search with rows and columns swapped (thresholds are the same either way round). It runs on the
            # same maps, swapping only each blob's box, not the pixels: a transposed copy of the maps costs more.
            accepted, candidates = self.run(contrast, strokes, 0, sharp, vertical=True)
            found.append(_extend_along_rows(accepted[:, _SWAPPED], candidates[:, _SWAPPED])[:, _SWAPPED])
        return np.concatenate(found)

    def _contrast(self, planes: list[np.ndarray], operation: int) -> np.ndarray:
        contrast = cv2.morphologyEx(planes[0], operation, self.stroke_kernel)
        for plane in planes[1:]:
            contrast = cv2.max(contrast, cv2.morphologyEx(plane, operation, self.stroke_kernel))
        return contrast

    def run(
        self, contrast: np.ndarray, strokes: np.ndarray, next_level: int, sharp: np.ndarray, *, vertical: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Accepted line blobs of `strokes` (thresholded `contrast`, `sharp` its _sharp_integral), and every
        line-sized blob as a candidate to extend them with; blobs that need it are searched again from contrast
        level `next_level` on. `vertical`: lines run down the columns."""
        accepted: list[np.ndarray] = [np.zeros((0, 4), np.int64)]
        candidates: list[np.ndarray] = [np.zeros((0, 4), np.int64)]
        self._scan(contrast, strokes, sharp, _Place(next_level, 0, 0, vertical), accepted, candidates)
        return np.concatenate(accepted), np.concatenate(candidates)

    def _scan(
        self,
        contrast: np.ndarray,
        strokes: np.ndarray,
        sharp: np.ndarray,
        place: _Place,
        accepted: list[np.ndarray],
        candidates: list[np.ndarray],
    ) -> None:
        """Blobs of `strokes` (a thresholded `contrast`); those too tall for a line, or text touching something,
        are searched again at the next level."""
        blobs_mask = cv2.morphologyEx(strokes, cv2.MORPH_CLOSE, self.closing_kernels[place.vertical])
        contours, _ = cv2.findContours(blobs_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            return
        blobs = _bounding_boxes(contours)
        # Along and across the line: a vertical line's height runs along it.
        along, across = (3, 2) if place.vertical else (2, 3)
        blobs = blobs[(blobs[:, across] >= 2) & (blobs[:, 2] * blobs[:, 3] >= 3)]
        too_tall = blobs[:, across] > self.max_height
        self._rescan(contrast, blobs[too_tall], place, accepted, candidates)
        blobs = blobs[~too_tall]
        if not len(blobs):
            return
        length, height = blobs[:, along], blobs[:, across]
        area = (length * height).astype(np.float64)
        sharp_pixels = _box_sums(sharp, blobs)
        sharp_count = sharp_pixels >= np.maximum(3, 0.02 * area)
        # Only these can be kept or searched again (see below): the others' fill and crossings decide nothing.
        measured = (
            ((height >= self.min_height) & (length >= _MIN_LINE_ASPECT * height))
            | sharp_count
            | (height >= 2 * self.min_height)
        )
        crossings_per_row, fill = np.zeros(len(blobs)), np.zeros(len(blobs))
        if measured.any():
            boxes = blobs[measured]
            # Strokes crossed along the line: where the mask changes from one pixel to the next along it.
            crossings = np.zeros_like(strokes)
            if place.vertical:
                np.bitwise_xor(strokes[1:], strokes[:-1], out=crossings[1:])
            else:
                np.bitwise_xor(strokes[:, 1:], strokes[:, :-1], out=crossings[:, 1:])
            crossings_per_row[measured] = _box_counts(crossings, boxes) / height[measured]
            fill[measured] = _box_counts(blobs_mask, boxes) / area[measured]
        line_like = (
            (height >= self.min_height)
            & (length >= _MIN_LINE_ASPECT * height)
            & (fill >= _MIN_LINE_FILL)
            & (crossings_per_row >= _MIN_STROKE_CROSSINGS_PER_ROW)
        )
        sharp_enough = sharp_count & ((fill >= _MIN_SHARP_FILL) | (crossings_per_row >= _MIN_SHARP_CROSSINGS_PER_ROW))
        kept = line_like if self.large_text else sharp_enough | line_like  # see _LARGE_TEXT_REDUCTION
        offset = np.array([place.left, place.top, 0, 0])
        accepted.append(blobs[kept] + offset)
        candidates.append(blobs + offset)
        touching = ~kept & (height >= 2 * self.min_height) & (crossings_per_row >= _MIN_STROKE_CROSSINGS_PER_ROW)
        self._rescan(contrast, blobs[touching], place, accepted, candidates)

    def _rescan(
        self,
        contrast: np.ndarray,
        blobs: np.ndarray,
        place: _Place,
        accepted: list[np.ndarray],
        candidates: list[np.ndarray],
    ) -> None:
        """Search each blob's box again at contrast level `place.level` (none past the last level)."""
        if place.level >= len(_CONTRAST_LEVELS):
            return
        threshold = _CONTRAST_LEVELS[place.level]
        for x, y, w, h in blobs:
            region = contrast[y : y + h, x : x + w]
            region_strokes = cv2.threshold(region, threshold - 1, 1, cv2.THRESH_BINARY)[1]
            inner = _Place(place.level + 1, place.left + x, place.top + y, place.vertical)
            self._scan(region, region_strokes, _sharp_integral(region), inner, accepted, candidates)


@dataclass(frozen=True)
class _Place:
    """Where a scan runs: the contrast level to search next, the scanned region's offset in the map, and whether
    its lines run vertically."""

    level: int
    left: int
    top: int
    vertical: bool


#: Columns of (x, y, w, h) rows that swap rows and columns.
_SWAPPED = [1, 0, 3, 2]


def _sharp_integral(contrast: np.ndarray) -> np.ndarray:
    """Integral image of the pixels at least _SHARP_CONTRAST from their background."""
    return cv2.integral(cv2.threshold(contrast, _SHARP_CONTRAST - 1, 1, cv2.THRESH_BINARY)[1])


def _bounding_boxes(contours: Sequence[np.ndarray]) -> np.ndarray:
    """(x, y, w, h) rows of each contour's bounding box: cv2.boundingRect, vectorised (noise makes hundreds)."""
    lengths = np.fromiter(map(len, contours), np.intp, len(contours))
    points = np.concatenate(contours).reshape(-1, 2)
    starts = np.zeros(len(contours), np.intp)
    np.cumsum(lengths[:-1], out=starts[1:])
    low, high = np.minimum.reduceat(points, starts), np.maximum.reduceat(points, starts)
    return np.concatenate([low, high - low + 1], axis=1).astype(np.int64)


def _cell_maxima(brightest: np.ndarray) -> np.ndarray:
    """The brightest pixel of each cell of _TEXTURE_CELL_PX (rounded up) of the max-pooled strongest channel."""
    cell = _TEXTURE_CELL_PX
    return np.ascontiguousarray(cv2.dilate(brightest, np.ones((cell, cell), np.uint8), anchor=(0, 0))[::cell, ::cell])


def _dark_floor_cells(cell_maxima: np.ndarray) -> np.ndarray:
    """Which cells lie on a dark floor (see _DARK_FLOOR_LEVEL), from _cell_maxima."""
    return cv2.dilate(cell_maxima, np.ones((_TEXTURE_NEIGHBOURHOOD_CELLS,) * 2, np.uint8)) <= _DARK_FLOOR_LEVEL


def _black_ink(
    brightest: np.ndarray,
    darkest: np.ndarray,
    cell_maxima: np.ndarray,
    dark_floor: np.ndarray,
    factor: int,
    planes: list[np.ndarray],
) -> np.ndarray:
    """0/1 mask of the flat black ink on a dark floor that is not black itself (see _BLACK_INK_LEVEL), from the
    max-pooled strongest channel, the min-pooled channels' strongest `darkest`, the _cell_maxima and
    _dark_floor_cells, and the full-resolution `planes` (reduced `factor` times to the others). Max-pooled 2x or more,
    a reduced pixel is its full-resolution neighbourhood already (black if all of it is); min-pooled, black if any of
    it is."""
    height, width = brightest.shape
    cell = _TEXTURE_CELL_PX
    padded = cv2.copyMakeBorder(brightest, 0, -height % cell, 0, -width % cell, cv2.BORDER_REPLICATE)
    cell_means = cv2.resize(padded, (padded.shape[1] // cell, padded.shape[0] // cell), interpolation=cv2.INTER_AREA)
    floor_means = cv2.blur(cell_means.astype(np.float32), (_TEXTURE_NEIGHBOURHOOD_CELLS,) * 2)
    allowed = dark_floor & (cell_maxima >= _INK_FLOOR_PEAK) & (floor_means >= _INK_FLOOR_MEAN)
    neighbourhood = brightest if factor > 1 else cv2.dilate(brightest, np.ones((2, 2), np.uint8), anchor=(0, 0))
    # numpy's comparison, not OpenCV's: OpenCV takes an image of one pixel for a scalar.
    black = (neighbourhood <= _BLACK_INK_LEVEL).view(np.uint8)
    allowed_pixels = cv2.resize(allowed.view(np.uint8), None, fx=cell, fy=cell, interpolation=cv2.INTER_NEAREST)
    allowed_pixels = allowed_pixels[:height, :width]
    ink = np.bitwise_and(black, allowed_pixels)
    # Most images have little or none of it: the runs are looked for around it only (a run of three reaches two
    # pixels beyond), the same as over the whole image.
    left, top, box_width, box_height = cv2.boundingRect(ink)
    if box_width:
        around = np.s_[max(0, top - 2) : top + box_height + 2, max(0, left - 2) : left + box_width + 2]
        runs = [cv2.morphologyEx(black[around], cv2.MORPH_OPEN, kernel) for kernel in _STROKE_RUNS]
        strokes = runs[0]
        for run in runs[1:]:
            strokes = cv2.max(strokes, run)
        ink[around] = np.bitwise_and(strokes, allowed_pixels[around])
    # Slanted letters: components of black on a floor whose black is specks (see _MIN_INK_COMPONENT_PX), looked for
    # around the black only (a grainy film's border is most of the film). Most chest X-rays have no such floor.
    if not allowed.any():
        return ink
    touched = np.bitwise_and((darkest <= _BLACK_INK_LEVEL).view(np.uint8), allowed_pixels)
    components = _black_components(touched)
    if not components.clumped:
        return ink | components.letter_sized
    # Only on images searched at half their size (at most _HALF_RESOLUTION_MAX_PIXELS): the full-resolution labels
    # take four bytes a pixel, too much memory on the largest (a hostile image of 100 megapixels or more).
    if factor != 2 or components.letter_sized_share > _MAX_LETTER_SIZED_SHARE:
        return ink
    # The reduced copy joined a dense floor's specks (see _MAX_LETTER_SIZED_SHARE): the floor is tested again at full
    # resolution, where they stand apart. Min-pooled, each black pixel there lies under a black reduced pixel, so
    # the reduced black's box holds all of it.
    left, top, box_width, box_height = cv2.boundingRect(touched)
    box = np.s_[top : top + box_height, left : left + box_width]
    full_box = np.s_[top * factor : (top + box_height) * factor, left * factor : (left + box_width) * factor]
    full = planes[0][full_box]
    for plane in planes[1:]:
        full = cv2.max(full, plane[full_box])
    floor = cv2.resize(allowed_pixels[box], None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    full_components = _black_components(np.bitwise_and((full <= _BLACK_INK_LEVEL).view(np.uint8), floor))
    if not full_components.clumped:
        ink[box] |= _max_pooled(full_components.letter_sized, factor)
    return ink


class _Components(NamedTuple):
    """A dark floor's black pixels, by the size of their components."""

    #: 0/1 mask of the components of _MIN_INK_COMPONENT_PX or more.
    letter_sized: np.ndarray
    #: Whether more than _MAX_CLUMPED_SHARE of the black lies in components of _MIN_SPECK_PX up to
    #: _MIN_INK_COMPONENT_PX: then components that large are the floor's own, not letters.
    clumped: bool
    #: The share of the black in components of _MIN_INK_COMPONENT_PX or more.
    letter_sized_share: float


def _black_components(black: np.ndarray) -> _Components:
    """The 8-connected components of a dark floor's black pixels (`black`, 0/1), by size (see _MIN_SPECK_PX)."""
    letter_sized = np.zeros_like(black)
    if cv2.countNonZero(black) < _MIN_INK_COMPONENT_PX:
        return _Components(letter_sized, False, 0.0)
    # Around the black only: a grainy film's border is most of the film.
    left, top, box_width, box_height = cv2.boundingRect(black)
    around = np.s_[top : top + box_height, left : left + box_width]
    pixels = black[around].view(bool)
    # Labels without OpenCV's statistics, which cost 2-5 times the labelling; the areas from the black pixels only.
    _, labels = cv2.connectedComponents(black[around], connectivity=8)
    own_labels = labels[pixels]
    areas = np.bincount(own_labels)
    large = areas >= _MIN_INK_COMPONENT_PX
    letter_sized[around][pixels] = large[own_labels]
    total = int(areas.sum())
    clumped = int(areas[(areas >= _MIN_SPECK_PX) & ~large].sum()) > _MAX_CLUMPED_SHARE * total
    return _Components(letter_sized, clumped, int(areas[large].sum()) / total)


def _first_thresholds(contrast: np.ndarray, dark_floor: np.ndarray) -> np.ndarray:
    """Per-pixel threshold of the first search (see _TEXTURE_CELL_PX); `dark_floor` from _dark_floor_cells."""
    height, width = contrast.shape
    cell = _TEXTURE_CELL_PX
    strongest = np.ascontiguousarray(
        cv2.dilate(contrast, np.ones((cell, cell), np.uint8), anchor=(0, 0))[::cell, ::cell]
    )
    # The quietest cell around is the background's texture, even right next to (or inside) a block of text.
    texture = cv2.erode(strongest, np.ones((_TEXTURE_NEIGHBOURHOOD_CELLS,) * 2, np.uint8))
    faintest = np.where(dark_floor, _FAINTEST_CONTRAST_ON_DARK_FLOOR, _FAINTEST_CONTRAST)
    thresholds = np.clip(texture * _TEXTURE_MULTIPLE, faintest, _CONTRAST_LEVELS[0]).astype(np.uint8)
    return cv2.resize(thresholds, None, fx=cell, fy=cell, interpolation=cv2.INTER_NEAREST)[:height, :width]


def _extend_along_rows(lines: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Grow each accepted line sideways over candidate blobs in its row, so faint words of a line join it."""
    if not len(lines) or not len(candidates):
        return lines
    line_top, line_bottom = lines[:, 1], lines[:, 1] + lines[:, 3]
    cand_left, cand_top = candidates[:, 0], candidates[:, 1]
    cand_right, cand_bottom, cand_height = cand_left + candidates[:, 2], cand_top + candidates[:, 3], candidates[:, 3]
    # The (line, candidate) pairs in one row, found through the candidates sorted by their top: texture can make
    # thousands of each, and a lines x candidates matrix would not fit in memory. Rows stay those of the original
    # lines, so a line cannot snowball up or down over anatomy.
    by_top = np.argsort(cand_top, kind="stable")
    sorted_tops = cand_top[by_top]
    tallest = int(cand_height.max())
    pair_lines, pair_candidates = [], []
    for line in range(len(lines)):
        top, bottom, height = int(line_top[line]), int(line_bottom[line]), int(lines[line, 3])
        near = by_top[np.searchsorted(sorted_tops, top - tallest) : np.searchsorted(sorted_tops, bottom, "right")]
        overlap = np.minimum(bottom, cand_bottom[near]) - np.maximum(top, cand_top[near])
        in_row = (overlap >= 0.5 * np.minimum(height, cand_height[near])) & (
            cand_height[near] <= _MAX_SAME_LINE_HEIGHT * height
        )
        pair_candidates.append(np.sort(near[in_row]))
        pair_lines.append(np.full(len(pair_candidates[-1]), line))
    pair_line, pair_candidate = np.concatenate(pair_lines), np.concatenate(pair_candidates)
    reach = _SAME_LINE_GAP * np.minimum(lines[pair_line, 3], cand_height[pair_candidate])
    grown = np.stack([lines[:, 0], line_top, lines[:, 0] + lines[:, 2], line_bottom], 1)
    taken = np.zeros(len(candidates), bool)
    while True:
        gap = np.maximum(
            cand_left[pair_candidate] - grown[pair_line, 2], grown[pair_line, 0] - cand_right[pair_candidate]
        )
        joins = (gap <= reach) & ~taken[pair_candidate]
        if not joins.any():
            break
        # In order of line, then candidate: a candidate two lines reach joins the first.
        for line, candidate in zip(pair_line[joins], pair_candidate[joins], strict=True):
            if taken[candidate]:
                continue
            taken[candidate] = True
            grown[line, 0] = min(grown[line, 0], cand_left[candidate])
            grown[line, 1] = min(grown[line, 1], cand_top[candidate])
            grown[line, 2] = max(grown[line, 2], cand_right[candidate])
            grown[line, 3] = max(grown[line, 3], cand_bottom[candidate])
    return np.stack([grown[:, 0], grown[:, 1], grown[:, 2] - grown[:, 0], grown[:, 3] - grown[:, 1]], 1)


def _padded_union(
    lines: np.ndarray, factor: int, reduced_shape: tuple[int, int], full_shape: tuple[int, int]
) -> list[Box]:
    """Pad each line, merge overlapping boxes and return them in full-resolution coordinates."""
    if not len(lines):
        return []
    union = np.zeros(reduced_shape, np.uint8)
    max_height = _MAX_LINE_HEIGHT_PX / factor
    for x, y, w, h in lines:
        # By the line's thickness: a vertical line's text is as tall as the line is wide.
        pad = int(np.ceil(max(_MIN_PAD_PX / factor, _PAD_FRACTION * min(w, h, max_height))))
        cv2.rectangle(
            union, (int(x) - pad, int(y) - pad), (int(x + w - 1) + pad, int(y + h - 1) + pad), 1, -1
        )
    contours, _ = cv2.findContours(union, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    full_height, full_width = full_shape
    boxes: list[Box] = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        # The reduced copy lost the last (factor - 1) rows and columns: a box at its edge reaches the image's.
        right = full_width if x + w == reduced_shape[1] else min(full_width, (x + w) * factor)
        bottom = full_height if y + h == reduced_shape[0] else min(full_height, (y + h) * factor)
        boxes.append((x * factor, y * factor, right - x * factor, bottom - y * factor))
    return sorted(boxes, key=lambda box: (box[1], box[0]))
