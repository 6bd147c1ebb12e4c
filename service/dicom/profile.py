"""The action this service takes on every attribute of DICOM PS3.15 Table E.1-1 (Basic Application Level
Confidentiality Profile), read once at import from the table maintained in `dicom-anonymizer` (2026c edition).

The table lists a code per attribute; where the standard offers a choice (Z/D, X/Z, X/D, X/Z/D, X/Z/U*), the choice
is made here, once, so that applying the profile is one dictionary look-up per element:

- X -> remove; Z -> empty (zero length); D -> dummy of the same VR; U -> keyed UID mapping.
- Z/D, X/D, X/Z/D -> dummy: a dummy is conformant whatever the attribute's type in its IOD (a Type 1 attribute may
  be neither empty nor absent), and the caller's objects must stay valid.
- X/Z -> empty: the permitted choice that keeps Type 2 attributes present.
- X/Z/U* (the reference sequences: Referenced Image, Source Image) -> keep the sequence and apply the profile inside
  it, so its UIDs are mapped (U) and the references stay consistent within the de-identified set.

Repeating groups are entries with masks in the table: Curve Data (50xx,eeee: every element of the groups
0x5000-0x50FF) and Overlay Data / Overlay Comments (60xx,3000 / 60xx,4000 for the groups 0x6000-0x60FF). They get
their action in every group of the range.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

#: The edition of PS3.15 Table E.1-1 the actions come from.
TABLE_EDITION = "2026c"


class Action(enum.Enum):
    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    REMAP_UID = "U"
    #: Keep the sequence; its items get the profile like the top level (X/Z/U*).
    KEEP_REFERENCES = "X/Z/U*"


# The table's categories as dicom-anonymizer names them, and what we do for each (see the module docstring).
_ACTION_OF_CATEGORY: Mapping[str, Action] = MappingProxyType(
    {
        "X_TAGS": Action.REMOVE,
        "Z_TAGS": Action.EMPTY,
        "D_TAGS": Action.DUMMY,
        "U_TAGS": Action.REMAP_UID,
        "Z_D_TAGS": Action.DUMMY,
        "X_Z_TAGS": Action.EMPTY,
        "X_D_TAGS": Action.DUMMY,
        "X_Z_D_TAGS": Action.DUMMY,
        "X_Z_U_STAR_TAGS": Action.KEEP_REFERENCES,
    }
)
# The union of all the others, not a category of its own.
_UNION_CATEGORY = "ALL_TAGS"

_ONE_ELEMENT = 0xFFFF
_WHOLE_GROUP = 0x0000


def _groups_matching(group: int, group_mask: int) -> list[int]:
    return [candidate for candidate in range(0x10000) if candidate & group_mask == group & group_mask]


def _add(actions: dict[int, Action], key: int, action: Action, category: str) -> None:
    # A tag listed twice with different actions means the table's format or content changed under us: stop at
    # import rather than guess which action protects the patient.
    if actions.setdefault(key, action) is not action:
        raise RuntimeError(f"PS3.15 table {TABLE_EDITION}: {key:#x} has two actions (second in {category})")


def _build_actions(
    table: Mapping[str, Iterable[tuple[int, ...]]],
) -> tuple[Mapping[int, Action], Mapping[int, Action]]:
    """Return (action by tag, action by whole group) from the table's categories."""
    by_tag: dict[int, Action] = {}
    by_group: dict[int, Action] = {}
    for category, entries in table.items():
        if category == _UNION_CATEGORY:
            continue
        if category not in _ACTION_OF_CATEGORY:
            raise RuntimeError(f"PS3.15 table {TABLE_EDITION}: category {category} has no action in this service")
        action = _ACTION_OF_CATEGORY[category]
        for entry in entries:
            if len(entry) == 2:
                group, element = entry
                _add(by_tag, (group << 16) | element, action, category)
                continue
            group, element, group_mask, element_mask = entry
            for matching_group in _groups_matching(group, group_mask):
                if element_mask == _ONE_ELEMENT:
                    _add(by_tag, (matching_group << 16) | element, action, category)
                elif element_mask == _WHOLE_GROUP:
                    _add(by_group, matching_group, action, category)
                else:
                    raise RuntimeError(f"PS3.15 table {TABLE_EDITION}: element mask {element_mask:#x} not supported")
    return MappingProxyType(by_tag), MappingProxyType(by_group)


_ACTION_BY_TAG, _ACTION_BY_GROUP = _build_actions(dicom_anonymization_database_selector(f"dicomfields_{TABLE_EDITION}"))


def action_for(tag: int) -> Action | None:
    """The profile's action for an element, or None when the table does not list it (the element is kept)."""
    return _ACTION_BY_TAG.get(tag) or _ACTION_BY_GROUP.get(tag >> 16)
