"""The tests' privacy oracle: Tesseract OCR used as an attacker would use it on an anonymized image.

Each region is read plain, after a strong unsharp mask, upscaled and sharpened, and with its strokes pulled off
the background; a token counts as leaked if any of these views yields it. Tesseract is a test oracle only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytesseract

Box = tuple[int, int, int, int]
#: A gray image and the Tesseract page segmentation mode to read it with.
View = tuple[np.ndarray, int]


def normalised(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


def sharpened(gray: np.ndarray) -> np.ndarray:
    """What an attacker tries first: a strong unsharp mask, then a full contrast stretch."""
    blurred = cv2.GaussianBlur(gray, (0, 0), 2.0)
    sharp = cv2.addWeighted(gray, 3.0, blurred, -2.0, 0)
    return cv2.normalize(sharp, None, 0, 255, cv2.NORM_MINMAX)


def text_isolated(gray: np.ndarray) -> np.ndarray:
    """Bright and dark strokes pulled off their background (top-hat + black-hat), as dark text on white."""
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (25, 25))
    strokes = cv2.max(
        cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel), cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel)
    )
    return 255 - cv2.normalize(strokes, None, 0, 255, cv2.NORM_MINMAX)


def attack_views(gray: np.ndarray) -> list[np.ndarray]:
    upscaled = cv2.resize(gray, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    return [gray, sharpened(gray), sharpened(upscaled), text_isolated(upscaled)]


def gray_of(region: np.ndarray) -> np.ndarray:
    return region if region.ndim == 2 else cv2.cvtColor(region, cv2.COLOR_BGR2GRAY)


def stretched_to_read(channel: np.ndarray, text_size: int) -> np.ndarray:
    """Full contrast, 8 bits, and capitals (`text_size` px) no larger than Tesseract reads best (20-40 px)."""
    stretched = cv2.normalize(channel.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if text_size > 32:
        stretched = cv2.resize(stretched, None, fx=32 / text_size, fy=32 / text_size, interpolation=cv2.INTER_AREA)
    return stretched


def stroke_views(channel: np.ndarray, text_size: int) -> list[np.ndarray]:
    """Light strokes and dark strokes pulled off a textured background, each alone, as dark text on white, at the
    scale Tesseract reads best: what reads faint text on film grain, text over anatomy and very large letters."""
    stretched = cv2.normalize(channel.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    scale = 36 / text_size
    resized = cv2.resize(
        stretched, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    )
    smooth = cv2.GaussianBlur(resized, (0, 0), 1.0)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (25, 25))
    return [
        255 - cv2.normalize(cv2.morphologyEx(smooth, operation, kernel), None, 0, 255, cv2.NORM_MINMAX)
        for operation in (cv2.MORPH_TOPHAT, cv2.MORPH_BLACKHAT)
    ]


def block_views(region: np.ndarray, text_size: int) -> list[View]:
    """What an attacker reads in one text block (grey or BGR, lines running left to right): the contrast-stretched
    grey through every attack view and with its light and dark strokes isolated; on colour images also the
    distance to the block's median colour (text of any hue, in any channel), plain and with its strokes isolated."""
    gray = gray_of(region)
    views = attack_views(stretched_to_read(gray, text_size)) + stroke_views(gray, text_size)
    if region.ndim == 3 and np.ptp(region, axis=2).max() > 0.05 * np.ptp(region):  # colour, not grey in BGR
        distance = np.abs(region.astype(np.float32) - np.median(region.reshape(-1, 3), axis=0)).max(axis=2)
        views += [stretched_to_read(distance, text_size), stroke_views(distance, text_size)[0]]
    return [(view, 6) for view in views]


def ocr(gray: np.ndarray, psm: int) -> str:
    padded = cv2.copyMakeBorder(gray, 12, 12, 12, 12, cv2.BORDER_REPLICATE)
    return normalised(pytesseract.image_to_string(padded, config=f"--psm {psm}"))


def words_read(view: View) -> list[str]:
    """Each word Tesseract reads, and each run of two or three neighbouring words on a line, joined."""
    gray, psm = view
    padded = cv2.copyMakeBorder(gray, 12, 12, 12, 12, cv2.BORDER_REPLICATE)
    found = []
    for line in pytesseract.image_to_string(padded, config=f"--psm {psm}").splitlines():
        words = [word for word in map(normalised, line.split()) if word]
        found += ["".join(words[start : start + count]) for count in (1, 2, 3) for start in range(len(words))]
    return found


def patient_tokens(lines: Iterable[str]) -> set[str]:
    """What identifies the patient: every burned word of four or more characters."""
    return {word for word in burned_words(lines) if len(word) >= 4}


def burned_words(lines: Iterable[str]) -> set[str]:
    return {normalised(word) for line in lines for word in line.split()} - {""}


def tokens_read(view_groups: Sequence[Sequence[View]], lines: Sequence[str]) -> list[set[str]]:
    """For each group of views, the patient tokens (of the burned `lines`) Tesseract reads in any of them.

    A token counts where a word, or a few neighbouring words joined (OCR splits "Mc gehee"), is the token,
    possibly glued to another burned word ("ID3677"). Matching words rather than searching all text
    joined keeps the garbage Tesseract reads in X-ray texture ("deanna", or "mari" and "ass" on
    two lines) from counting as a leaked "ANNA" or "MARIA".
    """
    tokens, words = patient_tokens(lines), burned_words(lines)
    spellings = {
        token: {token} | {word + token for word in words} | {token + word for word in words}
        for token in tokens
    }
    views = [view for group in view_groups for view in group]
    with ThreadPoolExecutor(max_workers=4) as pool:
        words_per_view = iter(list(pool.map(words_read, views)))
    found = []
    for group in view_groups:
        read = {word for _ in group for word in next(words_per_view)}
        found.append({token for token in tokens if spellings[token] & read})
    return found


def crop(pixels: np.ndarray, box: Box, margin: int) -> np.ndarray:
    x, y, w, h = box
    return pixels[max(0, y - margin) : y + h + margin, max(0, x - margin) : x + w + margin]


def ink_box(ink: np.ndarray) -> Box:
    """Bounding box of the non-zero pixels of a mask (where text was burned)."""
    ys, xs = np.nonzero(ink)
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def changed_box(before: np.ndarray, after: np.ndarray, threshold: int = 60) -> Box:
    """Where `after` differs strongly from `before` (the stamp), ignoring lossy re-encoding noise."""
    height = min(before.shape[0], after.shape[0])
    changed = np.zeros(after.shape[:2], bool)
    changed[:height] = cv2.absdiff(before[:height], after[:height]) > threshold
    changed[height:] = True  # a band added below the image
    return ink_box(changed)


def read_stamp(before: np.ndarray, after: np.ndarray) -> str:
    """OCR of the label stamped onto `after` (light text on a dark box), scaled to Tesseract's liking."""
    label = crop(after, changed_box(before, after), 0)
    scale = max(1.0, 60 / label.shape[0])
    label = cv2.resize(label, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return ocr(255 - label, psm=6)
