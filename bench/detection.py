"""The text-detection row of `make bench`: CPU per image of the text cascade against the old line search, by modality.

For each modality, process CPU ms per image (time.process_time; OpenCV on one thread, as in a worker) of
(a) the line search alone (`service.imaging.text.propose_text`: what the service ran before the cascade, the
baseline) and (b) the whole cascade (`TextDetector.find`: the line search proposes, the learned detector verifies
the proposals' crops in one mosaic, the recognizer reads squat and isolated lines). Each image gets one warm-up
call of each, then N timed repeats (N = 5, 2 with --quick); an image's figure is the median of its repeats and a
modality's the median of its images. Also the median number of boxes redacted and of orientation markers kept, and
where the cascade's time goes: the CPU of the detector's runs and of the recognizer's readings within it (each an
image's median over its repeats, then the modality's median: the parts' medians need not add up to the cascade's),
with how many of each an image takes.

Modalities: `chest`, the default model's 16 validation X-rays (JPEG, decoded as the service decodes them); and
synthetic images from tests/imaging/modalities.py, 4 seeded images each at the sizes such images come in, each
with a patient name and birth date burned into a corner so the cascade has text to verify: `ct` (CT scouts,
~512 x 512), `pet` (PET projections, 512 x 512 BGR), `mr` (MR slices, 256 to 512 square) and `chest-grain`
(scanned films with coarse grain, ~2000 x 1700).

`.venv/bin/python bench/detection.py [--quick] [--json]` prints the table (or the row as JSON); `bench/run.py`
includes it in its results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The synthetic modalities live with the tests (and import ocr_oracle from tests/): plain modules.
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "imaging"))

from modalities import Burn, burn_in, chest_grain, ct_scout, mr_slice, pet  # noqa: E402

from service.imaging.codec import decode_image  # noqa: E402
from service.imaging.detection import TextDetector  # noqa: E402
from service.imaging.patient_text import DEJAVU_DIR  # noqa: E402
from service.imaging.text import propose_text  # noqa: E402
from service.models.fetch import text_models_dir, validation_images  # noqa: E402
from service.settings import ModelCacheSettings  # noqa: E402

CACHE_DIR = ModelCacheSettings().model_cache_dir
MAX_BYTES = MAX_PIXELS = 10**9
REPEATS, QUICK_REPEATS = 5, 2

#: Synthetic modalities: generator, and (height, width, capital height of the burned text in px) per image.
SYNTHETIC: dict[str, tuple[Callable[[np.random.Generator, int, int], np.ndarray], list[tuple[int, int, int]]]] = {
    "ct": (ct_scout, [(512, 512, 12), (560, 480, 12), (512, 512, 11), (640, 512, 13)]),
    "pet": (pet, [(512, 512, 12), (512, 512, 11), (512, 512, 12), (512, 512, 13)]),
    "mr": (mr_slice, [(256, 256, 10), (320, 320, 10), (448, 448, 11), (512, 512, 12)]),
    "chest-grain": (chest_grain, [(2000, 1700, 28), (1950, 1650, 26), (2048, 1700, 30), (2000, 1760, 28)]),
}
PATIENTS = ("Halvard Ostby 1951-04-22", "Marit Ellingsen 1962-07-08", "Eirik Fossheim 1977-05-30",
            "Aslaug Tveit 1944-01-19")  # fmt: skip
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
#: DejaVu comes with the test dependencies (`make test-deps`); `make bench` does not install it, so without it the
#: text is drawn in OpenCV's built-in face (recorded in the row: figures of the two are not comparable).
FONT = "DejaVuSans" if (DEJAVU_DIR / "DejaVuSans.ttf").is_file() else "hershey"


def chest_images() -> list[np.ndarray]:
    paths = sorted(validation_images(CACHE_DIR).glob("*.jpeg"))
    if len(paths) != 16:
        sys.exit("the default model is not fetched: run `make model`")
    return [decode_image(path.read_bytes(), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS).pixels for path in paths]


def synthetic_images(modality: str) -> list[np.ndarray]:
    """The modality's seeded images, each with one name-and-date line burned into a corner, white on the dark
    background (all four generators leave their corners dark)."""
    generate, sizes = SYNTHETIC[modality]
    images = []
    for index, (height, width, size) in enumerate(sizes):
        rng = np.random.default_rng(1000 * list(SYNTHETIC).index(modality) + index)
        pixels = generate(rng, height, width)
        burn_in(pixels, Burn((PATIENTS[index],), CORNERS[index], "white", FONT, size))
        images.append(pixels)
    return images


def cpu_ms(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median process CPU ms of `call` over `repeats` runs after a warm-up run, and the warm-up's result."""
    result = call()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        call()
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times), result


#: The cascade's two models as TextDetector holds them, and the call that runs each.
MODEL_CALLS = {"detector": ("_detector", "probability"), "recognizer": ("_recognizer", "read")}


class ModelClock:
    """The process CPU and the number of calls of the cascade's two models (MODEL_CALLS), counted by wrapping the
    loaded detector's models in place: the bench's instrument only."""

    def __init__(self, detector: TextDetector) -> None:
        self.reset()
        for part, (attribute, method) in MODEL_CALLS.items():
            model = getattr(detector, attribute)
            setattr(model, method, self._timed(part, getattr(model, method)))

    def _timed(self, part: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            started = time.process_time()
            try:
                return call(*args)
            finally:
                self.seconds[part] += time.process_time() - started
                self.calls[part] += 1

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(MODEL_CALLS, 0.0)
        self.calls = dict.fromkeys(MODEL_CALLS, 0)


def cascade_cpu_ms(detector: TextDetector, clock: ModelClock, pixels: np.ndarray, repeats: int) -> dict[str, Any]:
    """The cascade on `pixels`: medians over `repeats` runs after a warm-up of its process CPU ms, of its models'
    (see ModelClock) and of their calls; and the warm-up's findings."""
    findings = detector.find(pixels)
    runs = []
    for _ in range(repeats):
        clock.reset()
        started = time.process_time()
        detector.find(pixels)
        runs.append({"cascade_cpu_ms": (time.process_time() - started) * 1000,
                     **{f"{part}_cpu_ms": seconds * 1000 for part, seconds in clock.seconds.items()},
                     **{f"{part}_calls": calls for part, calls in clock.calls.items()}})
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]} | {
        "redact": len(findings.redact), "markers": len(findings.markers)}


def measure_modality(detector: TextDetector, clock: ModelClock, images: list[np.ndarray], repeats: int
                     ) -> dict[str, Any]:
    per_image = []
    for pixels in images:
        line_ms, _ = cpu_ms(lambda pixels=pixels: propose_text(pixels), repeats)
        per_image.append({"shape": list(pixels.shape), "line_search_cpu_ms": line_ms,
                          **cascade_cpu_ms(detector, clock, pixels, repeats)})
    medians = {key: statistics.median(image[key] for image in per_image) for key in per_image[0] if key != "shape"}
    return {
        "images": len(images),
        "megapixels": statistics.median(pixels.shape[0] * pixels.shape[1] / 1e6 for pixels in images),
        **medians,
        "cascade_over_line_search": medians["cascade_cpu_ms"] / medians["line_search_cpu_ms"],
        "per_image": per_image,
    }


def measure(repeats: int = REPEATS) -> dict[str, Any]:
    cv2.setNumThreads(1)  # as a worker runs it
    detector = TextDetector.load(text_models_dir(CACHE_DIR))
    clock = ModelClock(detector)
    modalities = {"chest": measure_modality(detector, clock, chest_images(), repeats)}
    for modality in SYNTHETIC:
        modalities[modality] = measure_modality(detector, clock, synthetic_images(modality), repeats)
    return {"repeats": repeats, "font": FONT, "modalities": modalities}


def print_row(row: dict[str, Any]) -> None:
    font = "" if row.get("font", "DejaVuSans") == "DejaVuSans" else f"; synthetic text in {row['font']}"
    print(f"Text detection, CPU ms per image (medians; {row['repeats']} repeats per image after a warm-up{font}):")
    print(f"  {'modality':<13}{'images':>7}{'MP':>6}{'line search':>13}{'cascade':>9}{'ratio':>7}"
          f"{'detector (runs)':>17}{'recognizer (reads)':>20}{'redact':>8}{'markers':>9}")  # fmt: skip
    for name, figures in row["modalities"].items():
        detector = f"{figures['detector_cpu_ms']:.1f} ({figures['detector_calls']:g})"
        recognizer = f"{figures['recognizer_cpu_ms']:.1f} ({figures['recognizer_calls']:g})"
        print(f"  {name:<13}{figures['images']:>7}{figures['megapixels']:6.2f}{figures['line_search_cpu_ms']:13.1f}"
              f"{figures['cascade_cpu_ms']:9.1f}{figures['cascade_over_line_search']:6.1f}x"
              f"{detector:>17}{recognizer:>20}{figures['redact']:8g}{figures['markers']:9g}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} repeats per image, not {REPEATS}")
    parser.add_argument("--repeats", type=int, help=f"timed repeats per image (default {REPEATS})")
    parser.add_argument("--json", action="store_true", help="print the row as JSON")
    args = parser.parse_args(argv)
    row = measure(args.repeats or (QUICK_REPEATS if args.quick else REPEATS))
    print(json.dumps(row)) if args.json else print_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
