"""Fake burned-in patient text, drawn the way modality consoles and scanners stamp it into the pixels.

It produces realistic inputs for the demo and for the anonymization tests; the pipeline itself never calls it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
#: Text intensity as a fraction of the dtype's white.
COLOR_LEVELS = {"white": 1.0, "gray": 0.6, "black": 0.0}
DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")

_HERSHEY = cv2.FONT_HERSHEY_SIMPLEX
#: Line pitch as a multiple of the capital height, as consoles space their annotation lines.
_LINE_PITCH = 1.7


def burn_patient_text(
    pixels: np.ndarray,
    lines: Sequence[str],
    *,
    position: str = "top-left",
    font: str = "hershey",
    size_px: int | None = None,
    color: str = "white",
) -> np.ndarray:
    """Return a copy of `pixels` with `lines` burned in at `position`.

    `font` is "hershey" (cv2.putText's built-in face) or a TrueType file: a path, or a DejaVu name such as
    "DejaVuSans-Bold". `size_px` is the height of a capital letter in pixels (default: 1/40 of the
    shorter side, at least 12). Works on gray, BGR and BGRA images of dtype uint8 or uint16.
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, not {position!r}")
    if color not in COLOR_LEVELS:
        raise ValueError(f"color must be one of {tuple(COLOR_LEVELS)}, not {color!r}")
    if not lines:
        return pixels.copy()
    height, width = pixels.shape[:2]
    cap_height = size_px or max(12, round(min(height, width) / 40))
    coverage = _render_coverage(tuple(lines), font, cap_height)

    margin = cap_height
    block_h, block_w = coverage.shape
    top = {"top": margin, "bottom": height - margin - block_h}.get(
        position.split("-")[0], (height - block_h) // 2
    )
    left = {"left": margin, "right": width - margin - block_w}.get(
        position.split("-")[-1], (width - block_w) // 2
    )
    # Clip the text block to the image: a long line on a small image is cut off, as a console would.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + block_h, height), min(left + block_w, width)
    alpha = coverage[y0 - top : y1 - top, x0 - left : x1 - left].astype(np.float32) / 255.0

    burned = pixels.copy()
    roi = burned[y0:y1, x0:x1]
    if roi.ndim == 3:
        alpha = alpha[:, :, None]
    white = np.iinfo(pixels.dtype).max
    ink = np.full(roi.shape, COLOR_LEVELS[color] * white, np.float32)
    if roi.ndim == 3 and roi.shape[2] == 4:
        ink[:, :, 3] = roi[:, :, 3]  # text changes colour, not transparency
    blended = roi * (1.0 - alpha) + ink * alpha
    roi[...] = np.clip(np.rint(blended), 0, white).astype(pixels.dtype)
    return burned


def _render_coverage(lines: tuple[str, ...], font: str, cap_height: int) -> np.ndarray:
    """Anti-aliased coverage (0..255) of the text block, cropped to the lines' extent."""
    if font == "hershey":
        return _render_hershey(lines, cap_height)
    return _render_truetype(lines, _font_path(font), cap_height)


def _render_hershey(lines: tuple[str, ...], cap_height: int) -> np.ndarray:
    scale = cap_height / _hershey_cap_height_at_unit_scale()
    thickness = max(1, round(cap_height / 11))
    pitch = round(cap_height * _LINE_PITCH)
    widths = [cv2.getTextSize(line, _HERSHEY, scale, thickness)[0][0] for line in lines]
    pad = thickness + 2
    canvas = np.zeros((pitch * (len(lines) - 1) + cap_height * 2 + 2 * pad, max(widths) + 2 * pad), np.uint8)
    for index, line in enumerate(lines):
        baseline = pad + cap_height + index * pitch
        cv2.putText(canvas, line, (pad, baseline), _HERSHEY, scale, 255, thickness, cv2.LINE_AA)
    return canvas


def _render_truetype(lines: tuple[str, ...], path: Path, cap_height: int) -> np.ndarray:
    face = _truetype_face(path, cap_height)
    pitch = round(cap_height * _LINE_PITCH)
    widths = [round(face.getlength(line)) for line in lines]
    pad = max(2, cap_height // 4)
    canvas = Image.new("L", (max(widths) + 2 * pad, pitch * (len(lines) - 1) + cap_height * 2 + 2 * pad))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((pad, pad + cap_height + index * pitch), line, fill=255, font=face, anchor="ls")
    return np.asarray(canvas)


@lru_cache(maxsize=1)
def _hershey_cap_height_at_unit_scale() -> float:
    # getTextSize reports the font's ascent, not the ink of a capital (OpenCV 5 draws these names with a
    # TrueType face), so measure the ink once.
    probe = np.zeros((200, 200), np.uint8)
    cv2.putText(probe, "H", (20, 150), _HERSHEY, 4.0, 255, 1, cv2.LINE_8)
    rows = np.flatnonzero(probe.any(axis=1))
    return (rows[-1] - rows[0] + 1) / 4.0


@lru_cache(maxsize=64)
def _truetype_face(path: Path, cap_height: int) -> ImageFont.FreeTypeFont:
    # Sizes in TrueType are em sizes; scale so a capital letter is `cap_height` pixels tall.
    probe = ImageFont.truetype(str(path), 100)
    _, top, _, bottom = probe.getbbox("H", anchor="ls")
    return ImageFont.truetype(str(path), max(1, round(cap_height * 100 / (bottom - top))))


def _font_path(font: str) -> Path:
    candidate = Path(font)
    if candidate.is_file():
        return candidate
    named = DEJAVU_DIR / (font if font.endswith(".ttf") else f"{font}.ttf")
    if named.is_file():
        return named
    raise ValueError(f"font must be 'hershey', a TrueType file or a DejaVu font name, not {font!r}")
