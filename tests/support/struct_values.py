"""Hypothesis strategies for arbitrary Struct contents: the values a robot's tabular
reading may hold, for the property tests of how ingest stores them."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)


def structs(text: st.SearchStrategy[str] = TEXT) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts of None, bools, floats and `text`, nested in lists and dicts."""
    leaf = st.none() | st.booleans() | st.floats() | text
    values = st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
        max_leaves=20,
    )
    return st.dictionaries(text, values, max_size=6)
