"""Output keys: processed paths, keyed pseudonyms, anonymized keys that keep nothing of the original."""

from __future__ import annotations

import pytest
from conftest import HOSTILE_KEYS, key_fragments

from service.outputs import anonymized_key, failure_key, processed_key, pseudonym

SECRET = b"s" * 32


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("a/b/scan.jpeg", "a/b/scan-processed.jpeg"),
        ("scan.png", "scan-processed.png"),
        ("no-extension", "no-extension-processed"),
        ("dir.with.dots/scan", "dir.with.dots/scan-processed"),
        ("Jürgen Groß/a+b 100%.tar.jpg", "Jürgen Groß/a+b 100%.tar-processed.jpg"),
    ],
)
def test_processed_key(key: str, expected: str) -> None:
    assert processed_key(key) == expected


def test_pseudonyms_are_keyed_stable_and_distinct() -> None:
    first = pseudonym(SECRET, "in", HOSTILE_KEYS[0])
    assert first == pseudonym(SECRET, "in", HOSTILE_KEYS[0])
    assert first != pseudonym(SECRET, "other", HOSTILE_KEYS[0])
    assert first != pseudonym(b"t" * 32, "in", HOSTILE_KEYS[0])
    assert len(first) == 32 and all(c in "0123456789abcdef" for c in first)


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_anonymized_key_keeps_only_the_extension(key: str) -> None:
    alias = pseudonym(SECRET, "in", key)
    anonymized = anonymized_key(alias, key, "jpeg")
    assert anonymized.startswith(alias)
    suffix = anonymized.removeprefix(alias)
    assert suffix in {".jpg", ".jpeg", ".png"}
    for fragment in key_fragments(key):
        assert fragment not in anonymized


def test_unknown_extensions_are_replaced_by_the_format() -> None:
    assert anonymized_key("p", "scan.Anna", "png") == "p.png"
    assert anonymized_key("p", "scan", "jpeg") == "p.jpg"
    assert anonymized_key("p", "scan.JPEG", "jpeg") == "p.jpeg"
    assert failure_key("p") == "_failed/p.json"
