"""Limits declared once with their `edged ingest` flag; the CLI is derived from them."""

from __future__ import annotations

from dataclasses import field, fields
from typing import Any


def flag_field(default: Any, flag: str, help: str, kind: str = "float") -> Any:
    """A dataclass field carrying its flag, help and kind: "size" (bytes, 64KiB style),
    "int" (>= 0), "count" (>= 1) or "float" (seconds or a rate, > 0)."""
    return field(default=default, metadata={"flag": flag, "help": help, "kind": kind})


def flagged(cls: type) -> list[tuple[str, str, str, str, Any]]:
    """(field name, flag, help, kind, default) of every flagged field of a dataclass."""
    return [
        (f.name, f.metadata["flag"], f.metadata["help"], f.metadata["kind"], f.default)
        for f in fields(cls)
        if "flag" in f.metadata
    ]
