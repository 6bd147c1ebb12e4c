"""Image bytes <-> pixels: sniffing and decoding untrusted uploads (with limits on bytes and pixels), the
conversions the model and the text search need, and encoding the outputs in the upload's own format."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Sequence
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
#: A JPEG's minimum coded unit: 8 x 8 pixels in grey, 16 x 16 in colour (chroma halved both ways, 4:2:0).
_JPEG_MCU_PX = {1: 8, 3: 16}


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """Encode `pixels` in `fmt` (a `DecodedImage.format`); PNG and TIFF keep 16 bits, the others get 8.

    A JPEG carries a restart marker after every row of minimum coded units (8 or 16 pixel rows, about 0.2 % more
    bytes): each row's coded data then stands alone, which `encode_changed_rows` builds on."""
    try:
        extension, params = _ENCODERS[fmt]
    except KeyError:
        raise ValueError(f"cannot encode {fmt!r}; expected one of {sorted(_ENCODERS)}") from None
    if fmt in _EIGHT_BIT_FORMATS:
        pixels = to_8bit(pixels)
    if fmt == "jpeg":
        params = [*params, *_jpeg_row_params(pixels)]
    ok, encoded = cv2.imencode(extension, pixels, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {pixels.shape} {pixels.dtype} image as {fmt}")
    return encoded.tobytes()


def encode_changed_rows(
    pixels: np.ndarray, fmt: str, *, unchanged_encoding: bytes, changed: Sequence[tuple[int, int]]
) -> bytes:
    """`encode_image(pixels, fmt)`, given `unchanged_encoding`: `encode_image` of an image that differs from
    `pixels` only within the row ranges `changed` ([top, bottom) pairs). The anonymized copy is the stamped one
    redacted in a few boxes: of an 8-bit JPEG only the rows of coded units holding those ranges are encoded and
    put in place of the same rows of `unchanged_encoding`, byte for byte what encoding the whole image gives, for
    a fraction of its CPU. Anything else is encoded whole."""
    height = pixels.shape[0]
    rows = sorted((max(0, top), min(height, bottom)) for top, bottom in changed if min(height, bottom) > max(0, top))
    if not rows:
        return unchanged_encoding
    if fmt != "jpeg" or pixels.dtype != np.uint8:
        # 16 bits are scaled to 8 by the brightest value, which redaction may change: the whole image changes.
        return encode_image(pixels, fmt)
    try:
        layout = _JpegRows.parse(unchanged_encoding)
    except ValueError:
        return encode_image(pixels, fmt)
    if layout.shape != pixels.shape[:2] or layout.row_count != -(-height // layout.row_height):
        return encode_image(pixels, fmt)
    coded_rows = list(layout.rows)
    for first, last in _runs(rows, layout.row_height):
        strip = pixels[first * layout.row_height : min(height, last * layout.row_height)]
        try:
            part = _JpegRows.parse(encode_image(strip, fmt))
        except ValueError:
            return encode_image(pixels, fmt)
        if part.tables != layout.tables or part.row_count != last - first:
            return encode_image(pixels, fmt)
        coded_rows[first:last] = part.rows
    return layout.joined(coded_rows)


def _jpeg_row_params(eight_bit: np.ndarray) -> list[int]:
    """Encoder settings for a restart marker after every row of coded units (4:2:0 chroma in colour, as the
    encoder's default, but fixed: the unit's size depends on it)."""
    channels = 1 if eight_bit.ndim == 2 else eight_bit.shape[2]
    if channels not in _JPEG_MCU_PX:
        return []  # BGRA: the encoder drops alpha; its rows are not spliced
    units_per_row = -(-eight_bit.shape[1] // _JPEG_MCU_PX[channels])
    sampling = [] if channels == 1 else [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420]
    return [*sampling, cv2.IMWRITE_JPEG_RST_INTERVAL, units_per_row]


def _runs(rows: Sequence[tuple[int, int]], row_height: int) -> list[tuple[int, int]]:
    """The sorted pixel row ranges `rows` as runs [first, last) of coded-unit rows, overlapping runs merged."""
    runs: list[tuple[int, int]] = []
    for top, bottom in rows:
        first, last = top // row_height, -(-bottom // row_height)
        if runs and first <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], last))
        else:
            runs.append((first, last))
    return runs


@dataclass(frozen=True)
class _JpegRows:
    """A baseline JPEG cut at its restart markers, one per row of coded units (as `encode_image` writes it)."""

    #: Everything up to the coded data (markers, tables, frame and scan headers).
    head: bytes
    #: The coded data of each row of units, without its restart marker.
    rows: tuple[bytes, ...]
    #: Quantisation and Huffman tables, which coded rows must share to be exchanged.
    tables: bytes
    shape: tuple[int, int]
    row_height: int

    @property
    def row_count(self) -> int:
        return len(self.rows)

    @classmethod
    def parse(cls, data: bytes) -> _JpegRows:
        """Raises ValueError unless `data` is a single-scan baseline JPEG with a restart marker after every row."""
        if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
            raise ValueError("not a JPEG")
        position, tables, frame, interval = 2, b"", None, 0
        while True:
            if position + 4 > len(data) or data[position] != 0xFF:
                raise ValueError("malformed JPEG header")
            marker, length = data[position + 1], int.from_bytes(data[position + 2 : position + 4], "big")
            segment = data[position + 4 : position + 2 + length]
            if marker in (0xDB, 0xC4):  # quantisation, Huffman tables
                tables += segment
            elif marker == 0xC0:  # baseline frame: precision, height, width, components (id, sampling, table)
                frame = segment
            elif 0xC1 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                raise ValueError("not a baseline JPEG")
            elif marker == 0xDD:
                interval = int.from_bytes(segment[:2], "big")
            position += 2 + length
            if marker == 0xDA:
                break
        if frame is None or not interval:
            raise ValueError("no baseline frame or no restart interval")
        height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
        sampling = frame[7 : 6 + 3 * frame[5] : 3]
        unit_width, unit_height = 8 * max(value >> 4 for value in sampling), 8 * max(value & 15 for value in sampling)
        if interval != -(-width // unit_width):
            raise ValueError("restart markers do not fall at row ends")
        # Inside coded data 0xFF is always followed by 0x00 (stuffing) or a restart marker (0xD0-0xD7).
        rows = tuple(re.split(rb"\xff[\xd0-\xd7]", data[position:-2]))
        return cls(data[:position], rows, tables, (height, width), unit_height)

    def joined(self, rows: Sequence[bytes]) -> bytes:
        """This JPEG with `rows` as its coded rows (restart markers numbered 0-7 in turn between them)."""
        parts = [self.head]
        for number, row in enumerate(rows):
            if number:
                parts.append(bytes((0xFF, 0xD0 + (number - 1) % 8)))
            parts.append(row)
        parts.append(b"\xff\xd9")
        return b"".join(parts)
