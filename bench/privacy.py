"""The privacy row of `make bench`: how much burned-in patient text the anonymized pixels leak, and how much of the
rest they keep, on random images no test and no tuning has seen.

Each image is drawn from its seed (BASE_SEED + index): a modality of tests/imaging/modalities.py, in turn CT scout,
PET (BGR), MR slice and chest film with grain; a random size (400-1400 px a side, chest films 900-2200), bit depth
(8, 12 or 16; PET 8) and, one in five grey images, stored as BGR. One to three blocks of patient text are burned into
it (a name with an ID, a birth date, a surname with an accession number), each at a random border place, in a
random DejaVu face (plain, oblique, condensed, serif italic, mono bold, extra light), capitals 9-29 px, a random ink
(white, greys, black; on colour also yellow, cyan, green), turned a quarter either way one time in five, and one
time in four faint instead: 25-44 grey levels lighter or darker than what it is burned on.

The service's text cascade (TextDetector.find) and blur (blur_text_regions) make the anonymized pixels. The tests' OCR
oracle (Tesseract through every attack view: stretched, sharpened, strokes isolated, colour distance) reads each
block in the original and in the anonymized pixels. A block the oracle cannot read in the original is not counted
(too faint or small for Tesseract: nobody reads it either); a block with a patient token read after is a leak.
Reported per modality and in all: images, blocks read before, blocks leaked, images with a leak, readable blocks
partly redacted (less than 95 % of their ink inside redaction boxes: no OCR, so steadier than the leak count), and
the median share of the pixels away from the text (modalities.away_from_text: farther than 0.6 of its height from
its ink) that the anonymized pixels keep unchanged (issue 15 asks >= 0.95).

`.venv/bin/python bench/privacy.py [--quick] [--images N] [--seed S] [--json] [--verbose]`. About 4 s per image on
one core, most of it Tesseract; needs the test dependencies (`make test-deps`: Tesseract, DejaVu fonts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The modalities and the OCR oracle live with the tests: plain modules.
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "imaging"))

from modalities import GENERATORS, WHITE, Burn, as_bgr, attacker_views, away_from_text, burn_in  # noqa: E402
from ocr_oracle import Box, patient_tokens, tokens_read  # noqa: E402

from service.imaging.detection import TextDetector  # noqa: E402
from service.imaging.redact import blur_text_regions  # noqa: E402
from service.models.fetch import text_models_dir  # noqa: E402
from service.settings import ModelCacheSettings  # noqa: E402

#: Seeds of the images: not those of the sweeps the cascade was developed on (1000s and 2000s).
BASE_SEED = 3000
IMAGES, QUICK_IMAGES = 48, 24
#: The modalities, in turn (modalities.GENERATORS): CT scout, PET, MR slice, chest film with grain.
MODALITIES = list(GENERATORS)
FONTS = ("DejaVuSans", "DejaVuSans-Oblique", "DejaVuSansCondensed", "DejaVuSerif-Italic", "DejaVuSansMono-Bold",
         "DejaVuSerifCondensed-Bold", "DejaVuSans-ExtraLight", "DejaVuSansCondensed-BoldOblique")  # fmt: skip
#: Names as consoles write them (ASCII transliterations).
NAMES = ("Oystein Aeroe", "Brigitte Mueller", "Jose Garcia Nunez", "Kari Nordmann", "Wei Zhang", "Anna-Lena Berg",
         "Siobhan O'Neill", "Mikkel Vestergaard")  # fmt: skip
BORDER_PLACES = ("top-left", "top", "top-right", "left", "right", "bottom-left", "bottom", "bottom-right")
#: A block's ink: its pixels at least this much covered by the glyphs (of 255). A readable block less than
#: FULLY_REDACTED of whose ink lies in redaction boxes is partly redacted: a measure without OCR, steadier than
#: whether the oracle reads the rest (a name half redacted may read one version and not the next).
INK_COVERAGE = 64
FULLY_REDACTED = 0.95
#: Capital heights of the burned text are drawn from MIN_SIZE_PX up to (not including) MAX_SIZE_PX.
MIN_SIZE_PX, MAX_SIZE_PX = 9, 30
GREY_INKS = ("white", "light-grey", "black", "dark-grey")
COLOUR_INKS = ("yellow", "cyan", "green")


@dataclass(frozen=True)
class Scene:
    modality: str
    pixels: np.ndarray
    burns: list[Burn]
    boxes: list[Box]


def scene(seed: int, modality: str) -> Scene:
    """The image of `seed`: `modality`'s anatomy with one to three random blocks of patient text burned in."""
    rng = np.random.default_rng(seed)
    if modality == "chest-grain":
        height, width = int(rng.integers(900, 2200)), int(rng.integers(900, 2000))
    else:
        height, width = int(rng.integers(400, 1400)), int(rng.integers(400, 1400))
    bits = 8 if modality == "pet" else int(rng.choice([8, 12, 16]))
    # The anatomy has a stream of its own, so the text's draws do not shift with the generator's.
    pixels = GENERATORS[modality](np.random.default_rng([seed, 1]), height, width, bits)
    if pixels.ndim == 2 and rng.random() < 0.2:
        pixels = as_bgr(pixels)
    name = NAMES[int(rng.integers(len(NAMES)))]
    blocks = [
        (name, f"ID {rng.integers(10000, 99999)}"),
        (f"DOB {rng.integers(1930, 2010)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}",),
        (f"{name.split()[-1]} ACC{rng.integers(100000, 999999)}",),
    ]
    places = [str(place) for place in rng.permutation(BORDER_PLACES)]
    inks = GREY_INKS + (COLOUR_INKS if pixels.ndim == 3 else ())
    burns = []
    for index, lines in enumerate(blocks[: int(rng.integers(1, 4))]):
        faint = rng.random() < 0.25
        contrast = int(rng.choice([-1, 1]) * rng.integers(25, 45)) if faint else None
        # In this order: the draws make the scenes of the seeds measured so far.
        ink, font, size = str(rng.choice(inks)), str(rng.choice(FONTS)), int(rng.integers(MIN_SIZE_PX, MAX_SIZE_PX))
        burn = Burn(lines, places[index], ink, font, size, contrast=contrast, turn=int(rng.choice([0, 0, 0, 0, 1, 3])))
        burns.append(_fitted(burn, height, width))
    boxes = [burn_in(pixels, burn, WHITE[bits]) for burn in burns]
    return Scene(modality, pixels, burns, boxes)


def _fitted(burn: Burn, height: int, width: int) -> Burn:
    """`burn`, its letters made smaller until it fits its image with its margin (a capital height) all round: a long
    line turned to run down a small image does not fit at every size drawn (seed 9016)."""
    while burn.size > MIN_SIZE_PX:
        rows, columns = burn.coverage().shape
        if rows + 2 * burn.size <= height and columns + 2 * burn.size <= width:
            break
        burn = replace(burn, size=burn.size - 1)
    return burn


def measure_image(detector: TextDetector, seed: int, modality: str) -> dict[str, Any]:
    image = scene(seed, modality)
    redact = detector.find(image.pixels).redact
    after = blur_text_regions(image.pixels, redact)
    groups = [attacker_views(pixels, box, burn) for burn, box in zip(image.burns, image.boxes, strict=True)
              for pixels in (after, image.pixels)]
    read = tokens_read(groups, [line for burn in image.burns for line in burn.lines])
    redacted = np.zeros(image.pixels.shape[:2], bool)
    for x, y, width, height in redact:
        redacted[y : y + height, x : x + width] = True
    blocks = []
    for burn, box, leaked, before in zip(image.burns, image.boxes, read[::2], read[1::2], strict=True):
        readable = bool(before & patient_tokens(burn.lines))
        x, y, width, height = box
        ink = burn.coverage() >= INK_COVERAGE
        blocks.append({"readable": readable, "leaked": readable and bool(leaked), "ink": burn.ink,
                       "faint": burn.contrast is not None, "turn": burn.turn, "size": burn.size, "font": burn.font,
                       "ink_redacted": float(redacted[y : y + height, x : x + width][ink].mean())})
    away = away_from_text(image.pixels.shape, image.burns, image.boxes)
    same = image.pixels == after
    kept = float((same.all(axis=2) if same.ndim == 3 else same)[away].mean())
    return {"seed": seed, "modality": modality, "shape": list(image.pixels.shape), "kept": kept, "blocks": blocks}


def summary(images: list[dict[str, Any]]) -> dict[str, Any]:
    blocks = [block for image in images for block in image["blocks"]]
    return {
        "images": len(images),
        "blocks_readable": sum(block["readable"] for block in blocks),
        "blocks_leaked": sum(block["leaked"] for block in blocks),
        "blocks_partly_redacted": sum(block["readable"] and block["ink_redacted"] < FULLY_REDACTED for block in blocks),
        "images_leaking": sum(any(block["leaked"] for block in image["blocks"]) for image in images),
        "kept_median": statistics.median(image["kept"] for image in images),
        "kept_min": min(image["kept"] for image in images),
    }


def measure(count: int = IMAGES, base_seed: int = BASE_SEED, *, verbose: bool = False) -> dict[str, Any]:
    cv2.setNumThreads(1)  # as a worker runs it
    # Tesseract's own threads (the oracle runs several Tesseracts at once) would only fight over the cores.
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    detector = TextDetector.load(text_models_dir(ModelCacheSettings().model_cache_dir))
    images = []
    for index in range(count):
        modality = MODALITIES[index % len(MODALITIES)]
        images.append(measure_image(detector, base_seed + index, modality))
        if verbose:
            image = images[-1]
            leaks = [f"{block['ink']}{' faint' if block['faint'] else ''} {block['font']} {block['size']} px "
                     f"turn {block['turn']}" for block in image["blocks"] if block["leaked"]]  # fmt: skip
            print(f"seed {image['seed']} {modality} {image['shape']}: kept {image['kept']:.3f}"
                  + (f", LEAKED: {'; '.join(leaks)}" if leaks else ""), file=sys.stderr, flush=True)
    by_modality = {name: summary([image for image in images if image["modality"] == name])
                   for name in MODALITIES if any(image["modality"] == name for image in images)}
    return {"base_seed": base_seed, "modalities": by_modality, "all": summary(images), "per_image": images}


def print_row(row: dict[str, Any]) -> None:
    print(f"Privacy on unseen images (seeds {row['base_seed']}+; OCR oracle before and after redaction):")
    print(f"  {'modality':<12}{'images':>7}{'blocks read':>13}{'leaked':>8}{'images leaking':>16}"
          f"{'partly redacted':>17}{'kept (median, min)':>21}")  # fmt: skip
    for name, figures in [*row["modalities"].items(), ("all", row["all"])]:
        print(f"  {name:<12}{figures['images']:>7}{figures['blocks_readable']:>13}{figures['blocks_leaked']:>8}"
              f"{figures['images_leaking']:>16}{figures['blocks_partly_redacted']:>17}"
              f"{figures['kept_median']:>13.3f}, {figures['kept_min']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_IMAGES} images, not {IMAGES}")
    parser.add_argument("--images", type=int, help=f"how many images (default {IMAGES})")
    parser.add_argument("--seed", type=int, default=BASE_SEED, help=f"the first image's seed (default {BASE_SEED})")
    parser.add_argument("--json", action="store_true", help="print the row as JSON")
    parser.add_argument("--verbose", action="store_true", help="one line per image on stderr, with what leaked")
    args = parser.parse_args(argv)
    count = args.images if args.images is not None else (QUICK_IMAGES if args.quick else IMAGES)
    if count < 1:
        parser.error("--images must be at least 1")
    row = measure(count, args.seed, verbose=args.verbose)
    print(json.dumps(row)) if args.json else print_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
