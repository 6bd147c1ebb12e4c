"""Image bytes and pixels: decoding untrusted uploads, finding and blurring burned-in text, stamping the
label, and encoding the results.

Plain NumPy, OpenCV and Pillow only (no TensorFlow): the web process uses this module too.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from service.errors import UnprocessableObject

Box = tuple[int, int, int, int]  # x, y, w, h in pixel coordinates


@dataclass(frozen=True)
class DecodedImage:
    #: OpenCV layout: HxW gray, HxWx3 BGR or HxWx4 BGRA; dtype uint8 or uint16; EXIF orientation applied.
    pixels: np.ndarray
    #: Canonical container name: "jpeg", "png", "tiff", "bmp" or "webp"; `encode_image` writes it back.
    format: str


# --------------------------------------------------------------------------------------------------- decoding

#: Pillow's container name -> canonical format. Only containers OpenCV can both decode and encode are
#: accepted, so every output keeps its input's format. MPO is a JPEG with extra images appended (camera
#: previews, depth maps): OpenCV decodes the primary image and the extras are dropped.
_ACCEPTED_CONTAINERS = {
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "PNG": "png",
    "TIFF": "tiff",
    "BMP": "bmp",
    "WEBP": "webp",
}
#: Containers Pillow may sniff (its JPEG reader reports MPO by itself). Listing them keeps Pillow's lenient
#: parsers for headerless formats (TGA...) from claiming random bytes; GIF is listed only to answer
#: "unsupported format" rather than "not an image".
_SNIFFED_CONTAINERS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")

#: EXIF orientation -> the transform that makes the pixels upright (as in PIL.ImageOps.exif_transpose).
_UPRIGHT_BY_ORIENTATION: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda pixels: cv2.flip(pixels, 1),
    3: lambda pixels: cv2.rotate(pixels, cv2.ROTATE_180),
    4: lambda pixels: cv2.flip(pixels, 0),
    5: cv2.transpose,
    6: lambda pixels: cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE),
    7: lambda pixels: cv2.rotate(cv2.transpose(pixels), cv2.ROTATE_180),
    8: lambda pixels: cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Decode untrusted bytes into upright pixels, or raise `UnprocessableObject`.

    Checks run cheapest first: the byte count, then the header (Pillow parses only the header, so a
    decompression bomb is refused before any pixel memory is allocated), then the full decode by OpenCV,
    which keeps 16-bit depth and alpha. Multi-frame images (animated GIF/APNG/WebP, multi-page TIFF) are
    refused rather than cut to their first frame: the other frames could hold more patient text.
    """
    if len(data) > max_bytes:
        raise UnprocessableObject(
            f"image is {len(data)} bytes, over the limit of {max_bytes}", reason="too-large"
        )
    header = _open_header(data)
    container = header.format or "unknown"
    if container not in _ACCEPTED_CONTAINERS:
        accepted = ", ".join(sorted(set(_ACCEPTED_CONTAINERS.values())))
        raise UnprocessableObject(
            f"{container} images are not supported (accepted: {accepted})", reason="unsupported-format"
        )
    width, height = header.size
    if width * height > max_pixels:
        raise UnprocessableObject(
            f"image is {width}x{height} pixels, over the limit of {max_pixels}", reason="too-many-pixels"
        )
    if container != "MPO" and _frame_count(header) > 1:
        raise UnprocessableObject("animated and multi-page images are not supported", reason="animated-image")
    orientation = _exif_orientation(header)

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.shape[:2] != (height, width):
        raise UnprocessableObject("image data is corrupt or truncated", reason="corrupt-image")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.dtype not in (np.uint8, np.uint16) or channels not in (1, 3, 4):
        raise UnprocessableObject(
            f"{pixels.dtype} pixels with {channels} channels are not supported", reason="unsupported-format"
        )
    # IMREAD_UNCHANGED is the only mode that keeps 16 bits and alpha, and it ignores EXIF orientation.
    upright = _UPRIGHT_BY_ORIENTATION.get(orientation)
    if upright is not None:
        pixels = upright(pixels)
    return DecodedImage(pixels=pixels, format=_ACCEPTED_CONTAINERS[container])


def _open_header(data: bytes) -> Image.Image:
    try:
        # Our own pixel limit is checked right after; Pillow's bomb warning would only repeat it. (Not
        # thread-safe before Python 3.14, but the worst a race can do is leave this one warning ignored.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_SNIFFED_CONTAINERS)
    except Image.DecompressionBombError as error:
        raise UnprocessableObject(
            "image dimensions are far over the pixel limit", reason="too-many-pixels"
        ) from error
    except (UnidentifiedImageError, OSError, ValueError, EOFError) as error:
        raise UnprocessableObject("data is not a recognised image", reason="not-an-image") from error


def _frame_count(header: Image.Image) -> int:
    try:
        return int(getattr(header, "n_frames", 1))
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        raise UnprocessableObject("image frame table is corrupt", reason="corrupt-image") from error


def _exif_orientation(header: Image.Image) -> int:
    """The orientation still to apply to what OpenCV decodes (1: none)."""
    if header.format == "TIFF":
        return 1  # OpenCV's TIFF reader (libtiff) already applies the orientation tag
    # Pillow's PNG reader would decode the whole image to look for an eXIf chunk stored after the pixel data;
    # only the (usual) eXIf chunk ahead of the pixels is honoured.
    if header.format == "PNG" and "exif" not in header.info:
        return 1
    try:
        orientation = header.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        # Pillow's EXIF parser raises many exception types on malformed blocks; a broken EXIF block is
        # common in the wild and must not make an otherwise good image fail.
        return 1
    return orientation if isinstance(orientation, int) else 1


# ------------------------------------------------------------------------------------------------ conversions


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """HxW gray or HxWx3 BGR uint8 for the model (may return `pixels` itself when it already is).

    Alpha is dropped and 16-bit data is scaled by its real bit depth (the bit length of its brightest value):
    12-bit data in a 16-bit container keeps its full contrast. Gray stays one channel: the model's
    preprocessing resizes first, so expanding it to three channels is done on the small image.
    """
    eight_bit = _to_8bit(pixels)
    if eight_bit.ndim == 3 and eight_bit.shape[2] == 4:
        return cv2.cvtColor(eight_bit, cv2.COLOR_BGRA2BGR)
    return eight_bit


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype != np.uint16:
        raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")
    colour = pixels if pixels.ndim == 2 else pixels[:, :, :3]
    shift = max(0, int(colour.max()).bit_length() - 8)
    return cv2.convertScaleAbs(pixels, alpha=1.0 / (1 << shift))


def _to_gray8(pixels: np.ndarray) -> np.ndarray:
    eight_bit = _to_8bit(pixels)
    if eight_bit.ndim == 2:
        return eight_bit
    code = cv2.COLOR_BGRA2GRAY if eight_bit.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(eight_bit, code)


# ----------------------------------------------------------------------------------- burned-in text search

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


def find_text_regions(pixels: np.ndarray) -> list[Box]:
    """Boxes (x, y, w, h) around every burned-in text line (names, ids, dates, markers), padded for blurring.

    Classical morphology, no model: white top-hat (bright strokes) and black-hat (dark strokes) with a kernel
    wider than any stroke; thresholded at a few times the local texture, and at rising levels wherever a blob
    is too tall for a line or touches something; characters joined by a horizontal closing; blobs kept if they
    are sharp or shaped like a text line, then extended along their row over fainter words. The same search on
    a copy reduced four times more finds letters too large for the first. Overlapping boxes are merged.
    """
    gray = _to_gray8(pixels)
    height, width = gray.shape
    factor = _search_reduction(height * width)
    bright, dark = _pooled(gray, factor)
    lines = _LineSearch(factor).lines(bright, dark)
    ratio = _LARGE_TEXT_REDUCTION
    if min(bright.shape) >= 8 * ratio:
        large = _LineSearch(factor, large_text=True).lines(_max_pooled(bright, ratio), _min_pooled(dark, ratio))
        lines = np.concatenate([lines, large * ratio])
    return _padded_union(lines, factor, bright.shape, (height, width))


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


class _LineSearch:
    """Text-line blobs of one contrast map, in reduced coordinates (x, y, w, h rows)."""

    def __init__(self, factor: int, *, large_text: bool = False) -> None:
        """`factor`: full-resolution pixels per reduced pixel. `large_text`: the search on a copy reduced
        _LARGE_TEXT_REDUCTION times more, for lines of at least _MIN_LARGE_LINE_HEIGHT_PX."""
        gap = max(3, int(_CHARACTER_GAP_PX / factor) | 1)
        self.stroke_kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (int(_STROKE_KERNEL_PX / factor) | 1,) * 2)
        self.closing_kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (gap, 1))
        self.large_text = large_text
        min_height = _MIN_LARGE_LINE_HEIGHT_PX / _LARGE_TEXT_REDUCTION if large_text else _MIN_LINE_HEIGHT_PX
        self.min_height = min_height / factor
        self.max_height = _MAX_LINE_HEIGHT_PX / factor

    def lines(self, bright: np.ndarray, dark: np.ndarray) -> np.ndarray:
        """Text lines of bright strokes (white top-hat of `bright`) and of dark ones (black-hat of `dark`)."""
        found = []
        for contrast in (
            cv2.morphologyEx(bright, cv2.MORPH_TOPHAT, self.stroke_kernel),
            cv2.morphologyEx(dark, cv2.MORPH_BLACKHAT, self.stroke_kernel),
        ):
            accepted, candidates = self.run(contrast)
            # Large letters are searched only where they stand out clearly, so there is no fainter word to add.
            found.append(accepted if self.large_text else _extend_along_rows(accepted, candidates))
        return np.concatenate(found)

    def run(self, contrast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Accepted line blobs, and every line-sized blob as a candidate to extend them with."""
        accepted: list[np.ndarray] = [np.zeros((0, 4), np.int64)]
        candidates: list[np.ndarray] = [np.zeros((0, 4), np.int64)]
        if self.large_text:
            threshold = _CONTRAST_LEVELS[_LARGE_TEXT_LEVEL]
            strokes = cv2.threshold(contrast, threshold - 1, 1, cv2.THRESH_BINARY)[1]
            self._scan(contrast, strokes, _LARGE_TEXT_LEVEL + 1, 0, 0, accepted, candidates)
        else:
            # cv2.compare gives 0/255; the masks are counted through integral images, so they hold 0/1.
            strokes = np.bitwise_and(cv2.compare(contrast, _first_thresholds(contrast), cv2.CMP_GE), 1)
            self._scan(contrast, strokes, 0, 0, 0, accepted, candidates)
        return np.concatenate(accepted), np.concatenate(candidates)

    def _scan(
        self,
        contrast: np.ndarray,
        strokes: np.ndarray,
        next_level: int,
        left: int,
        top: int,
        accepted: list[np.ndarray],
        candidates: list[np.ndarray],
    ) -> None:
        """Blobs of `strokes` (a thresholded `contrast`); those too tall for a line, or text touching something,
        are searched again at the next level."""
        blobs_mask = cv2.morphologyEx(strokes, cv2.MORPH_CLOSE, self.closing_kernel)
        contours, _ = cv2.findContours(blobs_mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            return
        blobs = _bounding_boxes(contours)
        blobs = blobs[(blobs[:, 3] >= 2) & (blobs[:, 2] * blobs[:, 3] >= 3)]
        too_tall = blobs[:, 3] > self.max_height
        self._rescan(contrast, blobs[too_tall], next_level, left, top, accepted, candidates)
        blobs = blobs[~too_tall]
        if not len(blobs):
            return
        width, height = blobs[:, 2], blobs[:, 3]
        area = (width * height).astype(np.float64)
        sharp_pixels = _box_sums(
            cv2.integral(cv2.threshold(contrast, _SHARP_CONTRAST - 1, 1, cv2.THRESH_BINARY)[1]), blobs
        )
        crossings = np.zeros_like(strokes)
        np.bitwise_xor(strokes[:, 1:], strokes[:, :-1], out=crossings[:, 1:])
        crossings_per_row = _box_sums(cv2.integral(crossings), blobs) / height
        fill = _box_sums(cv2.integral(blobs_mask), blobs) / area
        line_like = (
            (height >= self.min_height)
            & (width >= _MIN_LINE_ASPECT * height)
            & (fill >= _MIN_LINE_FILL)
            & (crossings_per_row >= _MIN_STROKE_CROSSINGS_PER_ROW)
        )
        sharp = (sharp_pixels >= np.maximum(3, 0.02 * area)) & (
            (fill >= _MIN_SHARP_FILL) | (crossings_per_row >= _MIN_SHARP_CROSSINGS_PER_ROW)
        )
        kept = line_like if self.large_text else sharp | line_like  # see _LARGE_TEXT_REDUCTION
        offset = np.array([left, top, 0, 0])
        accepted.append(blobs[kept] + offset)
        candidates.append(blobs + offset)
        touching = ~kept & (height >= 2 * self.min_height) & (crossings_per_row >= _MIN_STROKE_CROSSINGS_PER_ROW)
        self._rescan(contrast, blobs[touching], next_level, left, top, accepted, candidates)

    def _rescan(
        self,
        contrast: np.ndarray,
        blobs: np.ndarray,
        level: int,
        left: int,
        top: int,
        accepted: list[np.ndarray],
        candidates: list[np.ndarray],
    ) -> None:
        """Search each blob's box again at contrast level `level` (none past the last level)."""
        if level >= len(_CONTRAST_LEVELS):
            return
        threshold = _CONTRAST_LEVELS[level]
        for x, y, w, h in blobs:
            region = contrast[y : y + h, x : x + w]
            region_strokes = cv2.threshold(region, threshold - 1, 1, cv2.THRESH_BINARY)[1]
            self._scan(region, region_strokes, level + 1, left + x, top + y, accepted, candidates)


def _bounding_boxes(contours: Sequence[np.ndarray]) -> np.ndarray:
    """(x, y, w, h) rows of each contour's bounding box: cv2.boundingRect, vectorised (noise makes hundreds)."""
    lengths = np.fromiter(map(len, contours), np.intp, len(contours))
    points = np.concatenate(contours).reshape(-1, 2)
    starts = np.zeros(len(contours), np.intp)
    np.cumsum(lengths[:-1], out=starts[1:])
    low, high = np.minimum.reduceat(points, starts), np.maximum.reduceat(points, starts)
    return np.concatenate([low, high - low + 1], axis=1).astype(np.int64)


def _first_thresholds(contrast: np.ndarray) -> np.ndarray:
    """Per-pixel threshold of the first search (see _TEXTURE_CELL_PX)."""
    height, width = contrast.shape
    cell = _TEXTURE_CELL_PX
    strongest = np.ascontiguousarray(
        cv2.dilate(contrast, np.ones((cell, cell), np.uint8), anchor=(0, 0))[::cell, ::cell]
    )
    # The quietest cell around is the background's texture, even right next to (or inside) a block of text.
    texture = cv2.erode(strongest, np.ones((_TEXTURE_NEIGHBOURHOOD_CELLS,) * 2, np.uint8))
    thresholds = np.clip(texture * _TEXTURE_MULTIPLE, _FAINTEST_CONTRAST, _CONTRAST_LEVELS[0]).astype(
        np.uint8
    )
    return cv2.resize(thresholds, None, fx=cell, fy=cell, interpolation=cv2.INTER_NEAREST)[:height, :width]


def _extend_along_rows(lines: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Grow each accepted line sideways over candidate blobs in its row, so faint words of a line join it."""
    if not len(lines) or not len(candidates):
        return lines
    row_top, row_bottom = (
        lines[:, 1:2].astype(np.float64),
        (lines[:, 1] + lines[:, 3])[:, None].astype(np.float64),
    )
    row_height = row_bottom - row_top
    grown = np.stack([lines[:, 0], lines[:, 1], lines[:, 0] + lines[:, 2], lines[:, 1] + lines[:, 3]], 1)
    cand_left, cand_top = candidates[None, :, 0], candidates[None, :, 1]
    cand_right, cand_bottom = cand_left + candidates[None, :, 2], cand_top + candidates[None, :, 3]
    cand_height = candidates[None, :, 3]
    # Rows stay those of the original lines, so a line cannot snowball up or down over anatomy.
    overlap = np.minimum(row_bottom, cand_bottom) - np.maximum(row_top, cand_top)
    in_row = (overlap >= 0.5 * np.minimum(row_height, cand_height)) & (
        cand_height <= _MAX_SAME_LINE_HEIGHT * row_height
    )
    taken = np.zeros(len(candidates), bool)
    while True:
        gap = np.maximum(cand_left - grown[:, 2:3], grown[:, 0:1] - cand_right)
        joins = in_row & (gap <= _SAME_LINE_GAP * np.minimum(row_height, cand_height)) & ~taken[None, :]
        if not joins.any():
            break
        for line, candidate in zip(*np.nonzero(joins), strict=True):
            if taken[candidate]:
                continue
            taken[candidate] = True
            grown[line, 0] = min(grown[line, 0], candidates[candidate, 0])
            grown[line, 1] = min(grown[line, 1], candidates[candidate, 1])
            grown[line, 2] = max(grown[line, 2], candidates[candidate, 0] + candidates[candidate, 2])
            grown[line, 3] = max(grown[line, 3], candidates[candidate, 1] + candidates[candidate, 3])
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
        pad = int(np.ceil(max(_MIN_PAD_PX / factor, _PAD_FRACTION * min(h, max_height))))
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


# --------------------------------------------------------------------------------------------------- blurring


def blur_text_regions(pixels: np.ndarray, regions: Sequence[Box]) -> np.ndarray:
    """A copy of `pixels` whose `regions` hold no trace of their text; every other pixel is left bit for bit.

    A Gaussian blur can be undone well enough to read by sharpening; this cannot. In each region the strokes
    are first erased (a morphological opening then closing, with a kernel wider than any stroke, leaves only
    the background around them), then what remains is reduced to blocks about a text line's height and
    smoothly interpolated back, so even the amount of ink per character is gone.
    """
    blurred = pixels.copy()
    height, width = blurred.shape[:2]
    for x, y, w, h in regions:
        left, top, right, bottom = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
        if right > left and bottom > top:
            region = blurred[top:bottom, left:right]
            region[...] = _erase_text(region)
    return blurred


def _erase_text(region: np.ndarray) -> np.ndarray:
    height, width = region.shape[:2]
    # find_text_regions pads a line by about half its height on each side, so a third of the box's short side
    # is about the text height, far wider than a stroke.
    block = max(4, min(height, width) // 3)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (block | 1, block | 1))
    background = cv2.morphologyEx(cv2.morphologyEx(region, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    blocks = cv2.resize(
        background, (max(1, width // block), max(1, height // block)), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(blocks, (width, height), interpolation=cv2.INTER_LINEAR)


# --------------------------------------------------------------------------------------------------- stamping

_LABEL_FONT = cv2.FONT_HERSHEY_SIMPLEX
#: Label text height as a fraction of the image's shorter side, and the smallest height still legible.
_LABEL_HEIGHT_FRACTION = 0.03
_MIN_LABEL_HEIGHT_PX = 10
_LINE_SPACING = 1.35


def stamp_label(pixels: np.ndarray, text: str, *, avoid: Sequence[Box]) -> np.ndarray:
    """A copy of `pixels` with `text` in white on a black box, never overlapping any box in `avoid`.

    The text is sized from the image (about 3% of its shorter side, wrapped onto more lines if the image is
    narrow). Corners and edge centres are tried in turn; if every one overlaps `avoid`, a black band is added
    at the bottom and the label goes there, so every existing coordinate (and `avoid` box) stays valid.
    """
    height, width = pixels.shape[:2]
    margin = max(2, round(min(height, width) * 0.01))
    tile = _render_label(text, max_width=width - 2 * margin, min_side=min(height, width))
    tile_height, tile_width = tile.shape
    for x, y in _label_positions(width, height, tile_width, tile_height, margin):
        inside = x >= 0 and y >= 0 and x + tile_width <= width and y + tile_height <= height
        if inside and not any(_overlaps((x, y, tile_width, tile_height), box) for box in avoid):
            stamped = pixels.copy()
            _paste(stamped, tile, x, y)
            return stamped
    band_height = tile_height + 2 * margin
    stamped = np.zeros((height + band_height, width, *pixels.shape[2:]), pixels.dtype)
    stamped[:height] = pixels
    if stamped.ndim == 3 and stamped.shape[2] == 4:
        stamped[height:, :, 3] = np.iinfo(stamped.dtype).max  # an opaque band
    _paste(stamped, tile, margin, height + margin)
    return stamped


def _render_label(text: str, *, max_width: int, min_side: int) -> np.ndarray:
    """White-on-black uint8 tile holding `text`, at most `max_width` wide (wrapped, then shrunk, to fit)."""
    (_, unit_height), _ = cv2.getTextSize("Hg", _LABEL_FONT, 1.0, 1)
    line_height = max(_MIN_LABEL_HEIGHT_PX, round(min_side * _LABEL_HEIGHT_FRACTION))
    for _attempt in range(8):
        scale = line_height / unit_height
        thickness = 2 if line_height >= 24 else 1
        pad = max(2, round(line_height * 0.35))
        lines = _wrap(text, scale, thickness, max_width - 2 * pad)
        widths = [cv2.getTextSize(line, _LABEL_FONT, scale, thickness)[0][0] for line in lines]
        if max(widths) + 2 * pad <= max_width or line_height <= 6:
            break
        line_height = max(6, int(line_height * (max_width - 2 * pad) / max(widths)))
    pitch = round(line_height * _LINE_SPACING)
    tile = np.zeros((pitch * (len(lines) - 1) + line_height + 2 * pad, max(widths) + 2 * pad), np.uint8)
    (_, ascent), _ = cv2.getTextSize("H", _LABEL_FONT, scale, thickness)
    for index, line in enumerate(lines):
        cv2.putText(
            tile, line, (pad, pad + ascent + index * pitch), _LABEL_FONT, scale, 255, thickness, cv2.LINE_AA
        )
    return tile


def _wrap(text: str, scale: float, thickness: int, max_width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and cv2.getTextSize(f"{lines[-1]} {word}", _LABEL_FONT, scale, thickness)[0][0] <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _label_positions(
    width: int, height: int, tile_width: int, tile_height: int, margin: int
) -> list[tuple[int, int]]:
    left, centre, right = margin, (width - tile_width) // 2, width - margin - tile_width
    top, middle, bottom = margin, (height - tile_height) // 2, height - margin - tile_height
    return [
        (left, bottom), (right, bottom), (left, top), (right, top),
        (centre, bottom), (centre, top), (left, middle), (right, middle),
    ]  # fmt: skip


def _overlaps(first: Box, second: Box) -> bool:
    x1, y1, w1, h1 = first
    x2, y2, w2, h2 = second
    return x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1


def _paste(canvas: np.ndarray, tile: np.ndarray, x: int, y: int) -> None:
    white = np.iinfo(canvas.dtype).max
    # 255 * 257 == 65535: the tile's 8-bit antialiasing maps exactly onto 16 bits.
    values = tile if canvas.dtype == np.uint8 else tile.astype(canvas.dtype) * (white // 255)
    target = canvas[y : y + tile.shape[0], x : x + tile.shape[1]]
    values = values[: target.shape[0], : target.shape[1]]  # only a band narrower than the label clips it
    if target.ndim == 2:
        target[...] = values
    else:
        target[:, :, :3] = values[:, :, None]
        if target.shape[2] == 4:
            target[:, :, 3] = white


# --------------------------------------------------------------------------------------------------- encoding

#: Fast settings: encoding is a visible share of the CPU per image. PNG level 1 with the "up" filter is 2x
#: faster than OpenCV's default adaptive filtering for about the same size on X-rays.
_ENCODERS: dict[str, tuple[str, list[int]]] = {
    "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    "png": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]),
    "tiff": (".tiff", [cv2.IMWRITE_TIFF_COMPRESSION, cv2.IMWRITE_TIFF_COMPRESSION_LZW]),
    "bmp": (".bmp", []),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
}
_EIGHT_BIT_FORMATS = {"jpeg", "bmp", "webp"}


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode `pixels` in `fmt` (a `DecodedImage.format`); PNG and TIFF keep 16 bits, the others get 8."""
    try:
        extension, params = _ENCODERS[fmt]
    except KeyError:
        raise ValueError(f"cannot encode {fmt!r}; expected one of {sorted(_ENCODERS)}") from None
    if fmt in _EIGHT_BIT_FORMATS:
        pixels = _to_8bit(pixels)
    ok, encoded = cv2.imencode(extension, pixels, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {pixels.shape} {pixels.dtype} image as {fmt}")
    return encoded.tobytes()
