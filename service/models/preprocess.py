"""A decoded image -> the tensor the model expects, as its spec says (crop, size, interpolation, colours, scale).

OpenCV, so in the workers (and the training notebook) only: the web process reads specs without it.
"""

from __future__ import annotations

import cv2
import numpy as np

from service.models.spec import ModelSpec

# Named after OpenCV's constants; `nearest_exact` uses half-pixel centres like PIL's NEAREST (what the default
# model was trained with: other interpolations move its risk by up to 0.4).
_INTERPOLATIONS = {
    "nearest_exact": cv2.INTER_NEAREST_EXACT,
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
}


def to_model_tensor(spec: ModelSpec, image8: np.ndarray) -> np.ndarray:
    """HxW gray or HxWx3 BGR uint8 image -> float32 tensor (height, width, channels) as the model expects."""
    size = (spec.input.width, spec.input.height)
    top, left, height, width = spec.input.crop_box(*image8.shape[:2])
    # A view, not a copy: OpenCV reads the rows of the crop in place.
    cropped = image8[top:top + height, left:left + width]
    # Every interpolation works per channel, so resizing gray and then expanding it equals expanding first.
    resized = cv2.resize(cropped, size, interpolation=_INTERPOLATIONS[spec.input.resize])
    gray = resized.ndim == 2
    if spec.input.color_mode == "rgb":
        resized = cv2.cvtColor(resized, cv2.COLOR_GRAY2RGB if gray else cv2.COLOR_BGR2RGB)
    elif spec.input.color_mode == "grayscale":
        resized = (resized if gray else cv2.cvtColor(resized, cv2.COLOR_BGR2GRAY))[:, :, np.newaxis]
    elif gray:
        resized = cv2.cvtColor(resized, cv2.COLOR_GRAY2BGR)
    multiplier, offset = spec.input.scale_coefficients
    tensor = resized.astype(np.float32)
    tensor *= np.float32(multiplier)
    tensor += np.float32(offset)
    return tensor
