"""Retention's pure parts: the flag's value and the cutoff it gives (the deletes
themselves are in test_storage_contract.py, on both backends)."""

from __future__ import annotations

import pytest

from edged.ingest.retention import cutoff_ns, parse_retention


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("400d", 400 * 86400.0), ("1d", 86400.0), ("36h", 36 * 3600.0), ("90m", 5400.0)],
)
def test_parse_retention(text: str, seconds: float) -> None:
    assert parse_retention(text) == seconds


@pytest.mark.parametrize(
    ("text", "says"),
    [("0d", "longer than 0"), ("0", "longer than 0"), ("1y", "not a retention"), ("", "not a")],
)
def test_bad_retention_is_one_sentence(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_retention(text)


def test_cutoff_is_now_minus_retention_in_ns() -> None:
    assert cutoff_ns(1_000_000.5, 400_000.0) == 600_000_500_000_000
