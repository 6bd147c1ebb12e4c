"""From stored DICOM values to what a viewer shows: the Modality LUT (rescale or LUT), the VOI LUT (the file's
window, its VOI LUT, or a robust default), and the presentation (MONOCHROME1 is inverted).

The whole chain is evaluated once per object over every value the pixel type can hold (at most 65536), giving a
lookup table; rendering a frame is then one table lookup, a few milliseconds for a 2-megapixel radiograph. The
same table gives the inverse the stamp needs: stored values that display as white and as black.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from service.imaging.codec import to_8bit

#: Share of the darkest and brightest stored values left outside the default window (when the file has none):
#: burned-in text and collimator edges saturate instead of squeezing the anatomy into a few grey levels.
_DEFAULT_WINDOW_PERCENTILES = (0.5, 99.5)
#: The default window is estimated on every n-th row and column: a 2-megapixel frame is 64x fewer values.
_DEFAULT_WINDOW_STRIDE = 8


@dataclass(frozen=True)
class DisplayCurve:
    """Stored value -> 8-bit display value, for one monochrome object."""

    #: uint8 table indexed by the stored value's unsigned bit pattern (so signed values index it too).
    table: np.ndarray
    #: Stored values (within BitsStored) that display as white and as black: what burned-in stamps are drawn with.
    white: int
    black: int

    def apply(self, frame: np.ndarray) -> np.ndarray:
        if frame.dtype == np.uint8:
            return cv2.LUT(frame, self.table)
        return np.take(self.table, frame.view(np.uint16))


def display_curve(dataset: Dataset, frames: np.ndarray) -> DisplayCurve:
    """The display curve of a monochrome object whose stored values are `frames` (uint8, uint16 or int16)."""
    dtype = frames.dtype
    every_pattern = np.arange(1 << (8 * dtype.itemsize), dtype=np.uint8 if dtype.itemsize == 1 else np.uint16)
    stored = every_pattern.view(dtype) if dtype.kind == "i" else every_pattern
    modality = _modality_values(dataset, stored)
    shown = _voi(dataset, modality, frames, stored)
    if str(dataset.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        shown = 1.0 - shown
    table = np.clip(np.rint(shown * 255.0), 0, 255).astype(np.uint8)
    low, high = _stored_range(dataset, dtype)
    valid = (stored >= low) & (stored <= high)
    white, black = _extremes(stored[valid], table[valid])
    return DisplayCurve(table=table, white=white, black=black)


def to_display(frame: np.ndarray, curve: DisplayCurve | None) -> np.ndarray:
    """One frame's display pixels: HxW uint8 (monochrome, through `curve`) or HxWx3 uint8 BGR (colour)."""
    if curve is not None:
        return curve.apply(frame)
    return cv2.cvtColor(to_8bit(np.ascontiguousarray(frame)), cv2.COLOR_RGB2BGR)


def _modality_values(dataset: Dataset, stored: np.ndarray) -> np.ndarray:
    if "ModalityLUTSequence" in dataset:
        try:
            return np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)
        except Exception:
            pass  # a malformed LUT: fall back to the rescale (or identity), which every viewer also understands
    slope = first_number(dataset.get("RescaleSlope"), default=1.0) or 1.0
    intercept = first_number(dataset.get("RescaleIntercept"), default=0.0)
    return stored.astype(np.float64) * slope + intercept


def _voi(dataset: Dataset, modality: np.ndarray, frames: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Display values in [0, 1] for each modality value."""
    if "VOILUTSequence" in dataset:
        try:
            looked_up = np.asarray(apply_voi_lut(modality, dataset, index=0, prefer_lut=True), dtype=np.float64)
            span = float(looked_up.max() - looked_up.min())
            if span > 0:
                return (looked_up - looked_up.min()) / span
        except Exception:
            pass  # a malformed VOI LUT: use the window, or the default
    center = first_number(dataset.get("WindowCenter"), default=None)
    width = first_number(dataset.get("WindowWidth"), default=None)
    if center is None or width is None or width < 1:
        center, width = _default_window(frames, stored, modality)
    function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (modality - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((modality - (center - width / 2)) / width, 0.0, 1.0)
    # PS3.3 C.11.2.1.2.1, the default LINEAR function.
    return np.clip((modality - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5, 0.0, 1.0)


def _default_window(frames: np.ndarray, stored: np.ndarray, modality: np.ndarray) -> tuple[float, float]:
    """A window over the bulk of the first frame's values, for files that carry none."""
    sample = frames[0, ::_DEFAULT_WINDOW_STRIDE, ::_DEFAULT_WINDOW_STRIDE]
    # Modality values of the sample through the same table as the frames (the bit pattern indexes `modality`).
    values = modality[sample.view(np.uint16) if sample.dtype.itemsize == 2 else sample]
    low, high = np.percentile(values, _DEFAULT_WINDOW_PERCENTILES)
    if high <= low:
        low, high = float(modality.min()), float(modality.max())
    width = max(float(high - low), 1.0)
    return float(low + high) / 2.0, width


def _stored_range(dataset: Dataset, dtype: np.dtype) -> tuple[int, int]:
    bits_stored = int(first_number(dataset.get("BitsStored"), default=dtype.itemsize * 8) or dtype.itemsize * 8)
    bits_stored = min(max(bits_stored, 1), dtype.itemsize * 8)
    if dtype.kind == "i":
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def _extremes(values: np.ndarray, shown: np.ndarray) -> tuple[int, int]:
    """Stored values displayed brightest and darkest, each taken at the far end of its plateau (the value
    consoles burn annotations with: the maximum stored value, or the minimum for MONOCHROME1)."""
    whites = values[shown == shown.max()]
    blacks = values[shown == shown.min()]
    increasing = int(whites.max()) >= int(blacks.max())
    white = int(whites.max()) if increasing else int(whites.min())
    black = int(blacks.min()) if increasing else int(blacks.max())
    return white, black


def first_number(value: object, *, default: float | None) -> float | None:
    """The first value of a numeric (possibly multi-valued) element; `default` when absent or malformed."""
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    return number if np.isfinite(number) else default
