"""Tests of `service.imaging`: hostile bytes, 8-bit conversion, the label stamp, anonymization attacked with
OCR, and encoding.

Tesseract (the oracle in `ocr_oracle`) is the reader throughout: it must read the stamp, read the burned-in
patient text on the input (proving the oracle works) and read none of it after anonymization, however the
output is sharpened.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import VALIDATION_IMAGES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ocr_oracle import (
    View,
    attack_views,
    changed_box,
    crop,
    ink_box,
    patient_tokens,
    read_stamp,
    sharpened,
    tokens_read,
)
from PIL import Image, ImageOps

from service.errors import UnprocessableObject
from service.imaging.codec import decode_image, encode_changed_rows, encode_image, to_model_input
from service.imaging.patient_text import burn_patient_text
from service.imaging.redact import blur_text_regions
from service.imaging.stamp import stamp_label
from service.imaging.text import Box, propose_text

LIMITS = {"max_bytes": 50_000_000, "max_pixels": 40_000_000}


def _decode(data: bytes, **limits: int):
    return decode_image(data, **{**LIMITS, **limits})


def _rejection(data: bytes, **limits: int) -> str:
    with pytest.raises(UnprocessableObject) as caught:
        _decode(data, **limits)
    assert caught.value.status_code == 422
    return caught.value.reason


def _cv2_bytes(pixels: np.ndarray, extension: str) -> bytes:
    ok, encoded = cv2.imencode(extension, pixels)
    assert ok
    return encoded.tobytes()


def _pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _gradient(height: int, width: int, channels: int = 0, dtype: type = np.uint8) -> np.ndarray:
    """Distinct values everywhere, so any flip, rotation or channel swap shows."""
    top = np.iinfo(dtype).max
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx * 7 + yy * 3) % (top + 1)
    if not channels:
        return base.astype(dtype)
    return np.dstack([(base + 50 * c) % (top + 1) for c in range(channels)]).astype(dtype)


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((40, 60), np.uint8),
        ((40, 60, 3), np.uint8),
        ((40, 60, 4), np.uint8),
        ((40, 60), np.uint16),
        ((40, 60, 3), np.uint16),
        ((40, 60, 4), np.uint16),
    ],
    ids=["gray8", "bgr8", "bgra8", "gray16", "bgr16", "bgra16"],
)
def test_png_decodes_losslessly_with_depth_and_alpha(shape: tuple[int, ...], dtype: type) -> None:
    pixels = _gradient(shape[0], shape[1], shape[2] if len(shape) == 3 else 0, dtype)
    decoded = _decode(_cv2_bytes(pixels, ".png"))
    assert decoded.format == "png"
    assert decoded.pixels.dtype == dtype
    np.testing.assert_array_equal(decoded.pixels, pixels)


@pytest.mark.parametrize("channels", [0, 3])
def test_16_bit_tiff_keeps_its_depth(channels: int) -> None:
    pixels = _gradient(30, 50, channels, np.uint16)
    decoded = _decode(_cv2_bytes(pixels, ".tiff"))
    assert decoded.format == "tiff"
    np.testing.assert_array_equal(decoded.pixels, pixels)


@pytest.mark.parametrize(("extension", "fmt"), [(".bmp", "bmp"), (".webp", "webp"), (".jpg", "jpeg")])
def test_other_formats_are_named_canonically(extension: str, fmt: str) -> None:
    decoded = _decode(_cv2_bytes(_gradient(30, 50, 3), extension))
    assert decoded.format == fmt
    assert decoded.pixels.shape == (30, 50, 3)


def test_cmyk_jpeg_decodes_to_bgr() -> None:
    red = Image.new("RGB", (32, 24), (220, 20, 20)).convert("CMYK")
    decoded = _decode(_pil_bytes(red, "JPEG", quality=95))
    assert decoded.pixels.shape == (24, 32, 3)
    blue, green, red_channel = decoded.pixels[12, 16].astype(int)
    assert red_channel > 180 and green < 70 and blue < 70


def test_progressive_jpeg_decodes() -> None:
    pixels = _gradient(64, 96)
    decoded = _decode(_pil_bytes(Image.fromarray(pixels), "JPEG", quality=95, progressive=True))
    assert decoded.format == "jpeg"
    assert np.abs(decoded.pixels.astype(int) - pixels).mean() < 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    stored = np.full((40, 70, 3), 30, np.uint8)
    stored[2:12, 2:22] = (0, 0, 250)  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _pil_bytes(Image.fromarray(stored[:, :, ::-1]), "JPEG", quality=95, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))[:, :, ::-1]
    decoded = _decode(data)
    assert decoded.pixels.shape == expected.shape
    assert np.abs(decoded.pixels.astype(int) - expected).max() < 40
    if orientation in (5, 6, 7, 8):
        assert decoded.pixels.shape[:2] == (70, 40)


@pytest.mark.parametrize(
    ("fmt", "options"), [("TIFF", {"tiffinfo": {0x0112: 6}}), ("WEBP", {"lossless": True})]
)
def test_orientation_of_tiff_and_webp_is_applied_once(fmt: str, options: dict) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = _gradient(20, 30, 3)
    data = _pil_bytes(Image.fromarray(stored[:, :, ::-1]), fmt, exif=exif, **options)
    np.testing.assert_array_equal(_decode(data).pixels, cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE))


def test_exif_orientation_of_png_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _pil_bytes(Image.fromarray(_gradient(20, 30)), "PNG", exif=exif)
    upright = cv2.rotate(_gradient(20, 30), cv2.ROTATE_90_CLOCKWISE)
    np.testing.assert_array_equal(_decode(data).pixels, upright)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not-an-image"),
        (b"patient: Anna Mcgehee, DOB 1941-11-26\n" * 20, "not-an-image"),
        (b"\x89PNG\r\n\x1a\n", "not-an-image"),
        (b"GIF89a" + bytes(40), "not-an-image"),
    ],
    ids=["empty", "text", "png-signature-only", "gif-signature-only"],
)
def test_non_images_are_refused(data: bytes, reason: str) -> None:
    assert _rejection(data) == reason


def test_truncated_jpeg_is_corrupt() -> None:
    data = _cv2_bytes(_gradient(200, 300, 3), ".jpg")
    assert _rejection(data[: len(data) // 2]) == "corrupt-image"


def test_truncated_png_is_corrupt() -> None:
    data = _cv2_bytes(_gradient(200, 300, 3), ".png")
    assert _rejection(data[: len(data) * 2 // 3]) == "corrupt-image"


def test_gif_is_an_unsupported_format() -> None:
    assert _rejection(_pil_bytes(Image.fromarray(_gradient(20, 30)), "GIF")) == "unsupported-format"


def test_animated_png_and_multi_page_tiff_are_refused() -> None:
    frames = [Image.fromarray(_gradient(20, 30) + shift) for shift in (0, 80)]
    apng = _pil_bytes(frames[0], "PNG", save_all=True, append_images=frames[1:])
    tiff = _pil_bytes(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    assert _rejection(apng) == "animated-image"
    assert _rejection(tiff) == "animated-image"


def test_byte_limit_is_checked_before_anything_is_parsed() -> None:
    assert _rejection(b"\x89PNG" + bytes(2000), max_bytes=1000) == "too-large"
    assert _rejection(_cv2_bytes(_gradient(100, 100), ".png"), max_bytes=100) == "too-large"


def test_pixel_limit() -> None:
    data = _cv2_bytes(_gradient(100, 100), ".png")
    assert _rejection(data, max_pixels=9_999) == "too-many-pixels"
    assert _decode(data, max_pixels=10_000).pixels.shape == (100, 100)


def _png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes declaring a huge 8-bit gray image (the pixel data is a small zlib stream)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(4096)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "side", [30_000, 10_000, 100_000], ids=["bomb", "over-pillow-warning", "over-pillow-error"]
)
def test_png_bomb_is_refused_fast_without_allocating(side: int) -> None:
    data = _png_bomb(side, side)
    assert len(data) < 1_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        reason = _rejection(data)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason == "too-many-pixels"
    assert elapsed < 0.5
    assert peak < 2_000_000  # a decoded 30000x30000 image would be 900 MB


# --------------------------------------------------------------------------------------- to_model_input


def test_to_model_input_keeps_gray_and_bgr_and_drops_alpha() -> None:
    gray = _gradient(10, 20)
    assert to_model_input(gray) is gray  # no copy when there is nothing to convert
    bgra = _gradient(10, 20, 4)
    np.testing.assert_array_equal(to_model_input(bgra), bgra[:, :, :3])
    bgr = _gradient(10, 20, 3)
    assert to_model_input(bgr) is bgr


def test_to_model_input_scales_12_bit_data_in_a_16_bit_container_by_its_real_depth() -> None:
    twelve_bit = (_gradient(64, 64).astype(np.uint16) * 16 + 15).clip(0, 4095)
    converted = to_model_input(twelve_bit)
    assert converted.shape == (64, 64) and converted.dtype == np.uint8
    assert converted.max() == 255  # not black, not dimmed 16x
    np.testing.assert_allclose(converted, twelve_bit / 16, atol=1)


def test_to_model_input_scales_full_16_bit_data_and_ignores_alpha_for_the_depth() -> None:
    full = np.full((8, 8), 65535, np.uint16)
    assert to_model_input(full).max() == 255
    bgra = np.zeros((8, 8, 4), np.uint16)
    bgra[:, :, :3] = 1000  # 10-bit colour
    bgra[:, :, 3] = 65535  # opaque alpha must not decide the scale
    assert to_model_input(bgra)[0, 0, 0] == round(1000 / 4)


# --------------------------------------------------------------------------------------------- OCR tools


def _gray8(pixels: np.ndarray) -> np.ndarray:
    """What a reader sees: 8-bit gray, 16-bit data scaled by its real depth."""
    converted = to_model_input(pixels)
    return converted if converted.ndim == 2 else cv2.cvtColor(converted, cv2.COLOR_BGR2GRAY)


def _same_scale_gray8(pixels: np.ndarray) -> np.ndarray:
    """8-bit gray at a fixed scale (16 bits / 257), so an image before and after an edit compare pixelwise."""
    eight_bit = pixels if pixels.dtype == np.uint8 else (pixels // 257).astype(np.uint8)
    if eight_bit.ndim == 2:
        return eight_bit
    return cv2.cvtColor(eight_bit, cv2.COLOR_BGRA2GRAY if eight_bit.shape[2] == 4 else cv2.COLOR_BGR2GRAY)


def _stacked(views: Iterable[np.ndarray]) -> np.ndarray:
    """One page holding every view, each contrast-stretched on its own, so one OCR run reads them all."""
    views = [cv2.normalize(view, None, 0, 255, cv2.NORM_MINMAX) for view in views]
    width = max(view.shape[1] for view in views) + 24
    return np.vstack(
        [
            cv2.copyMakeBorder(view, 12, 12, 12, width - 12 - view.shape[1], cv2.BORDER_REPLICATE)
            for view in views
        ]
    )


# --------------------------------------------------------------------------------------------- stamping

STAMP = "Pneumonia, risk=97.3%"


def _stamp_read(pixels: np.ndarray, stamped: np.ndarray) -> str:
    return read_stamp(_same_scale_gray8(pixels), _same_scale_gray8(stamped))


def _stamp_box(pixels: np.ndarray, stamped: np.ndarray) -> Box:
    return changed_box(_same_scale_gray8(pixels), _same_scale_gray8(stamped))


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((150, 150), np.uint8), ((4000, 4000), np.uint8), ((600, 800, 3), np.uint16), ((300, 500, 4), np.uint8)],
    ids=["150px-gray", "4000px-gray", "bgr16", "bgra"],
)
def test_stamp_is_legible_at_any_size(shape: tuple[int, ...], dtype: type) -> None:
    pixels = np.full(shape, np.iinfo(dtype).max // 2, dtype)
    before = pixels.copy()
    stamped = stamp_label(pixels, STAMP, avoid=[])
    np.testing.assert_array_equal(pixels, before)  # the input is never modified
    assert stamped.shape == pixels.shape and stamped.dtype == pixels.dtype
    read = _stamp_read(pixels, stamped)
    assert "PNEUMONIA" in read and "973" in read, read
    _, _, w, h = _stamp_box(pixels, stamped)
    assert h >= 10 and w * h < 0.25 * shape[0] * shape[1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(40, 700),
    width=st.integers(40, 700),
    boxes=st.lists(
        st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.8), st.floats(0, 0.8)), max_size=8
    ),
)
def test_stamp_never_overlaps_avoided_boxes(height: int, width: int, boxes: list[tuple[float, ...]]) -> None:
    pixels = np.full((height, width), 128, np.uint8)
    avoid = [
        (int(x * (width - 1)), int(y * (height - 1)), int(w * width) + 1, int(h * height) + 1)
        for x, y, w, h in boxes
    ]
    stamped = stamp_label(pixels, STAMP, avoid=avoid)
    assert stamped.shape[1] == width and stamped.shape[0] >= height
    for x, y, w, h in avoid:
        np.testing.assert_array_equal(stamped[:height][y : y + h, x : x + w], pixels[y : y + h, x : x + w])
    assert (stamped[:height] != pixels).any() or stamped.shape[0] > height  # the label is somewhere


def test_stamp_moves_away_from_avoided_corners() -> None:
    pixels = np.full((400, 600, 3), 90, np.uint8)
    bottom_left = (0, 300, 200, 100)
    stamped = stamp_label(pixels, STAMP, avoid=[bottom_left])
    assert stamped.shape == pixels.shape
    x, y, _, h = _stamp_box(pixels, stamped)
    assert x >= 200 or y + h <= 300


def test_stamp_goes_to_a_bottom_band_when_everything_is_covered() -> None:
    pixels = np.full((300, 400), 77, np.uint8)
    stamped = stamp_label(pixels, STAMP, avoid=[(0, 0, 400, 300)])
    assert stamped.shape[0] > 300 and stamped.shape[1] == 400
    np.testing.assert_array_equal(stamped[:300], pixels)  # existing coordinates keep their pixels
    assert "PNEUMONIA" in _stamp_read(pixels, stamped)


def test_where_avoided_boxes_cover_every_place_the_first_place_found_free_is_taken() -> None:
    """`free` looks closer only where `avoid` leaves no place (the worker's proposals hold anatomy as well as text),
    place by place in the usual order; where it accepts none, the band is added as before."""
    pixels = np.full((300, 400), 77, np.uint8)
    asked: list[Box] = []

    def right_half_free(place: Box) -> bool:
        asked.append(place)
        return place[0] >= 200

    stamped = stamp_label(pixels, STAMP, avoid=[(0, 0, 400, 300)], free=right_half_free)
    assert stamped.shape == pixels.shape
    x, _, _, _ = _stamp_box(pixels, stamped)
    assert x >= 200 and asked[-1][0] == x
    assert all(place[0] < 200 for place in asked[:-1])  # the places before it, in order, were refused
    asked.clear()
    assert stamp_label(pixels, STAMP, avoid=[(0, 0, 50, 50)], free=right_half_free).shape == pixels.shape
    assert asked == []  # a place free of `avoid` needs no closer look
    assert stamp_label(pixels, STAMP, avoid=[(0, 0, 400, 300)], free=lambda place: False).shape[0] > 300


def test_band_of_a_bgra_image_is_opaque() -> None:
    pixels = np.zeros((100, 300, 4), np.uint16)
    stamped = stamp_label(pixels, STAMP, avoid=[(0, 0, 300, 100)])
    assert (stamped[100:, :, 3] == 65535).all()


# --------------------------------------------------------------------------------------------- anonymization


def _synthetic_xray(seed: int, height: int, width: int) -> np.ndarray:
    """An X-ray-like background: smooth gradients, bright soft ellipses ("lungs"), rib arcs and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = 35 + 70 * xx / width + 35 * yy / height
    for centre_x in (0.33, 0.67):
        ellipse = ((xx - centre_x * width) / (0.17 * width)) ** 2 + ((yy - height / 2) / (0.3 * height)) ** 2
        image += 80 * np.exp(-ellipse)
    for rib in range(9):
        arc = yy - height * (0.18 + 0.075 * rib) - 0.0005 * (xx - width / 2) ** 2
        image += 40 * np.exp(-((arc / 10.0) ** 2))
    image += rng.normal(0, 5, image.shape)
    return np.clip(cv2.GaussianBlur(image, (0, 0), 1.2), 0, 255).astype(np.uint8)


def _real_xrays() -> list[Path]:
    """The model's validation chest X-rays, fetched by `make model` (never committed)."""
    images = sorted(VALIDATION_IMAGES.glob("*.jpeg"))
    if not images:
        pytest.skip(f"no X-rays in {VALIDATION_IMAGES}: run `make model`")
    return images


@dataclass(frozen=True)
class BurnCase:
    background: str  # "synthetic-<seed>" or "real-<index>"
    position: str
    font: str
    size_px: int
    color: str
    lines: tuple[str, ...]

    @property
    def tokens(self) -> set[str]:
        return patient_tokens(self.lines)


_NAME_ID_DOB = ("Anna Mcgehee", "ID 3677  DOB 1941-11-26")
BURN_CASES = [
    BurnCase("synthetic-1", "top-left", "hershey", 12, "white", _NAME_ID_DOB),
    BurnCase(
        "synthetic-2", "bottom-right", "DejaVuSerif-Bold", 30, "black", ("Oskar Lindqvist", "MRN 880412")
    ),
    BurnCase(
        "synthetic-3", "center", "DejaVuSans", 20, "white", ("Wilhelmina Okafor", "DOB 1955-02-17", "55218")
    ),
    BurnCase("synthetic-4", "top-right", "DejaVuSansMono", 44, "gray", ("Tanaka Hiroshi",)),
    BurnCase(
        "real-0", "top-left", "DejaVuSans-Bold", 18, "white", ("Maria Gonzalez", "ID 40917", "DOB 1963-07-04")
    ),
    BurnCase("real-8", "bottom-left", "DejaVuSerif", 36, "white", ("Fatima Zahra", "ID 77120")),
    BurnCase(
        "real-5", "bottom-right", "DejaVuSansMono", 16, "gray", ("Jonas Berger", "ACC 99431 2021-05-17")
    ),
    BurnCase("real-4", "center", "DejaVuSans", 28, "black", ("Olivia Brown", "ID 52281")),
    BurnCase("real-12", "center", "hershey", 48, "white", ("Chen Jing",)),
]


def _real_marks(case: BurnCase) -> list[pytest.MarkDecorator]:
    return [pytest.mark.model] if case.background.startswith("real") else []


def _background(case: BurnCase) -> np.ndarray:
    kind, index = case.background.split("-")
    if kind == "synthetic":
        return _synthetic_xray(int(index), 1000, 1300 if int(index) % 2 else 900)
    images = _real_xrays()
    return cv2.imread(str(images[int(index) % len(images)]), cv2.IMREAD_GRAYSCALE)


def _text_box(case: BurnCase, shape: tuple[int, ...]) -> Box:
    blank = np.zeros(shape[:2], np.uint8)
    return ink_box(
        burn_patient_text(blank, case.lines, position=case.position, font=case.font, size_px=case.size_px)
    )


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, id=f"{case.background}-{case.position}", marks=_real_marks(case))
        for case in BURN_CASES
    ],
)
def test_anonymized_text_cannot_be_read_back(case: BurnCase) -> None:
    background = _background(case)
    burned = burn_patient_text(
        background, case.lines, position=case.position, font=case.font, size_px=case.size_px, color=case.color
    )
    text_box = _text_box(case, burned.shape)
    regions = propose_text(burned)[1]
    anonymized = blur_text_regions(burned, regions)

    # Nothing outside the regions changed, bit for bit.
    outside = np.ones(burned.shape[:2], bool)
    for x, y, w, h in regions:
        outside[y : y + h, x : x + w] = False
    np.testing.assert_array_equal(anonymized[outside], burned[outside])

    # Views of the output: the whole image, every region, the text's neighbourhood (the slowest read first).
    output_views: list[View] = [(anonymized, 11), (sharpened(anonymized), 11)]
    region_views = [attack_views(crop(anonymized, region, 4)) for region in regions]
    output_views += [(_stacked(views), 11) for views in zip(*region_views, strict=True)]
    output_views += [(view, 6) for view in attack_views(crop(anonymized, text_box, case.size_px))]
    input_views = [(view, 6) for view in attack_views(crop(burned, text_box, case.size_px))]
    leaked, read_before = tokens_read([output_views, input_views], case.lines)

    # The oracle works: Tesseract reads most of the patient's tokens on the input...
    assert len(read_before) >= max(1, (len(case.tokens) + 1) // 2), (sorted(read_before), sorted(case.tokens))
    # ...and none of them in any view of the output.
    assert not leaked, f"readable after anonymization: {sorted(leaked)}"


def test_sixteen_bit_and_colour_images_are_anonymized_too() -> None:
    background = _synthetic_xray(7, 700, 900).astype(np.uint16) * 16  # 12-bit data in a 16-bit container
    lines = ("Ingrid Johansson", "ID 61523")
    burned = burn_patient_text(background, lines, position="top-left", font="DejaVuSans", size_px=26)
    colour = cv2.cvtColor(
        burn_patient_text(_synthetic_xray(8, 700, 900), lines, size_px=26), cv2.COLOR_GRAY2BGRA
    )
    for image in (burned, colour):
        anonymized = blur_text_regions(image, propose_text(image)[1])
        assert anonymized.dtype == image.dtype and anonymized.shape == image.shape
        output = _gray8(anonymized[:150, :600])
        output_views = [(output, 6), (sharpened(cv2.resize(output, None, fx=2, fy=2)), 6)]
        leaked, read_before = tokens_read([output_views, [(_gray8(image[:150, :600]), 6)]], lines)
        assert len(read_before) >= 2
        assert not leaked


@pytest.mark.model
def test_real_xrays_without_text_keep_their_anatomy() -> None:
    for path in _real_xrays():
        pixels = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        covered = np.zeros(pixels.shape, bool)
        for x, y, w, h in propose_text(pixels)[1]:
            covered[y : y + h, x : x + w] = True
        # Lead markers ("R", "A-P"), rulers and ECG clips are found too, and may be; lungs and ribs may not.
        assert covered.mean() < 0.15, f"{path.name}: {covered.mean():.1%} of the image flagged as text"


def test_synthetic_xray_without_text_is_left_alone() -> None:
    for seed in range(3):
        pixels = _synthetic_xray(seed, 1000, 1300)
        regions = propose_text(pixels)[1]
        assert sum(w * h for _, _, w, h in regions) < 0.01 * pixels.size


def test_blur_changes_only_the_regions_and_returns_a_copy() -> None:
    pixels = _gradient(120, 200, 3)
    before = pixels.copy()
    regions = [(10, 10, 50, 30), (150, 90, 80, 80), (-5, -5, 10, 10)]  # partly outside the image too
    blurred = blur_text_regions(pixels, regions)
    np.testing.assert_array_equal(pixels, before)
    inside = np.zeros((120, 200), bool)
    for x, y, w, h in regions:
        inside[max(0, y) : y + h, max(0, x) : x + w] = True
    np.testing.assert_array_equal(blurred[~inside], pixels[~inside])
    assert (blurred[inside] != pixels[inside]).any()


# --------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("fmt", "shape", "dtype"),
    [
        ("png", (50, 70), np.uint16),
        ("png", (50, 70, 4), np.uint8),
        ("tiff", (50, 70, 3), np.uint16),
        ("tiff", (50, 70), np.uint8),
        ("bmp", (50, 70, 3), np.uint8),
        ("bmp", (50, 70), np.uint8),
        ("jpeg", (50, 70), np.uint8),
        ("jpeg", (50, 70, 3), np.uint8),
        ("webp", (50, 70, 3), np.uint8),
        ("webp", (50, 70, 4), np.uint8),
    ],
)
def test_encode_decode_round_trip_keeps_format_dtype_and_channels(
    fmt: str, shape: tuple[int, ...], dtype: type
) -> None:
    pixels = _gradient(shape[0], shape[1], shape[2] if len(shape) == 3 else 0, dtype)
    decoded = _decode(encode_image(pixels, fmt))
    assert decoded.format == fmt
    assert decoded.pixels.dtype == pixels.dtype and decoded.pixels.shape == pixels.shape
    if fmt in ("png", "tiff", "bmp"):
        np.testing.assert_array_equal(decoded.pixels, pixels)


def test_every_decoded_image_can_be_encoded_back() -> None:
    for extension in (".png", ".tiff", ".bmp", ".jpg", ".webp"):
        decoded = _decode(_cv2_bytes(_gradient(20, 30, 3), extension))
        stamped = stamp_label(decoded.pixels, STAMP, avoid=propose_text(decoded.pixels)[1])
        assert _decode(encode_image(stamped, decoded.format)).format == decoded.format


def _film(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth shading with grain and a few hard edges: what a JPEG codes like an X-ray or a photo."""
    base = cv2.resize(rng.integers(0, 256, (8, 8, *shape[2:]), np.uint8), shape[1::-1], interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 6, shape)
    pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
    pixels[shape[0] // 3 : shape[0] // 2, shape[1] // 4 : shape[1] // 2] = 255
    return pixels


def _redacted(rng: np.random.Generator, pixels: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """`pixels` with four random boxes overwritten (one touching the bottom edge); the row ranges changed."""
    height, width = pixels.shape[:2]
    changed = pixels.copy()
    rows = []
    for index in range(4):
        h = int(rng.integers(1, max(2, height // 5)))
        w = int(rng.integers(1, width + 1))
        y = height - h if index == 0 else int(rng.integers(0, height - h + 1))
        x = int(rng.integers(0, width - w + 1))
        changed[y : y + h, x : x + w] = rng.integers(0, 256, (h, w, *pixels.shape[2:]), np.uint8)
        rows.append((y, y + h))
    return changed, rows


@pytest.mark.parametrize("channels", [(), (3,)], ids=["grey", "bgr"])
@pytest.mark.parametrize("size", [(1416, 1776), (203, 301), (16, 16), (9, 1000), (1000, 9)])
def test_changed_rows_are_spliced_into_a_jpeg_byte_for_byte(
    size: tuple[int, int], channels: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The anonymized copy's JPEG is the stamped copy's with the redacted rows re-encoded: exactly the bytes a
    whole encode gives, while only those rows are encoded."""
    rng = np.random.default_rng(size[0] * 7 + size[1] + len(channels))
    before = _film(rng, (*size, *channels))
    after, rows = _redacted(rng, before)
    unchanged = encode_image(before, "jpeg")
    whole = encode_image(after, "jpeg")
    encoded_heights = []
    imencode = cv2.imencode

    def counted(extension: str, pixels: np.ndarray, params: list[int]) -> tuple[bool, np.ndarray]:
        encoded_heights.append(pixels.shape[0])
        return imencode(extension, pixels, params)

    monkeypatch.setattr(cv2, "imencode", counted)
    spliced = encode_changed_rows(after, "jpeg", unchanged_encoding=unchanged, changed=rows)
    assert spliced == whole
    unit = 8 if not channels else 16
    assert sum(encoded_heights) <= sum(-(-bottom // unit) * unit - top // unit * unit for top, bottom in rows)
    np.testing.assert_array_equal(_decode(spliced).pixels, _decode(whole).pixels)


def test_changed_rows_are_encoded_whole_when_they_cannot_be_spliced() -> None:
    rng = np.random.default_rng(5)
    before = _film(rng, (120, 90, 3))
    after, rows = _redacted(rng, before)
    unchanged = encode_image(before, "jpeg")
    assert encode_changed_rows(before, "jpeg", unchanged_encoding=unchanged, changed=[]) is unchanged
    # Rows below the image change nothing.
    assert encode_changed_rows(before, "jpeg", unchanged_encoding=unchanged, changed=[(500, 600)]) is unchanged
    for fmt in ("png", "webp"):
        assert encode_changed_rows(after, fmt, unchanged_encoding=encode_image(before, fmt), changed=rows) == (
            encode_image(after, fmt))
    deep = after.astype(np.uint16) * 16
    assert encode_changed_rows(deep, "jpeg", unchanged_encoding=unchanged, changed=rows) == encode_image(deep, "jpeg")
    # Not the encoder's layout: no restart markers, another size, another depth of channels, not a JPEG at all.
    whole = encode_image(after, "jpeg")
    grey = before[:, :, 0]
    for foreign in (_cv2_bytes(before, ".jpg"), encode_image(before[:64], "jpeg"), encode_image(grey, "jpeg"),
                    b"\xff\xd8 not a JPEG \xff\xd9", encode_image(before, "png")):
        assert encode_changed_rows(after, "jpeg", unchanged_encoding=foreign, changed=rows) == whole


def test_eight_bit_formats_accept_16_bit_pixels() -> None:
    decoded = _decode(encode_image(np.full((10, 10, 3), 4095, np.uint16), "jpeg"))
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.min() > 250


def test_unknown_format_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="gif"):
        encode_image(_gradient(5, 5), "gif")
