"""A tabular reading's Struct in the stored form, and back: one place for the conversion.

Promised: every Struct the protocol allows stores without error and comes back exactly
(same keys, kinds and doubles bit for bit, -0.0 included), and the `data` column is
strict JSON, so SQLite's json functions read every row.

- numbers are doubles and are written as Python's shortest round-trip form (`5.0`,
  `1e+300`, `-0.0`), as `json_format` wrote them before;
- +Inf / -Inf are written `9e999` / `-9e999`: strict JSON that every reader (SQLite,
  Python's json) reads back as ±Inf;
- NaN has no JSON spelling: `data` holds `null` there, and the reading's Struct bytes
  are kept beside it (`data_exact`, NULL for every other row). The tabular and MQL paths
  read those bytes; SQL sees the `null` (docs/query-language.md).

SQL and MQL results travel as BSON, whose keys are C strings: a NUL in a key (valid in a
Struct) reads as U+FFFD there (`to_bson`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import bson
from bson.errors import InvalidDocument
from google.protobuf.struct_pb2 import Struct, Value

# A JSON string (skipped whole, so text inside strings is never touched) or one of the
# non-finite tokens Python's json writes.
_NON_FINITE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-Infinity|Infinity|NaN')
_STRICT = {"NaN": "null", "Infinity": "9e999", "-Infinity": "-9e999"}
# Struct numbers are doubles: a JSON integer (none are written; older tools may have)
# reads as one too, so BSON and Struct get what was meant and huge ones cannot overflow.
_DECODER = json.JSONDecoder(parse_int=float)


def python_value(value: Value) -> Any:
    """A Value as plain Python (numbers stay floats, NaN and ±Inf included)."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return python_struct(value.struct_value)
    if kind == "list_value":
        return [python_value(v) for v in value.list_value.values]
    if kind in ("number_value", "string_value", "bool_value"):
        return getattr(value, kind)
    return None  # null_value, or no kind set (read as null, as json_format does)


def python_struct(struct: Struct) -> dict[str, Any]:
    return {k: python_value(v) for k, v in struct.fields.items()}


def _has_nan(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isnan(obj)
    if isinstance(obj, dict):
        return any(_has_nan(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_nan(v) for v in obj)
    return False


def _strict_token(match: re.Match[str]) -> str:
    text = match.group(0)
    return _STRICT.get(text, text)


def encode_struct(struct: Struct) -> tuple[str, bytes | None]:
    """(`data` JSON text, `data_exact` bytes or None): the stored form of one reading."""
    obj = python_struct(struct)
    text = json.dumps(obj)
    if "NaN" not in text and "Infinity" not in text:
        return text, None  # cheap test; the regex below only runs when it may matter
    text = _NON_FINITE.sub(_strict_token, text)
    return text, struct.SerializeToString() if _has_nan(obj) else None


def decode_python(text: str, exact: bytes | None) -> dict[str, Any]:
    """The stored reading as plain Python, NaN restored where `data` says null."""
    if exact is not None:
        return python_struct(Struct.FromString(exact))
    value = _DECODER.decode(text)
    return value if isinstance(value, dict) else {}


def decode_struct(text: str, exact: bytes | None) -> Struct:
    """The stored reading as the Struct that was uploaded."""
    if exact is not None:
        return Struct.FromString(exact)
    out = Struct()
    out.update(decode_python(text, None))
    return out


def _nul_free(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k).replace("\x00", "\ufffd"): _nul_free(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nul_free(v) for v in value]
    return value


def to_bson(doc: Mapping[str, Any]) -> bytes:
    """A SQL/MQL result document as BSON, NUL in keys replaced rather than failing the query."""
    try:
        return bson.encode(doc)
    except InvalidDocument:
        return bson.encode(_nul_free(doc))
