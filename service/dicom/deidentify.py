"""Header de-identification by DICOM PS3.15 Annex E: the Basic Application Level Confidentiality Profile, applied
in place to a data set and every sequence item in it, once per image in the event path.

What happens to each element:

- Elements listed in Table E.1-1 get the action `service.dicom.profile` chose for their code (X remove, Z empty,
  D dummy, U keyed UID; Z/D, X/D, X/Z/D -> dummy; X/Z -> empty; X/Z/U* -> keep the reference sequence and apply the
  profile inside it). A sequence whose action is D or Z becomes an empty sequence (a dummy item would be invented
  content); X removes it. The action follows the tag, whatever the element's VR or value: a malformed value (a bad
  date, an undecodable name, a wrong length, VR UN) is removed, emptied or replaced like a well-formed one.
- Elements not in the table are kept, as the standard says, except private elements (odd groups), removed at every
  depth.
- Dummies are valid for their VR: "ANONYMOUS" (PN, AE), "ANONYMIZED" (text, CS), 19000101 / 000000 (dates, times),
  "000Y" (AS), 0 (numbers), empty bytes (OB, OW, UN ...), the mapped UID (UI). UR and AT have no neutral value and
  are emptied. Elements without a VR (implicit VR files) or with VR UN get the dictionary VR of their tag when it is
  known. A sequence pydicom cannot parse cannot be checked for identifying content, so it is removed.
- UIDs (every U, and D on a UI) are replaced by a keyed mapping: the same UID and secret give the same new UID in
  every process, with no shared state, so studies and references stay consistent across pods.
- Dates are removed, not shifted: the profile's own D/Z/X actions on dates and times, recorded as
  LongitudinalTemporalInformationModified = REMOVED.
- PatientName and PatientID become a keyed pseudonym of the original PatientID, so one patient's images stay linked.
- PatientIdentityRemoved, DeidentificationMethod and DeidentificationMethodCodeSequence record what was done.
  BurnedInAnnotation is the caller's: only it knows whether the pixels are clean.

Element values are patient data: this module raises nothing about them and logs nothing, and pydicom's warnings
(which quote values) are silenced while it works. pydicom also logs through its own logger, which must stay disabled
in the workers (service.dicom.read disables it).
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from service.dicom.profile import TABLE_EDITION, Action, action_for

#: The pseudonym when neither an ID nor a name and birth date identify the patient: every such image shares it.
UNKNOWN_PATIENT = "ANONYMOUS"
# 32 hex characters: 128 bits of the keyed digest, well within PN and LO (64 characters).
_PSEUDONYM_LENGTH = 32

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY_BY_VR: Mapping[str, object] = MappingProxyType(
    {
        "PN": "ANONYMOUS",
        "AE": "ANONYMOUS",
        # 10 characters: fits SH and CS (16), and CS's upper-case alphabet.
        **dict.fromkeys(("LO", "SH", "LT", "ST", "UT", "UC", "CS"), _DUMMY_TEXT),
        "DA": "19000101",
        "TM": "000000",
        "DT": "19000101000000",
        "AS": "000Y",
        "IS": "0",
        "DS": "0",
        **dict.fromkeys(("US", "SS", "UL", "SL", "UV", "SV"), 0),
        **dict.fromkeys(("FL", "FD"), 0.0),
        **dict.fromkeys(("OB", "OW", "OD", "OF", "OL", "OV", "UN"), b""),
    }
)

_BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
_CLEAN_PIXEL_DATA_CODE = ("113101", "Clean Pixel Data Option")
# DeidentificationMethod is LO (64 characters a value), so each part of the description is one value.
_PROFILE_DESCRIPTION = f"DICOM PS3.15 E.1 Basic Profile (table E.1-1 {TABLE_EDITION})"
_CLEAN_PIXEL_DATA_DESCRIPTION = "Clean Pixel Data Option"
_DATES_DESCRIPTION = "Dates removed"
_TOOL_DESCRIPTION = "xray-pipeline"

_PATIENT_NAME = BaseTag(0x00100010)
_PATIENT_ID = BaseTag(0x00100020)
_PATIENT_BIRTH_DATE = BaseTag(0x00100030)
_SOP_INSTANCE_UID = BaseTag(0x00080018)
# Characters around a stored text or UID value that carry no meaning (padding to even length, or NUL for UIDs).
_PADDING = " \x00"


def map_uid(secret: bytes, uid: str) -> str:
    """The keyed replacement of `uid`: a `2.25.` UID (a UUID as an integer, PS3.5 B.2) derived from
    HMAC-SHA256(secret, "uid" NUL uid), the same in every process for the same secret and UID."""
    digest = hmac.new(secret, b"uid\x00" + uid.encode(), hashlib.sha256).digest()
    # An RFC 9562 version 8 ("custom") UUID: 122 bits of the digest with the version and variant bits set. (pydicom's
    # generate_uid(prefix=None) ignores its entropy sources and returns a random UUID, so it cannot be used here.)
    value = int.from_bytes(digest[:16], "big")
    value = (value & ~(0xF << 76)) | (0x8 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return f"2.25.{value}"


def patient_pseudonym(secret: bytes, ds: pydicom.Dataset) -> str:
    """The keyed pseudonym of the patient of `ds`: the first 32 hex characters of
    HMAC-SHA256(secret, "patient" NUL PatientID), or of PatientName NUL PatientBirthDate when there is no PatientID;
    `UNKNOWN_PATIENT` when none of them is present."""
    with _pydicom_silenced():
        identity = _text_of(ds, _PATIENT_ID)
        if not identity:
            name, birth_date = _text_of(ds, _PATIENT_NAME), _text_of(ds, _PATIENT_BIRTH_DATE)
            if not name and not birth_date:
                return UNKNOWN_PATIENT
            identity = f"{name}\x00{birth_date}"
    digest = hmac.new(secret, b"patient\x00" + identity.encode(), hashlib.sha256).hexdigest()
    return digest[:_PSEUDONYM_LENGTH]


def deidentify(ds: pydicom.Dataset, *, secret: bytes, pixels_cleaned: bool) -> None:
    """In place: apply the basic profile to every element (nested too), remove private elements, replace
    UIDs by the keyed mapping, set the patient pseudonym and the de-identification flags; update
    ds.file_meta.MediaStorageSOPInstanceUID when file_meta exists. PixelData is left untouched."""
    with _pydicom_silenced():
        # From the original identity, before the profile empties it.
        pseudonym = patient_pseudonym(secret, ds)
        _apply_profile(ds, secret)
        _put(ds, "PatientName", pseudonym)
        _put(ds, "PatientID", pseudonym)
        _record_deidentification(ds, pixels_cleaned)
        file_meta = getattr(ds, "file_meta", None)
        if file_meta is not None:
            _update_media_storage_uid(ds, file_meta, secret)


@contextmanager
def _pydicom_silenced() -> Iterator[None]:
    # pydicom warns about malformed values by quoting them; those are patient data, and malformed values are
    # expected here (the profile treats them by their tag anyway).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _apply_profile(ds: pydicom.Dataset, secret: bytes) -> None:
    # The tags are collected first: elements are removed and replaced as we go.
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            continue
        action = action_for(tag)
        element = ds.get_item(tag)
        vr = _vr_of(tag, element)
        if action is None or action is Action.KEEP_REFERENCES:
            if vr == "SQ":
                _apply_to_items(ds, tag, secret)
            elif action is Action.KEEP_REFERENCES:
                # The table's fallback for a reference attribute that is not a sequence: an empty value.
                ds[tag] = DataElement(tag, vr, empty_value_for_VR(vr))
        elif action is Action.REMOVE:
            del ds[tag]
        elif action is Action.EMPTY or vr == "SQ":
            ds[tag] = DataElement(tag, vr, empty_value_for_VR(vr))
        elif action is Action.REMAP_UID or vr == "UI":
            ds[tag] = DataElement(tag, "UI", [map_uid(secret, uid) for uid in _uids_of(element)])
        else:
            ds[tag] = DataElement(tag, vr, _DUMMY_BY_VR.get(vr, empty_value_for_VR(vr)))


def _apply_to_items(ds: pydicom.Dataset, tag: BaseTag, secret: bytes) -> None:
    try:
        items = ds[tag].value
    except Exception:
        items = None
    if not isinstance(items, Sequence):
        # A sequence that cannot be parsed cannot be checked for identifying content: it goes.
        del ds[tag]
        return
    for item in items:
        _apply_profile(item, secret)


def _vr_of(tag: BaseTag, element: DataElement | RawDataElement) -> str:
    vr = element.VR
    # No VR (implicit VR files) or UN: the action is the tag's, and the dictionary knows the tag's real VR.
    if vr is None or vr == "UN":
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return "UN"
    # Ambiguous dictionary VRs ("US or SS", "OB or OW"): an empty value or a dummy is valid in any of them.
    return vr.split(" or ")[0]


def _uids_of(element: DataElement | RawDataElement) -> list[str]:
    """The UIDs an element holds, read without pydicom's value conversion (which may refuse a malformed value)."""
    value = element.value
    if value is None:
        return []
    if isinstance(value, bytes):
        # UIDs are ASCII by definition; Latin-1 decodes any byte, so a malformed value still maps deterministically.
        values = value.decode("latin-1").split("\\")
    elif isinstance(value, str):
        values = [value]
    else:
        values = [str(uid) for uid in value]
    return [stripped for uid in values if (stripped := uid.strip(_PADDING))]


def _text_of(ds: pydicom.Dataset, tag: BaseTag) -> str:
    if tag not in ds:
        return ""
    try:
        # Decoded with the data set's character set, so one patient's name gives one pseudonym whatever the encoding.
        value = ds[tag].value
    except Exception:
        value = ds.get_item(tag).value
    if value is None:
        return ""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return text.strip(_PADDING)


def _put(ds: pydicom.Dataset, keyword: str, value: object) -> None:
    # A fresh element with the dictionary VR: assigning to an existing element would keep its VR, which may be UN.
    tag = tag_for_keyword(keyword)
    ds[tag] = DataElement(tag, dictionary_VR(tag), value)


def _code_item(code: tuple[str, str]) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodeMeaning = code
    item.CodingSchemeDesignator = "DCM"
    return item


def _record_deidentification(ds: pydicom.Dataset, pixels_cleaned: bool) -> None:
    descriptions = [_PROFILE_DESCRIPTION]
    codes = [_BASIC_PROFILE_CODE]
    if pixels_cleaned:
        descriptions.append(_CLEAN_PIXEL_DATA_DESCRIPTION)
        codes.append(_CLEAN_PIXEL_DATA_CODE)
    descriptions += [_DATES_DESCRIPTION, _TOOL_DESCRIPTION]
    _put(ds, "PatientIdentityRemoved", "YES")
    _put(ds, "LongitudinalTemporalInformationModified", "REMOVED")
    _put(ds, "DeidentificationMethod", descriptions)
    _put(ds, "DeidentificationMethodCodeSequence", [_code_item(code) for code in codes])


def _update_media_storage_uid(ds: pydicom.Dataset, file_meta: pydicom.Dataset, secret: bytes) -> None:
    if _SOP_INSTANCE_UID in ds:
        file_meta.MediaStorageSOPInstanceUID = ds[_SOP_INSTANCE_UID].value
    elif "MediaStorageSOPInstanceUID" in file_meta:
        # No SOPInstanceUID to copy: the original must not stay in the header, so it gets the same mapping.
        file_meta.MediaStorageSOPInstanceUID = map_uid(secret, str(file_meta.MediaStorageSOPInstanceUID))
