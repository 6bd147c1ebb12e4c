"""Image bytes <-> pixels: sniffing and decoding untrusted uploads (with limits on bytes and pixels), the
conversions the model and the text search need, and encoding the outputs in the upload's own format."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from service.errors import UnprocessableObject


@dataclass(frozen=True)
class DecodedImage:
    #: OpenCV layout: HxW gray, HxWx3 BGR or HxWx4 BGRA; dtype uint8 or uint16; EXIF orientation applied.
    pixels: np.ndarray
    #: Canonical container name: "jpeg", "png", "tiff", "bmp" or "webp"; `encode_image` writes it back.
    format: str


# --------------------------------------------------------------------------------------------------- decoding

#: Pillow's container name -> canonical format. Only containers OpenCV can both decode and encode are
#: accepted, so every output keeps its input's format. MPO is a JPEG with extra images appended (camera
#: previews, depth maps): OpenCV decodes the primary image and the extras are dropped.
_ACCEPTED_CONTAINERS = {
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "PNG": "png",
    "TIFF": "tiff",
    "BMP": "bmp",
    "WEBP": "webp",
}
#: Containers Pillow may sniff (its JPEG reader reports MPO by itself). Listing them keeps Pillow's lenient
#: parsers for headerless formats (TGA...) from claiming random bytes; GIF is listed only to answer
#: "unsupported format" rather than "not an image".
_SNIFFED_CONTAINERS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")

#: EXIF orientation -> the transform that makes the pixels upright (as in PIL.ImageOps.exif_transpose).
_UPRIGHT_BY_ORIENTATION: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda pixels: cv2.flip(pixels, 1),
    3: lambda pixels: cv2.rotate(pixels, cv2.ROTATE_180),
    4: lambda pixels: cv2.flip(pixels, 0),
    5: cv2.transpose,
    6: lambda pixels: cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE),
    7: lambda pixels: cv2.rotate(cv2.transpose(pixels), cv2.ROTATE_180),
    8: lambda pixels: cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Decode untrusted bytes into upright pixels, or raise `UnprocessableObject`.

    Checks run cheapest first: the byte count, then the header (Pillow parses only the header, so a
    decompression bomb is refused before any pixel memory is allocated), then the full decode by OpenCV,
    which keeps 16-bit depth and alpha. Multi-frame images (animated GIF/APNG/WebP, multi-page TIFF) are
    refused rather than cut to their first frame: the other frames could hold more patient text.
    """
    check_byte_count(data, max_bytes)
    header = _open_header(data)
    container = header.format or "unknown"
    if container not in _ACCEPTED_CONTAINERS:
        accepted = ", ".join(sorted(set(_ACCEPTED_CONTAINERS.values())))
        raise UnprocessableObject(
            f"{container} images are not supported (accepted: {accepted})", reason="unsupported-format"
        )
    width, height = header.size
    if width * height > max_pixels:
        raise UnprocessableObject(
            f"image is {width}x{height} pixels, over the limit of {max_pixels}", reason="too-many-pixels"
        )
    if container != "MPO" and _frame_count(header) > 1:
        raise UnprocessableObject("animated and multi-page images are not supported", reason="animated-image")
    orientation = _exif_orientation(header)

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.shape[:2] != (height, width):
        raise UnprocessableObject("image data is corrupt or truncated", reason="corrupt-image")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.dtype not in (np.uint8, np.uint16) or channels not in (1, 3, 4):
        raise UnprocessableObject(
            f"{pixels.dtype} pixels with {channels} channels are not supported", reason="unsupported-format"
        )
    # IMREAD_UNCHANGED is the only mode that keeps 16 bits and alpha, and it ignores EXIF orientation.
    upright = _UPRIGHT_BY_ORIENTATION.get(orientation)
    if upright is not None:
        pixels = upright(pixels)
    return DecodedImage(pixels=pixels, format=_ACCEPTED_CONTAINERS[container])


def check_byte_count(data: bytes, max_bytes: int) -> None:
    """The first check of any upload, the cheapest (DICOM objects get it too)."""
    if len(data) > max_bytes:
        raise UnprocessableObject(f"image is {len(data)} bytes, over the limit of {max_bytes}", reason="too-large")


def _open_header(data: bytes) -> Image.Image:
    try:
        # Our own pixel limit is checked right after; Pillow's bomb warning would only repeat it. (Not
        # thread-safe before Python 3.14, but the worst a race can do is leave this one warning ignored.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_SNIFFED_CONTAINERS)
    except Image.DecompressionBombError as error:
        raise UnprocessableObject(
            "image dimensions are far over the pixel limit", reason="too-many-pixels"
        ) from error
    except (UnidentifiedImageError, OSError, ValueError, EOFError) as error:
        raise UnprocessableObject("data is not a recognised image", reason="not-an-image") from error


def _frame_count(header: Image.Image) -> int:
    try:
        return int(getattr(header, "n_frames", 1))
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        raise UnprocessableObject("image frame table is corrupt", reason="corrupt-image") from error


def _exif_orientation(header: Image.Image) -> int:
    """The orientation still to apply to what OpenCV decodes (1: none)."""
    if header.format == "TIFF":
        return 1  # OpenCV's TIFF reader (libtiff) already applies the orientation tag
    # Pillow's PNG reader would decode the whole image to look for an eXIf chunk stored after the pixel data;
    # only the (usual) eXIf chunk ahead of the pixels is honoured.
    if header.format == "PNG" and "exif" not in header.info:
        return 1
    try:
        orientation = header.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        # Pillow's EXIF parser raises many exception types on malformed blocks; a broken EXIF block is
        # common in the wild and must not make an otherwise good image fail.
        return 1
    return orientation if isinstance(orientation, int) else 1


# ---------------------------------------------------------------------------------------------- conversions


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """HxW gray or HxWx3 BGR uint8 for the model (may return `pixels` itself when it already is).

    Alpha is dropped and 16-bit data is scaled by its real bit depth (the bit length of its brightest value):
    12-bit data in a 16-bit container keeps its full contrast. Gray stays one channel: the model's
    preprocessing resizes first, so expanding it to three channels is done on the small image.
    """
    eight_bit = to_8bit(pixels)
    if eight_bit.ndim == 3 and eight_bit.shape[2] == 4:
        return cv2.cvtColor(eight_bit, cv2.COLOR_BGRA2BGR)
    return eight_bit


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype != np.uint16:
        raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")
    colour = pixels if pixels.ndim == 2 else pixels[:, :, :3]
    shift = max(0, int(colour.max()).bit_length() - 8)
    return cv2.convertScaleAbs(pixels, alpha=1.0 / (1 << shift))


def to_gray8(pixels: np.ndarray) -> np.ndarray:
    eight_bit = to_8bit(pixels)
    if eight_bit.ndim == 2:
        return eight_bit
    code = cv2.COLOR_BGRA2GRAY if eight_bit.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(eight_bit, code)


# ------------------------------------------------------------------------------------------------- encoding

#: Fast settings: encoding is a visible share of the CPU per image. PNG level 1 with the "up" filter is 2x
#: faster than OpenCV's default adaptive filtering for about the same size on X-rays.
_ENCODERS: dict[str, tuple[str, list[int]]] = {
    "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90]),
    "png": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]),
    "tiff": (".tiff", [cv2.IMWRITE_TIFF_COMPRESSION, cv2.IMWRITE_TIFF_COMPRESSION_LZW]),
    "bmp": (".bmp", []),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90]),
}
_EIGHT_BIT_FORMATS = {"jpeg", "bmp", "webp"}


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode `pixels` in `fmt` (a `DecodedImage.format`); PNG and TIFF keep 16 bits, the others get 8."""
    try:
        extension, params = _ENCODERS[fmt]
    except KeyError:
        raise ValueError(f"cannot encode {fmt!r}; expected one of {sorted(_ENCODERS)}") from None
    if fmt in _EIGHT_BIT_FORMATS:
        pixels = to_8bit(pixels)
    ok, encoded = cv2.imencode(extension, pixels, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {pixels.shape} {pixels.dtype} image as {fmt}")
    return encoded.tobytes()
