"""The DICOM row of `make bench`: what reading and writing DICOM costs over the JPEG path, per 2-megapixel CR.

The same chest X-ray (a validation image of the default model, resized to about 2 megapixels) goes through the
worker's whole analysis (`analyze_batch`: decode, display rendering, text search, stamp, de-identification and
both outputs; a no-op model, so only the work around the model is counted) three ways: as a JPEG (the baseline),
as an uncompressed 12-bit CR DICOM, and compressed losslessly as RLE, JPEG-LS and JPEG 2000 (both outputs are
written in the source's syntax, so each is decoded once and encoded twice); and the JPEG-LS and JPEG 2000 sources
again with DICOM_OUTPUT_SYNTAX=rle (outputs written as RLE). CPU ms per image are process CPU time, medians of
repeats, and the DICOM figures are reported as differences from the JPEG baseline of the same run, by stage, with
the size of the outputs (kB, the mean of the two) beside the source's.

`.venv/bin/python bench/dicom.py [--repeats N]` prints the row; `bench/run.py` includes it in its results.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.engine.analysis import analyze_batch  # noqa: E402
from service.engine.messages import AnalysisRequest, ImageLimits  # noqa: E402
from service.imaging.detection import TextDetector  # noqa: E402
from service.models.fetch import default_model_dir, text_models_dir, validation_images  # noqa: E402
from service.models.spec import ModelSpec  # noqa: E402
from service.settings import ModelCacheSettings  # noqa: E402

CACHE_DIR = ModelCacheSettings().model_cache_dir
MODEL_DIR = default_model_dir(CACHE_DIR)
#: 1760 x 1140: about 2.0 megapixels, a common CR detector size.
SIZE = (1760, 1140)
LIMITS = ImageLimits(max_bytes=10**9, max_pixels=10**9)
KEY = b"bench-pseudonym-key-0123456789abcdef"
#: The DICOM sources: (name in the results, transfer syntax, DICOM_OUTPUT_SYNTAX, label in the table).
SYNTAXES = (
    ("explicit", ExplicitVRLittleEndian, "source", "DICOM explicit VR"),
    ("rle", RLELossless, "source", "DICOM RLE"),
    ("jpegls", JPEGLSLossless, "source", "DICOM JPEG-LS"),
    ("j2k", JPEG2000Lossless, "source", "DICOM JPEG 2000"),
    ("jpegls_as_rle", JPEGLSLossless, "rle", "JPEG-LS -> RLE"),
    ("j2k_as_rle", JPEG2000Lossless, "rle", "JPEG 2000 -> RLE"),
)


def chest_pixels() -> np.ndarray:
    source = sorted(validation_images(CACHE_DIR).glob("*.jpeg"))[0]
    return cv2.resize(cv2.imread(str(source), cv2.IMREAD_GRAYSCALE), SIZE, interpolation=cv2.INTER_AREA)


def as_dicom(pixels: np.ndarray, transfer_syntax: str) -> bytes:
    """A CR as a modality writes it: 12 bits stored, a window, MONOCHROME2, a realistic header."""
    stored = (pixels.astype(np.uint16) << 4) | (pixels.astype(np.uint16) >> 4)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^PATIENT", "BENCH-0001", "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "101010", "ACC0001", "S1"
    ds.InstitutionName, ds.ReferringPhysicianName, ds.StationName = "Bench Hospital", "REFERRER^A", "CR01"
    ds.StudyDescription, ds.SeriesDescription = "XR CHEST PA", "PA"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.set_pixel_data(stored, "MONOCHROME2", 12, generate_instance_uid=False)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def cpu_ms(data: bytes, spec: ModelSpec, repeats: int, output_syntax: str = "source") -> dict[str, float]:
    """Median process CPU ms of one image's analysis, and of each stage the worker times; and the kB of the source
    and of its outputs (the mean of the two)."""
    totals, stages = [], {}
    request = AnalysisRequest(data, anonymize_always=True, deid_key=KEY, dicom_output_syntax=output_syntax)
    detector = TextDetector.load(text_models_dir(ModelCacheSettings().model_cache_dir))
    for _ in range(repeats + 1):  # the first run warms caches and imports
        started = time.process_time()
        [analysis] = analyze_batch([request], spec=spec, predict=lambda batch: np.zeros((len(batch), 2)),
                                   limits=LIMITS, detector=detector)
        totals.append((time.process_time() - started) * 1000)
        if isinstance(analysis, Exception):
            raise analysis
        for stage, seconds in analysis.timings.items():
            stages.setdefault(stage, []).append(seconds * 1000)
    outputs = len(analysis.stamped) + len(analysis.anonymized or b"")
    sizes = {"source_kb": len(data) / 1000, "output_kb": outputs / 2000}
    return {"total": statistics.median(totals[1:])} | sizes | {
        stage: statistics.median(values[1:]) for stage, values in stages.items() if stage != "infer"
    }


def measure(repeats: int = 15) -> dict[str, Any]:
    spec = ModelSpec.parse((ROOT / "service/models/default/pneumonia.yaml").read_text(), source="pneumonia.yaml")
    pixels = chest_pixels()
    ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    baseline = cpu_ms(jpeg.tobytes(), spec, repeats)
    row: dict[str, Any] = {"megapixels": pixels.size / 1e6, "jpeg_cpu_ms": baseline}
    for name, syntax, output_syntax, _ in SYNTAXES:
        figures = cpu_ms(as_dicom(pixels, syntax), spec, repeats, output_syntax)
        row[f"dicom_{name}_cpu_ms"] = figures
        row[f"dicom_{name}_extra_cpu_ms"] = figures["total"] - baseline["total"]
    return row


def print_row(row: dict[str, Any]) -> None:
    print(f"DICOM, {row['megapixels']:.1f} MP CR, CPU ms per image around the model (medians):")
    print(f"  {'':<20}{'total':>8}{'decode':>8}{'detect':>8}{'stamp':>8}{'anonymize':>10}{'over JPEG':>11}"
          f"{'kB in':>8}{'kB out':>8}")
    for name, label in (("jpeg", "JPEG (baseline)"), *((f"dicom_{name}", label) for name, *_, label in SYNTAXES)):
        if f"{name}_cpu_ms" not in row:  # a row from before the syntax was measured
            continue
        figures = row[f"{name}_cpu_ms"]
        extra = row.get(f"{name}_extra_cpu_ms")
        print(f"  {label:<20}{figures['total']:8.1f}{figures.get('decode', 0):8.1f}{figures.get('detect', 0):8.1f}"
              f"{figures.get('stamp', 0):8.1f}"
              f"{figures.get('anonymize', 0):10.1f}{'' if extra is None else f'{extra:+11.1f}'}"
              f"{figures.get('source_kb', 0):8.0f}{figures.get('output_kb', 0):8.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true", help="print the row as JSON")
    args = parser.parse_args(argv)
    row = measure(args.repeats)
    print(json.dumps(row)) if args.json else print_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
