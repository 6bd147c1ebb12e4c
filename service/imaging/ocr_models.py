"""The two learned text models, run with ONNX Runtime on one thread: PP-OCRv4's DB detector (where is text?) and
its CTC recognizer (what does a short line say?). Both come from the `rapidocr-onnxruntime` wheel
(service.models.fetch); only their input and output conventions live here, the cascade is service.imaging.detection.

Why these: PP-OCR is maintained, Apache-2.0, small (4.7 and 10.9 MB) and trained on scene and document text of
every size, colour and orientation, which is what burned-in annotations are. The DB detector outputs a per-pixel
text probability; its connected regions are text lines shrunk by a fixed ratio, grown back by `unclip_distance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import onnxruntime as ort

from service.imaging.text import Box

#: DB's binarisation threshold and the mean probability a region needs to count as text (PP-OCR's defaults).
_PIXEL_THRESHOLD = 0.3
_REGION_THRESHOLD = 0.5
#: DB shrinks each text polygon by this ratio in training; a region is grown back by area * ratio / perimeter.
_UNCLIP_RATIO = 1.6
#: A line-shaped region (at least _MIN_BAND_LENGTH times longer than its mean thickness) whose box is thicker than
#: _BAND_RATIO times that thickness (plus _BAND_SLACK_PX) is no straight band: the detector spread its text onto
#: something beside it (a brain's ventricle beside a vertical date), or the line bends or slants. Its box still
#: stands for the line, but the pixels to redact are pieces along it, each as thick as the region is there: the box
#: of a date bulging onto a ventricle at one end was four times the date's width, all of its length
#: (bench/privacy.py's seed 5042 kept 0.93 of its anatomy). A squat region has no length to follow: its box it is
#: (cut in pieces, a small blob over a 12 px name covered less of it, which was then read: seed 7010).
_MIN_BAND_LENGTH = 4
_BAND_RATIO = 1.5
_BAND_SLACK_PX = 2
#: Pieces are cut this many of the region's median thicknesses long, and neighbours joined again where their union
#: wastes at most _PIECE_WASTE of itself.
_PIECE_LENGTH = 1.0
_PIECE_WASTE = 0.2
#: The recognizer reads lines resized to this height. It was trained at 48, but at 32 it reads the markers and
#: short words it is asked about as surely (the 16 demo films' `R` at 0.85 to 0.97, some better than at 48) for
#: half the CPU (1.8 ms a letter, not 3.4, before the folding of service.models.onnx_folding; 1.3 ms after).
_LINE_HEIGHT = 32


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread: the worker's model already has the cores; detection runs beside it in the finisher thread.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No memory pattern: a pattern is planned and kept for each input shape, and every mosaic and line has a shape
    # of its own, so patterns are never reused, only kept (about 20 MB more per worker after a few dozen X-rays,
    # at the same CPU per image).
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _normalised(image: np.ndarray) -> np.ndarray:
    """uint8 BGR HxWx3 -> 1x3xHxW float32 in -1..1, as both models were trained."""
    return (image.astype(np.float32).transpose(2, 0, 1)[None] - 127.5) / 127.5


@dataclass(frozen=True)
class TextRegion:
    """One text line the detector found: its box in the input's coordinates (grown back to the line's extent),
    its mean text probability, and the pieces that cover it (grown back too): its box alone, unless the region is
    no straight band (see _BAND_RATIO)."""

    x: int
    y: int
    width: int
    height: int
    score: float
    pieces: tuple[Box, ...]

    @property
    def box(self) -> Box:
        return self.x, self.y, self.width, self.height


class DbTextDetector:
    """PP-OCRv4 DB: text line regions of a BGR uint8 image whose sides are multiples of 32."""

    def __init__(self, path: Path) -> None:
        self._session = _session(path)
        self._input = self._session.get_inputs()[0].name

    def probability(self, image: np.ndarray) -> np.ndarray:
        """Per-pixel text probability (HxW float32) of `image` (HxWx3 uint8, sides multiples of 32)."""
        return self._session.run(None, {self._input: _normalised(image)})[0][0, 0]

    @staticmethod
    def regions(probability: np.ndarray) -> list[TextRegion]:
        """The text regions of a probability map: its connected regions above the pixel threshold whose mean
        probability reaches the region threshold, grown back to the lines' extent (as boxes, and as pieces along
        those that are no straight band: see _BAND_RATIO)."""
        mask = cv2.compare(probability, _PIXEL_THRESHOLD, cv2.CMP_GT)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        sums = np.bincount(labels.ravel(), weights=probability.ravel(), minlength=count)
        found: list[TextRegion] = []
        for label in range(1, count):
            x, y, width, height, area = (int(value) for value in stats[label])
            score = float(sums[label] / area)
            if score < _REGION_THRESHOLD or min(width, height) < 2:
                continue
            grow = _unclip_growth(width, height)
            box = (x - grow, y - grow, width + 2 * grow, height + 2 * grow)
            pieces: tuple[Box, ...] = (box,)
            length, thickness = max(width, height), area / max(width, height)
            if length >= _MIN_BAND_LENGTH * thickness and min(width, height) > _BAND_RATIO * thickness + _BAND_SLACK_PX:
                pieces = _pieces(labels[y : y + height, x : x + width] == label, x, y, grow)
            found.append(TextRegion(*box, score, pieces))
        return found


def _unclip_growth(length: float, thickness: float) -> int:
    """How far to grow a region this long and thick on every side to undo DB's shrinking (see _UNCLIP_RATIO)."""
    return int(np.ceil(length * thickness * _UNCLIP_RATIO / (2 * (length + thickness))))


def _pieces(region: np.ndarray, left: int, top: int, end_grow: int) -> tuple[Box, ...]:
    """Boxes along `region` (a boolean mask: the region's pixels in its box, whose corner is at `left`, `top`), each
    as thick as the region is there, grown back as a band of the region's length and median thickness would be;
    at its two ends grown as far as its box is (`end_grow`), so they reach as far along as the box does: text the
    detector saw faintly at a line's end is covered no less than by the box."""
    turned = region.shape[0] > region.shape[1]
    band = region.T if turned else region  # lengthwise along the rows
    rows, length = band.shape
    filled = band.any(axis=0)
    tops = np.argmax(band, axis=0)
    bottoms = rows - np.argmax(band[::-1], axis=0)
    thickness = float(np.median((bottoms - tops)[filled]))
    step = max(2, round(_PIECE_LENGTH * thickness))
    grow = _unclip_growth(length, thickness)
    # [start, top, end, bottom] along the band, and the area of the columns' own extents joined in each.
    pieces: list[list[int]] = []
    joined: list[int] = []
    for start in range(0, length, step):
        columns = filled[start : start + step]
        if not columns.any():
            continue
        piece = [start, int(tops[start : start + step][columns].min()), min(length, start + step),
                 int(bottoms[start : start + step][columns].max())]
        area = (piece[2] - piece[0]) * (piece[3] - piece[1])
        if pieces and pieces[-1][2] == piece[0]:
            last = pieces[-1]
            union = [last[0], min(last[1], piece[1]), piece[2], max(last[3], piece[3])]
            if (union[2] - union[0]) * (union[3] - union[1]) <= (1 + _PIECE_WASTE) * (joined[-1] + area):
                pieces[-1], joined[-1] = union, joined[-1] + area
                continue
        pieces.append(piece)
        joined.append(area)
    # The box's growth is at least the band's (its box is at least as thick as the band's median).
    pieces[0][0] -= end_grow - grow
    pieces[-1][2] += end_grow - grow
    boxes = []
    for start, low, end, high in pieces:
        x, y, width, height = (low, start, high - low, end - start) if turned else (start, low, end - start, high - low)
        boxes.append((left + x - grow, top + y - grow, width + 2 * grow, height + 2 * grow))
    return tuple(boxes)


class Reading(NamedTuple):
    """What the recognizer read in a line: the text, the mean confidence of its characters, and where along the line
    they lie: from the start of the first character's step to the end of the last's, as fractions of the line's
    width (each step is 8 columns of the line resized to 32 px tall: a quarter of its height)."""

    text: str
    confidence: float
    start: float = 0.0
    end: float = 0.0


class CtcTextRecognizer:
    """PP-OCRv4's recognizer: the text of one line image, with the mean confidence of its characters."""

    def __init__(self, path: Path) -> None:
        self._session = _session(path)
        self._input = self._session.get_inputs()[0].name
        # The character set is in the model's metadata; index 0 is CTC's blank and a space follows the set.
        characters = self._session.get_modelmeta().custom_metadata_map["character"].splitlines()
        self._characters = ["", *characters, " "]

    def read(self, line: np.ndarray) -> Reading:
        """The text of `line` (HxWx3 uint8 BGR, one line of text, a little margin around it)."""
        height, width = line.shape[:2]
        resized_width = max(_LINE_HEIGHT // 2, int(np.ceil(_LINE_HEIGHT * width / max(1, height))))
        resized = cv2.resize(line, (resized_width, _LINE_HEIGHT), interpolation=cv2.INTER_LINEAR)
        output = self._session.run(None, {self._input: _normalised(resized)})[0][0]
        indices, confidences = output.argmax(axis=1), output.max(axis=1)
        keep = np.ones(len(indices), bool)
        keep[1:] = indices[1:] != indices[:-1]  # CTC: a repeated index is one character...
        keep &= indices != 0  # ...and the blank separates characters
        if not keep.any():
            return Reading("", 0.0)
        text = "".join(self._characters[index] for index in indices[keep] if index < len(self._characters))
        steps = np.flatnonzero(indices != 0)  # a character's steps, its repeats included
        start, end = float(steps[0] / len(indices)), float((steps[-1] + 1) / len(indices))
        return Reading(text, float(confidences[keep].mean()), start, end)
