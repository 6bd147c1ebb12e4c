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

import cv2
import numpy as np
import onnxruntime as ort

#: DB's binarisation threshold and the mean probability a region needs to count as text (PP-OCR's defaults).
_PIXEL_THRESHOLD = 0.3
_REGION_THRESHOLD = 0.5
#: DB shrinks each text polygon by this ratio in training; a region is grown back by area * ratio / perimeter.
_UNCLIP_RATIO = 1.6
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
    """One text line the detector found: its box in the input's coordinates (grown back to the line's extent)
    and its mean text probability."""

    x: int
    y: int
    width: int
    height: int
    score: float


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
        probability reaches the region threshold, grown back to the lines' extent."""
        mask = cv2.compare(probability, _PIXEL_THRESHOLD, cv2.CMP_GT)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        sums = np.bincount(labels.ravel(), weights=probability.ravel(), minlength=count)
        found: list[TextRegion] = []
        for label in range(1, count):
            x, y, width, height, area = (int(value) for value in stats[label])
            score = float(sums[label] / area)
            if score < _REGION_THRESHOLD or min(width, height) < 2:
                continue
            grow = int(np.ceil(width * height * _UNCLIP_RATIO / (2 * (width + height))))
            found.append(TextRegion(x - grow, y - grow, width + 2 * grow, height + 2 * grow, score))
        return found


class CtcTextRecognizer:
    """PP-OCRv4's recognizer: the text of one line image, with the mean confidence of its characters."""

    def __init__(self, path: Path) -> None:
        self._session = _session(path)
        self._input = self._session.get_inputs()[0].name
        # The character set is in the model's metadata; index 0 is CTC's blank and a space follows the set.
        characters = self._session.get_modelmeta().custom_metadata_map["character"].splitlines()
        self._characters = ["", *characters, " "]

    def read(self, line: np.ndarray) -> tuple[str, float]:
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
            return "", 0.0
        text = "".join(self._characters[index] for index in indices[keep] if index < len(self._characters))
        return text, float(confidences[keep].mean())
