"""A tabular reading's Struct in the stored form, and back: one place for the conversion.

Promised: every Struct the protocol allows stores without error and comes back exactly
(same keys, kinds and doubles bit for bit, -0.0 included), and a row's `data` as SQL sees
it (DATA_SQL; on SQLite new rows hold only the Struct bytes, see BYTES_ONLY) is strict
JSON, so SQLite's json functions read every row.

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
import sqlite3
import struct as _struct
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as _json_str
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
    """(`data` JSON text, `data_exact` bytes or None): the JSON form of one reading."""
    return stored_json(struct.SerializeToString())


def stored_json(exact: bytes) -> tuple[str, bytes | None]:
    """(`data` JSON text, `data_exact` bytes or None) of a reading's Struct bytes.

    Read straight from the wire bytes (`struct_json`), which gives the same text as the
    general path below, several times faster; a shape the fast reader does not take (an
    unset Value, a repeated key, ...) goes the general way."""
    try:
        text, nan = struct_json(exact)
    except _Unusual:
        return _encode_struct_general(Struct.FromString(exact))
    return text, exact if nan else None


# -- rows stored as Struct bytes alone -----------------------------------------------------
# `edged ingest` on SQLite stores a reading as its Struct bytes (`data_exact`) with `data`
# = BYTES_ONLY: writing JSON cost most of the ingest's CPU. Readers turn such a row back
# into the (JSON, NaN bytes) pair the JSON writer would have stored (`as_stored`, the
# same function of the same bytes), so every answer is what it was. An older row (JSON,
# data_exact only for NaN) never has `data` = '{}' with bytes beside it: a NaN row has a
# key. The MQL pushdown reads `data` raw: '{}' with data_exact set is one of the rows it
# passes to Python anyway (mql._JSON_OPAQUE).

BYTES_ONLY = "{}"

# The `data` JSON text of a row, in SQL (SQLite, with `register_sql_functions`).
DATA_SQL = (
    f"CASE WHEN data = '{BYTES_ONLY}' AND data_exact IS NOT NULL"
    " THEN edged_data(data, data_exact) ELSE data END"
)

_LAST: list[tuple[bytes, tuple[str, bytes | None]]] = [(b"", ("{}", None))]
"""The last row `as_stored` converted: a SQL query reading `data` twice in a row
(two json_extract calls) converts once. Replaced whole, so threads see one pair."""


def as_stored(data: str, exact: bytes | None) -> tuple[str, bytes | None]:
    """(`data`, `data_exact`) of a row as the JSON writer stores them: JSON text, and the
    Struct bytes only where a NaN reads as null."""
    if exact is None or data != BYTES_ONLY:
        return data, exact
    last = _LAST[0]
    if last[0] == exact:
        return last[1]
    form = stored_json(exact)
    _LAST[0] = (exact, form)
    return form


def _sql_data(data: Any, exact: Any) -> str | None:
    """`edged_data(data, data_exact)`: total, so a hand-written call cannot fail a query."""
    try:
        return as_stored(data, exact)[0]
    except Exception:  # bytes that are not a Struct, a value of another type
        return None


def register_sql_functions(conn: sqlite3.Connection) -> None:
    """What DATA_SQL calls, on a connection that reads `data` in SQL."""
    conn.create_function("edged_data", 2, _sql_data, deterministic=True)


def _encode_struct_general(struct: Struct) -> tuple[str, bytes | None]:
    obj = python_struct(struct)
    text = json.dumps(obj)
    if "NaN" not in text and "Infinity" not in text:
        return text, None  # cheap test; the regex below only runs when it may matter
    text = _NON_FINITE.sub(_strict_token, text)
    return text, struct.SerializeToString() if _has_nan(obj) else None


# -- the fast reader: Struct wire bytes -> the stored JSON text ---------------------------
# Struct = repeated (1: entry {1: key, 2: Value}); Value = oneof null_value (1, varint),
# number_value (2, fixed64), string_value (3), bool_value (4, varint), struct_value (5),
# list_value (6: ListValue = repeated 1: Value). The text is what json.dumps writes for
# python_struct() (keys in wire order, which is the map's order; ", " and ": "
# separators; ASCII escapes; floats by repr), with NaN -> null and +-Inf -> +-9e999.


class _Unusual(Exception):
    """The bytes hold a shape the fast reader leaves to the general path."""


_DOUBLE = _struct.Struct("<d").unpack_from


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Unusual
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(start, end) of the length-delimited field body whose length prefix is at pos."""
    n = buf[pos] if pos < end else 0x80
    if n < 0x80:
        pos += 1
    else:
        n, pos = _varint(buf, pos)
    if pos + n > end:
        raise _Unusual
    return pos, pos + n


def struct_json(buf: bytes) -> tuple[str, bool]:
    """(JSON text, whether a NaN was written as null) of an encoded Struct."""
    nan = [False]
    try:
        return _struct_text(buf, 0, len(buf), nan), nan[0]
    except (IndexError, UnicodeDecodeError):
        raise _Unusual from None


def _struct_text(buf: bytes, pos: int, end: int, nan: list[bool]) -> str:
    parts = []
    keys = set()
    while pos < end:
        stop, key, vstart = _next_entry(buf, pos, end)
        if key in keys:
            raise _Unusual  # a repeated key: the last one wins, and keeps the first place
        keys.add(key)
        head = _KEY_TEXT.get(key) or _key_text(key)
        if buf[vstart] == 0x11 and vstart + 9 == stop:  # a number, the usual value
            x = _DOUBLE(buf, vstart + 1)[0]
            parts.append(head + (repr(x) if x - x == 0 else _non_finite(x, nan)))
        else:
            parts.append(head + _value_text(buf, vstart, stop, nan))
        pos = stop
    return "{" + ", ".join(parts) + "}"


_KEY_TEXT: dict[bytes, str] = {}
"""Encoded key -> its JSON text and ": ". Readings of one component repeat their keys."""
_KEY_TEXT_MAX = 4096
_KEY_CACHED_BYTES = 64  # with the count: the cache holds at most ~1 MiB of keys


def _key_text(key: bytes) -> str:
    text = str(_json_str(key.decode())) + ": "
    if len(key) <= _KEY_CACHED_BYTES:
        if len(_KEY_TEXT) >= _KEY_TEXT_MAX:
            _KEY_TEXT.clear()  # a caller sending ever new keys only loses the cache
        _KEY_TEXT[key] = text
    return text


def _next_entry(buf: bytes, pos: int, end: int) -> tuple[int, bytes, int]:
    """(end, key, Value start) of the map entry at pos: the usual short entry (entry: 0x0A
    len, key: 0x0A len key, value: 0x12 len Value, one-byte lengths) read inline."""
    n, kl = buf[pos + 1], buf[pos + 3]
    if buf[pos] != 0x0A or n >= 0x80 or kl >= 0x80 or buf[pos + 2] != 0x0A:
        return _entry(buf, pos, end)  # a long entry (or not an entry)
    stop = pos + 2 + n
    kstop = pos + 4 + kl
    if buf[kstop] != 0x12 or kstop + 2 + buf[kstop + 1] != stop or stop > end:
        return _entry(buf, pos, end)
    return stop, buf[pos + 4 : kstop], kstop + 2


def _entry(buf: bytes, pos: int, end: int) -> tuple[int, bytes, int]:
    """(end, key, Value start) of the map entry at pos, any length prefixes."""
    if buf[pos] != 0x0A:
        raise _Unusual
    start, stop = _length(buf, pos + 1, end)
    if start >= stop or buf[start] != 0x0A:
        raise _Unusual
    kstart, kstop = _length(buf, start + 1, stop)
    if kstop >= stop or buf[kstop] != 0x12:
        raise _Unusual  # no Value
    vstart, vstop = _length(buf, kstop + 1, stop)
    if vstop != stop:
        raise _Unusual
    return stop, buf[kstart:kstop], vstart


def _non_finite(x: float, nan: list[bool]) -> str:
    if math.isnan(x):
        nan[0] = True
        return "null"
    return "9e999" if x > 0 else "-9e999"


def _value_text(buf: bytes, pos: int, end: int, nan: list[bool]) -> str:
    if pos >= end:
        raise _Unusual  # no kind set
    tag = buf[pos]
    if tag == 0x11:
        if pos + 9 != end:
            raise _Unusual
        x = _DOUBLE(buf, pos + 1)[0]
        return repr(x) if x - x == 0 else _non_finite(x, nan)
    if tag == 0x1A:
        start, stop = _length(buf, pos + 1, end)
        if stop != end:
            raise _Unusual
        return str(_json_str(buf[start:stop].decode()))
    if tag in (0x20, 0x08):
        value, stop = _varint(buf, pos + 1)
        if stop != end:
            raise _Unusual
        if tag == 0x08:
            return "null"
        return "true" if value else "false"
    if tag in (0x2A, 0x32):
        start, stop = _length(buf, pos + 1, end)
        if stop != end:
            raise _Unusual
        if tag == 0x2A:
            return _struct_text(buf, start, stop, nan)
        return _list_text(buf, start, stop, nan)
    raise _Unusual


def _list_text(buf: bytes, pos: int, end: int, nan: list[bool]) -> str:
    parts = []
    while pos < end:
        if buf[pos] != 0x0A:
            raise _Unusual
        start, stop = _length(buf, pos + 1, end)
        parts.append(_value_text(buf, start, stop, nan))
        pos = stop
    return "[" + ", ".join(parts) + "]"


def decode_python(text: str, exact: bytes | None) -> dict[str, Any]:
    """The stored reading as plain Python, NaN restored where `data` says null."""
    if exact is not None and text == BYTES_ONLY:
        value = _bytes_python(exact)
        if value is not None:
            return value
    text, exact = as_stored(text, exact)
    if exact is not None:
        return python_struct(Struct.FromString(exact))
    value = _DECODER.decode(text)
    return value if isinstance(value, dict) else {}


def decode_struct(text: str, exact: bytes | None) -> Struct:
    """The stored reading as the Struct that was uploaded."""
    value = _bytes_python(exact) if exact is not None and text == BYTES_ONLY else None
    if value is None:
        text, exact = as_stored(text, exact)
        if exact is not None:
            return Struct.FromString(exact)
        value = decode_python(text, None)
    out = Struct()
    out.update(value)
    return out


def _bytes_python(exact: bytes) -> dict[str, Any] | None:
    """What decoding `struct_json(exact)`'s text gives, read from the bytes directly (no
    JSON in between); None where that text is not the answer (a NaN, an unusual shape)."""
    nan = [False]
    try:
        value = _struct_py(exact, 0, len(exact), nan)
    except (_Unusual, IndexError, UnicodeDecodeError):
        return None
    return None if nan[0] else value


def _struct_py(buf: bytes, pos: int, end: int, nan: list[bool]) -> dict[str, Any]:
    """`_struct_text`, yielding the values instead of their JSON (same checks)."""
    out: dict[str, Any] = {}
    while pos < end:
        stop, key, vstart = _next_entry(buf, pos, end)
        name = key.decode()
        if name in out:
            raise _Unusual
        if buf[vstart] == 0x11 and vstart + 9 == stop:
            x = _DOUBLE(buf, vstart + 1)[0]
            if math.isnan(x):
                nan[0] = True
            out[name] = x
        else:
            out[name] = _value_py(buf, vstart, stop, nan)
        pos = stop
    return out


def _value_py(buf: bytes, pos: int, end: int, nan: list[bool]) -> Any:
    if pos >= end:
        raise _Unusual
    tag = buf[pos]
    if tag == 0x11:
        if pos + 9 != end:
            raise _Unusual
        x = _DOUBLE(buf, pos + 1)[0]
        if math.isnan(x):
            nan[0] = True
        return x
    if tag == 0x1A:
        start, stop = _length(buf, pos + 1, end)
        if stop != end:
            raise _Unusual
        return buf[start:stop].decode()
    if tag in (0x20, 0x08):
        value, stop = _varint(buf, pos + 1)
        if stop != end:
            raise _Unusual
        return None if tag == 0x08 else bool(value)
    if tag in (0x2A, 0x32):
        start, stop = _length(buf, pos + 1, end)
        if stop != end:
            raise _Unusual
        if tag == 0x2A:
            return _struct_py(buf, start, stop, nan)
        items = []
        while start < stop:
            if buf[start] != 0x0A:
                raise _Unusual
            vstart, vstop = _length(buf, start + 1, stop)
            items.append(_value_py(buf, vstart, vstop, nan))
            start = vstop
        return items
    raise _Unusual


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
