"""Synthetic images of several modalities, and text burned into them the way consoles, scanners and film markers
put it there: deterministic (seeded) inputs for the text-detection tests.

Each generator takes a numpy Generator and a size and returns finished pixels: grey uint8, or uint16 holding 12 or
16 significant bits, or (PET) BGR uint8. The anatomy carries what makes a hand-written text finder fire: sharp rib,
clavicle and vertebra edges, pedicles in rows like letters, ECG leads and wires, folded gyri, hot spots, grain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from ocr_oracle import Box, View, block_views, crop, ink_box

from service.imaging.patient_text import burn_patient_text

#: The white of each bit depth a generator can produce (12 bits are stored in uint16, as CT and MR store them).
WHITE = {8: 255, 12: 4095, 16: 65535}


def _coords(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates as fractions (0..1) of the height and the width, broadcastable (h,1), (1,w)."""
    return (
        (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height,
        (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width,
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Noise (0..1, may overshoot a little) with about `cells` blobs along the short side, smoothly interpolated."""
    height, width = shape
    across = max(2, round(cells * max(height, width) / min(height, width)))
    grid_shape = (cells, across) if height <= width else (across, cells)
    grid = rng.random(grid_shape, dtype=np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _grain(rng: np.random.Generator, shape: tuple[int, int], sigma: float, amplitude: float) -> np.ndarray:
    """Gaussian noise blurred to clumps of about `sigma` pixels, with a standard deviation of about `amplitude`."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), sigma)
    return noise * (amplitude / max(float(noise.std()), 1e-6))


def _soft_ellipse(
    yy: np.ndarray, xx: np.ndarray, centre: tuple[float, float], radii: tuple[float, float], sharpness: float = 3
) -> np.ndarray:
    """1 inside an ellipse, falling smoothly to 0 outside (a super-Gaussian of order `sharpness`)."""
    (cx, cy), (rx, ry) = centre, radii
    distance = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    return np.exp(-(distance**sharpness)).astype(np.float32)


def _curve(
    layer: np.ndarray, points: list[tuple[float, float]], value: float, thickness: int, *, closed: bool = False
) -> None:
    """Draw a polyline through `points` (fractions of the width and height) into the float `layer`."""
    height, width = layer.shape[:2]
    pixels = np.array([[round(x * width), round(y * height)] for x, y in points], np.int32)
    cv2.polylines(layer, [pixels], closed, value, max(1, thickness), cv2.LINE_AA)


def _quantised(image: np.ndarray, bits: int) -> np.ndarray:
    white = WHITE[bits]
    return np.rint(np.clip(image, 0, 1) * white).astype(np.uint8 if bits == 8 else np.uint16)


def as_bgr(grey: np.ndarray) -> np.ndarray:
    """Grey content in a colour container, as many exports store it."""
    return np.ascontiguousarray(np.dstack([grey] * 3))


# --------------------------------------------------------------------------------------------------- modalities


def ct_scout(rng: np.random.Generator, height: int, width: int, bits: int = 8) -> np.ndarray:
    """A CT scout (AP topogram) of chest and abdomen: a bright torso and arms on black, darker lungs, ribs, a
    column of vertebrae with their pedicles, clavicles, pelvis, ECG electrodes and their wires, bowel gas, and
    the scout's noise and row streaks."""
    yy, xx = _coords(height, width)
    # Half-width of the torso along the body (fractions of the width): neck, shoulders, chest, waist, hips.
    levels, widths = [0, 0.07, 0.14, 0.22, 0.5, 0.66, 0.82, 1], [0.07, 0.08, 0.33, 0.35, 0.31, 0.28, 0.34, 0.33]
    half = np.interp(yy[:, 0], levels, widths).astype(np.float32)[:, None]
    dx = xx - 0.5
    image = 0.5 * np.sqrt(np.clip(1 - (dx / half) ** 2, 0, 1)) ** 0.7
    for side in (-1, 1):  # arms along the body, from the shoulders down
        arm_x = 0.5 + side * (half + 0.065)
        start = 1 / (1 + np.exp(-(yy - 0.16) / 0.012))
        image = image + 0.42 * start * np.sqrt(np.clip(1 - ((xx - arm_x) / 0.045) ** 2, 0, 1)) ** 0.7
    image = image + 0.06 * (_smooth_noise(rng, (height, width), 6) - 0.5) * (image > 0.05)

    # Lungs (with a diaphragm dome below each), the heart, the liver under the right one.
    lungs = np.zeros((height, width), np.float32)
    for cx in (0.33, 0.67):
        dome = 0.47 + 0.05 * ((xx - cx) / 0.12) ** 2
        lungs += _soft_ellipse(yy, xx, (cx, 0.32), (0.12, 0.2)) * (1 / (1 + np.exp(-(dome - yy) / 0.008)))
    image = image - 0.27 * lungs
    image = image + 0.14 * _soft_ellipse(yy, xx, (0.54, 0.42), (0.1, 0.08), 2)
    image = image + 0.06 * _soft_ellipse(yy, xx, (0.36, 0.55), (0.14, 0.07), 2)
    gas = np.clip((_smooth_noise(rng, (height, width), 22) - 0.72) * 6, 0, 1)
    image = image - 0.12 * gas * _soft_ellipse(yy, xx, (0.5, 0.68), (0.22, 0.1))

    bones = np.zeros((height, width), np.float32)
    thick = max(2, height // 110)
    for side in (-1, 1):
        for rib in range(11):  # posterior ribs: out from the spine, up a little, then down the side
            top = 0.14 + 0.033 * rib
            points = [(0.5 + side * (0.03 + 0.28 * t), top - 0.025 * np.sin(np.pi * t * 0.8) + 0.06 * t**2)
                      for t in np.linspace(0, 1, 24)]  # fmt: skip
            _curve(bones, points, 0.13, thick)
        _curve(bones, [(0.5 + side * (0.03 + 0.25 * t), 0.125 - 0.025 * t + 0.012 * np.sin(np.pi * t * 2))
                       for t in np.linspace(0, 1, 20)], 0.2, thick + 1)  # fmt: skip
        cv2.ellipse(bones, (round((0.5 + side * 0.11) * width), round(0.83 * height)),
                    (round(0.1 * width), round(0.07 * height)), 0, 180, 360, 0.16, thick + 1, cv2.LINE_AA)  # fmt: skip
        cv2.circle(bones, (round((0.5 + side * 0.17) * width), round(0.96 * height)), round(0.03 * width), 0.2, -1,
                   cv2.LINE_AA)  # fmt: skip
    vertebra_w, vertebra_h = max(4, round(0.028 * width)), max(4, round(0.012 * height))
    for top in np.arange(0.06, 0.86, 0.031):  # vertebral bodies, pedicles like pairs of "o", disc spaces between
        cy = round(top * height)
        cv2.rectangle(bones, (width // 2 - vertebra_w, cy - vertebra_h), (width // 2 + vertebra_w, cy + vertebra_h),
                      0.14, -1)  # fmt: skip
        for side in (-1, 1):
            cv2.ellipse(bones, (width // 2 + side * round(0.7 * vertebra_w), cy - vertebra_h // 3),
                        (max(1, vertebra_w // 4), max(1, vertebra_h // 2)), 0, 0, 360, 0.2, max(1, thick // 2),
                        cv2.LINE_AA)  # fmt: skip
    image = image + cv2.GaussianBlur(bones, (0, 0), 1.2)

    metal = np.zeros((height, width), np.float32)
    for _ in range(4):  # ECG electrodes and their wires
        x0, y0 = rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.55)
        cv2.circle(metal, (round(x0 * width), round(y0 * height)), max(3, width // 90), 0.6, max(1, thick // 2),
                   cv2.LINE_AA)  # fmt: skip
        steps = rng.normal(0, 0.012, (40, 2)).cumsum(axis=0) + np.linspace(0, 1, 40)[:, None] * [0.0, 0.3]
        _curve(metal, [(x0 + dx_, y0 + dy_) for dx_, dy_ in steps], 0.45, 1)
    image = np.maximum(image, metal)
    image = image + rng.normal(0, 0.022, (height, width)).astype(np.float32)
    image = image + rng.normal(0, 0.012, (height, 1)).astype(np.float32)  # row streaks
    return _quantised(cv2.GaussianBlur(image, (0, 0), 0.7) + 0.02, bits)


def pet(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A whole-body PET maximum-intensity projection in a hot colour map (BGR): a faint body outline on black,
    brain with a brighter cortex, myocardium, liver, kidneys, bladder, salivary glands, a few hot lesions, and the
    blotchy noise of counts."""
    yy, xx = _coords(height, width)
    # Body coordinates in units of the image height, so the body keeps its shape in any frame.
    bx = (xx - 0.5) * width / height
    by = yy
    body_half = np.interp(
        by[:, 0], [0, 0.03, 0.16, 0.19, 0.23, 0.6, 0.7, 1], [0, 0.06, 0.05, 0.03, 0.13, 0.12, 0.13, 0.1]
    ).astype(np.float32)[:, None]
    body = np.clip(1 - (bx / np.maximum(body_half, 1e-3)) ** 8, 0, 1) * (by > 0.012)
    legs_gap = (by > 0.72) & (np.abs(bx) < 0.012 + 0.03 * (by - 0.72))
    uptake = 0.1 * body * ~legs_gap * (0.7 + 0.6 * _smooth_noise(rng, (height, width), 10))

    brain = _soft_ellipse(by, bx, (0, 0.09), (0.05, 0.065), 4)
    cortex = brain - _soft_ellipse(by, bx, (0, 0.09), (0.038, 0.052), 4)
    gyri = _smooth_noise(rng, (height, width), 40)
    uptake += 0.45 * brain + 0.45 * np.clip(cortex, 0, 1) * (0.6 + 0.6 * gyri)
    uptake += 0.35 * _soft_ellipse(by, bx, (0, 0.155), (0.03, 0.018), 2)  # cerebellum
    for side in (-1, 1):
        uptake += 0.35 * _soft_ellipse(by, bx, (side * 0.03, 0.175), (0.012, 0.01), 2)  # salivary glands
        uptake += 0.55 * _soft_ellipse(by, bx, (side * 0.055, 0.47), (0.018, 0.032), 2)  # kidneys
    heart = _soft_ellipse(by, bx, (0.025, 0.33), (0.045, 0.04), 3)
    uptake += 0.75 * np.clip(heart - _soft_ellipse(by, bx, (0.027, 0.332), (0.026, 0.022), 3), 0, 1)
    uptake += 0.28 * _soft_ellipse(by, bx, (-0.05, 0.42), (0.07, 0.045), 2)  # liver
    uptake += 1.0 * _soft_ellipse(by, bx, (0, 0.66), (0.035, 0.025), 2)  # bladder
    uptake += 0.12 * _soft_ellipse(by, bx, (0, 0.45), (0.008, 0.22), 2)  # marrow of the spine
    for _ in range(6):  # lesions
        lx, ly = rng.uniform(-0.09, 0.09), rng.uniform(0.24, 0.62)
        uptake += rng.uniform(0.5, 0.9) * _soft_ellipse(by, bx, (lx, ly), (0.007, 0.007), 1)

    counts = rng.gamma(6.0, 1 / 6.0, (height, width)).astype(np.float32)
    uptake = cv2.GaussianBlur(uptake * counts, (0, 0), max(1.0, height / 400)) + 0.01 * rng.random(
        (height, width), dtype=np.float32
    )
    grey = np.rint(np.clip(uptake / 1.05, 0, 1) ** 0.8 * 255).astype(np.uint8)
    return cv2.applyColorMap(grey, cv2.COLORMAP_HOT)


def mr_slice(rng: np.random.Generator, height: int, width: int, bits: int = 8) -> np.ndarray:
    """An axial T2-weighted MR slice of the head at the ventricles: scalp, a dark skull with its marrow, a bright
    CSF rim, grey and white matter with folded bright sulci, the lateral ventricles and the falx, under Rician
    noise (also on the black background)."""
    yy, xx = _coords(height, width)
    side = min(height, width)
    hx, hy = (xx - 0.5) * width / side, (yy - 0.5) * height / side
    radius = np.sqrt((hx / 0.37) ** 2 + (hy / 0.45) ** 2)
    image = np.zeros((height, width), np.float32)
    image = np.where(radius < 1.0, 0.55, image)  # scalp fat
    image = np.where(radius < 0.95, 0.04, image)  # skull
    image = np.where(np.abs(radius - 0.915) < 0.008, 0.3, image)  # diploe
    image = np.where(radius < 0.885, 0.8, image)  # CSF rim
    brain_edge = 0.86 - 0.02 * _smooth_noise(rng, (height, width), 30)
    image = np.where(radius < brain_edge, 0.52, image)  # grey matter
    white_edge = 0.66 + 0.1 * (_smooth_noise(rng, (height, width), 14) - 0.5)
    image = np.where(radius < white_edge, 0.34, image)  # white matter
    folds = _smooth_noise(rng, (height, width), 26) * 5
    sulci = (np.abs(folds - np.round(folds)) < 0.06) & (radius > white_edge - 0.08) & (radius < brain_edge)
    image = np.where(sulci, 0.85, image)
    ventricles = np.zeros((height, width), np.float32)
    for sign in (-1, 1):
        cv2.ellipse(ventricles, (round(width / 2 + sign * 0.035 * side), round(height / 2 - 0.02 * side)),
                    (round(0.012 * side), round(0.08 * side)), sign * 12, 0, 360, 1.0, -1, cv2.LINE_AA)  # fmt: skip
        cv2.ellipse(ventricles, (round(width / 2 + sign * 0.05 * side), round(height / 2 + 0.075 * side)),
                    (round(0.007 * side), round(0.022 * side)), -sign * 35, 0, 360, 1.0, -1, cv2.LINE_AA)  # fmt: skip
    image = image * (1 - ventricles) + 0.9 * ventricles
    falx = (np.abs(hx) < 0.0025 + 0.002 * np.abs(hy)) & (radius < brain_edge) & (np.abs(hy) > 0.12)
    image = np.where(falx, 0.75, image)
    image = cv2.GaussianBlur(image, (0, 0), 0.9)
    sigma = 0.035
    real = image + rng.normal(0, sigma, image.shape).astype(np.float32)
    imaginary = rng.normal(0, sigma, image.shape).astype(np.float32)
    return _quantised(np.sqrt(real**2 + imaginary**2), bits)


def chest_grain(rng: np.random.Generator, height: int, width: int, bits: int = 8) -> np.ndarray:
    """A PA chest film, scanned: dark lungs with vessel markings and diaphragm domes, posterior and anterior
    ribs with bright cortices, clavicles, spine, heart shadow and mediastinum, shoulders, on a dark direct
    exposure, with uneven exposure and coarse film grain."""
    yy, xx = _coords(height, width)
    dx = xx - 0.5
    half = np.interp(yy[:, 0], [0, 0.05, 0.1, 0.3, 1], [0.09, 0.11, 0.42, 0.45, 0.43]).astype(np.float32)[:, None]
    image = 0.06 + 0.56 * np.sqrt(np.clip(1 - (dx / half) ** 2, 0, 1)) ** 0.5
    image = image + 0.08 * (_smooth_noise(rng, (height, width), 5) - 0.5)

    lungs = np.zeros((height, width), np.float32)
    for cx, rx in ((0.31, 0.15), (0.69, 0.14)):
        dome = 0.7 + 0.07 * ((xx - cx) / rx) ** 2
        lungs += _soft_ellipse(yy, xx, (cx, 0.44), (rx, 0.31)) * (1 / (1 + np.exp(-(dome - yy) / 0.006)))
    heart = _soft_ellipse(yy, xx, (0.56, 0.6), (0.15, 0.12), 2)
    image = image - 0.38 * lungs * (1 - 0.75 * heart) + 0.05 * heart
    image = image + 0.14 * _soft_ellipse(yy, xx, (0.5, 0.3), (0.05, 0.25), 3)  # mediastinum

    vessels = np.zeros((height, width), np.float32)
    for _ in range(60):  # vessel markings, branching out of each hilum
        side = rng.choice([-1, 1])
        angle = rng.uniform(-2.2, 2.2)
        steps = np.linspace(0, rng.uniform(0.08, 0.22), 12)
        wobble = rng.normal(0, 0.006, 12).cumsum()
        points = [(0.5 + side * (0.08 + s * abs(np.cos(angle))) + w, 0.46 + s * np.sin(angle) * 1.2)
                  for s, w in zip(steps, wobble, strict=True)]  # fmt: skip
        _curve(vessels, points, 0.07, max(1, height // 500))
    image = image + cv2.GaussianBlur(vessels, (0, 0), 1.0) * lungs

    bones = np.zeros((height, width), np.float32)
    cortex = np.zeros((height, width), np.float32)
    thick = max(3, round(height * 0.016))
    for side in (-1, 1):
        for rib in range(10):
            top = 0.17 + 0.055 * rib
            posterior = [(0.5 + side * (0.035 + 0.37 * t), top - 0.035 * np.sin(np.pi * t * 0.9) + 0.09 * t**2)
                         for t in np.linspace(0, 1, 30)]  # fmt: skip
            _curve(bones, posterior, 0.07, thick)
            for edge in (-1, 1):
                _curve(cortex, [(x, y + edge * thick / 2 / height) for x, y in posterior], 0.06, max(1, thick // 6))
            anterior = [(0.5 + side * (0.4 - 0.3 * t), top + 0.03 + 0.12 * t - 0.04 * t**2)
                        for t in np.linspace(0, 1, 20)]  # fmt: skip
            _curve(bones, anterior, 0.04, thick)
        clavicle = [(0.5 + side * (0.04 + 0.28 * t), 0.16 - 0.05 * t + 0.015 * np.sin(2 * np.pi * t))
                    for t in np.linspace(0, 1, 24)]  # fmt: skip
        _curve(bones, clavicle, 0.16, round(thick * 1.3))
        _curve(cortex, [(0.5 + side * (0.34 + 0.06 * t), 0.15 + 0.25 * t) for t in np.linspace(0, 1, 10)], 0.06,
               max(1, thick // 4))  # scapula edge  # fmt: skip
    for top in np.arange(0.04, 0.98, 0.042):  # vertebrae: bright bodies with end plates
        cy = round(top * height)
        cv2.rectangle(bones, (round(0.475 * width), cy), (round(0.525 * width), cy + round(0.03 * height)), 0.04, -1)
        cv2.rectangle(cortex, (round(0.475 * width), cy), (round(0.525 * width), cy + round(0.03 * height)), 0.04,
                      max(1, thick // 5))  # fmt: skip
    image = image + cv2.GaussianBlur(bones + cortex, (0, 0), 1.1)

    exposure = 1 - 0.25 * (((xx - 0.45) / 0.9) ** 2 + ((yy - 0.5) / 0.9) ** 2)
    image = image * exposure
    image = image + _grain(rng, (height, width), 1.4, 0.021) + _grain(rng, (height, width), 0.6, 0.008)
    return _quantised(image, bits)


# ------------------------------------------------------------------------------------------------------- text

PLACES = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
#: Ink as a fraction of white per BGR channel, and whether it is lighter or darker than what it is burned on.
INKS = {
    "white": ((1.0, 1.0, 1.0), "light"),
    "light-grey": ((0.72, 0.72, 0.72), "light"),
    "yellow": ((0.0, 1.0, 1.0), "light"),
    "cyan": ((1.0, 1.0, 0.0), "light"),
    "green": ((0.1, 0.85, 0.1), "light"),
    "black": ((0.0, 0.0, 0.0), "dark"),
    "dark-grey": ((0.28, 0.28, 0.28), "dark"),
}
MARKER_LETTERS = ("R", "L")


@dataclass(frozen=True)
class Burn:
    """One block of text burned into an image: lines of patient text, or a laterality marker."""

    lines: tuple[str, ...]
    #: One of PLACES (one capital height, or `margin` pixels, from the border), or the block's centre as
    #: fractions (x, y) of the width and height.
    where: str | tuple[float, float]
    ink: str = "white"
    font: str = "DejaVuSans"
    #: Capital height in pixels.
    size: int = 16
    #: Grey levels (of 255) added to whatever is under the text, instead of `ink`: faint text (negative: darker).
    contrast: int | None = None
    #: Quarter turns counter-clockwise: 1 reads bottom to top (as along a left edge), 3 top to bottom.
    turn: int = 0
    #: Distance from the border, for a place in PLACES (default: one capital height).
    margin: int | None = None

    @property
    def is_marker(self) -> bool:
        return len(self.lines) == 1 and self.lines[0] in MARKER_LETTERS

    @property
    def light(self) -> bool:
        """Whether the text is lighter than what it is burned on."""
        return self.contrast > 0 if self.contrast is not None else INKS[self.ink][1] == "light"

    @property
    def text_height(self) -> int:
        """Ink height of the tallest single line (capitals, ascenders and descenders), across the text's direction."""
        return max(_coverage((line,), self.font, self.size).shape[0] for line in self.lines)

    def coverage(self) -> np.ndarray:
        """Anti-aliased coverage (0..255) of the block as burned (turned), cropped to its ink."""
        return np.ascontiguousarray(np.rot90(_coverage(self.lines, self.font, self.size), self.turn))


def marker(letter: str, where: str | tuple[float, float], size: int = 44, ink: str = "white",
           font: str = "DejaVuSans-Bold", margin: int | None = None) -> Burn:  # fmt: skip
    """A film's laterality marker: one tall bold capital, R or L."""
    assert letter in MARKER_LETTERS, letter
    return Burn((letter,), where, ink, font, size, margin=margin)


@lru_cache(maxsize=256)
def _coverage(lines: tuple[str, ...], font: str, size: int) -> np.ndarray:
    longest = max(len(line) for line in lines)
    height, width = round(size * (3 + 1.7 * len(lines))), round(size * (1.4 * longest + 4))
    drawn = burn_patient_text(np.zeros((height, width), np.uint8), lines, position="top-left", font=font,
                              size_px=size)  # fmt: skip
    x, y, w, h = ink_box(drawn)
    assert x + w < width and y + h < height, "the text block was cut off"
    drawn = drawn[y : y + h, x : x + w]
    drawn.flags.writeable = False
    return drawn


def burn_in(pixels: np.ndarray, burn: Burn, white: int | None = None) -> Box:
    """Burn `burn` into `pixels` (grey, BGR or BGRA, uint8 or uint16, whose white is `white`: by default the
    dtype's maximum) in place; return the box (x, y, w, h) of its ink."""
    white = white or int(np.iinfo(pixels.dtype).max)
    coverage = burn.coverage()
    h, w = coverage.shape
    height, width = pixels.shape[:2]
    if isinstance(burn.where, tuple):
        x, y = round(burn.where[0] * width - w / 2), round(burn.where[1] * height - h / 2)
    else:
        margin = burn.size if burn.margin is None else burn.margin
        vertical, _, horizontal = burn.where.partition("-") if "-" in burn.where else (burn.where, "", burn.where)
        y = {"top": margin, "bottom": height - margin - h}.get(vertical, (height - h) // 2)
        x = {"left": margin, "right": width - margin - w}.get(horizontal, (width - w) // 2)
    assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, f"{burn.lines} does not fit"
    # Alpha (BGRA) is left as it is: the text is burned into the colour.
    region = pixels[y : y + h, x : x + w, :3] if pixels.ndim == 3 else pixels[y : y + h, x : x + w]
    colour = region.ndim == 3
    alpha = coverage.astype(np.float32) / 255
    if colour:
        alpha = alpha[:, :, None]
    base = region.astype(np.float32)
    if burn.contrast is not None:
        blended = base + alpha * burn.contrast * white / 255
    else:
        shade = INKS[burn.ink][0]
        assert colour or len(set(shade)) == 1, "coloured ink needs a colour image"
        ink = np.array(shade, np.float32) * white if colour else np.float32(shade[0] * white)
        blended = base * (1 - alpha) + ink * alpha
    region[...] = np.clip(np.rint(blended), 0, white).astype(pixels.dtype)
    return x, y, w, h


#: Each modality's generator, called as (rng, height, width, bits): PET is always 8-bit BGR.
GENERATORS: dict[str, Callable[[np.random.Generator, int, int, int], np.ndarray]] = {
    "ct-scout": ct_scout,
    "pet": lambda rng, height, width, _bits: pet(rng, height, width),
    "mr": mr_slice,
    "chest-grain": chest_grain,
}
#: Pixels farther than this many text heights from every burned ink box are away from the text: what redaction
#: must keep.
TEXT_MARGIN_IN_HEIGHTS = 0.6


def away_from_text(shape: tuple[int, ...], burns: Sequence[Burn], boxes: Sequence[Box]) -> np.ndarray:
    """Mask (of an image of `shape`) of the pixels away from the text of `burns`, burned at `boxes`."""
    away = np.ones(shape[:2], bool)
    for burn, (x, y, w, h) in zip(burns, boxes, strict=True):
        margin = int(np.ceil(TEXT_MARGIN_IN_HEIGHTS * burn.text_height))
        away[max(0, y - margin) : y + h + margin, max(0, x - margin) : x + w + margin] = False
    return away


def attacker_views(pixels: np.ndarray, box: Box, burn: Burn) -> list[View]:
    """What an attacker reads (ocr_oracle.block_views) around one burned block at `box`: its pixels tightly cropped
    and turned so its lines run left to right."""
    block = np.ascontiguousarray(np.rot90(crop(pixels, box, max(4, burn.size)), -burn.turn))
    return block_views(block, burn.size)
