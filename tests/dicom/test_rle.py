"""RLE Lossless frames put together from rows encoded once: byte for byte what pylibjpeg-rle's frame encoder writes
for the same pixels, read back by pydicom's own RLE decoder, whichever rows changed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid
from pydicom.valuerep import VR
from rle.rle import encode_frame

from service.dicom.rle import RleRows


def reference(frame: np.ndarray) -> bytes:
    """pylibjpeg-rle's encoding of one frame (rows x columns [x samples], interleaved samples)."""
    samples = frame.shape[2] if frame.ndim == 3 else 1
    return encode_frame(frame.tobytes(), frame.shape[0], frame.shape[1], samples, frame.dtype.itemsize * 8, "<")


def decoded(frames: list[bytes], like: np.ndarray) -> np.ndarray:
    """The frames as pydicom's own RLE decoder (pure Python, another implementation than the encoder's) reads them
    from a Part 10 object."""
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    grey = like.ndim == 3
    dataset.set_pixel_data(like if len(like) > 1 else like[0], "MONOCHROME2" if grey else "RGB",
                           like.dtype.itemsize * 8, generate_instance_uid=False)
    dataset.PixelData = encapsulate(frames)
    dataset["PixelData"].VR = VR.OB
    dataset["PixelData"].is_undefined_length = True
    dataset.file_meta.TransferSyntaxUID = RLELossless
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pixel_array(buffer, decoding_plugin="pydicom").reshape(like.shape)


FRAMES = {
    "grey-8": np.random.default_rng(1).integers(0, 256, (2, 31, 45)).astype(np.uint8),
    "grey-12-in-16": np.random.default_rng(2).integers(0, 4096, (1, 40, 64)).astype(np.uint16),
    "signed-16": np.random.default_rng(3).integers(-3000, 3000, (1, 24, 30)).astype(np.int16),
    "rgb-8": np.random.default_rng(4).integers(0, 256, (3, 16, 20, 3)).astype(np.uint8),
    "flat": np.full((1, 300, 2), 7, np.uint16),
    "runs": (np.arange(50 * 257).reshape(1, 50, 257) // 130 % 3).astype(np.uint8),
}


@pytest.mark.parametrize("name", FRAMES)
def test_unchanged_frames_are_pylibjpeg_rles_and_decode_to_the_source(name: str) -> None:
    source = FRAMES[name]
    encoded = RleRows(source).encoded_frames(source)
    assert encoded == [reference(frame) for frame in source]
    assert np.array_equal(decoded(encoded, source), source)


@pytest.mark.parametrize("name", FRAMES)
def test_changed_rows_are_encoded_again_and_the_rest_shared(name: str) -> None:
    source = FRAMES[name]
    rows = RleRows(source)
    rows.encoded_frames(source)
    changed = source.copy()
    changed[0, 0] = 0
    changed[-1, -1] = changed[-1, -1] // 2 + 1
    changed[0, len(source[0]) // 2 :] = 9
    encoded = rows.encoded_frames(changed)
    assert encoded == [reference(frame) for frame in changed]
    # The source's rows are still the source's: a changed copy did not write into them.
    assert rows.encoded_frames(source) == [reference(frame) for frame in source]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int16]),
    samples=st.sampled_from([1, 3]),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 140)),
    seed=st.integers(0, 2**32 - 1),
    levels=st.sampled_from([2, 16, 256]),
)
def test_any_frames_and_any_changed_rows_encode_as_a_whole_encode_does(
    dtype: type, samples: int, shape: tuple[int, int, int], seed: int, levels: int
) -> None:
    """Few levels make long runs, many make literals; rows of one byte, rows longer than a PackBits run (128)."""
    rng = np.random.default_rng(seed)
    full_shape = (*shape, samples) if samples > 1 else shape
    source = rng.integers(0, levels, full_shape).astype(dtype)
    changed = source.copy()
    for frame in range(shape[0]):
        for row in rng.choice(shape[1], rng.integers(0, shape[1] + 1), replace=False):
            changed[frame, row] = rng.integers(0, levels, changed[frame, row].shape).astype(dtype)
    rows = RleRows(source)
    assert rows.encoded_frames(changed) == [reference(frame) for frame in changed]
    assert rows.encoded_frames(source) == [reference(frame) for frame in source]


def test_frames_shaped_unlike_the_source_are_refused() -> None:
    rows = RleRows(FRAMES["grey-8"])
    with pytest.raises(ValueError, match="not shaped as the source's"):
        rows.encoded_frames(FRAMES["grey-8"][:1])
    with pytest.raises(ValueError, match="not shaped as the source's"):
        rows.encoded_frames(FRAMES["grey-8"].astype(np.uint16))


def test_more_segments_than_rle_holds_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 15 segments"):
        RleRows(np.zeros((1, 4, 4, 3), np.uint64))


def test_frames_encapsulate_as_pydicom_reads_them() -> None:
    """Encapsulated as the writer does, the frames come back out one by one."""
    source = FRAMES["rgb-8"]
    encoded = RleRows(source).encoded_frames(source)
    assert list(generate_frames(encapsulate(encoded), number_of_frames=len(encoded))) == encoded
