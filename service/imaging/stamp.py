"""Stamping the model's label and risk onto an image, where no burned-in text is."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from service.imaging.text import Box

_LABEL_FONT = cv2.FONT_HERSHEY_SIMPLEX
#: Label text height as a fraction of the image's shorter side, and the smallest height still legible.
_LABEL_HEIGHT_FRACTION = 0.03
_MIN_LABEL_HEIGHT_PX = 10
_LINE_SPACING = 1.35


def stamp_label(
    pixels: np.ndarray,
    text: str,
    *,
    avoid: Sequence[Box],
    white: int | None = None,
    black: int = 0,
    free: Callable[[Box], bool] | None = None,
) -> np.ndarray:
    """A copy of `pixels` with `text` in white on a black box, never overlapping any box in `avoid`.

    White and black are the pixel type's extremes unless given: a DICOM frame's stored values only look white
    or black through its display curve (MONOCHROME1 is white at its lowest value, a CT at its highest).

    The text is sized from the image (about 3% of its shorter side, wrapped onto more lines if the image is
    narrow). Corners and edge centres are tried in turn. `avoid` may hold more than text (a search's proposals,
    anatomy among them): where every place overlaps it, `free`, if given, looks closer at each place in turn, and
    the first it accepts is taken. Failing that, a black band is added at the bottom and the label goes there, so
    every existing coordinate (and `avoid` box) stays valid.
    """
    height, width = pixels.shape[:2]
    tile, place, margin = _placed_label(pixels.shape, text, avoid, free)
    if place is not None:
        stamped = pixels.copy()
        _paste(stamped, tile, *place, white, black)
        return stamped
    band_height = tile.shape[0] + 2 * margin
    stamped = np.full((height + band_height, width, *pixels.shape[2:]), black, pixels.dtype)
    stamped[:height] = pixels
    if stamped.ndim == 3 and stamped.shape[2] == 4:
        stamped[height:, :, 3] = np.iinfo(stamped.dtype).max  # an opaque band
    _paste(stamped, tile, margin, height + margin, white, black)
    return stamped


def _placed_label(
    shape: tuple[int, ...], text: str, avoid: Sequence[Box], free: Callable[[Box], bool] | None
) -> tuple[np.ndarray, tuple[int, int] | None, int]:
    """The label's tile, its place on an image of `shape` (see stamp_label; None: a band is needed), and the
    margin."""
    height, width = shape[:2]
    margin = max(2, round(min(height, width) * 0.01))
    tile = _render_label(text, max_width=width - 2 * margin, min_side=min(height, width))
    tile_height, tile_width = tile.shape
    places = [(x, y, tile_width, tile_height)
              for x, y in _label_positions(width, height, tile_width, tile_height, margin)
              if x >= 0 and y >= 0 and x + tile_width <= width and y + tile_height <= height]
    place = next((place for place in places if not any(_overlaps(place, box) for box in avoid)), None)
    if place is None and free is not None:
        place = next((place for place in places if free(place)), None)
    return tile, place[:2] if place is not None else None, margin


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


def _paste(canvas: np.ndarray, tile: np.ndarray, x: int, y: int, white: int | None, black: int) -> None:
    opaque = np.iinfo(canvas.dtype).max
    if white is None and black == 0:
        # 255 * 257 == 65535: the tile's 8-bit antialiasing maps exactly onto 16 bits.
        values = tile if canvas.dtype == np.uint8 else tile.astype(canvas.dtype) * (opaque // 255)
    else:
        white = opaque if white is None else white
        # Antialiasing blends from black to white, whichever way round the stored values run.
        values = (black + (np.int64(white) - black) * tile.astype(np.int64) // 255).astype(canvas.dtype)
    target = canvas[y : y + tile.shape[0], x : x + tile.shape[1]]
    values = values[: target.shape[0], : target.shape[1]]  # only a band narrower than the label clips it
    if target.ndim == 2:
        target[...] = values
    else:
        target[:, :, :3] = values[:, :, None]
        if target.shape[2] == 4:
            target[:, :, 3] = opaque
