"""Realistic synthetic DICOM objects for the tests, built at test time with pydicom and numpy (nothing downloaded).

It owns a fake patient and study, the header a modality writes (with PHI where real data hides it: nested
sequences, private blocks, free-text descriptions), plausible anatomy for the pixels, burned-in text, and encoding
to each transfer syntax the pipeline must read.
"""

from __future__ import annotations

import datetime
import inspect
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import pydicom
from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.valuerep import DSfloat

from service.imaging.patient_text import burn_patient_text

PRIVATE_CREATOR = "ACME 1.0"
MANUFACTURER = "ACME Medical Systems"
#: Device identity (PS3.15 option 113109 keeps it; the basic profile removes it).
STATION_NAME = "STEXH-RAD03"
DEVICE_SERIAL = "SN-88213-4471"
ISSUER_OF_PATIENT_ID = "STEXH-HIS"

SOP_CLASSES = {
    "CR": uids.ComputedRadiographyImageStorage,
    "DX": uids.DigitalXRayImageStorageForPresentation,
    "CT": uids.CTImageStorage,
    "MR": uids.MRImageStorage,
    "US": uids.UltrasoundImageStorage,
    "PT": uids.PositronEmissionTomographyImageStorage,
}
UNCOMPRESSED = (uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian, uids.DeflatedExplicitVRLittleEndian)
#: Compressed syntaxes encoded by a pydicom encoder plugin, pinned so the output does not depend on which of
#: several installed plugins pydicom would pick first.
_PYDICOM_ENCODERS = {
    uids.RLELossless: "pydicom",
    uids.JPEGLSLossless: "pyjpegls",
    uids.JPEG2000Lossless: "pylibjpeg",
}
TRANSFER_SYNTAXES = (*UNCOMPRESSED, *_PYDICOM_ENCODERS, uids.JPEGLosslessSV1, uids.JPEGBaseline8Bit)
_COLOUR = ("RGB", "YBR_FULL")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_CT_RESCALE = (1.0, -1024.0)
#: Stored value written outside a CT's circular field of view (as Siemens and GE scanners do).
_CT_PADDING = -2000


@dataclass(frozen=True)
class Patient:
    name: str = "DOE^JANE^MARIE"  # PN
    patient_id: str = "PID-4471-0815"
    birth_date: str = "19610412"
    sex: str = "F"
    address: str = "12 Example Street, Springfield 12345"
    phone: str = "+1 555 0100 321"
    #: Written to OtherPatientIDs and OtherPatientIDsSequence (an MRN from another issuer).
    other_patient_id: str = "MRN-0815-4471"
    #: Written to OtherPatientNames (a birth name).
    other_names: str = "ROE^JANE^MARIE"

    @property
    def name_text(self) -> str:
        """The name as free text carries it ("DOE JANE"): family and given name, without the carets."""
        return " ".join(part for part in self.name.split("^")[:2] if part)


@dataclass(frozen=True)
class Study:
    study_uid: str  # generated once per study (pydicom.uid.generate_uid())
    accession: str = "ACC20240412001"
    study_date: str = "20240412"
    study_time: str = "093015"
    description: str = "XR CHEST PA for DOE JANE"  # free text carrying the name, as real data does
    study_id: str = "STX-240412-77"
    institution: str = "St. Example Hospital"
    institution_address: str = "1 Hospital Road, Springfield 12345"
    referring_physician: str = "HOUSE^GREGORY^^DR"
    performing_physician: str = "CHASE^ROBERT"
    reading_physician: str = "CUDDY^LISA^^DR"
    operator: str = "TECHNO^TERRY"
    requested_procedure_id: str = "RP-240412-0815"
    scheduled_step_id: str = "SPS-240412-0815"


def new_study(**overrides: Any) -> Study:
    """A study with a fresh StudyInstanceUID (unless `study_uid` is among the overrides)."""
    return Study(**{"study_uid": uids.generate_uid(), **overrides})


# -- values derived from the study, so that phi_values() can list them --------------------------------------


def _later(study: Study, seconds: int) -> str:
    start = datetime.datetime.strptime(study.study_date + study.study_time[:6], "%Y%m%d%H%M%S")
    return (start + datetime.timedelta(seconds=seconds)).strftime("%H%M%S")


def _series_time(study: Study) -> str:
    return _later(study, 47)


def _acquisition_time(study: Study) -> str:
    return _later(study, 62)


def _content_time(study: Study) -> str:
    return _later(study, 79)


def _derived_uid(study: Study, label: str) -> str:
    # Deterministic per study: the same study always references the same prior image, and tests can list it.
    return uids.generate_uid(entropy_srcs=[study.study_uid, label])


def _image_comments(patient: Patient) -> str:
    return f"Prelim read requested for {patient.name_text}, ID {patient.patient_id}"


def _requested_procedure_description(patient: Patient) -> str:
    return f"CHEST 2 VIEWS {patient.name_text}"


def _patient_age(patient: Patient, study: Study) -> str | None:
    try:
        born = datetime.datetime.strptime(patient.birth_date, "%Y%m%d").date()
        seen = datetime.datetime.strptime(study.study_date, "%Y%m%d").date()
    except ValueError:
        return None
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return f"{max(years, 0):03d}Y"


def phi_values(patient: Patient, *, study: Study) -> list[str]:
    """Every identifying string the factory wrote into headers (names, IDs, dates, times, UIDs, institution,
    physicians, addresses, accession, descriptions carrying the name, private-tag values...), for byte-level
    leak checks. Excludes values too short/common to search for (< 6 characters).

    All of them are in a default `make_dicom` object; `phi_in_sequences=False`, `private_tags=False` and the
    SR/PR of `make_no_pixels` carry a subset. Not listed: the series, SOP instance and frame of reference UIDs,
    which are new per call (read them from the data set). Values are text: encode them with the object's
    character set (ASCII for the default patient), or use `leaked_phi`, which also looks inside deflated data sets.
    """
    candidates = [
        patient.name,
        patient.name_text,
        patient.patient_id,
        patient.other_patient_id,
        patient.other_names,
        patient.birth_date,
        patient.address,
        patient.phone,
        study.study_uid,
        study.accession,
        study.study_id,
        study.study_date,
        study.study_time,
        _series_time(study),
        _acquisition_time(study),
        _content_time(study),
        study.study_date + _acquisition_time(study),
        study.description,
        study.institution,
        study.institution_address,
        study.referring_physician,
        study.performing_physician,
        study.reading_physician,
        study.operator,
        study.requested_procedure_id,
        study.scheduled_step_id,
        STATION_NAME,
        DEVICE_SERIAL,
        _derived_uid(study, "referenced-image"),
        _image_comments(patient),
        _requested_procedure_description(patient),
    ]
    return [value for value in dict.fromkeys(candidates) if len(value) >= 6]


def searchable_bytes(data: bytes) -> bytes:
    """`data` with a deflated data set inflated, so a byte search sees what a reader sees; other data unchanged."""
    if data[128:132] != b"DICM" or uids.DeflatedExplicitVRLittleEndian.encode() not in data[:1024]:
        return data
    # (0002,0000) UL group length: tag (4), VR (2), length (2), value (4) right after "DICM".
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    return data[:meta_end] + zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)


def leaked_phi(data: bytes, patient: Patient, *, study: Study) -> list[str]:
    """The `phi_values` found in `data` (UTF-8 or Latin-1 encoded, deflated data sets inflated first)."""
    haystack = searchable_bytes(data)
    found = []
    for value in phi_values(patient, study=study):
        encodings = {value.encode("utf-8")} | ({value.encode("latin-1")} if _latin1(value) else set())
        if any(encoded in haystack for encoded in encodings):
            found.append(value)
    return found


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


# -- synthetic anatomy ---------------------------------------------------------------------------------------


def synthetic_anatomy(
    modality: str, rows: int, columns: int, *, bits_stored: int, signed: bool, rgb: bool, seed: int
) -> np.ndarray:
    """Plausible stored values: a chest-like radiograph (bright mediastinum, dark lungs, ribs, film grain) for CR/DX; a
    CT slice in HU (air -1000, soft tissue 40, bone 700+, body ellipse) stored with the rescale; an MR-like slice; a
    US-like fan; a PET-like hot-spot RGB image (for RGB). Deterministic for a seed.

    One frame, shaped (rows, columns) or (rows, columns, 3), in MONOCHROME2 sense (bright = high). A CT is stored
    with the default rescale (1, -1024) and, when signed, padded with -2000 outside the field of view. RGB is a
    colour-Doppler fan for US, a hot-colour-mapped PET for PT, and the gray anatomy in three channels (a screen
    capture) otherwise.
    """
    return _anatomy(modality, rows, columns, bits_stored=bits_stored, signed=signed, rgb=rgb, seed=seed, frame=0)


def _anatomy(
    modality: str,
    rows: int,
    columns: int,
    *,
    bits_stored: int,
    signed: bool,
    rgb: bool,
    seed: int,
    frame: int,
    rescale: tuple[float, float] = _CT_RESCALE,
) -> np.ndarray:
    rng = np.random.default_rng([seed, frame])
    dtype = _dtype(bits_stored, signed)
    low, high = _stored_range(bits_stored, signed)
    if modality == "CT" and not rgb:
        hu, inside_fov = _ct_hu(rows, columns, rng, frame)
        slope, intercept = rescale
        stored = np.rint((hu - intercept) / slope)
        stored[~inside_fov] = _CT_PADDING if signed else 0
        return np.clip(stored, low, high).astype(dtype)
    if modality == "US":
        image = _us_fan(rows, columns, rng)
        image = _with_doppler(image, rows, columns, rng) if rgb else image
    elif modality == "PT":
        image = _pet(rows, columns, rng)
        if rgb:
            hot = cv2.applyColorMap(np.rint(image * 255).astype(np.uint8), cv2.COLORMAP_HOT)
            image = cv2.cvtColor(hot, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    elif modality == "MR":
        image = _mr_slice(rows, columns, rng)
    elif modality == "CT":  # an RGB screen capture of a CT, in a mediastinal window
        hu, _ = _ct_hu(rows, columns, rng, frame)
        image = np.clip((hu - (40 - 200)) / 400, 0, 1)
    else:
        image = _chest_radiograph(rows, columns, rng)
    if rgb and image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.rint(low + np.clip(image, 0, 1) * (high - low)).astype(dtype)


def _dtype(bits_stored: int, signed: bool) -> np.dtype:
    return np.dtype(("i" if signed else "u") + ("1" if bits_stored <= 8 else "2"))


def _stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def _at(columns: int, rows: int, x: float, y: float) -> tuple[int, int]:
    """A point given as fractions of the image's width and height, in pixels."""
    return round(x * columns), round(y * rows)


def _axes(columns: int, rows: int, a: float, b: float) -> tuple[int, int]:
    return max(1, round(a * columns)), max(1, round(b * rows))


def _chest_radiograph(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """A PA chest radiograph, 0..1 with bright = attenuating; the corners stay dark (direct exposure)."""
    dx, dy = rng.uniform(-0.02, 0.02, size=2)
    image = np.full((rows, columns), 0.06, np.float32)
    torso = np.zeros_like(image)
    cv2.ellipse(torso, _at(columns, rows, 0.5 + dx, 0.66 + dy), _axes(columns, rows, 0.40, 0.56), 0, 0, 360, 1, -1)
    image = np.where(torso > 0, 0.52, image)
    lungs = np.zeros_like(image)
    for side in (-1, 1):
        centre = _at(columns, rows, 0.5 + dx + side * 0.16, 0.50 + dy)
        cv2.ellipse(lungs, centre, _axes(columns, rows, 0.12, 0.27), side * 4, 0, 360, 1, -1)
    ribs, vessels = np.zeros_like(image), np.zeros_like(image)
    thickness = max(1, round(rows / 90))
    for side in (-1, 1):
        arc = (270, 360) if side > 0 else (180, 270)  # from the spine, out and down to the chest wall
        for index in range(10):
            centre = _at(columns, rows, 0.5 + dx + side * 0.02, 0.30 + dy + index * 0.052)
            cv2.ellipse(ribs, centre, _axes(columns, rows, 0.31, 0.09), 0, *arc, 1, thickness)
            centre = _at(columns, rows, 0.5 + dx + side * 0.30, 0.27 + dy + index * 0.05)  # fainter anterior ribs
            cv2.ellipse(ribs, centre, _axes(columns, rows, 0.26, 0.07), 0, *(arc[::-1] if side < 0 else arc), 0.5,
                        thickness)
        hilum = (0.5 + dx + side * 0.09, 0.47 + dy)
        for _ in range(14):  # vessel markings fanning out from the hilum
            angle, length = rng.uniform(-2.4, 2.4) * side, rng.uniform(0.08, 0.2)
            end = (hilum[0] + side * abs(np.sin(angle)) * length, hilum[1] - np.cos(angle) * length)
            cv2.line(vessels, _at(columns, rows, *hilum), _at(columns, rows, *end), 1, thickness)
        start, end = _at(columns, rows, 0.5 + side * 0.04, 0.21 + dy), _at(columns, rows, 0.5 + side * 0.30, 0.15)
        cv2.line(ribs, start, end, 1.4, 2 * thickness)  # clavicles
    image = np.where(lungs > 0, 0.20 + 0.07 * vessels, image)
    image += 0.12 * np.minimum(ribs, 1.4) * (torso > 0)
    # Mediastinum and spine over the midline, the heart bulging to the patient's left (the image's right).
    cv2.rectangle(image, _at(columns, rows, 0.45 + dx, 0.18), _at(columns, rows, 0.55 + dx, 0.96), 0.74, -1)
    cv2.ellipse(image, _at(columns, rows, 0.55 + dx, 0.64 + dy), _axes(columns, rows, 0.13, 0.11), 0, 0, 360, 0.7, -1)
    cv2.ellipse(image, _at(columns, rows, 0.5 + dx, 0.92), _axes(columns, rows, 0.36, 0.16), 0, 180, 360, 0.62, -1)
    image = cv2.GaussianBlur(image, (0, 0), max(0.8, rows / 200))
    heel = np.linspace(0.03, -0.03, columns, dtype=np.float32)[None, :]  # the anode heel effect
    grain = rng.normal(0, 0.012, image.shape).astype(np.float32)
    return np.clip(image + heel * (image > 0.1) + grain, 0, 1)


def _ct_hu(rows: int, columns: int, rng: np.random.Generator, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """An axial chest CT slice in HU and the mask of its circular field of view."""
    dx, dy = rng.uniform(-0.015, 0.015, size=2)
    lung_scale = 1 + 0.04 * frame  # the lungs grow slice by slice towards the base
    hu = np.full((rows, columns), -1000, np.float32)
    cv2.ellipse(hu, _at(columns, rows, 0.5 + dx, 0.52 + dy), _axes(columns, rows, 0.42, 0.31), 0, 0, 360, -100, -1)
    cv2.ellipse(hu, _at(columns, rows, 0.5 + dx, 0.52 + dy), _axes(columns, rows, 0.39, 0.28), 0, 0, 360, 40, -1)
    for side in (-1, 1):
        centre = _at(columns, rows, 0.5 + dx + side * 0.17, 0.49 + dy)
        cv2.ellipse(hu, centre, _axes(columns, rows, 0.13 * lung_scale, 0.19), 0, 0, 360, -860, -1)
        for _ in range(14):  # vessels
            x = 0.5 + dx + side * 0.17 + rng.uniform(-0.09, 0.09)
            y = 0.49 + dy + rng.uniform(-0.14, 0.14)
            radius = max(1, round(rng.uniform(0.003, 0.008) * columns))
            cv2.circle(hu, _at(columns, rows, x, y), radius, float(rng.uniform(-80, 60)), -1)
    cv2.ellipse(hu, _at(columns, rows, 0.53 + dx, 0.52 + dy), _axes(columns, rows, 0.10, 0.11), 0, 0, 360, 45, -1)
    cv2.circle(hu, _at(columns, rows, 0.5 + dx, 0.38 + dy), max(1, round(0.03 * columns)), 180, -1)  # aorta
    vertebra = _at(columns, rows, 0.5 + dx, 0.73 + dy)
    cv2.circle(hu, vertebra, max(1, round(0.05 * columns)), 900, -1)
    cv2.circle(hu, vertebra, max(1, round(0.04 * columns)), 260, -1)
    start, end = _at(columns, rows, 0.5 + dx, 0.78 + dy), _at(columns, rows, 0.5 + dx, 0.82 + dy)
    cv2.line(hu, start, end, 800, max(1, round(0.015 * columns)))
    for angle in np.linspace(0.5, 2 * np.pi - 0.5, 16):  # ribs in cross-section along the chest wall
        x, y = 0.5 + dx + 0.36 * np.sin(angle), 0.52 + dy - 0.255 * np.cos(angle)
        cv2.ellipse(hu, _at(columns, rows, x, y), _axes(columns, rows, 0.012, 0.008), 0, 0, 360, 750, -1)
    cv2.line(hu, _at(columns, rows, 0.15, 0.88), _at(columns, rows, 0.85, 0.88), 150, max(1, round(rows / 100)))
    hu = cv2.GaussianBlur(hu, (0, 0), 0.7) + rng.normal(0, 12, hu.shape).astype(np.float32)
    y, x = np.ogrid[:rows, :columns]
    inside = ((y - (rows - 1) / 2) / (rows / 2)) ** 2 + ((x - (columns - 1) / 2) / (columns / 2)) ** 2 <= 1
    return hu, inside


def _mr_slice(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """A T1-like axial brain slice, 0..1, with Rician background noise."""
    dx, dy = rng.uniform(-0.02, 0.02, size=2)
    image = np.zeros((rows, columns), np.float32)
    centre = _at(columns, rows, 0.5 + dx, 0.5 + dy)
    cv2.ellipse(image, centre, _axes(columns, rows, 0.36, 0.44), 0, 0, 360, 0.85, -1)  # scalp fat
    cv2.ellipse(image, centre, _axes(columns, rows, 0.34, 0.42), 0, 0, 360, 0.08, -1)  # skull
    cv2.ellipse(image, centre, _axes(columns, rows, 0.32, 0.40), 0, 0, 360, 0.50, -1)  # gray matter
    cv2.ellipse(image, centre, _axes(columns, rows, 0.26, 0.34), 0, 0, 360, 0.68, -1)  # white matter
    for side in (-1, 1):
        ventricle = _at(columns, rows, 0.5 + dx + side * 0.05, 0.47 + dy)
        cv2.ellipse(image, ventricle, _axes(columns, rows, 0.03, 0.11), side * 12, 0, 360, 0.15, -1)
    image = cv2.GaussianBlur(image, (0, 0), max(0.8, rows / 250)) * 0.8
    real = image + rng.normal(0, 0.02, image.shape)
    imaginary = rng.normal(0, 0.02, image.shape)
    return np.clip(np.hypot(real, imaginary), 0, 1).astype(np.float32)


def _us_fan(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """A sector scan: speckle inside a fan from the top centre, a dark cyst, attenuation with depth."""
    y, x = np.ogrid[:rows, :columns]
    apex_x, apex_y = columns / 2, rows * 0.04
    depth = np.hypot(x - apex_x, y - apex_y) / rows
    angle = np.arctan2(x - apex_x, y - apex_y)
    fan = (np.abs(angle) < np.radians(35)) & (depth > 0.06) & (depth < 0.92)
    echo = np.full((rows, columns), 0.45, np.float32)
    for band in rng.uniform(0.15, 0.8, size=3):  # tissue interfaces
        echo[np.abs(depth - band) < 0.01] = 0.95
    cv2.ellipse(echo, _at(columns, rows, 0.5 + rng.uniform(-0.05, 0.05), 0.55), _axes(columns, rows, 0.08, 0.06),
                0, 0, 360, 0.04, -1)
    speckle = rng.rayleigh(0.6, (rows, columns)).astype(np.float32)
    image = cv2.GaussianBlur(echo * speckle, (0, 0), 0.8) * np.exp(-1.1 * depth).astype(np.float32)
    return np.where(fan, np.clip(image, 0, 1), 0).astype(np.float32)


def _with_doppler(gray: np.ndarray, rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """The fan in three channels with a colour-Doppler flow: red towards the probe, blue away."""
    image = np.repeat(gray[:, :, None], 3, axis=2)
    y, x = np.ogrid[:rows, :columns]
    vessel = np.abs((y / rows - 0.42) - 0.3 * (x / columns - 0.5)) < 0.025
    box = (np.abs(x / columns - 0.5) < 0.15) & (np.abs(y / rows - 0.42) < 0.12) & (gray > 0)
    flow = vessel & box
    towards = flow & (x < columns * (0.5 + rng.uniform(-0.05, 0.05)))
    image[towards] = (0.9, 0.1, 0.05)
    image[flow & ~towards] = (0.05, 0.25, 0.95)
    return image


def _pet(rows: int, columns: int, rng: np.random.Generator) -> np.ndarray:
    """A PET chest slice: faint body, cold lungs, a hot myocardium, liver, and two lesions; Poisson noise."""
    dx, dy = rng.uniform(-0.02, 0.02, size=2)
    image = np.zeros((rows, columns), np.float32)
    cv2.ellipse(image, _at(columns, rows, 0.5 + dx, 0.52 + dy), _axes(columns, rows, 0.40, 0.30), 0, 0, 360, 0.1, -1)
    for side in (-1, 1):
        lung = _at(columns, rows, 0.5 + dx + side * 0.17, 0.49 + dy)
        cv2.ellipse(image, lung, _axes(columns, rows, 0.13, 0.19), 0, 0, 360, 0.03, -1)
    heart = _at(columns, rows, 0.55 + dx, 0.52 + dy)
    cv2.ellipse(image, heart, _axes(columns, rows, 0.08, 0.08), 0, 0, 360, 0.7, max(1, round(0.03 * columns)))
    cv2.ellipse(image, _at(columns, rows, 0.4 + dx, 0.8), _axes(columns, rows, 0.16, 0.06), 0, 0, 360, 0.3, -1)
    y, x = np.ogrid[:rows, :columns]
    for _ in range(2):
        cx, cy = rng.uniform(0.3, 0.7) * columns, rng.uniform(0.35, 0.6) * rows
        sigma = 0.02 * columns
        image += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)).astype(np.float32)
    image = cv2.GaussianBlur(image, (0, 0), max(1.0, rows / 128))
    counts = rng.poisson(np.clip(image, 0, 1) * 300) / 300
    return np.clip(counts, 0, 1).astype(np.float32)


# -- the object ----------------------------------------------------------------------------------------------


def make_dicom(
    *,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    rows: int = 512,
    columns: int = 512,
    frames: int = 1,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    transfer_syntax: str = uids.ExplicitVRLittleEndian,
    window: tuple[float, float] | Literal["auto"] | None = "auto",
    rescale: tuple[float, float] | None = None,
    burned_in: Sequence[str] = (),
    patient: Patient = Patient(),  # frozen, so one shared default is safe
    study: Study | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    phi_in_sequences: bool = True,
    private_tags: bool = True,
    pixels: np.ndarray | None = None,
    seed: int = 0,
) -> bytes:
    """A complete Part 10 object (preamble, DICM, File Meta with the right TransferSyntaxUID, data set), as bytes.

    `pixels` are stored values shaped (frames, rows, columns[, 3]) (a single frame may drop the first axis); they
    override rows, columns and frames. `burned_in` lines are drawn top-left into every frame at the value that
    displays white. JPEG baseline needs unsigned 8 bits, and colour JPEG baseline is written YBR_FULL_422 (4:2:2, as
    the standard requires); YBR_FULL takes 8-bit data, in every other syntax. JPEG lossless SV1 is encoded by GDCM.
    """
    if photometric not in (*_MONOCHROME, *_COLOUR):
        raise ValueError(f"photometric must be one of {(*_MONOCHROME, *_COLOUR)}, not {photometric!r}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8..16, not {bits_stored}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}")
    if transfer_syntax == uids.JPEGBaseline8Bit and (bits_stored != 8 or signed):
        raise ValueError("JPEG baseline holds unsigned 8-bit samples only")
    if photometric == "YBR_FULL" and bits_stored != 8:
        raise ValueError("YBR_FULL is made for 8-bit data only")
    colour = photometric in _COLOUR
    study = study or new_study()
    rescale = rescale or (_CT_RESCALE if modality == "CT" else None)

    if pixels is None:
        stored = np.stack([
            _anatomy(modality, rows, columns, bits_stored=bits_stored, signed=signed, rgb=colour, seed=seed,
                     frame=index, rescale=rescale or _CT_RESCALE)
            for index in range(frames)
        ])
        if photometric == "MONOCHROME1":
            stored = _inverted(stored, bits_stored, signed)
    else:
        stored = _as_stored(pixels, colour=colour, bits_stored=bits_stored, signed=signed)
    if window == "auto":
        window = _auto_window(modality, stored, rescale) if not colour else None
    if photometric == "YBR_FULL" and pixels is None:
        stored = convert_color_space(stored, "RGB", "YBR_FULL")
    if burned_in:
        stored = np.stack([_burn(frame, burned_in, photometric, bits_stored, signed) for frame in stored])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = SOP_CLASSES.get(modality, uids.SecondaryCaptureImageStorage)
    if modality == "US" and len(stored) > 1:
        sop_class = uids.UltrasoundMultiFrameImageStorage
    _common_header(
        ds, modality=modality, sop_class=sop_class, patient=patient, study=study, series_uid=series_uid,
        sop_uid=sop_uid, body_part=body_part, phi_in_sequences=phi_in_sequences, private_tags=private_tags,
    )
    _image_header(ds, modality=modality, study=study, patient=patient, burned_in=bool(burned_in),
                  phi_in_sequences=phi_in_sequences, sop_class=sop_class, frames=len(stored))
    if rescale is not None:
        ds.RescaleIntercept = _ds(rescale[1])
        ds.RescaleSlope = _ds(rescale[0])
        ds.RescaleType = "HU" if modality == "CT" else "US"
    if window is not None:
        ds.WindowCenter = _ds(window[0])
        ds.WindowWidth = _ds(window[1])
    _set_pixels(ds, stored, photometric=photometric, bits_stored=bits_stored, transfer_syntax=transfer_syntax)
    if modality == "DX" and not colour:
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    return _part10(ds)


def make_no_pixels(kind: str = "SR", **like_make_dicom: Any) -> bytes:
    """A DICOM object without PixelData: a Basic Text SR (SOPClass 1.2.840.10008.5.1.4.1.1.88.11) with a ContentSequence
    holding the patient name, or kind="PR" a Grayscale Softcopy Presentation State; same patient/study headers.

    Takes `make_dicom`'s keywords: patient, study, series_uid, sop_uid, phi_in_sequences, private_tags and an
    uncompressed transfer_syntax shape the object; modality, body_part, rows, columns and window describe the image
    it refers to; the pixel-only ones are accepted and ignored.
    """
    unknown = set(like_make_dicom) - set(inspect.signature(make_dicom).parameters)
    if unknown:
        raise TypeError(f"make_no_pixels() got unexpected keyword arguments {sorted(unknown)}")
    if kind not in ("SR", "PR"):
        raise ValueError(f"kind must be 'SR' or 'PR', not {kind!r}")
    options = {**{name: p.default for name, p in inspect.signature(make_dicom).parameters.items()}, **like_make_dicom}
    if options["transfer_syntax"] not in UNCOMPRESSED:
        raise ValueError("an object without pixel data takes an uncompressed transfer syntax")
    patient: Patient = options["patient"]
    study: Study = options["study"] or new_study()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = options["transfer_syntax"]
    sop_class = uids.BasicTextSRStorage if kind == "SR" else uids.GrayscaleSoftcopyPresentationStateStorage
    _common_header(
        ds, modality=kind, sop_class=sop_class, patient=patient, study=study, series_uid=options["series_uid"],
        sop_uid=options["sop_uid"], body_part=options["body_part"], phi_in_sequences=options["phi_in_sequences"],
        private_tags=options["private_tags"],
    )
    image_series = _derived_uid(study, "referenced-series")
    image_class = SOP_CLASSES.get(options["modality"], uids.SecondaryCaptureImageStorage)
    referenced_uid = _derived_uid(study, "referenced-image")
    referenced = _item(ReferencedSOPClassUID=image_class, ReferencedSOPInstanceUID=referenced_uid)
    if kind == "SR":
        _sr_content(ds, patient=patient, study=study, image_series=image_series, referenced=referenced)
    else:
        window = options["window"]
        _pr_content(ds, patient=patient, study=study, image_series=image_series, referenced=referenced,
                    rows=options["rows"], columns=options["columns"],
                    window=window if isinstance(window, tuple) else (2048.0, 4096.0))
    return _part10(ds)


# -- header ----------------------------------------------------------------------------------------------------


def _item(**attributes: Any) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _code(value: str, scheme: str, meaning: str) -> DicomSequence:
    return DicomSequence([_item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)])


def _ds(value: float) -> DSfloat:
    return DSfloat(round(float(value), 4), auto_format=True)


def _charset(patient: Patient, study: Study) -> str:
    texts = [str(value) for value in (*vars(patient).values(), *vars(study).values())]
    return "ISO_IR 100" if all(_latin1(text) for text in texts) else "ISO_IR 192"


def _common_header(
    ds: Dataset,
    *,
    modality: str,
    sop_class: str,
    patient: Patient,
    study: Study,
    series_uid: str | None,
    sop_uid: str | None,
    body_part: str | None,
    phi_in_sequences: bool,
    private_tags: bool,
) -> None:
    """SOP common, patient, general study, series and equipment modules: what every object of the study carries."""
    sop_uid = sop_uid or uids.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    charset = _charset(patient, study)
    ds.SpecificCharacterSet = charset
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = _content_time(study)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = _series_time(study)
    ds.ContentTime = _content_time(study)
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = study.institution
    ds.InstitutionAddress = study.institution_address
    ds.ReferringPhysicianName = study.referring_physician
    ds.StationName = STATION_NAME
    ds.StudyDescription = study.description
    ds.SeriesDescription = " ".join(part for part in (body_part, "PA" if modality in ("CR", "DX") else "") if part)
    ds.InstitutionalDepartmentName = "Radiology"
    ds.PerformingPhysicianName = study.performing_physician
    ds.NameOfPhysiciansReadingStudy = study.reading_physician
    ds.OperatorsName = study.operator
    ds.ManufacturerModelName = f"ACME {modality} 3000"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = ISSUER_OF_PATIENT_ID
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.OtherPatientIDs = patient.other_patient_id
    ds.OtherPatientNames = patient.other_names
    if (age := _patient_age(patient, study)) is not None:
        ds.PatientAge = age
    ds.PatientAddress = patient.address
    ds.PatientTelephoneNumbers = patient.phone
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.DeviceSerialNumber = DEVICE_SERIAL
    ds.SoftwareVersions = "VA20A"
    ds.ProtocolName = " ".join(part for part in (modality, body_part) if part)
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid or uids.generate_uid()
    ds.StudyID = study.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if phi_in_sequences:
        _phi_sequences(ds, patient=patient, study=study)
    if private_tags:
        _private_blocks(ds, patient=patient, study=study, charset=charset)


def _phi_sequences(ds: Dataset, *, patient: Patient, study: Study) -> None:
    """PHI where a de-identifier that only looks at the top level misses it: nested one and two levels deep."""
    ds.RequestAttributesSequence = DicomSequence([
        _item(
            RequestedProcedureDescription=_requested_procedure_description(patient),
            RequestedProcedureID=study.requested_procedure_id,
            ScheduledProcedureStepID=study.scheduled_step_id,
            ScheduledProcedureStepDescription=study.description,
            AccessionNumber=study.accession,
            ReferencedStudySequence=DicomSequence([
                _item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",  # Detached Study Management (retired)
                      ReferencedSOPInstanceUID=study.study_uid),
            ]),
        )
    ])
    ds.OtherPatientIDsSequence = DicomSequence([
        _item(PatientID=patient.patient_id, IssuerOfPatientID=ISSUER_OF_PATIENT_ID, TypeOfPatientID="TEXT"),
        _item(
            PatientID=patient.other_patient_id,
            IssuerOfPatientID="REGIONAL-MPI",
            TypeOfPatientID="TEXT",
            IssuerOfPatientIDQualifiersSequence=DicomSequence([
                _item(AssigningFacilitySequence=DicomSequence([_item(LocalNamespaceEntityID=study.institution)])),
            ]),
        ),
    ])


def _private_blocks(ds: Dataset, *, patient: Patient, study: Study, charset: str) -> None:
    """A vendor's private groups with the name and ID as text, and a CSA-like binary header that also holds them."""
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "PN", patient.name)
    block.add_new(0x11, "LO", patient.patient_id)
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", f"{patient.name_text} {patient.patient_id}")
    encoding = "utf-8" if charset == "ISO_IR 192" else "latin-1"
    fields = {"PatientName": patient.name, "PatientID": patient.patient_id, "AccessionNumber": study.accession}
    blob = b"SV10\x04\x03\x02\x01" + b"".join(f"{key}={value}\0".encode(encoding) for key, value in fields.items())
    block.add_new(0x20, "OB", blob + b"\x00" * (len(blob) % 2))


def _image_header(
    ds: Dataset,
    *,
    modality: str,
    study: Study,
    patient: Patient,
    burned_in: bool,
    phi_in_sequences: bool,
    sop_class: str,
    frames: int,
) -> None:
    """General image and acquisition attributes, and a few of the modality's own."""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = _acquisition_time(study)
    ds.AcquisitionDateTime = study.study_date + _acquisition_time(study)
    ds.AcquisitionNumber = 1
    ds.ImageComments = _image_comments(patient)
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    if phi_in_sequences:
        ds.ReferencedImageSequence = DicomSequence([
            _item(ReferencedSOPClassUID=sop_class, ReferencedSOPInstanceUID=_derived_uid(study, "referenced-image"))
        ])
    if modality in ("CR", "DX"):
        ds.ViewPosition = "PA"
        ds.PatientOrientation = ["L", "F"]
        ds.ImagerPixelSpacing = [_ds(0.143), _ds(0.143)]
        ds.KVP = _ds(125)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    if modality in ("CT", "MR", "PT"):
        ds.FrameOfReferenceUID = uids.generate_uid()
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [_ds(-250), _ds(-250), _ds(-120)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [_ds(0.9765625), _ds(0.9765625)]
        ds.SliceThickness = _ds(1.0)
    if modality == "CT":
        ds.KVP = _ds(120)
        ds.ConvolutionKernel = "B30f"
    elif modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.MagneticFieldStrength = _ds(1.5)
        ds.EchoTime = _ds(12)
        ds.RepetitionTime = _ds(500)
    elif modality == "PT":
        ds.Units = "BQML"
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.CorrectedImage = ["ATTN", "DECY"]
        ds.DecayCorrection = "START"
    if frames > 1 and modality not in ("CT", "MR", "PT"):  # a cine loop; cross-sections have no frame time
        ds.FrameTime = _ds(33.3)
        ds.FrameIncrementPointer = Tag("FrameTime")


def _sr_content(ds: Dataset, *, patient: Patient, study: Study, image_series: str, referenced: Dataset) -> None:
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    ds.VerifyingObserverSequence = DicomSequence([
        _item(VerifyingObserverName=study.reading_physician, VerifyingOrganization=study.institution,
              VerificationDateTime=study.study_date + _content_time(study),
              VerifyingObserverIdentificationCodeSequence=DicomSequence()),
    ])
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([
        _item(StudyInstanceUID=study.study_uid, ReferencedSeriesSequence=DicomSequence([
            _item(SeriesInstanceUID=image_series, ReferencedSOPSequence=DicomSequence([referenced])),
        ])),
    ])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = _code("18748-4", "LN", "Diagnostic Imaging Report")
    ds.ContinuityOfContent = "SEPARATE"
    finding = _item(
        RelationshipType="CONTAINS", ValueType="TEXT", ConceptNameCodeSequence=_code("121071", "DCM", "Finding"),
        TextValue=f"{patient.name_text} ({patient.patient_id}): lungs clear, no acute cardiopulmonary process.",
    )
    ds.ContentSequence = DicomSequence([
        _item(RelationshipType="HAS OBS CONTEXT", ValueType="PNAME",
              ConceptNameCodeSequence=_code("121029", "DCM", "Subject Name"), PersonName=patient.name),
        _item(RelationshipType="HAS OBS CONTEXT", ValueType="TEXT",
              ConceptNameCodeSequence=_code("121030", "DCM", "Subject ID"), TextValue=patient.patient_id),
        _item(RelationshipType="CONTAINS", ValueType="CONTAINER", ContinuityOfContent="SEPARATE",
              ConceptNameCodeSequence=_code("121070", "DCM", "Findings"), ContentSequence=DicomSequence([finding])),
    ])


def _pr_content(
    ds: Dataset,
    *,
    patient: Patient,
    study: Study,
    image_series: str,
    referenced: Dataset,
    rows: int,
    columns: int,
    window: tuple[float, float],
) -> None:
    image = _item(ReferencedSOPClassUID=referenced.ReferencedSOPClassUID,
                  ReferencedSOPInstanceUID=referenced.ReferencedSOPInstanceUID)
    ds.ContentLabel = "ANNOTATIONS"
    ds.ContentDescription = f"Annotations for {patient.name_text}"
    ds.PresentationCreationDate = study.study_date
    ds.PresentationCreationTime = _content_time(study)
    ds.ContentCreatorName = study.operator
    ds.ReferencedSeriesSequence = DicomSequence([
        _item(SeriesInstanceUID=image_series, ReferencedImageSequence=DicomSequence([image])),
    ])
    ds.DisplayedAreaSelectionSequence = DicomSequence([
        _item(DisplayedAreaTopLeftHandCorner=[1, 1], DisplayedAreaBottomRightHandCorner=[columns, rows],
              PresentationSizeMode="SCALE TO FIT", PresentationPixelAspectRatio=[1, 1]),
    ])
    ds.GraphicLayerSequence = DicomSequence([_item(GraphicLayer="TEXT", GraphicLayerOrder=1)])
    text = _item(
        BoundingBoxAnnotationUnits="PIXEL", BoundingBoxTopLeftHandCorner=[10.0, 10.0],
        BoundingBoxBottomRightHandCorner=[300.0, 40.0], BoundingBoxTextHorizontalJustification="LEFT",
        UnformattedTextValue=f"{patient.name_text} {patient.patient_id}",
    )
    ds.GraphicAnnotationSequence = DicomSequence([
        _item(GraphicLayer="TEXT", ReferencedImageSequence=DicomSequence([image]),
              TextObjectSequence=DicomSequence([text])),
    ])
    ds.SoftcopyVOILUTSequence = DicomSequence([
        _item(ReferencedImageSequence=DicomSequence([image]), WindowCenter=_ds(window[0]), WindowWidth=_ds(window[1])),
    ])
    ds.PresentationLUTShape = "IDENTITY"


# -- pixels ----------------------------------------------------------------------------------------------------


def _as_stored(pixels: np.ndarray, *, colour: bool, bits_stored: int, signed: bool) -> np.ndarray:
    array = np.asarray(pixels)
    if array.ndim == (3 if colour else 2):
        array = array[None]
    if array.ndim != (4 if colour else 3) or (colour and array.shape[-1] != 3):
        raise ValueError(f"pixels shaped {array.shape} do not fit frames x rows x columns{' x 3' if colour else ''}")
    low, high = _stored_range(bits_stored, signed)
    if array.size and (array.min() < low or array.max() > high):
        raise ValueError(f"pixels hold values outside the {bits_stored}-bit range [{low}, {high}]")
    return array.astype(_dtype(bits_stored, signed))


def _inverted(stored: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    low, high = _stored_range(bits_stored, signed)
    return (low + high - stored.astype(np.int32)).astype(stored.dtype)


def _auto_window(modality: str, stored: np.ndarray, rescale: tuple[float, float] | None) -> tuple[float, float]:
    if modality == "CT":
        return 40.0, 400.0  # mediastinal window, in HU
    slope, intercept = rescale or (1.0, 0.0)
    low, high = np.percentile(stored, [0.5, 99.5]) * slope + intercept
    return float(low + high) / 2, max(float(high - low), 2.0)


def _burn(frame: np.ndarray, lines: Sequence[str], photometric: str, bits_stored: int, signed: bool) -> np.ndarray:
    """Blend text into one frame at the stored value that displays white, as a console stamps it."""
    low, high = _stored_range(bits_stored, signed)
    rows, columns = frame.shape[:2]
    size_px = max(12, round(min(rows, columns) / 32))
    canvas = burn_patient_text(np.zeros((rows, columns), np.uint8), lines, size_px=size_px)
    alpha = canvas.astype(np.float32) / 255
    ink: float | np.ndarray = low if photometric == "MONOCHROME1" else high
    if frame.ndim == 3:
        alpha = alpha[:, :, None]
        # White: full R, G and B; or full luma and neutral chroma (8-bit YBR_FULL only, see make_dicom).
        ink = np.array([high, high, high] if photometric == "RGB" else [high, 128, 128], np.float32)
    blended = frame * (1 - alpha) + ink * alpha
    return np.clip(np.rint(blended), low, high).astype(frame.dtype)


def _set_pixels(ds: Dataset, stored: np.ndarray, *, photometric: str, bits_stored: int, transfer_syntax: str) -> None:
    if transfer_syntax == uids.JPEGBaseline8Bit:
        _set_jpeg_baseline(ds, stored, photometric)
        return
    ds.set_pixel_data(stored if len(stored) > 1 else stored[0], photometric, bits_stored, generate_instance_uid=False)
    if transfer_syntax in UNCOMPRESSED:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax == uids.JPEGLosslessSV1:
        fragments = [_jpeg_lossless_sv1(frame, photometric, bits_stored) for frame in stored]
        _set_encapsulated(ds, fragments, transfer_syntax)
    else:
        ds.compress(transfer_syntax, encoding_plugin=_PYDICOM_ENCODERS[transfer_syntax], generate_instance_uid=False)


def _set_encapsulated(ds: Dataset, fragments: list[bytes], transfer_syntax: str) -> None:
    ds.PixelData = encapsulate(fragments)
    element = ds["PixelData"]
    element.VR = "OB"
    element.is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = transfer_syntax


def _set_jpeg_baseline(ds: Dataset, stored: np.ndarray, photometric: str) -> None:
    colour = photometric in _COLOUR
    quality = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422]
    fragments = []
    for frame in stored:
        if colour:
            rgb = convert_color_space(frame, "YBR_FULL", "RGB") if photometric == "YBR_FULL" else frame
            frame = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".jpg", frame, quality)
        if not ok:
            raise RuntimeError("cv2.imencode could not encode a JPEG baseline frame")
        fragments.append(encoded.tobytes())
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "YBR_FULL_422" if colour else photometric
    if colour:
        ds.PlanarConfiguration = 0
    if len(stored) > 1:
        ds.NumberOfFrames = len(stored)
    ds.Rows, ds.Columns = stored.shape[1:3]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = _ds(stored.nbytes / sum(len(fragment) for fragment in fragments))
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    _set_encapsulated(ds, fragments, uids.JPEGBaseline8Bit)


def _jpeg_lossless_sv1(frame: np.ndarray, photometric: str, bits_stored: int) -> bytes:
    """One frame as JPEG lossless, first-order prediction (process 14, selection value 1), by GDCM.

    pydicom has no encoder for this syntax; GDCM's ImageChangeTransferSyntax has, fed the way pydicom's own GDCM
    RLE encoder feeds it (pydicom/pixels/encoders/gdcm.py).
    """
    import gdcm  # only this syntax needs it

    rows, columns = frame.shape[:2]
    writer = gdcm.ImageWriter()  # the image must belong to a writer that stays in scope (as in pydicom)
    image = writer.GetImage()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    kind = gdcm.PhotometricInterpretation.GetPIType(photometric)
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(kind))
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ImplicitVRLittleEndian))
    samples = 3 if frame.ndim == 3 else 1
    signed = int(frame.dtype.kind == "i")
    image.SetPixelFormat(gdcm.PixelFormat(samples, frame.dtype.itemsize * 8, bits_stored, bits_stored - 1, signed))
    if samples > 1:
        image.SetPlanarConfiguration(0)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetByteStringValue(np.ascontiguousarray(frame).tobytes())
    image.SetDataElement(element)
    converter = gdcm.ImageChangeTransferSyntax()
    converter.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(uids.JPEGLosslessSV1)))
    converter.SetInput(image)
    if not converter.Change():
        raise RuntimeError("GDCM could not encode JPEG lossless SV1")
    fragments = converter.GetOutput().GetDataElement().GetSequenceOfFragments()
    return b"".join(
        fragments.GetFragment(index).GetByteValue().GetBuffer().encode("utf-8", "surrogateescape")
        for index in range(fragments.GetNumberOfFragments())
    )


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read(data: bytes) -> pydicom.Dataset:
    """`data` parsed by pydicom (a convenience for tests)."""
    return pydicom.dcmread(io.BytesIO(data))
