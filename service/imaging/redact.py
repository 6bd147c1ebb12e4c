"""Redaction: making the text in given boxes unreadable for good, leaving every other pixel untouched."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from service.imaging.text import Box


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
    # A box is a text line padded by 0.3 of its height on each side (service.imaging.detection; the line search's
    # unverified boxes by nearly half), so a third of its short side is over half the text's height, far wider
    # than a stroke.
    block = max(4, min(height, width) // 3)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (block | 1, block | 1))
    background = cv2.morphologyEx(cv2.morphologyEx(region, cv2.MORPH_OPEN, kernel), cv2.MORPH_CLOSE, kernel)
    blocks = cv2.resize(
        background, (max(1, width // block), max(1, height // block)), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(blocks, (width, height), interpolation=cv2.INTER_LINEAR)
